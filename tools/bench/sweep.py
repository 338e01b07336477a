"""Launch-config sweeps: one kernel timed over a grid of launch settings, as the bench times it (GPU).

    python -m tools.bench sweep decode  [--shapes 64x4096,1x131072] [--kv bf16,e4m3] [--page 16] [--heads 32/8]
                                        [--head-size 128] [--q-len 1,8] [--varlen] --sweep "kv_heads=1,4;block_n=32,64"
                                        [--compiled]
    python -m tools.bench sweep prefill [--shapes "4x(2048+2048),1x16384"] [--kv bf16,e4m3] [--page 16,64]
                                        [--fp8-query] --sweep "block_m=64,128;block_n=64,128;warps=4,8;stages=2,3"
    python -m tools.bench sweep cache   [--tokens 16384] [--kv auto,fp8_e4m3,fp8_e5m2_per_token_head] [--scales head]
                                        --sweep "block_rows=16,32,64;warps=4,8"

A sweep spec is ``;``-separated fields, each ``name=v1,v2,...``; its settings are the product of the fields, and
``--sweep`` may repeat (the settings of each are run in turn: ``--sweep "block_n=64;stages=3" --sweep
"block_n=128;warps=8"`` runs two). Field names are those of the kernel's launch config (``sweep KIND --help``
lists them); ``warps``, ``stages`` and ``splits`` stand for ``num_warps``, ``num_stages`` and ``num_splits``. A
setting replaces those fields of the config the kernel's chooser picks for the case (``dataclasses.replace``),
and the sweep passes it to the package's ``launch_<op>(..., config=...)`` on arguments normalised by the
package's own checks (nothing is monkeypatched). The first row of every case is the chooser's config
("chosen"); a setting the kernel refuses (an assertion, out of resources) prints its error and the sweep goes on.

Times and inputs are the bench's (:mod:`.timing`, :mod:`.inputs`, the ``measure_*`` functions of the case
modules: rotated inputs past L2, CUDA events, each row's output spot-checked against the reference); rates are
fractions of the ceiling measured first (:func:`.ceilings.copy_bandwidth` for decode and the cache writer, the
bf16 :func:`.ceilings.matmul_rate` for prefill).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import itertools
import sys
from collections.abc import Callable

__all__ = ["KINDS", "check_fields", "describe_compiled", "main", "parse_sweep", "run_sweep"]

# Short field names of a sweep spec.
ALIASES = {"warps": "num_warps", "stages": "num_stages", "splits": "num_splits"}


def parse_sweep(text: str) -> list[dict[str, int]]:
    """The settings of one sweep spec: ``"kv_heads=1,4;block_n=32,64"`` -> ``[{"kv_heads": 1, "block_n": 32},
    {"kv_heads": 1, "block_n": 64}, {"kv_heads": 4, "block_n": 32}, {"kv_heads": 4, "block_n": 64}]`` (short names
    expanded: ``warps`` -> ``num_warps``). An empty spec is no setting."""
    fields: dict[str, list[int]] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, sep, values = part.partition("=")
        name = ALIASES.get(name.strip(), name.strip())
        try:
            numbers = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            numbers = []
        if not sep or not name or not numbers:
            raise ValueError(f"--sweep: expected 'name=v1,v2,...' with integer values, got {part.strip()!r}")
        if name in fields:
            raise ValueError(f"--sweep: field {name!r} given twice in {text!r}")
        fields[name] = numbers
    return [dict(zip(fields, values)) for values in itertools.product(*fields.values())] if fields else []


def check_fields(settings: list[dict[str, int]], config_class: type) -> None:
    """Every field of ``settings`` is one of ``config_class``'s."""
    known = [f.name for f in dataclasses.fields(config_class)]
    for setting in settings:
        unknown = sorted(set(setting) - set(known))
        if unknown:
            raise ValueError(f"--sweep: {config_class.__name__} has no field {unknown}; its fields: {known}")


def _describe(config) -> str:
    return ",".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config))


# --- decode ---------------------------------------------------------------------------------------------------


def _decode_cases(args) -> list:
    from .cases_decode import DecodeSpec

    hq, hkv = (int(x) for x in args.heads.split("/"))
    return [
        DecodeSpec(
            n, ctx, hq=hq, hkv=hkv, d=args.head_size, block=page, kv_dtype=kv, per_token=args.per_token, q_len=q_len,
            varlen=args.varlen,
        )  # fmt: skip
        for n, ctx in (_pair(s) for s in _split(args.shapes))
        for q_len in (int(x) for x in _split(args.q_len))
        for page in (int(p) for p in _split(args.page))
        for kv in _split(args.kv)
    ]


def _attention_features(
    cache, q, out, cu_seqlens_q, max_seqlen_q: int, max_seqlen_k: int, causal: bool, q_descale=None
):
    """The normalised arguments the packages' ops launch with (``kvflash.attn_common.check_attention_call``)."""
    from kvflash.attn_common import check_attention_call

    return check_attention_call(
        q, cache.k, cache.v, cache.seqused_k.shape[0], cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, block_table=cache.block_table, seqused_k=cache.seqused_k, cu_seqlens_k=None,
        softmax_scale=None, causal=causal, window_size=None, softcap=0.0, alibi_slopes=None, s_aux=None,
        k_descale=cache.k_descale, v_descale=cache.v_descale, output_scale=None, kv_descale_per_token=None, out=out,
        q_descale=q_descale,
    )  # fmt: skip


def _decode_chosen(spec, setting: dict[str, int]):
    """The chooser's config; a setting's ``num_splits`` is the chooser's ``num_splits`` (at most that many), as
    a caller's would be, before the setting replaces the fields it names."""
    import torch

    from kvflash.attn_common import platform
    from kvflash.paged_decode.launch_config import choose_paged_decode_config

    return choose_paged_decode_config(
        num_seqs=spec.num_seqs, num_kv_heads=spec.hkv, group=spec.hq // spec.hkv, head_size=spec.d,
        kv_itemsize=1 if spec.kv_dtype != "bf16" else 2, max_seqlen_k=spec.ctx, window_left=-1,
        num_splits=setting.get("num_splits", 0), per_token_scales=spec.per_token, max_seqlen_q=spec.q_len,
        multiprocessor_count=platform.multiprocessor_count(torch.device("cuda")),
        interpreter=platform.interpreter_enabled(),
    )  # fmt: skip


def _decode_measure(spec, config):
    import torch

    from kvflash.paged_decode.op import launch_paged_decode

    from .cases_decode import measure_decode, query_offsets

    # --varlen: the query ranges at q_len 1 too, as flash_attn_varlen_func passes them (the USE_CU_SEQLENS_Q build)
    cu_q = None if spec.q_len == 1 and not spec.varlen else query_offsets(spec)

    def bind(cache, q, out):
        f = _attention_features(cache, q, out, cu_q, spec.q_len, spec.ctx, causal=True)
        lse = torch.empty(spec.hq, q.shape[0], dtype=torch.float32, device=q.device)
        # As the op passes them: num_splits 0 (automatic; the chooser's input, unused with a config), no deferred
        # sequences.
        return functools.partial(
            launch_paged_decode, q, cache.k, cache.v, cache.block_table, cache.seqused_k, None, cu_q, f.k_descale,
            f.v_descale, f.alibi_slopes, f.s_aux, out, lse, spec.q_len, spec.ctx, f.softmax_scale, f.window_left,
            f.window_right, f.softcap, 0, False, f.output_scale, config=config,
        )  # fmt: skip

    return measure_decode(spec, bind)


# --- prefill --------------------------------------------------------------------------------------------------


def _prefill_cases(args) -> list:
    from .cases_prefill import PrefillSpec

    hq, hkv = (int(x) for x in args.heads.split("/"))
    q_dtype = "e4m3" if args.fp8_query else "bf16"
    return [
        PrefillSpec(shape, kv_dtype=kv, block=page, d=args.head_size, hq=hq, hkv=hkv, q_dtype=q_dtype)
        for shape in _split(args.shapes, keep_parentheses=True)
        for page in (int(p) for p in _split(args.page))
        for kv in _split(args.kv)
    ]


def _prefill_chosen(spec, setting: dict[str, int]):
    from kvflash.attn_common import platform
    from kvflash.chunk_prefill.launch_config import choose_chunk_prefill_config

    max_q = max(q for q, _ in spec.seqs)
    return choose_chunk_prefill_config(
        spec.d, spec.kv_dtype != "bf16", spec.hq // spec.hkv, max_q, interpreter=platform.interpreter_enabled(),
        q_is_fp8=spec.q_dtype == "e4m3",
    )  # fmt: skip


def _prefill_measure(spec, config):
    from kvflash.chunk_prefill.op import launch_chunk_prefill

    from .cases_prefill import measure_prefill

    max_q, max_k = max(q for q, _ in spec.seqs), max(k for _, k in spec.seqs)

    def bind(cache, q, out, cu_q, q_descale=None):
        f = _attention_features(cache, q, out, cu_q, max_q, max_k, causal=spec.causal, q_descale=q_descale)
        return functools.partial(
            launch_chunk_prefill, q, cache.k, cache.v, out, None, cu_q, max_q, block_table=cache.block_table,
            seqused_k=cache.seqused_k, cu_seqlens_k=None, softmax_scale=f.softmax_scale, window_left=f.window_left,
            window_right=f.window_right, softcap=f.softcap, alibi_slopes=f.alibi_slopes, s_aux=f.s_aux,
            k_descale=f.k_descale, v_descale=f.v_descale, output_scale=f.output_scale, q_descale=f.q_descale,
            config=config,
        )  # fmt: skip

    return measure_prefill(spec, bind)


# --- cache writer ---------------------------------------------------------------------------------------------


def _cache_cases(args) -> list:
    from .cases_cache import CacheSpec

    return [
        CacheSpec(kv, tokens=args.tokens, hkv=args.kv_heads, d=args.head_size, block=page, scales=args.scales)
        for page in (int(p) for p in _split(args.page))
        for kv in _split(args.kv)
    ]


def _cache_chosen(spec, setting: dict[str, int]):
    from kvflash.fp8_utils.launch_config import choose_reshape_and_cache_config

    return choose_reshape_and_cache_config(spec.tokens * spec.hkv, spec.d)


def _cache_measure(spec, config):
    import torch

    from kvflash.fp8_utils.op import launch_reshape_and_cache

    from .cases_cache import measure_cache

    def bind(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
        # As the op passes them: scale tensors (the floats then 1.0), or None and the floats.
        tensors = k_scale is None or isinstance(k_scale, torch.Tensor)
        return functools.partial(
            launch_reshape_and_cache, key, value, key_cache, value_cache, slot_mapping,
            k_scale=k_scale if tensors else None, v_scale=v_scale if tensors else None,
            k_scale_value=1.0 if tensors else k_scale, v_scale_value=1.0 if tensors else v_scale,
            per_token_scales=spec.per_token, config=config,
        )  # fmt: skip

    return measure_cache(spec, bind)


# --- the sweep ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kernel's sweep: its launch config class (``module:Name``), its kernel (for ``--compiled``), the ceiling
    its rates are fractions of, and three functions: the cases of the command line (``cases(args)``), the chooser's
    config of a case (``chosen(case, setting)``) and one timed row (``measure(case, config or None)``)."""

    config: str
    kernel: str
    ceiling: str  # "copy" or "bf16_matmul"
    help: str
    cases: Callable
    chosen: Callable
    measure: Callable

    def config_class(self) -> type:
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)


KINDS = {
    "decode": Kind(
        config="kvflash.paged_decode.launch_config:PagedDecodeLaunchConfig",
        kernel="kvflash.paged_decode.kernel:paged_decode_kernel",
        ceiling="copy",
        help="paged decode (launch_paged_decode), one query per sequence",
        cases=_decode_cases,
        chosen=_decode_chosen,
        measure=_decode_measure,
    ),
    "prefill": Kind(
        config="kvflash.chunk_prefill.launch_config:ChunkPrefillLaunchConfig",
        kernel="kvflash.chunk_prefill.kernel:chunk_prefill_kernel",
        ceiling="bf16_matmul",
        help="chunked prefill (launch_chunk_prefill), paged, causal",
        cases=_prefill_cases,
        chosen=_prefill_chosen,
        measure=_prefill_measure,
    ),
    "cache": Kind(
        config="kvflash.fp8_utils.launch_config:ReshapeAndCacheLaunchConfig",
        kernel="kvflash.fp8_utils.kernel:reshape_and_cache_kernel",
        ceiling="copy",
        help="cache writer (launch_reshape_and_cache)",
        cases=_cache_cases,
        chosen=_cache_chosen,
        measure=_cache_measure,
    ),
}


def _split(text: str, keep_parentheses: bool = False) -> list[str]:
    """Comma-separated items; with ``keep_parentheses``, commas inside ``(...)`` do not split."""
    if not keep_parentheses:
        return [x.strip() for x in text.split(",") if x.strip()]
    items, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [x.strip() for x in items + [current] if x.strip()]


def _pair(shape: str) -> tuple[int, int]:
    """``"64x4096"`` -> (64, 4096): sequences x keys per sequence."""
    try:
        n, ctx = (int(x) for x in shape.split("x"))
    except ValueError:
        raise ValueError(f"--shapes: expected 'NUM_SEQSxKV_LEN' such as 64x4096, got {shape!r}") from None
    return n, ctx


def _case_label(spec) -> str:
    if hasattr(spec, "kv_cache_dtype"):  # the cache writer's
        scales = "" if spec.kv_cache_dtype == "auto" or spec.per_token else f" {spec.scales} scales"
        return f"{spec.tokens}x{spec.hkv}x{spec.d} p{spec.block} {spec.kv_cache_dtype}{scales}"
    label = f"{spec.shape} {spec.hq}/{spec.hkv} D{spec.d} p{spec.block} {spec.kv_dtype}"
    q_len = getattr(spec, "q_len", 1)
    label += f" q_len {q_len}" * (q_len > 1) + " cu_seqlens_q" * getattr(spec, "varlen", False)
    return label + " per-token-head" * getattr(spec, "per_token", False)


def describe_compiled(kernel) -> list[str]:
    """Registers, spills and shared memory of each compiled variant of a ``@triton.jit`` kernel (best effort:
    the cache layout is Triton's own)."""
    lines = []
    for cache in getattr(kernel, "device_caches", {}).values():
        variants = next((c for c in cache if isinstance(c, dict)), {})
        for compiled in variants.values():
            md = compiled.metadata
            ttgir = compiled.asm.get("ttgir", "")
            mma = "v3" if "warp_group_dot" in ttgir else "v2" if "nvidia_mma" in ttgir else "?"
            lines.append(
                f"  variant warps={md.num_warps} stages={md.num_stages} regs={getattr(compiled, 'n_regs', '?')} "
                f"spills={getattr(compiled, 'n_spills', '?')} shared={md.shared} "
                f"async_copies={ttgir.count('async_copy_global_to_local')} mma={mma}"
            )
    return lines


def run_sweep(kind: str, args, settings: list[dict[str, int]], log=print) -> list[dict]:
    """Time every case of ``args`` with the chooser's config, then with each setting; print and return the rows."""
    import torch

    from .analysis import CHECK_TOL
    from .ceilings import copy_bandwidth, matmul_rate

    sweep = KINDS[kind]
    ceiling = copy_bandwidth() if sweep.ceiling == "copy" else matmul_rate(fp8=False)
    unit, per_ms = ("GB/s", 1e6) if sweep.ceiling == "copy" else ("TFLOP/s", 1e9)
    log(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {sweep.ceiling} {ceiling['value']:.1f} {unit}")
    rows = []
    for case in sweep.cases(args):
        label = _case_label(case)
        chosen = sweep.chosen(case, {})
        log(f"\n{kind} {label}: chosen {_describe(chosen)}")
        chosen_ms = None
        for setting in [None, *settings]:
            config = None if setting is None else dataclasses.replace(sweep.chosen(case, setting), **setting)
            name = "chosen" if setting is None else ",".join(f"{k}={v}" for k, v in setting.items())
            row = {"case": label, "setting": name, "config": _describe(config or chosen), "error": None}
            rows.append(row)
            try:
                m = sweep.measure(case, config)
            except Exception as exc:  # a setting the kernel refuses: report it, go on with the next
                row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc) else ''}"
                log(f"  {name:<36} failed: {row['error']}")
                continue
            rate = m.work / m.ms / per_ms
            chosen_ms = m.ms if setting is None else chosen_ms
            row.update(ms=m.ms, rate=rate, frac=rate / ceiling["value"], rel_err=m.rel_err, note=m.note)
            versus = f"{chosen_ms / m.ms:5.2f}x chosen" if chosen_ms else ""
            check = "-" if m.rel_err is None else f"{m.rel_err:.1e}" + " WRONG" * (m.rel_err > CHECK_TOL)
            log(f"  {name:<36} {m.ms:9.4f} ms {rate:8.1f} {unit} {100 * row['frac']:5.1f} %  {versus}  check {check}"
                f" {m.note}".rstrip())  # fmt: skip
    if args.compiled:
        module, attr = sweep.kernel.split(":")
        log(f"\ncompiled variants of {attr}:")
        for line in describe_compiled(getattr(importlib.import_module(module), attr)):
            log(line)
    return rows


def _fields_help(kind: Kind) -> str:
    module, name = kind.config.split(":")
    try:
        fields = ", ".join(f.name for f in dataclasses.fields(kind.config_class()))
    except (ImportError, AttributeError):  # the package is not importable here: name the class instead
        return f"those of {name} ({module})"
    return f"{fields} ({name})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench sweep",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="kind", required=True, metavar="{decode,prefill,cache}")
    for kind, spec in KINDS.items():
        p = sub.add_parser(kind, help=spec.help, description=f"Sweep the launch config of the {spec.help}.")
        p.add_argument(
            "--sweep", action="append", default=[], metavar="SPEC",
            help="settings 'field=v1,v2;field=v1,...' (their product; repeatable); without it only the chosen "
            f"config runs. Fields: {_fields_help(spec)}",
        )  # fmt: skip
        p.add_argument("--compiled", action="store_true", help="print each compiled kernel variant's registers")
        if kind == "decode":
            p.add_argument("--shapes", default="64x4096", help="NUM_SEQSxKV_LEN, comma-separated (default 64x4096)")
            p.add_argument("--kv", default="bf16,e4m3", help="KV dtypes among bf16,e4m3,e5m2 (default bf16,e4m3)")
            p.add_argument("--per-token", action="store_true", help="per-token-head descales (FP8 KV only)")
            p.add_argument(
                "--q-len", default="1", help="queries per sequence, comma-separated (speculative decode: 2..16)"
            )
            p.add_argument(
                "--varlen", action="store_true",
                help="pass cu_seqlens_q at q_len 1 too, as flash_attn_varlen_func does (the kernel build that reads "
                "each sequence's query range)",
            )  # fmt: skip
        elif kind == "prefill":
            p.add_argument(
                "--shapes", default="4x(2048+2048)",
                help="N x (context + new) or NxL, comma-separated, or the bench's names (default 4x(2048+2048))",
            )  # fmt: skip
            p.add_argument("--kv", default="bf16,e4m3", help="KV dtypes among bf16,e4m3,e5m2 (default bf16,e4m3)")
            p.add_argument(
                "--fp8-query", action="store_true",
                help="fp8 e4m3 queries with q_descale (FP8 KV only; the launch config's pv_fp8=0,1 picks the PV dot)",
            )  # fmt: skip
        else:
            p.add_argument("--tokens", type=int, default=16384, help="tokens written per call (default 16384)")
            p.add_argument("--kv-heads", type=int, default=8, help="KV heads (default 8)")
            p.add_argument(
                "--kv", default="auto,fp8_e4m3",
                help="kv_cache_dtype strings, e.g. auto,fp8_e4m3,fp8_e5m2,fp8_e4m3_per_token_head (default "
                "auto,fp8_e4m3)",
            )  # fmt: skip
            p.add_argument(
                "--scales", default="tensor", choices=["tensor", "head", "float"],
                help="FP8 scales: one-element tensors, [Hkv] tensors or Python floats (default tensor)",
            )  # fmt: skip
        if kind in ("decode", "prefill"):
            p.add_argument("--heads", default="32/8", help="query heads / KV heads (default 32/8)")
        p.add_argument("--head-size", type=int, default=128, help="D (default 128)")
        p.add_argument("--page", default="16", help="page sizes, comma-separated (default 16)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = [s for text in args.sweep for s in parse_sweep(text)]
        check_fields(settings, KINDS[args.kind].config_class())
    except ValueError as exc:
        parser.error(str(exc))
    import torch

    if not torch.cuda.is_available():
        print("no GPU: the sweeps time CUDA kernels", file=sys.stderr)
        return 2
    run_sweep(args.kind, args, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How fast the Hopper prefill kernel's producer and its consumers run, each without the other (GPU; FP8 cache).

    python3 -m tools.prefill_isolation [--shapes "4x(2048+2048),1x16384"] [--kv e4m3-q,e4m3] [--page 16]

Over an e4m3 cache with an fp8 query (``e4m3-q``: PV on fp8 operands) or a bf16 one (``e4m3``: the exact path, the
query split in two e4m3 terms, PV in fp16), a producer fills a two-slot K/V ring and two consumer warpgroups run the
wgmma and the softmax, on the same SMs. For the fp8 query the producer is one warpgroup that gathers the K/V tiles by
cp.async and transposes V; for the bf16 query (D 128) a one-warp TMA loader and a 4-warp V widener
(``hopper_tma_loader``). To tell which side holds the pair, the tool times three builds of ``kvflash.chunk_prefill``
on the bench's inputs (``tools/prefill_case.py``):

* ``landed``: the package as it is;
* ``producer alone``: a copy whose consumers only wait for each K and V slot and hand it back (no MMA, no softmax:
  the fp8 step ``_consumer_step_pv_fp8`` and the 16-bit item walk ``item_tiles_pv16`` rewritten);
* ``consumers alone``: a copy whose producer hands the slots out without loading them (no gathers, V neither
  transposed nor widened; the consumers compute on whatever the ring holds): the cp.async producer's
  ``_load_item_k_as_stored`` rewritten, and both queries sent to it (``hopper_op`` chooses no TMA loader), so the
  bf16 query's consumers are timed beside an idle producer too.

The last two compute wrong outputs by design: only their times mean something. Each build runs in a subprocess of
its own (one process imports one ``kvflash.chunk_prefill``) and is timed like the bench (``time_calls``, median of
CUDA-event times); rates are TFLOP/s over the causal (query, key) pairs, ``4 * Hq * D`` each. The copies are written
by rewrites located in the current source (``tools/source_edits.py``): a kernel change that moves what they look
for fails loudly, and ``tests/tools/test_prefill_isolation.py`` builds both copies from the current source.
``docs/chunk_prefill_perf.md`` (session 20) reads these numbers.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import textwrap

from tools.prefill_case import ROOT, copy_package, prefill_case, use_copy

VARIANTS = ("landed", "producer alone", "consumers alone")

# What the producer-alone consumers do with key tile g: wait for its K and V slots and hand them back.
_HAND_BACK_TILE = """s = g % STAGES
ph = (g // STAGES) & 1
mbarrier.wait(k_ready.index(s), ph)
mbarrier.arrive(k_empty.index(s))
mbarrier.wait(v_ready.index(s), ph)
mbarrier.arrive(v_empty.index(s))
"""
# The producer-alone fp8 step (the landed step's signature, this body) and 16-bit item walk (likewise).
_HANDS_BACK = ('    """Producer alone (tools/prefill_isolation.py): hand tile g\'s K and V slots back."""\n'
               + textwrap.indent(_HAND_BACK_TILE, "    ") + "    return s_acc, o, m_i, l_i\n\n\n")
_HANDS_BACK_ITEM = ('    """Producer alone (tools/prefill_isolation.py): hand the item\'s K and V slots back."""\n'
                    "    for j in range(n_tiles):\n        g = it + j\n" + textwrap.indent(_HAND_BACK_TILE, " " * 8)
                    + "    mbarrier.arrive(q_empty_bar)\n    return o, m_i, l_i\n\n\n")


def _function(source: str, name: str) -> tuple[int, int, str]:
    """``(start, end, signature)`` of the top-level function ``name`` in ``source``: its ``def`` line(s) through
    ``):`` and its text up to the next top-level decorator (or the end)."""
    start = source.find(f"def {name}(")
    if start < 0:
        raise RuntimeError(f"no function {name!r} to rewrite")
    end = source.find("\n\n\n@gluon.jit", start)
    return start, len(source) if end < 0 else end, source[start:source.index("):\n", start) + 3]


def _statement(source: str, start: int, end: int, call: str) -> str:
    """The text of the first statement in ``source[start:end]`` that begins with a call of ``call`` (from its line's
    start through its closing parenthesis and newline)."""
    at = source.find(f"{call}(", start, end)
    if at < 0:
        raise RuntimeError(f"no call of {call!r} to remove")
    line = source.rindex("\n", 0, at) + 1
    depth, i = 0, at
    while True:
        depth += {"(": 1, ")": -1}.get(source[i], 0)
        if source[i] == ")" and depth == 0:
            return source[line:source.index("\n", i) + 1]
        i += 1


def _replaced_body(source: str, name: str, body: str) -> tuple:
    """(anchor, replacement): function ``name`` keeps its signature and gets ``body``; the landed one stays,
    renamed ``<name>_landed`` and unused."""
    _, _, signature = _function(source, name)
    landed = signature.replace(f"def {name}(", f"def {name}_landed(", 1)
    return signature, signature + body + "@gluon.jit\n" + landed


def producer_alone_edits(key_tiles_source: str) -> tuple:
    """(anchor, replacement) pairs for ``hopper_key_tiles.py``, read from ``key_tiles_source``: the fp8 consumer step
    gets :data:`_HANDS_BACK` as its body and the fp8 item walk loses what comes before its steps (the first S's issue
    and turn); the 16-bit item walk (the bf16 query over an FP8 cache) gets :data:`_HANDS_BACK_ITEM`."""
    walk, walk_end, _ = _function(key_tiles_source, "item_tiles_pv_fp8")
    first = key_tiles_source.index("    s0 = it % STAGES\n", walk, walk_end)
    first_s = key_tiles_source[first:key_tiles_source.index("    if n_tiles > 1:\n", first, walk_end)]
    if "warpgroup_mma(" not in first_s:
        raise RuntimeError("hopper_key_tiles.py: item_tiles_pv_fp8 no longer starts by issuing the first S")
    return (
        _replaced_body(key_tiles_source, "_consumer_step_pv_fp8", _HANDS_BACK),
        (first_s, ""),
        _replaced_body(key_tiles_source, "item_tiles_pv16", _HANDS_BACK_ITEM),
    )


def consumers_alone_edits(producer_source: str) -> tuple:
    """(anchor, replacement) pairs for ``hopper_producer.py``, read from ``producer_source``: the K-as-stored FP8
    producer (``_load_item_k_as_stored``) issues no gathers and leaves V as staged (no transpose, no widening); it
    still waits for each free slot and publishes it. :func:`no_tma_loader_edits` sends the bf16 query to it."""
    start, end, _ = _function(producer_source, "_load_item_k_as_stored")
    first = _statement(producer_source, start, end, "_gather_kv")  # tile 0's, before the loop
    second = _statement(producer_source, producer_source.index(first, start) + len(first), end, "_gather_kv")
    v_start = producer_source.index("        if PV_FP8:", start, end)
    v_block = producer_source[v_start:producer_source.index("        fence_async_shared()\n", v_start, end)]
    return (
        (first, ""),
        (second, ""),
        (v_block, "        pass  # consumers alone: V neither transposed nor widened\n"),
    )


_TMA_LOADER_CHOICE = "    tma_loader = kv_fp8 and head_size in TMA_LOADER_HEAD_SIZES.get(q.dtype, ())\n"


def no_tma_loader_edits(op_source: str) -> tuple:
    """(anchor, replacement) pairs for ``hopper_op.py``: the bf16 query over an FP8 cache takes the cp.async producer
    (whose consumers-alone rewrite is :func:`consumers_alone_edits`) instead of the TMA loader; the consumers'
    registers are 208 either way."""
    if _TMA_LOADER_CHOICE not in op_source:
        raise RuntimeError("hopper_op.py: the TMA loader is no longer chosen by " + repr(_TMA_LOADER_CHOICE.strip()))
    replacement = "    tma_loader = False  # consumers alone: every FP8 query on the cp.async producer\n"
    return ((_TMA_LOADER_CHOICE, replacement),)


def build_variant(dest: pathlib.Path, variant: str) -> pathlib.Path:
    """Copy ``kvflash.chunk_prefill`` to ``dest/kvflash/chunk_prefill``, rewritten for ``variant`` (one of
    :data:`VARIANTS`); returns ``dest`` (the folder to put first on ``sys.path``). Raises if an anchor moved."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    rewrites = {"landed": {}, "producer alone": {"hopper_key_tiles.py": producer_alone_edits},
                "consumers alone": {"hopper_producer.py": consumers_alone_edits, "hopper_op.py": no_tma_loader_edits}}
    return copy_package(dest, rewrites[variant])


def _run_variant(variant: str, shapes: list[str], kinds: list[str], page: int) -> None:
    """In this process: build ``variant``, import it, time each shape and kind; print one JSON line each."""
    import torch

    folder = build_variant(pathlib.Path(tempfile.mkdtemp(prefix="kvflash_isolation_")), variant)
    use_copy(folder)  # before kvflash.chunk_prefill is imported: the copy is the package
    from tools.bench.timing import time_calls

    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in shapes:
        for kv in kinds:
            call, flops = prefill_case(shape, kv, page, gen)
            ms = time_calls([call]).ms
            print(json.dumps({"variant": variant, "shape": shape, "kv": kv, "ms": ms, "tflops": flops / ms / 1e9}),
                  flush=True)


KINDS = ("e4m3-q", "e4m3")  # the two queries that keep K fp8 for the fp8 QK^T dot (tools/prefill_case.py)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4x(2048+2048),1x16384", help="prefill shapes of tools.bench")
    parser.add_argument("--kv", default="e4m3-q,e4m3", help="e4m3-q (fp8 query) and/or e4m3 (bf16 query), e4m3 cache")
    parser.add_argument("--page", type=int, default=16, help="page size (default 16)")
    parser.add_argument("--variant", choices=VARIANTS, help="time one build in this process (used by the tool)")
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    kinds = [k for k in args.kv.split(",") if k]
    if any(k not in KINDS for k in kinds):
        parser.error(f"--kv: expected some of {KINDS}, got {args.kv!r}")
    if args.variant:
        _run_variant(args.variant, shapes, kinds, args.page)
        return

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("the tool times the Hopper kernel on an NVIDIA GPU; none is visible")
    print(f"{torch.cuda.get_device_name()} | e4m3 cache, page {args.page}, TFLOP/s")
    rates: dict[tuple[str, str, str], float] = {}
    for variant in VARIANTS:
        print(f"  timing {variant} ...", flush=True)
        done = subprocess.run([sys.executable, "-m", "tools.prefill_isolation", "--variant", variant, "--shapes",
                               args.shapes, "--kv", args.kv, "--page", str(args.page)], cwd=ROOT, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise SystemExit(f"{variant}: the timing run failed\n{done.stdout}{done.stderr}")
        for line in done.stdout.splitlines():
            if re.match(r"^\{.*\}$", line):
                row = json.loads(line)
                rates[(row["variant"], row["shape"], row["kv"])] = row["tflops"]
    print(f"  {'shape':16s} {'query':8s}" + "".join(f"{v:>17s}" for v in VARIANTS))
    for shape in shapes:
        for kv in kinds:
            query = "fp8" if kv.endswith("-q") else "bf16"
            print(f"  {shape:16s} {query:8s}" + "".join(f"{rates[(v, shape, kv)]:17.1f}" for v in VARIANTS))


if __name__ == "__main__":
    main()

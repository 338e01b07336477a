"""Chunked-prefill cases over the paged cache, and torch SDPA on the dense-equivalent bf16 problem.

Shapes (Hq/Hkv 32/8, D 128, causal bottom-right): 4 x (2048 context + 2048 new), 1 x 16384, and a mixed
batch of 120 decode rows (2048 keys) + 8 chunks of 512 new tokens over 1024 context. Full mode: bf16 and
e4m3 KV at block 16 and 64, e5m2 at block 16; quick mode: 4 x (2048 + 2048), bf16 + e4m3, block 16.

Work = 4 * Hq * D * visible (query, key) pairs; its ceiling is the bf16 matmul rate.

fp8-query rows (impl ``kvflash-q-fp8``): the bf16 query quantised by ``quantize_query`` per (sequence, KV head),
over the FP8 cache, both dots on fp8 tensor cores; compared with the bf16-KV row of the same shape. Their spot
check allows a larger error (``FP8_QUERY_CHECK_TOL``): P is rounded to e4m3 (3 mantissa bits).

SDPA (dense [B, H, S, D] tensors, GQA through ``enable_gqa`` or, if refused, K/V repeated to Hq heads):
- ``sdpa-cudnn``: cuDNN, ``is_causal`` over all ``kv_len`` queries (square). SDPA's ``is_causal`` is
  top-left, so for 2048 new over 2048 context this computes a 4096-long causal problem: its TFLOP/s
  count its own pairs, and the comparison is by rate (TFLOP/s), not by time.
- ``sdpa-cudnn-mask``: cuDNN with an explicit bottom-right boolean mask, the exact pairs kvflash
  computes; a mask may put cuDNN on another (slower) path, so targets compare with the faster cuDNN row.
- ``sdpa-flash``: FlashAttention-2 through ``aten._scaled_dot_product_flash_attention``, whose
  ``is_causal`` is bottom-right: the exact problem.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable

import torch

from .case import Case, Measurement, binder, measure
from .inputs import kv_bytes, make_paged_cache, spot_check, visible_pairs
from .timing import rotation_sets, time_calls

__all__ = ["PrefillSpec", "measure_prefill", "prefill_cases", "prefill_seqs"]

HQ, HKV, D = 32, 8, 128
# name -> per-sequence (q_len, kv_len)
SHAPES = {
    "4x(2048+2048)": [(2048, 4096)] * 4,
    "1x16384": [(16384, 16384)],
    "mixed 120x2048+8x(1024+512)": [(1, 2048)] * 120 + [(512, 1536)] * 8,
}
DENSE_SHAPES = ["4x(2048+2048)", "1x16384"]
FP8_KV = ["e4m3", "e5m2"]
# Off the primary configuration (full mode): head sizes 64 and 256, and full (non-causal) attention.
VARIANT_HEAD_SIZES = (64, 256)
NON_CAUSAL_SUFFIX = " non-causal"
# Relative error allowed in an fp8-query row's spot check: e4m3 probabilities carry about 2^-5.5 RMS relative error
# each, which random inputs (many comparable keys) do not average away.
FP8_QUERY_CHECK_TOL = 5e-2


@dataclasses.dataclass(frozen=True)
class PrefillSpec:
    shape: str
    kv_dtype: str = "bf16"
    block: int = 16
    varlen: bool = False  # through flash_attn_varlen_func instead of the op: measures the routing layer
    d: int = D
    causal: bool = True
    hq: int = HQ
    hkv: int = HKV
    q_dtype: str = "bf16"  # "e4m3": an fp8 query with q_descale (kv_dtype then FP8)

    @property
    def primary(self) -> bool:
        return (
            self.block == 16 and not self.varlen and (self.hq, self.hkv, self.d) == (HQ, HKV, D) and self.causal
            and self.q_dtype == "bf16"
        )  # fmt: skip

    @property
    def seqs(self) -> list[tuple[int, int]]:
        return prefill_seqs(self.shape)

    @property
    def label(self) -> str:
        """The row's shape label: the shape, marked when the attention is not causal."""
        return self.shape + ("" if self.causal else NON_CAUSAL_SUFFIX)

    def flops(self) -> int:
        pairs = sum(visible_pairs(q, k) if self.causal else q * k for q, k in self.seqs)
        return 4 * self.hq * self.d * pairs


def prefill_seqs(shape: str) -> list[tuple[int, int]]:
    """(q_len, kv_len) per sequence of a named shape (``SHAPES``), of ``"N x (context + new)"`` (``4x(2048+2048)``:
    4 sequences of 2048 new queries over 2048 cached keys) or of ``"N x L"`` (``1x16384``: no context)."""
    if shape in SHAPES:
        return SHAPES[shape]
    m = re.fullmatch(r"(\d+)x\((\d+)\+(\d+)\)", shape.replace(" ", ""))
    if m:
        n, context, new = (int(g) for g in m.groups())
        return [(new, context + new)] * n
    m = re.fullmatch(r"(\d+)x(\d+)", shape.replace(" ", ""))
    if m:
        n, length = (int(g) for g in m.groups())
        return [(length, length)] * n
    raise ValueError(f"shape: expected one of {list(SHAPES)}, 'Nx(context+new)' or 'NxL', got {shape!r}")


def _public_call(spec: PrefillSpec) -> Callable:
    """What a row times: ``chunk_prefill_attention``, or ``flash_attn_varlen_func`` for ``spec.varlen``."""
    max_q, max_k = max(q for q, _ in spec.seqs), max(k for _, k in spec.seqs)
    if not spec.varlen:
        from kvflash.chunk_prefill import chunk_prefill_attention

        return lambda cache, q, out, cu_q, q_descale=None: chunk_prefill_attention(
            q, cache.k, cache.v, cu_q, max_q, max_k, block_table=cache.block_table, seqused_k=cache.seqused_k,
            causal=spec.causal, k_descale=cache.k_descale, v_descale=cache.v_descale, out=out, q_descale=q_descale,
        )  # fmt: skip
    from kvflash.flash_attn_interface import flash_attn_varlen_func

    return lambda cache, q, out, cu_q, q_descale=None: flash_attn_varlen_func(
        q, cache.k, cache.v, max_q, cu_q, max_k, seqused_k=cache.seqused_k, causal=spec.causal,
        block_table=cache.block_table, out=out, k_descale=cache.k_descale, v_descale=cache.v_descale,
        q_descale=q_descale,
    )  # fmt: skip


def measure_prefill(spec: PrefillSpec, bind: Callable | None = None) -> Measurement:
    """Time the calls ``bind(cache, q, out, cu_seqlens_q)`` returns, one per rotated cache of ``spec`` (default:
    the public function, :func:`_public_call`), after a spot check of the first and last sequences of the first.
    The launch sweep binds ``launch_chunk_prefill`` with its own config."""
    if bind is None:
        bind = binder(_public_call(spec))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q_lens = [q for q, _ in spec.seqs]
    kv_lens = [k for _, k in spec.seqs]
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    cu_q = torch.tensor(cu, dtype=torch.int32, device="cuda")
    q_bytes = cu[-1] * spec.hq * spec.d * 2
    sets = []
    for _ in range(rotation_sets(kv_bytes(sum(kv_lens), spec.hkv, spec.d, spec.kv_dtype) + 2 * q_bytes)):
        cache = make_paged_cache(kv_lens, spec.hkv, spec.d, spec.block, spec.kv_dtype, gen)
        q = torch.randn(cu[-1], spec.hq, spec.d, dtype=torch.bfloat16, device="cuda", generator=gen)
        out = torch.full_like(q, float("nan"))
        if spec.q_dtype == "e4m3":
            from kvflash.fp8_utils import quantize_query

            q, q_descale = quantize_query(q, spec.hkv, granularity="per_sequence_kv_head", cu_seqlens_q=cu_q)
            sets.append((cache, q, out, cu_q, q_descale))
        else:
            sets.append((cache, q, out, cu_q))
    calls = [bind(*s) for s in sets]
    cache, q, out = sets[0][:3]
    q_descale = sets[0][4] if spec.q_dtype == "e4m3" else None
    last = len(spec.seqs) - 1
    slices = [(cu[0], cu[1], 0), (cu[last], cu[last + 1], last)]
    return measure(
        calls, spec.flops(), lambda: spot_check(out, q, cache, slices, causal=spec.causal, q_descale=q_descale)
    )


def _bottom_right_mask(q_len: int, kv_len: int) -> torch.Tensor:
    rows = torch.arange(q_len, device="cuda")[:, None] + (kv_len - q_len)
    return torch.arange(kv_len, device="cuda")[None, :] <= rows


def _sdpa_variants(impl: str, q_len: int, kv_len: int):
    """(label, fn(q, k, v, gqa) -> out) to try in order; q is [B, Hq, Sq, D], k/v [B, Hkv or Hq, Sk, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def cudnn(q, k, v, gqa, mask=None):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return sdpa(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)

    if impl == "sdpa-cudnn":
        return cudnn
    if impl == "sdpa-cudnn-mask":
        mask = _bottom_right_mask(q_len, kv_len)
        return functools.partial(cudnn, mask=mask)

    def flash(q, k, v, gqa):
        # aten's flash op takes the GQA head ratio natively; is_causal here is bottom-right.
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)[0]

    return flash


def _run_sdpa(impl: str, shape: str) -> Measurement:
    seqs = SHAPES[shape]
    batch, (q_len, kv_len) = len(seqs), seqs[0]
    if impl == "sdpa-cudnn":
        q_len = kv_len  # square causal: is_causal is top-left, exact only for q_len == kv_len
    gen = torch.Generator(device="cuda").manual_seed(0)
    fn = _sdpa_variants(impl, q_len, kv_len)
    set_bytes = 2 * (batch * q_len * HQ * D * 2) + 2 * (batch * kv_len * HKV * D * 2)
    sets = []
    for _ in range(rotation_sets(set_bytes)):
        # [B, S, H, D] storage viewed as [B, H, S, D], as engines and FlashAttention lay it out.
        q = torch.randn(batch, q_len, HQ, D, dtype=torch.bfloat16, device="cuda", generator=gen).transpose(1, 2)
        k = torch.randn(batch, kv_len, HKV, D, dtype=torch.bfloat16, device="cuda", generator=gen).transpose(1, 2)
        v = torch.randn(batch, kv_len, HKV, D, dtype=torch.bfloat16, device="cuda", generator=gen).transpose(1, 2)
        sets.append((q, k, v))
    note = "GQA native"
    try:
        fn(*sets[0], True)
        calls = [functools.partial(fn, *s, True) for s in sets]
    except RuntimeError as exc:
        note = f"K/V repeated to Hq heads (GQA refused: {str(exc).splitlines()[0][:80]})"
        group = HQ // HKV
        sets = [(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)) for q, k, v in sets]
        calls = [functools.partial(fn, *s, False) for s in sets]
    if impl == "sdpa-cudnn" and q_len != SHAPES[shape][0][0]:
        note += f"; square causal {q_len}x{kv_len} per sequence, rate compared"
    flops = 4 * HQ * D * batch * visible_pairs(q_len, kv_len)
    return Measurement.of(time_calls(calls), flops, note=note)


def _labels(impl: str, shape: str, kv_dtype: str, block: int | None, primary: bool, d: int = D) -> dict:
    labels = {
        "group": "prefill",
        "impl": impl,
        "shape": shape,
        "kv_dtype": kv_dtype,
        "hq": HQ,
        "hkv": HKV,
        "d": d,
        "block": block,
        "primary": primary,
        "metric": "flops",
    }
    if impl == "kvflash-q-fp8":
        labels["check_tol"] = FP8_QUERY_CHECK_TOL
    return labels


def _impl(spec: PrefillSpec) -> str:
    return "kvflash-q-fp8" if spec.q_dtype == "e4m3" else ("kvflash-varlen" if spec.varlen else "kvflash")


def prefill_cases(quick: bool) -> list[Case]:
    if quick:
        specs = [PrefillSpec("4x(2048+2048)", t) for t in ["bf16", "e4m3"]]
        specs += [PrefillSpec("4x(2048+2048)", "e4m3", q_dtype="e4m3")]
        sdpa = [(impl, "4x(2048+2048)") for impl in ["sdpa-cudnn", "sdpa-cudnn-mask"]]
    else:
        specs = [PrefillSpec(s, t, b) for s in SHAPES for b in [16, 64] for t in ["bf16", "e4m3"]]
        specs += [PrefillSpec(s, "e5m2") for s in SHAPES]
        specs += [PrefillSpec(s, varlen=True) for s in ["4x(2048+2048)", "mixed 120x2048+8x(1024+512)"]]
        specs += [PrefillSpec("4x(2048+2048)", t, d=d) for d in VARIANT_HEAD_SIZES for t in ["bf16", "e4m3"]]
        specs += [PrefillSpec("4x(2048+2048)", t, causal=False) for t in ["bf16", "e4m3"]]
        specs += [PrefillSpec(s, t, b, q_dtype="e4m3") for s in DENSE_SHAPES for b in [16, 64] for t in FP8_KV]
        sdpa = [(impl, s) for s in DENSE_SHAPES for impl in ["sdpa-cudnn", "sdpa-cudnn-mask", "sdpa-flash"]]
        sdpa = [(impl, s) for impl, s in sdpa if not (impl == "sdpa-cudnn-mask" and SHAPES[s][0][0] == SHAPES[s][0][1])]
    cases = [
        Case(
            f"prefill {s.label} b{s.block} {s.kv_dtype}"
            + " varlen" * s.varlen
            + f" D{s.d}" * (s.d != D)
            + " q-e4m3" * (s.q_dtype == "e4m3"),
            _labels(_impl(s), s.label, s.kv_dtype, s.block, s.primary, s.d),
            functools.partial(measure_prefill, s),
        )
        for s in specs
    ]
    for impl, shape in sdpa:
        labels = _labels(impl, shape, "bf16", None, True)
        cases.append(Case(f"prefill {shape} {impl} bf16", labels, functools.partial(_run_sdpa, impl, shape)))
    return cases

"""Paged decode cases: one query token per sequence over a paged bf16 / FP8 cache.

Full mode runs the primary configuration (Hq/Hkv 32/8, D 128, block 16) for every KV dtype and shape, block 64
on the large batches and on 1 x 131072, and variants on 64 x 4096: GQA 1 (8/8) and 8 (64/8), D 64, 80 (a padded
head, HEAD_PAD 128) and 256. Quick mode:
64 x 4096 and 1 x 131072, bf16 and e4m3, block 16.

Work = KV bytes of the tokens used (read once) + q + out (+ the float32 K and V scales of every token with
per-token-head descales, impl ``kvflash-per-token``, compared with the per-head FP8 row of the same shape: at most
1.10x its time, docs/design.md); its ceiling is the device-to-device copy. fp8-query rows (impl ``kvflash-q-fp8``,
``quantize_query`` per (sequence, KV head)) are compared with the bf16-query row of the same FP8 case (at most 1.0x
its time, docs/design.md); their work counts the query as bf16, like the row they are compared with.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

from .case import Case, Measurement, binder, measure
from .inputs import PagedCache, kv_bytes, make_paged_cache, spot_check
from .timing import rotation_sets

__all__ = ["DecodeSpec", "decode_cases", "measure_decode"]

LARGE_SHAPES = [(64, 4096), (128, 8192)]
SHAPES = LARGE_SHAPES + [(1, 131072), (4, 32768)]
DTYPES = ["bf16", "e4m3", "e5m2"]


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    num_seqs: int
    ctx: int
    hq: int = 32
    hkv: int = 8
    d: int = 128
    block: int = 16
    kv_dtype: str = "bf16"
    varlen: bool = False  # through flash_attn_varlen_func instead of the op: measures the routing layer
    per_token: bool = False  # per-token-head descales [num_blocks, block_size, Hkv] (FP8 only)
    q_len: int = 1  # queries per sequence (speculative-decode verification; the launch sweep's --q-len)
    q_fp8: bool = False  # an fp8 e4m3 query with q_descale (FP8 caches only)

    @property
    def primary(self) -> bool:
        return (self.hq, self.hkv, self.d, self.block, self.varlen, self.per_token, self.q_fp8) == (
            32, 8, 128, 16, False, False, False)  # fmt: skip

    @property
    def shape(self) -> str:
        return f"{self.num_seqs}x{self.ctx}"

    def work_bytes(self) -> int:
        q_and_out = 2 * self.num_seqs * self.q_len * self.hq * self.d * 2  # bf16 q read + bf16 out written
        return kv_bytes(self.num_seqs * self.ctx, self.hkv, self.d, self.kv_dtype, self.per_token) + q_and_out


def _specs(quick: bool) -> list[DecodeSpec]:
    if quick:
        return [DecodeSpec(b, c, kv_dtype=t) for b, c in [(64, 4096), (1, 131072)] for t in ["bf16", "e4m3"]] + [
            DecodeSpec(64, 4096, kv_dtype="e4m3", per_token=True),
            DecodeSpec(64, 4096, kv_dtype="e4m3", q_fp8=True),
        ]
    specs = [DecodeSpec(b, c, kv_dtype=t) for b, c in SHAPES for t in DTYPES]
    specs += [DecodeSpec(b, c, block=64, kv_dtype=t) for b, c in LARGE_SHAPES for t in DTYPES]
    # GQA 1 and 8 (4 is the primary), head sizes 64, 80 (padded to 128) and 256 (128 is the primary).
    for variant in [{"hq": 8}, {"hq": 64}, {"d": 64}, {"d": 80}, {"d": 256}]:
        specs += [DecodeSpec(64, 4096, kv_dtype=t, **variant) for t in DTYPES]
    specs += [DecodeSpec(1, 131072, block=64, kv_dtype=t) for t in ["bf16", "e4m3"]]
    specs += [DecodeSpec(64, 4096, kv_dtype=t, varlen=True) for t in ["bf16", "e4m3"]]
    specs += [DecodeSpec(b, c, kv_dtype=t, per_token=True) for b, c in SHAPES for t in ["e4m3", "e5m2"]]
    specs += [DecodeSpec(b, c, kv_dtype=t, q_fp8=True) for b, c in [(64, 4096), (1, 131072)] for t in ["e4m3", "e5m2"]]
    return specs


def _public_call(spec: DecodeSpec) -> Callable[[PagedCache, torch.Tensor, torch.Tensor], None]:
    """What a row times: ``paged_decode_attention``, or ``flash_attn_varlen_func`` for ``spec.varlen``."""
    cu_q = query_offsets(spec)
    if not spec.varlen:
        from kvflash.paged_decode import paged_decode_attention

        queries = {} if spec.q_len == 1 else dict(cu_seqlens_q=cu_q, max_seqlen_q=spec.q_len)
        return lambda cache, q, out, q_descale=None: paged_decode_attention(
            q, cache.k, cache.v, spec.ctx, block_table=cache.block_table, seqused_k=cache.seqused_k, causal=True,
            k_descale=cache.k_descale, v_descale=cache.v_descale, out=out, q_descale=q_descale, **queries,
        )  # fmt: skip
    from kvflash.flash_attn_interface import flash_attn_varlen_func

    return lambda cache, q, out: flash_attn_varlen_func(
        q, cache.k, cache.v, spec.q_len, cu_q, spec.ctx, seqused_k=cache.seqused_k, causal=True,
        block_table=cache.block_table, out=out, k_descale=cache.k_descale, v_descale=cache.v_descale,
    )  # fmt: skip


def query_offsets(spec: DecodeSpec) -> torch.Tensor:
    """``cu_seqlens_q [num_seqs + 1]`` int32 on the GPU: ``spec.q_len`` queries per sequence."""
    return torch.arange(0, (spec.num_seqs + 1) * spec.q_len, spec.q_len, dtype=torch.int32, device="cuda")


def measure_decode(spec: DecodeSpec, bind: Callable | None = None) -> Measurement:
    """Time the calls ``bind(cache, q, out)`` returns, one per rotated cache of ``spec`` (default: the public
    function, :func:`_public_call`), after a spot check of the first and last sequences of the first. The launch
    sweep binds ``launch_paged_decode`` with its own config."""
    if bind is None:
        bind = binder(_public_call(spec))
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache_bytes = kv_bytes(spec.num_seqs * spec.ctx, spec.hkv, spec.d, spec.kv_dtype, spec.per_token)
    sets = []
    for _ in range(rotation_sets(cache_bytes)):
        cache = make_paged_cache([spec.ctx] * spec.num_seqs, spec.hkv, spec.d, spec.block, spec.kv_dtype, gen,
                                 per_token=spec.per_token)  # fmt: skip
        q = torch.randn(spec.num_seqs * spec.q_len, spec.hq, spec.d, dtype=torch.bfloat16, device="cuda",
                        generator=gen)  # fmt: skip
        out = torch.full_like(q, float("nan"))
        if spec.q_fp8:
            from kvflash.fp8_utils import quantize_query

            offsets = query_offsets(spec)
            q, q_descale = quantize_query(q, spec.hkv, granularity="per_sequence_kv_head", cu_seqlens_q=offsets)
            sets.append((cache, q, out, q_descale))
        else:
            sets.append((cache, q, out))
    calls = [bind(*s) for s in sets]
    cache, q, out = sets[0][:3]
    q_descale = sets[0][3] if spec.q_fp8 else None
    last, n = spec.num_seqs - 1, spec.q_len
    checked = [(0, n, 0), (last * n, (last + 1) * n, last)]  # (first query row, end, sequence)
    return measure(calls, spec.work_bytes(), lambda: spot_check(out, q, cache, checked, q_descale=q_descale))


def decode_cases(quick: bool) -> list[Case]:
    cases = []
    for s in _specs(quick):
        labels = {
            "group": "decode",
            "impl": "kvflash-varlen"
            if s.varlen
            else "kvflash-per-token"
            if s.per_token
            else "kvflash-q-fp8"
            if s.q_fp8
            else "kvflash",
            "shape": s.shape,
            "kv_dtype": s.kv_dtype,
            "hq": s.hq,
            "hkv": s.hkv,
            "d": s.d,
            "block": s.block,
            "primary": s.primary,
            "metric": "bytes",
        }
        name = f"decode {s.shape} {s.hq}/{s.hkv} D{s.d} b{s.block} {s.kv_dtype}" + " varlen" * s.varlen
        name += " per-token-head" * s.per_token + " q-e4m3" * s.q_fp8
        cases.append(Case(name, labels, functools.partial(measure_decode, s)))
    return cases

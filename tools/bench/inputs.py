"""Benchmark inputs built on the GPU: a fragmented paged KV cache (bf16 or FP8 with per-(sequence, head)
descales), the work counts (bytes, FLOPs), and a spot check of one output slice against the oracle.

The cache is filled with random values (never zeros: they can run faster than real data) and its block
table is a random permutation of the pool, as a long-running server's cache is.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = [
    "KV_DTYPES",
    "PagedCache",
    "make_paged_cache",
    "visible_pairs",
    "kv_bytes",
    "spot_check",
]

KV_DTYPES = {"bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# Random fill is done in slices so an FP8 cache never needs a bf16 copy of itself.
_FILL_ELEMENTS = 1 << 28


@dataclasses.dataclass
class PagedCache:
    """``k, v [num_blocks, block_size, Hkv, D]``; ``block_table [num_seqs, max_blocks]`` int32;
    ``seqused_k [num_seqs]`` int32; ``k_descale, v_descale [num_seqs, Hkv]`` float32 (None for bf16), or
    per-token-head ``[num_blocks, block_size, Hkv]`` float32."""

    k: torch.Tensor
    v: torch.Tensor
    block_table: torch.Tensor
    seqused_k: torch.Tensor
    k_descale: torch.Tensor | None
    v_descale: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def _fill_random(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flat = t.view(-1)
    for start in range(0, flat.numel(), _FILL_ELEMENTS):
        part = flat[start : start + _FILL_ELEMENTS]
        part.copy_(torch.randn(part.shape, dtype=torch.bfloat16, device=t.device, generator=gen))
    return t


def make_paged_cache(
    kv_lens: list[int], hkv: int, d: int, block: int, kv_dtype: str, gen: torch.Generator, per_token: bool = False
) -> PagedCache:
    """A paged cache holding ``kv_lens[s]`` tokens for sequence ``s``, pages scattered over the pool.

    FP8 caches get different, non-unit K and V descales per (sequence, KV head), as engines pass them; with
    ``per_token``, one per stored (token, KV head) instead (``[num_blocks, block_size, Hkv]``).
    """
    device = gen.device
    num_seqs = len(kv_lens)
    max_blocks = max(1, -(-max(kv_lens) // block))
    num_blocks = num_seqs * max_blocks + 1
    dtype = KV_DTYPES[kv_dtype]
    k = _fill_random(torch.empty(num_blocks, block, hkv, d, dtype=dtype, device=device), gen)
    v = _fill_random(torch.empty(num_blocks, block, hkv, d, dtype=dtype, device=device), gen)
    pool = torch.randperm(num_blocks, device=device, generator=gen)
    block_table = pool[: num_seqs * max_blocks].view(num_seqs, max_blocks).to(torch.int32)
    seqused_k = torch.tensor(kv_lens, dtype=torch.int32, device=device)
    k_descale = v_descale = None
    if kv_dtype != "bf16":
        rows = (num_blocks, block, hkv) if per_token else (num_seqs, hkv)
        k_descale = 0.5 + torch.rand(rows, device=device, generator=gen)
        v_descale = 0.25 + 0.5 * torch.rand(rows, device=device, generator=gen)
    return PagedCache(k, v, block_table, seqused_k, k_descale, v_descale)


def cu_seqlens(lengths: list[int], device: torch.device | str) -> torch.Tensor:
    """``[len(lengths) + 1]`` int32 offsets of each sequence's first token (``cu_seqlens_q``), from 0."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def visible_pairs(q_len: int, kv_len: int) -> int:
    """(query, key) pairs a bottom-right causal sequence computes: query ``i`` sees ``kv_len - q_len + i + 1`` keys."""
    return q_len * (kv_len - q_len) + q_len * (q_len + 1) // 2


def kv_bytes(tokens: int, hkv: int, d: int, kv_dtype: str, per_token: bool = False) -> int:
    """Bytes of K and V for ``tokens`` tokens (read once), with ``per_token`` their float32 K and V scales."""
    scale_bytes = 2 * tokens * hkv * 4 if per_token else 0
    return 2 * tokens * hkv * d * KV_DTYPES[kv_dtype].itemsize + scale_bytes


def spot_check(
    out: torch.Tensor,
    q: torch.Tensor,
    cache: PagedCache,
    slices: list[tuple[int, int, int]],
    rows: int = 64,
    causal: bool = True,
    q_descale: torch.Tensor | None = None,
) -> tuple[float | None, str]:
    """Largest ||out - ref|| / ||ref|| over the last ``rows`` queries of each ``(q_start, q_end, seq)``.

    The last queries of a bottom-right causal sequence are themselves a valid sub-problem (same key
    positions; without ``causal`` every query sees every key), so the float32 oracle runs on that slice only and
    stays cheap at 131072 keys. A check
    that cannot run returns ``(None, why)``: the timing still counts, the row says it was not checked.
    """
    try:
        return max(_slice_error(out, q, cache, *s, rows, causal, q_descale) for s in slices), ""
    except Exception as exc:  # the oracle is not what is measured: report, do not lose the timing
        return None, f"not checked ({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})"


def _slice_error(
    out: torch.Tensor, q: torch.Tensor, cache: PagedCache, q_start: int, q_end: int, seq: int, rows: int, causal: bool,
    q_descale: torch.Tensor | None = None,
):  # fmt: skip
    from kvflash.attn_common import reference_attention

    n = min(rows, q_end - q_start)
    sl = slice(q_end - n, q_end)
    one = slice(seq, seq + 1)
    ref, _ = reference_attention(
        q[sl],
        cache.k,
        cache.v,
        torch.tensor([0, n], dtype=torch.int32, device=q.device),
        block_table=cache.block_table[one],
        seqused_k=cache.seqused_k[one],
        causal=causal,
        k_descale=_seq_descale(cache.k_descale, one),
        v_descale=_seq_descale(cache.v_descale, one),
        q_descale=_seq_descale(q_descale, one),  # an fp8 query's [num_seqs, Hkv]
        compute_dtype=torch.float32,
    )
    got = out[sl].float()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def _seq_descale(descale: torch.Tensor | None, one: slice) -> torch.Tensor | None:
    """One sequence's descales: its row of ``[num_seqs, Hkv]``; per-token-head ones are indexed like the cache
    (the block table's row picks them), so they pass whole."""
    if descale is None or descale.dim() == 3:
        return descale
    return descale[one]

"""Test inputs for the chunked-prefill kernel and the comparison against the reference.

Sequence mixes are ``(q_len, kv_len)`` tuples: one list covers decode rows, chunked prefill and mixed
batches. K/V are drawn per sequence, stored paged (random page ids, NaN in unused slots) or contiguous
(with NaN tokens past ``seqused_k`` when it caps the length), optionally in FP8 with per-(sequence,
KV head) descales.
"""

from __future__ import annotations

import dataclasses

import torch

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import assert_close_fa_rule, encode_fp8, make_paged_kv, poison
from kvflash.chunk_prefill import chunk_prefill_attention

# Decode rows (q_len 1), odd lengths, an empty query, prefill over a longer context, q_len == kv_len.
MIX = [(1, 37), (19, 19), (5, 44), (0, 7), (26, 61), (1, 1), (3, 3)]


@dataclasses.dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    kv_args: dict  # block_table + seqused_k, or cu_seqlens_k (+ seqused_k)

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1


def _cumsum(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _used_slots(block_table: torch.Tensor, kv_lens: list[int], num_blocks: int, block_size: int) -> torch.Tensor:
    """``[num_blocks, block_size]`` bool: the cache slots that hold a sequence's keys."""
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for s, kv_len in enumerate(kv_lens):
        for b in range(-(-kv_len // block_size)):
            used[block_table[s, b], : min(block_size, kv_len - b * block_size)] = True
    return used


def make_case(
    seqs: list[tuple[int, int]],
    *,
    num_q_heads: int = 8,
    num_kv_heads: int = 2,
    head_size: int = 64,
    dtype: torch.dtype = torch.float16,
    kv_dtype: torch.dtype | None = None,
    kv_scale: torch.Tensor | None = None,
    block_size: int | None = 16,
    joint_layout: bool = False,
    capped: bool = False,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Case:
    """Random inputs for ``seqs``.

    Cache slots that hold no key of a sequence are NaN, so a kernel that reads one shows it.
    ``block_size=None`` stores K/V contiguously (``capped`` adds 3 NaN tokens per sequence that
    ``seqused_k`` hides). With an FP8 ``kv_dtype``, values are encoded with ``kv_scale [num_seqs, 2, Hkv]``
    (K's and V's descale of each sequence and head), or 1.0.
    """
    gen = torch.Generator().manual_seed(seed)
    kv_dtype = kv_dtype or dtype
    q = torch.randn(sum(s[0] for s in seqs), num_q_heads, head_size, generator=gen).to(dtype)
    k_seqs, v_seqs = [], []
    for s, (_, kv_len) in enumerate(seqs):
        k_real = torch.randn(kv_len, num_kv_heads, head_size, generator=gen).to(device)
        v_real = torch.randn(kv_len, num_kv_heads, head_size, generator=gen).to(device)
        if kv_dtype.itemsize == 1:
            k_seqs.append(encode_fp8(k_real, kv_scale[s, 0] if kv_scale is not None else 1.0, kv_dtype))
            v_seqs.append(encode_fp8(v_real, kv_scale[s, 1] if kv_scale is not None else 1.0, kv_dtype))
        else:
            k_seqs.append(k_real.to(kv_dtype))
            v_seqs.append(v_real.to(kv_dtype))
    cu_seqlens_q = _cumsum([s[0] for s in seqs], device)
    max_q, max_k = max(s[0] for s in seqs), max(s[1] for s in seqs)
    if block_size is not None:
        paged = make_paged_kv(k_seqs, v_seqs, block_size, generator=gen, joint_layout=joint_layout)
        k, v = paged.k_cache, paged.v_cache
        unused = ~_used_slots(paged.block_table.cpu(), [s[1] for s in seqs], k.shape[0], block_size).to(device)
        for cache in (k, v):  # through an integer view: index_put is not implemented for FP8
            bits = torch.uint8 if cache.dtype.itemsize == 1 else torch.int16
            cache.view(bits)[unused] = torch.full((1,), float("nan"), dtype=cache.dtype).view(bits).to(device)
        kv_args = dict(block_table=paged.block_table, seqused_k=paged.seqused_k)
    else:
        extra = 3 if capped else 0

        def with_garbage(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, torch.full((extra, *x.shape[1:]), float("nan"), device=device).to(x.dtype)])

        k = torch.cat([with_garbage(x) for x in k_seqs])
        v = torch.cat([with_garbage(x) for x in v_seqs])
        kv_args = dict(cu_seqlens_k=_cumsum([s[1] + extra for s in seqs], device))
        if capped:
            kv_args["seqused_k"] = torch.tensor([s[1] for s in seqs], dtype=torch.int32, device=device)
    return Case(q.to(device), k, v, cu_seqlens_q, max_q, max_k, kv_args)


def assert_lse_close(lse: torch.Tensor, exact: torch.Tensor, low: torch.Tensor) -> None:
    """``-inf`` exactly where the reference has it; elsewhere FlashAttention's rule."""
    assert not torch.isnan(lse).any(), "lse has NaN"
    empty = torch.isinf(exact)
    assert torch.equal(torch.isneginf(lse), empty), "lse: -inf rows differ from the reference"
    assert_close_fa_rule(lse[~empty], exact[~empty], low[~empty].float(), atol=2e-3, what="lse")


def run_and_check(case: Case, *, out: torch.Tensor | None = None, **features) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel with ``features`` (poisoned output) and compare out and LSE with the reference."""
    if out is None:
        out = poison(torch.empty_like(case.q))
    got_out, got_lse = chunk_prefill_attention(
        case.q, case.k, case.v, case.cu_seqlens_q, case.max_seqlen_q, case.max_seqlen_k,
        out=out, return_lse=True, **case.kv_args, **features,
    )  # fmt: skip
    assert got_out is out
    ref_args = (case.q, case.k, case.v, case.cu_seqlens_q)
    exact_out, exact_lse = reference_attention(*ref_args, **case.kv_args, **features, compute_dtype=torch.float64)
    low_out, low_lse = reference_attention(*ref_args, **case.kv_args, **features, compute_dtype=case.q.dtype)
    assert_close_fa_rule(got_out, exact_out, low_out, what="out")
    assert_lse_close(got_lse, exact_lse, low_lse)
    return exact_out, exact_lse

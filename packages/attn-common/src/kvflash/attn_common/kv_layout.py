"""The KV-cache layout a launcher is given: paged (block table) or contiguous (``cu_seqlens_k``).

``check_kv_cache`` validates ``k``/``v`` with their index tensors against the query and returns a
:class:`KVLayout` that says everything a launcher needs to pick strides and launch settings.
"""

from __future__ import annotations

import dataclasses

import torch

from kvflash.attn_common.checks import (
    check_block_size,
    check_gqa,
    check_head_size,
    check_index_tensor,
    check_tensor,
)
from kvflash.attn_common.type_pair import QKVTypePair

__all__ = ["KVLayout", "check_kv_cache"]


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """Shape facts of a validated KV cache.

    Attributes
    ----------
    is_paged : bool
        ``k``/``v`` are ``[num_blocks, block_size, Hkv, D]`` with a block table; else ``[total_k, Hkv, D]``.
    num_seqs, num_kv_heads, head_size : int
    types : QKVTypePair
        The validated (q, kv) dtypes.
    """

    is_paged: bool
    num_seqs: int
    num_kv_heads: int
    head_size: int
    types: QKVTypePair


def check_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_seqs: int,
    *,
    block_table: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_k: int | None = None,
) -> KVLayout:
    """Validate a KV cache against the query ``q [total_q, Hq, D]``.

    Paged: ``k, v [num_blocks, block_size, Hkv, D]`` (strided views allowed), ``block_table
    [num_seqs, max_blocks]`` int32 and ``seqused_k [num_seqs]`` int32; ``cu_seqlens_k`` must be None.
    Contiguous: ``k, v [total_k, Hkv, D]`` and ``cu_seqlens_k [num_seqs + 1]`` int32; ``seqused_k`` may
    additionally cap each sequence's length (FlashAttention's meaning), ``block_table`` must be None.

    With ``max_seqlen_k`` (the caller's bound on every sequence's KV length) the cache must be able to hold
    that many tokens: ``max_blocks * block_size`` for a block table, ``total_k`` for the contiguous layout.
    That is the cheap check against reading past a table row; the lengths themselves are device values
    and are not read (no host synchronisation), so ``seqused_k <= max_seqlen_k`` is the caller's promise.
    """
    types = QKVTypePair.from_tensors(q, k, v)
    device = q.device
    num_q_heads, head_size = q.shape[1], q.shape[2]
    check_head_size(head_size, "head size (q.shape[-1])")
    if block_table is not None:
        if cu_seqlens_k is not None:
            raise ValueError("cu_seqlens_k: must be None when block_table is given (the paged layout uses seqused_k)")
        if seqused_k is None:
            raise ValueError(
                "seqused_k: required with block_table (the KV length of each sequence, new tokens included)"
            )
        check_tensor("k", k, ndim=4, device=device)
        num_blocks, block_size, num_kv_heads, _ = k.shape
        check_tensor("k", k, shape=(None, None, None, head_size), device=device)
        check_tensor("v", v, shape=(num_blocks, block_size, num_kv_heads, head_size), device=device)
        check_block_size(block_size)
        check_index_tensor("block_table", block_table, shape=(num_seqs, None), device=device)
        check_index_tensor("seqused_k", seqused_k, shape=(num_seqs,), device=device)
        is_paged = True
    else:
        if cu_seqlens_k is None:
            raise ValueError("cu_seqlens_k: required for a contiguous KV cache (or pass block_table and seqused_k)")
        check_tensor("k", k, ndim=3, device=device)
        total_k, num_kv_heads, _ = k.shape
        check_tensor("k", k, shape=(None, None, head_size), device=device)
        check_tensor("v", v, shape=(total_k, num_kv_heads, head_size), device=device)
        check_index_tensor("cu_seqlens_k", cu_seqlens_k, shape=(num_seqs + 1,), device=device)
        if seqused_k is not None:
            check_index_tensor("seqused_k", seqused_k, shape=(num_seqs,), device=device)
        is_paged = False
    if max_seqlen_k is not None:
        capacity = block_table.shape[1] * block_size if is_paged else int(k.shape[0])
        where = f"block_table addresses {block_table.shape[1]} pages x {block_size}" if is_paged else "k holds"
        if max_seqlen_k > capacity:
            raise ValueError(f"max_seqlen_k: {max_seqlen_k} keys do not fit: {where} {capacity} tokens")
    check_gqa(num_q_heads, num_kv_heads)
    return KVLayout(is_paged, num_seqs, int(num_kv_heads), int(head_size), types)

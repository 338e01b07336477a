"""Context-parallel decode: one decode step whose KV cache is split across the ranks of a process group.

Each rank holds, for every sequence, a shard of its keys and values in its own paged cache (its own block
table and lengths; a shard may be empty). A step is:

1. local split-KV decode over the shard with ``return_lse=True`` into a float32 ``out_r [num_seqs, Hq, D]``
   (never rounded to q's dtype: the result is rounded once, after the merge), ``lse_r [Hq, num_seqs]``
   (``-inf`` where the shard is empty);
2. one ``all_gather_into_tensor`` of the packed ``(out_r, lse_r)`` (float32) over the group;
3. one LSE merge of the ``world_size`` partials with :func:`kvflash.paged_decode.merge_partial_attentions`.

No host synchronisation anywhere, so a step can be captured in a CUDA graph (NCCL collectives are
capturable). Sinks are added on rank 0 only, so the merged denominator counts them once. Features that
depend on a key's absolute position (sliding windows, ALiBi) need each shard's global offset, which this
API does not take: they raise ``NotImplementedError``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kvflash.attn_common import check_tensor, empty_out
from kvflash.attn_common.output import output_dtypes
from kvflash.paged_decode import merge_partial_attentions, paged_decode_attention

__all__ = ["context_parallel_decode", "merge_partial_attention"]


def _all_gather_flat(output: torch.Tensor, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """``all_gather_into_tensor`` into a flat ``[world * numel]`` buffer (gloo wants it flat); torch >= 2.13
    names it ``all_gather_single`` and deprecates the old name."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def merge_partial_attention(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``W`` partial attentions over disjoint key sets: :func:`kvflash.paged_decode.merge_partial_attentions`
    (one launch), returning the merged LSE too.

    Parameters
    ----------
    outs : torch.Tensor
        ``[W, T, Hq, D]`` float32, each normalised by its own denominator.
    lses : torch.Tensor
        ``[W, Hq, T]`` float32, natural log; ``-inf`` for an empty part.

    Returns
    -------
    (out ``[T, Hq, D]`` float32, lse ``[Hq, T]`` float32); rows empty in every part give 0 and ``-inf``.
    """
    out_lse = torch.empty(lses.shape[1:], dtype=torch.float32, device=lses.device)
    return merge_partial_attentions(outs, lses, out_lse=out_lse)


def context_parallel_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seqused_k: torch.Tensor,
    max_seqlen_k: int,
    *,
    group: dist.ProcessGroup | None = None,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    s_aux: torch.Tensor | None = None,
    k_descale: torch.Tensor | float | None = None,
    v_descale: torch.Tensor | float | None = None,
    window_size: tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    kv_descale_per_token: bool | None = None,
    q_descale: torch.Tensor | float | None = None,
):
    """Decode one query per sequence against a KV cache sharded across ``group``.

    Call it on every rank of ``group`` with the same ``q`` and this rank's shard.

    Parameters
    ----------
    q : torch.Tensor
        ``[num_seqs, Hq, D]`` fp16/bf16, identical on every rank; or ``float8_e4m3fn`` with ``q_descale`` over FP8
        shards (as in :func:`kvflash.paged_decode.paged_decode_attention`).
    k_cache, v_cache : torch.Tensor
        This rank's pages ``[num_blocks, block_size, Hkv, D]``, q's dtype or FP8.
    block_table : torch.Tensor
        ``[num_seqs, max_blocks]`` int32, this rank's page ids for each sequence's shard.
    seqused_k : torch.Tensor
        ``[num_seqs]`` int32, this rank's shard length per sequence (0 allowed).
    max_seqlen_k : int
        Upper bound of this rank's shard lengths.
    group : torch.distributed.ProcessGroup, optional
        The context-parallel group (default: the world).
    k_descale, v_descale : torch.Tensor or float, optional
        This rank's descales (per tensor, ``[Hkv]`` or ``[num_seqs, Hkv]``): shards may be quantised with
        their own scales. Or per-token-head: float32 ``[num_blocks, block_size, Hkv]`` indexed like this rank's
        pages (FP8 caches only), as ``reshape_and_cache_flash`` writes them under a ``*_per_token_head``
        ``kv_cache_dtype``.
    kv_descale_per_token, q_descale : optional
        As in :func:`kvflash.paged_decode.paged_decode_attention` (``None``: per-token-head iff rank 3; ``q_descale``
        with an fp8 ``q`` only).
    softmax_scale, softcap, s_aux, num_splits
        As in :func:`kvflash.paged_decode.paged_decode_attention`; ``s_aux`` is counted once (rank 0).
    window_size, alibi_slopes
        Not supported here (they need the shard's global key positions): anything but ``None`` raises.
    out : torch.Tensor, optional
        ``[num_seqs, Hq, D]`` in q's dtype (fp16 or bf16 for an fp8 ``q``; default bf16 then).
    return_lse : bool
        Also return the merged ``lse [Hq, num_seqs]`` float32.
    """
    if window_size is not None and tuple(window_size) != (-1, -1):
        raise NotImplementedError("window_size: context-parallel decode does not know each shard's global positions")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: context-parallel decode does not know each shard's global positions")
    if out is not None:
        check_tensor("out", out, dtypes=output_dtypes(q), shape=tuple(q.shape), device=q.device)
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    num_seqs, num_heads, head_size = q.shape
    # The local partial stays float32: rounding it to q's dtype before the merge would round twice.
    local_out = torch.empty((num_seqs, num_heads, head_size), dtype=torch.float32, device=q.device)
    _, local_lse = paged_decode_attention(
        q,
        k_cache,
        v_cache,
        max_seqlen_k,
        block_table=block_table,
        seqused_k=seqused_k,
        softmax_scale=softmax_scale,
        softcap=softcap,
        s_aux=s_aux if rank == 0 else None,
        k_descale=k_descale,
        v_descale=v_descale,
        kv_descale_per_token=kv_descale_per_token,
        q_descale=q_descale,
        num_splits=num_splits,
        out=local_out,
        return_lse=True,
    )
    out_numel = local_out.numel()
    # One collective: out and lse of this rank packed into one float32 row.
    packed = torch.cat([local_out.reshape(-1), local_lse.reshape(-1)])
    gathered = torch.empty(world * packed.numel(), dtype=torch.float32, device=q.device)
    _all_gather_flat(gathered, packed, group)
    gathered = gathered.view(world, packed.numel())
    outs = gathered[:, :out_numel].reshape(world, num_seqs, num_heads, head_size)
    lses = gathered[:, out_numel:].reshape(world, num_heads, num_seqs)
    merged, merged_lse = merge_partial_attention(outs, lses)
    if out is None:
        out = empty_out(q, None)  # q's dtype, bf16 for an fp8 q
    out.copy_(merged)
    return (out, merged_lse) if return_lse else out

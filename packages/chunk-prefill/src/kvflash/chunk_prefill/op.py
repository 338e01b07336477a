"""The public entry point and its custom op ``torch.ops.kvflash.chunk_prefill``.

:func:`chunk_prefill_attention` checks and normalises its arguments, then calls the custom op, which takes
only tensors, ints, floats and bools (descales already ``[num_seqs, Hkv]`` fp32 tensors), writes ``out`` in
place and returns the LSE. The op has a fake implementation, so it traces under ``torch.compile`` and is
captured by CUDA graphs like any other op. CPU tensors without the Triton interpreter take the PyTorch
reference path.
"""

from __future__ import annotations

import torch

from kvflash.attn_common import (
    AttentionFeatures,
    check_int,
    empty_out,
    reference_attention_into,
    validate_index_tensors,
)
from kvflash.attn_common.call_plan import empty_buffer, planned
from kvflash.attn_common.ops import define_op
from kvflash.attn_common.platform import runs_triton
from kvflash.chunk_prefill.launcher import check_chunk_prefill_args, launch_chunk_prefill

__all__ = ["chunk_prefill_attention", "run_chunk_prefill"]


def _chunk_prefill_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    block_table: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    s_aux: torch.Tensor | None,
    k_descale: torch.Tensor,
    v_descale: torch.Tensor,
    return_lse: bool,
    skip_q_len: int,
    output_scale: torch.Tensor | None,
) -> torch.Tensor:
    """Write attention into ``out [total_q, Hq, D]``; return ``lse [Hq, total_q]`` fp32 (``[Hq, 0]`` when
    ``return_lse`` is False). Arguments are normalised: window edges ``-1`` = unbounded, causal folded
    into ``window_right = 0``, descales ``[num_seqs, Hkv]`` fp32 (or rank-3 per-token-head
    ``[num_blocks, block_size, Hkv]`` / ``[1, total_k, Hkv]`` fp32), ``output_scale`` ``[1]`` fp32 (fp8 ``out``)."""
    total_q, num_q_heads, _ = q.shape
    lse = empty_buffer((num_q_heads, total_q if return_lse else 0), torch.float32, q.device)
    if not runs_triton(q.device):
        reference_attention_into(
            out, lse if return_lse else None, q, k, v, cu_seqlens_q, block_table=block_table, seqused_k=seqused_k,
            cu_seqlens_k=cu_seqlens_k, softmax_scale=softmax_scale, window_size=(window_left, window_right),
            softcap=softcap, alibi_slopes=alibi_slopes, s_aux=s_aux, k_descale=k_descale, v_descale=v_descale,
            output_scale=output_scale,
        )  # fmt: skip
        return lse
    launch_chunk_prefill(
        q, k, v, out, lse if return_lse else None, cu_seqlens_q, max_seqlen_q,
        block_table=block_table, seqused_k=seqused_k, cu_seqlens_k=cu_seqlens_k, softmax_scale=softmax_scale,
        window_left=window_left, window_right=window_right, softcap=softcap, alibi_slopes=alibi_slopes,
        s_aux=s_aux, k_descale=k_descale, v_descale=v_descale, skip_q_len=skip_q_len, output_scale=output_scale,
    )  # fmt: skip
    return lse


def _chunk_prefill_fake(q, k, v, out, cu_seqlens_q, max_seqlen_q, block_table, seqused_k, cu_seqlens_k, softmax_scale,
      window_left, window_right, softcap, alibi_slopes, s_aux, k_descale, v_descale, return_lse,
      skip_q_len, output_scale):  # fmt: skip
    total_q, num_q_heads, _ = q.shape
    return q.new_empty((num_q_heads, total_q if return_lse else 0), dtype=torch.float32)


# torch.ops.kvflash.chunk_prefill (attn_common.ops: one C++ dispatch per eager call).
_chunk_prefill_op = define_op("chunk_prefill", _chunk_prefill_impl, _chunk_prefill_fake, mutates_args=("out",))


@planned
def chunk_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    block_table: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    s_aux: torch.Tensor | None = None,
    k_descale: torch.Tensor | float | None = None,
    v_descale: torch.Tensor | float | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    skip_q_len: int = 0,
    output_scale: torch.Tensor | None = None,
    kv_descale_per_token: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention of new query tokens over a paged or contiguous (possibly FP8) KV cache.

    Handles chunked prefill and mixed batches (decode rows with one query beside prefill rows) in one
    launch, with no host synchronisation.

    Parameters
    ----------
    q : torch.Tensor
        ``[total_q, Hq, D]`` fp16 or bf16, any strides with ``stride(-1) == 1``. ``D`` is 8..512, a
        multiple of 8.
    k, v : torch.Tensor
        Paged ``[num_blocks, block_size, Hkv, D]`` (strided views allowed, e.g. ``[:, 0]`` / ``[:, 1]`` of a
        joint ``[num_blocks, 2, block_size, Hkv, D]`` cache) with ``block_table`` and ``seqused_k``, or
        contiguous ``[total_k, Hkv, D]`` with ``cu_seqlens_k``. Dtype: ``q``'s, or ``float8_e4m3fn`` /
        ``float8_e5m2`` (real value = ``stored * descale``). ``Hq % Hkv == 0``.
    cu_seqlens_q : torch.Tensor
        ``[num_seqs + 1]`` int32 query offsets: from 0, never decreasing, up to ``total_q``. Values are not
        checked on the host (``KVFLASH_VALIDATE=1`` checks them); the kernel clamps every range to
        ``[0, total_q]`` and treats a decreasing one as empty, so bad offsets never address memory outside
        ``q`` / ``out`` (rows outside every range are then left unwritten).
    max_seqlen_q, max_seqlen_k : int
        Upper bounds of the per-sequence query and key lengths (launch heuristics only; never trusted for
        memory safety).
    block_table : torch.Tensor, optional
        ``[num_seqs, max_blocks]`` int32 page ids (paged layout).
    seqused_k : torch.Tensor, optional
        ``[num_seqs]`` int32 KV lengths, new tokens included (required when paged; with ``cu_seqlens_k``
        it caps each sequence's length).
    cu_seqlens_k : torch.Tensor, optional
        ``[num_seqs + 1]`` int32 key offsets (contiguous layout).
    softmax_scale : float, optional
        Defaults to ``1 / sqrt(D)``.
    causal : bool
        Bottom-right aligned: query ``i`` of a sequence with ``Lq`` queries and ``Lk`` keys sits at
        ``p = Lk - Lq + i`` and sees keys ``j <= p``.
    window_size : (int, int), optional
        ``(left, right)``, ``-1`` = unbounded: key ``j`` is visible iff ``p - left <= j <= p + right``.
    softcap : float
        ``> 0``: ``score = softcap * tanh(score / softcap)`` on the scaled score.
    alibi_slopes : torch.Tensor, optional
        ``[Hq]`` or ``[num_seqs, Hq]`` fp32: ``score += -slope * |p - j|``.
    s_aux : torch.Tensor, optional
        Sinks ``[Hq]``: one extra logit per head in the denominator (scaled-score domain, not softcapped).
    k_descale, v_descale : torch.Tensor or float, optional
        ``None`` (1.0), a float, or a tensor broadcastable to ``[num_seqs, Hkv]`` (fp32/fp16/bf16). Or
        per-token-head (FP8 caches only): one float32 scale per stored (token, KV head), indexed like the cache
        (as ``reshape_and_cache_flash`` writes them under a ``*_per_token_head`` ``kv_cache_dtype``):
        ``[num_blocks, block_size, Hkv]`` for a paged cache (rank 3: recognised by its shape), ``[total_k, Hkv]``
        for a contiguous one (with ``kv_descale_per_token=True``). Key ``j`` is ``k_stored_j * k_descale_j``; K
        and V take the same mode.
    kv_descale_per_token : bool, optional
        ``None`` (default): per-token-head iff a paged descale has rank 3. ``True``: both descales are
        per-token-head (the only way to pass the contiguous ``[total_k, Hkv]`` form, which would read like
        ``[num_seqs, Hkv]`` when the counts are equal). ``False``: per-(sequence, KV head) forms only.
    out : torch.Tensor, optional
        ``[total_q, Hq, D]`` in ``q``'s dtype (may be a strided view); written in place. ``float8_e4m3fn``
        with ``output_scale`` (and only then).
    return_lse : bool
        Also return the natural-log softmax denominator.
    skip_q_len : int
        Leave the ``out`` (and ``lse``) rows of sequences with at most this many queries untouched: in a mixed
        batch :func:`kvflash.paged_decode.paged_decode_attention` (``defer_longer_sequences``) serves them at
        decode speed. 0 (the default) serves every sequence.
    output_scale : torch.Tensor, optional
        float32, one element: the output is ``float8_e4m3fn``, ``out = saturate(attention / output_scale)``
        (clamped to +-448, applied in the kernel's epilogue; never NaN for finite input). ``lse`` is unscaled.

    Returns
    -------
    out : torch.Tensor
        ``[total_q, Hq, D]`` in ``q``'s dtype (``float8_e4m3fn`` with ``output_scale``). Rows with no visible key
        are 0.
    lse : torch.Tensor
        Only with ``return_lse``: ``[Hq, total_q]`` float32, the sink included; ``-inf`` for rows with no
        visible key and no sink.
    """
    args = check_chunk_prefill_args(
        q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, block_table=block_table, seqused_k=seqused_k,
        cu_seqlens_k=cu_seqlens_k, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, s_aux=s_aux, k_descale=k_descale, v_descale=v_descale, out=out,
        output_scale=output_scale, kv_descale_per_token=kv_descale_per_token,
    )  # fmt: skip
    check_int("skip_q_len", skip_q_len, 0)
    return run_chunk_prefill(
        q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, args, block_table=block_table, seqused_k=seqused_k,
        cu_seqlens_k=cu_seqlens_k, out=out, return_lse=return_lse, skip_q_len=skip_q_len,
    )  # fmt: skip


def run_chunk_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    features: AttentionFeatures,
    *,
    block_table: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    out: torch.Tensor | None,
    return_lse: bool,
    skip_q_len: int,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`chunk_prefill_attention` after its checks (:func:`check_chunk_prefill_args` returned ``features``
    for these arguments, ``out`` included, and ``skip_q_len`` is an int >= 0): the ``KVFLASH_VALIDATE`` checks,
    the output allocation and the op. For callers that checked the arguments themselves
    (``flash_attn_varlen_func``), so an eager call checks each argument once."""
    validate_index_tensors(
        q, k, cu_seqlens_q=cu_seqlens_q, block_table=block_table, seqused_k=seqused_k, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )  # fmt: skip
    f = features
    if out is None:
        out = empty_out(q, f.output_scale)
    lse = _chunk_prefill_op(
        q, k, v, out, cu_seqlens_q, max_seqlen_q, block_table, seqused_k, cu_seqlens_k, f.softmax_scale,
        f.window_left, f.window_right, f.softcap, f.alibi_slopes, f.s_aux, f.k_descale, f.v_descale, return_lse,
        skip_q_len, f.output_scale,
    )  # fmt: skip
    return (out, lse) if return_lse else out

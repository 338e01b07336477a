"""``flash_attn_varlen_func``: FlashAttention's varlen entry point over kvflash's kernels.

The signature and argument names are those of FlashAttention's varlen function as vLLM's fork and the
Intel XPU kernels expose it, so an engine switches by changing one import. This module checks what is
its own (unsupported arguments, the query offsets, the Python ints) and routes:

- few queries per sequence (``max_seqlen_q <= 16``: decode, speculative-decode verification) ->
  :func:`kvflash.paged_decode.paged_decode_attention` (K/V read once per sequence for all its queries and
  heads, split-KV over long contexts), given ``cu_seqlens_q``;
- a batch that may hold both long and short sequences (a mixed prefill + decode step) -> two launches:
  :func:`kvflash.chunk_prefill.chunk_prefill_attention` for the long sequences, then the decode kernel for
  the short ones, each program reading its sequence's length on the device;
- everything else -> :func:`kvflash.chunk_prefill.chunk_prefill_attention`.
See :mod:`kvflash.flash_attn_interface.routing`.

The KV cache, descales and feature arguments are checked and normalised here once (through attn_common, as the
kernel packages' own entry points do), then handed to the packages' ``run_*`` functions.
"""

from __future__ import annotations

import torch

from kvflash.attn_common import (
    check_attention_call,
    check_bool,
    check_int,
    check_query,
    empty_out,
    num_seqs_from_cu_seqlens_q,
    validate_index_tensors,
)
from kvflash.attn_common.call_plan import planned
from kvflash.chunk_prefill.op import run_chunk_prefill
from kvflash.flash_attn_interface.routing import choose_route
from kvflash.paged_decode.op import run_paged_decode

__all__ = ["flash_attn_varlen_func"]

SUPPORTED_FA_VERSIONS = (2, 3)


def _reject_unsupported(dropout_p, return_attn_probs, q_v, scheduler_metadata, fa_version) -> None:
    if dropout_p != 0.0:
        raise NotImplementedError(
            f"dropout_p: kvflash kernels are inference kernels; only 0.0 is supported, got {dropout_p}"
        )
    if return_attn_probs:
        raise NotImplementedError("return_attn_probs: returning the attention probabilities is not supported")
    if q_v is not None:
        raise NotImplementedError("q_v: a separate query for the value head (MLA) is not supported")
    if scheduler_metadata is not None:
        raise NotImplementedError(
            "scheduler_metadata: kvflash schedules from shapes; precomputed metadata is not supported"
        )
    if fa_version not in SUPPORTED_FA_VERSIONS:
        raise ValueError(f"fa_version: expected 2 or 3 (it selects nothing in kvflash), got {fa_version!r}")


@planned
def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    max_seqlen_q: int,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_k: int,
    cu_seqlens_k: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    q_v: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] | list[int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
    return_softmax_lse: bool = False,
    out: torch.Tensor | None = None,
    scheduler_metadata: torch.Tensor | None = None,
    q_descale: torch.Tensor | float | None = None,
    k_descale: torch.Tensor | float | None = None,
    v_descale: torch.Tensor | float | None = None,
    num_splits: int = 0,
    fa_version: int = 2,
    s_aux: torch.Tensor | None = None,
    output_scale: torch.Tensor | None = None,
    kv_descale_per_token: bool | None = None,
    q_descale_per_token: bool | None = None,
):
    """Variable-length attention of ``q`` over a paged or contiguous KV cache (FP8 allowed).

    Parameters
    ----------
    q : torch.Tensor
        ``[total_q, Hq, D]`` fp16 or bf16, any strides with ``stride(-1) == 1``. Or ``float8_e4m3fn`` (with
        ``q_descale``) over an FP8 cache: prefill rows then run the QK dot on fp8 tensor cores (q and K as
        stored) and PV in fp16 (V converted exactly; an fp8 PV dot is a launch-config option, see
        :class:`kvflash.chunk_prefill.launch_config.ChunkPrefillLaunchConfig`); decode rows convert the query to
        fp16 exactly and run the exact FP8-cache path.
        :func:`kvflash.fp8_utils.quantize_query` makes ``q`` and ``q_descale`` from a 16-bit query.
    k, v : torch.Tensor
        Paged ``[num_blocks, block_size, Hkv, D]`` (NHD pages; strided views such as slices of a joint
        ``[num_blocks, 2, block_size, Hkv, D]`` cache are fine) with ``block_table`` and ``seqused_k``; or
        contiguous ``[total_k, Hkv, D]`` with ``cu_seqlens_k``. dtype: ``q``'s, or ``float8_e4m3fn`` /
        ``float8_e5m2`` (K and V share it).
    max_seqlen_q, max_seqlen_k : int
        Upper bounds of the per-sequence query and key lengths (Python ints; launch settings come from them,
        memory safety never does).
    cu_seqlens_q : torch.Tensor
        ``[num_seqs + 1]`` int32 query offsets, rising from 0 to ``total_q``.

        Index values (``cu_seqlens_q``, ``cu_seqlens_k``, ``seqused_k``, ``block_table``) are not read on the
        host. The kernels clamp them to what ``q``, the block table and the cache can address, so no value
        makes them touch memory outside their tensors; with ``KVFLASH_VALIDATE=1`` in the environment every
        call checks them on the host (it synchronises) and names the first bad one.
    cu_seqlens_k : torch.Tensor, optional
        ``[num_seqs + 1]`` int32 key offsets, contiguous layout only.
    seqused_k : torch.Tensor, optional
        ``[num_seqs]`` int32 KV length of each sequence (new tokens included); required with ``block_table``.
        With ``cu_seqlens_k`` it caps each sequence's length.
    softmax_scale : float, optional
        Defaults to ``1 / sqrt(D)``.
    causal : bool
        Bottom-right aligned: query ``i`` of ``Lq`` queries over ``Lk`` keys sits at ``p = Lk - Lq + i`` and sees
        keys ``j <= p``.
    window_size : (int, int), optional
        ``(left, right)``, ``-1`` unbounded: key ``j`` visible iff ``p - left <= j <= p + right``.
    softcap : float
        ``> 0``: ``score = softcap * tanh(score / softcap)`` on the scaled score.
    alibi_slopes : torch.Tensor, optional
        ``[Hq]`` or ``[num_seqs, Hq]`` float32: ``score += -slope * |p - j|``.
    deterministic : bool
        Accepted for compatibility; kvflash kernels are always deterministic.
    block_table : torch.Tensor, optional
        ``[num_seqs, max_blocks]`` int32 page ids.
    return_softmax_lse : bool
        Also return ``lse [Hq, total_q]`` float32 (natural log of the full softmax denominator).
    out : torch.Tensor, optional
        ``[total_q, Hq, D]`` in ``q``'s dtype (fp16 or bf16 for an fp8 ``q``); may be a strided view. ``float8_e4m3fn``
        with ``output_scale`` (and only then: another dtype with ``output_scale`` raises naming ``out``, an fp8 ``out``
        without it raises naming ``output_scale``).
    k_descale, v_descale : torch.Tensor or float, optional
        The real value of a stored element is ``stored * descale``: a float, or a float32/fp16/bf16 tensor
        broadcastable to ``[num_seqs, Hkv]`` (1 element, ``[Hkv]``, ``[num_seqs, Hkv]``, stride-0 views).
        Or per-token-head (FP8 caches only), one float32 scale per stored (token, KV head) indexed like the
        cache, as ``reshape_and_cache_flash`` writes them under ``kv_cache_dtype="fp8_e4m3_per_token_head"`` /
        ``"fp8_e5m2_per_token_head"``: ``[num_blocks, block_size, Hkv]`` for a paged cache (rank 3, recognised
        by its shape), ``[total_k, Hkv]`` for a contiguous one (only with ``kv_descale_per_token=True``). Key
        ``j`` of head ``h`` is ``k_stored[j, h] * k_descale[j, h]``; K and V take the same mode (both
        per-token-head or neither); every route (decode, prefill, mixed) reads them.
    q_descale : torch.Tensor or float, optional
        With an fp8 ``q`` only (a 16-bit ``q`` with ``q_descale`` raises ``ValueError`` naming it): the real
        query is ``q * q_descale``, in the per-(sequence, KV head) forms of ``k_descale`` (``None`` = 1.0), or one
        float32 scale per (token, query head), ``[total_q, Hq]``, with ``q_descale_per_token=True``.
    q_descale_per_token : bool, optional
        A kvflash extension: ``True`` makes ``q_descale`` the per-(token, query head) form (explicit, as
        ``kv_descale_per_token``: ``[total_q, Hq]`` reads like ``[num_seqs, Hkv]`` when the counts are equal).
    kv_descale_per_token : bool, optional
        A kvflash extension. ``None`` (default): per-token-head iff a paged descale has rank 3. ``True``: both
        descales are per-token-head (required for the contiguous ``[total_k, Hkv]`` form, which would read like
        ``[num_seqs, Hkv]`` when ``total_k == num_seqs``). ``False``: per-(sequence, KV head) forms only.
        Wrong shapes, dtypes (float32 only), one descale per-token-head and the other not, or a non-FP8 cache
        raise naming the argument.
    num_splits : int
        Split-KV for decode: 0 automatic, 1 none, ``n > 1`` at most ``n``. The prefill path does not split
        (one split is within any bound).
    fa_version : int
        2 or 3; accepted for compatibility, selects nothing.
    s_aux : torch.Tensor, optional
        Sinks ``[Hq]``: one extra logit per head in the softmax denominator (scaled-score domain, not softcapped).
    output_scale : torch.Tensor, optional
        float32, one element (static output quantisation): the output is ``float8_e4m3fn`` holding
        ``saturate(attention / output_scale)``, clamped to +-448 in the kernels' epilogues (prefill, decode,
        split merge; every route), never NaN for finite input. ``lse`` stays float32 and unscaled.
    dropout_p, return_attn_probs, q_v, scheduler_metadata
        Not supported: anything but the defaults raises ``NotImplementedError`` naming the argument.

    Returns
    -------
    out : torch.Tensor
        ``[total_q, Hq, D]`` in ``q``'s dtype (``out``'s, or bf16, for an fp8 ``q``; ``float8_e4m3fn`` with
        ``output_scale``); rows with no visible key are 0.
    lse : torch.Tensor
        Only with ``return_softmax_lse``: ``[Hq, total_q]`` float32; ``-inf`` for rows with no visible key.
    """
    _reject_unsupported(dropout_p, return_attn_probs, q_v, scheduler_metadata, fa_version)
    check_bool("deterministic", deterministic)
    check_query(q)
    num_seqs = num_seqs_from_cu_seqlens_q(q, cu_seqlens_q)
    check_int("num_splits", num_splits, 0)
    # Checked and normalised once for every route (the kernel packages' run_* functions take them as they are);
    # out: q's dtype, or fp8 with output_scale, on every route (the decode op alone also takes fp32).
    f = check_attention_call(
        q, k, v, num_seqs, cu_seqlens_q=None, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,  # q's: above
        block_table=block_table, seqused_k=seqused_k, cu_seqlens_k=cu_seqlens_k, softmax_scale=softmax_scale,
        causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, s_aux=s_aux,
        k_descale=k_descale, v_descale=v_descale, output_scale=output_scale,
        kv_descale_per_token=kv_descale_per_token, out=out, q_descale=q_descale,
        q_descale_per_token=q_descale_per_token,
    )  # fmt: skip
    kv = dict(block_table=block_table, seqused_k=seqused_k, cu_seqlens_k=cu_seqlens_k)
    route = choose_route(q.shape[0], num_seqs, max_seqlen_q, q.shape[1] // k.shape[-2])
    if route.decode_only:
        # The decode kernel reads each sequence's query range from cu_seqlens_q: a caller whose max_seqlen_q
        # undercounts (query lengths [2, 0] under max_seqlen_q = 1, say) is still served exactly, in more
        # passes over the keys. KVFLASH_VALIDATE=1 reports the wrong max_seqlen_q.
        validate_index_tensors(  # KVFLASH_VALIDATE=1 only: the query lengths against max_seqlen_q
            q, k, cu_seqlens_q=cu_seqlens_q, block_table=None, seqused_k=None, cu_seqlens_k=None,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        )  # fmt: skip
        return run_paged_decode(
            q, k, v, f, max_seqlen_k, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max(1, max_seqlen_q),
            num_splits=num_splits, out=out, lse=None, return_lse=return_softmax_lse, defer_longer_sequences=False,
            **kv,
        )  # fmt: skip
    if not route.decode_queries:
        return run_chunk_prefill(
            q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, f, out=out, return_lse=return_softmax_lse,
            skip_q_len=0, **kv,
        )  # fmt: skip
    # A mixed batch: the prefill kernel serves the sequences with more than route.decode_queries queries, the
    # decode kernel the others (each program of both launches reads its sequence's length on the device).
    if out is None:
        out = empty_out(q, f.output_scale)
    result = run_chunk_prefill(
        q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, f, out=out, return_lse=return_softmax_lse,
        skip_q_len=route.decode_queries, **kv,
    )  # fmt: skip
    lse = result[1] if return_softmax_lse else None
    run_paged_decode(
        q, k, v, f, max_seqlen_k, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=route.decode_queries, num_splits=num_splits,
        out=out, lse=lse, return_lse=False, defer_longer_sequences=True, **kv,
    )  # fmt: skip
    return result

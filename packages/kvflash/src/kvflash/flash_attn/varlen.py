"""``flash_attn_varlen_func`` in FlashAttention's upstream argument order, over kvflash's kernels.

Upstream's varlen function takes ``cu_seqlens_k`` before the Python ints and, with a ``block_table``, reads
the key lengths from ``cu_seqlens_k`` (cumulative lengths, not offsets into a packed tensor). This module
maps that onto :func:`kvflash.flash_attn_interface.flash_attn_varlen_func` (the vLLM-fork order), which
checks and launches; nothing here launches a kernel itself.
"""

from __future__ import annotations

import torch

from kvflash.flash_attn_interface import flash_attn_varlen_func as _fork_varlen

__all__ = ["flash_attn_varlen_func"]


def _lengths_from_cumulative(cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    # A device-side difference: the per-sequence key lengths without reading values on the host.
    return (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] | list[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
    *,
    seqused_k: torch.Tensor | None = None,
    k_descale: torch.Tensor | float | None = None,
    v_descale: torch.Tensor | float | None = None,
    s_aux: torch.Tensor | None = None,
    q_descale: torch.Tensor | float | None = None,
    num_splits: int = 0,
):
    """Variable-length attention, FlashAttention's upstream signature (paged and FP8 caches allowed).

    Parameters
    ----------
    q : torch.Tensor
        ``[total_q, Hq, D]`` fp16 or bf16, ``stride(-1) == 1``; or ``float8_e4m3fn`` with ``q_descale`` over an
        FP8 cache (see :func:`kvflash.flash_attn_interface.flash_attn_varlen_func`).
    k, v : torch.Tensor
        Contiguous ``[total_k, Hkv, D]`` (sequence ``s`` is rows ``cu_seqlens_k[s]:cu_seqlens_k[s+1]``), or paged
        ``[num_blocks, page_block_size, Hkv, D]`` with ``block_table``. dtype: ``q``'s, or ``float8_e4m3fn`` /
        ``float8_e5m2`` with ``k_descale`` / ``v_descale``.
    cu_seqlens_q : torch.Tensor
        ``[batch + 1]`` int32 query offsets.
    cu_seqlens_k : torch.Tensor or None
        ``[batch + 1]`` int32 cumulative key lengths. Contiguous: offsets into ``k``. Paged: the key lengths
        are its differences (as upstream reads them); may be ``None`` when ``seqused_k`` is given.
    max_seqlen_q, max_seqlen_k : int
        Upper bounds of the per-sequence query and key lengths (Python ints).
    dropout_p : float
        Only 0.0 (inference kernels); anything else raises ``NotImplementedError``.
    softmax_scale : float, optional
        Defaults to ``1 / sqrt(D)``.
    causal : bool
        Bottom-right aligned mask, as upstream: query ``i`` of ``Lq`` over ``Lk`` keys sees keys
        ``j <= Lk - Lq + i``.
    window_size : (int, int)
        ``(left, right)``, ``-1`` = unbounded.
    softcap : float
        ``> 0``: ``score = softcap * tanh(score / softcap)``.
    alibi_slopes : torch.Tensor, optional
        ``[Hq]`` or ``[batch, Hq]`` float32; ``score += -slope * |i + Lk - Lq - j|``.
    deterministic : bool
        Accepted; the forward kernels are deterministic either way.
    return_attn_probs : bool
        As upstream: return ``(out, softmax_lse, S_dmask)``. ``S_dmask`` is ``None`` because upstream fills it
        only with dropout, which kvflash does not do.
    block_table : torch.Tensor, optional
        ``[batch, max_blocks]`` int32 page ids (paged ``k``/``v``).
    seqused_k : torch.Tensor, optional
        ``[batch]`` int32 (keyword only, FlashAttention-3's name): the number of keys each sequence uses; it
        replaces the lengths derived from ``cu_seqlens_k``.
    k_descale, v_descale : torch.Tensor or float, optional
        Keyword only. FP8 caches: the real value is ``stored * descale``; a float or a tensor broadcastable to
        ``[batch, Hkv]``; with ``block_table``, also per-token-head float32 ``[num_blocks, block_size, Hkv]`` (rank 3,
        indexed like the pages, as ``reshape_and_cache_flash`` writes them under a ``*_per_token_head``
        ``kv_cache_dtype``). A contiguous cache takes per-token-head descales only through
        :func:`kvflash.flash_attn_interface.flash_attn_varlen_func` (``kv_descale_per_token=True``).
    s_aux : torch.Tensor, optional
        Keyword only. Sinks ``[Hq]`` float32: one extra logit per head in the softmax denominator.
    q_descale : torch.Tensor or float, optional
        Keyword only, an fp8 ``q`` only: the real query is ``q * q_descale``, broadcastable to ``[batch, Hkv]``.
    num_splits : int
        Keyword only. Split-KV for decode: 0 automatic, 1 none, ``n > 1`` at most ``n``.

    Returns
    -------
    out : torch.Tensor
        ``[total_q, Hq, D]`` in ``q``'s dtype (bf16 for an fp8 ``q``).
    (out, softmax_lse, S_dmask) : tuple
        With ``return_attn_probs``: ``softmax_lse [Hq, total_q]`` float32 (natural log; ``-inf`` for rows with
        no visible key) and ``None``.
    """
    if dropout_p != 0.0:
        raise NotImplementedError(
            f"dropout_p: kvflash kernels are inference kernels; only 0.0 is supported, got {dropout_p}"
        )
    if block_table is not None:
        if seqused_k is None:
            if cu_seqlens_k is None:
                raise ValueError("cu_seqlens_k: with block_table, cu_seqlens_k or seqused_k must give the key lengths")
            seqused_k = _lengths_from_cumulative(cu_seqlens_k)
        cu_seqlens_k = None  # paged: the fork-order function reads lengths from seqused_k only
    elif cu_seqlens_k is None:
        raise ValueError("cu_seqlens_k: required for contiguous k/v (no block_table)")
    result = _fork_varlen(
        q,
        k,
        v,
        max_seqlen_q,
        cu_seqlens_q,
        max_seqlen_k,
        cu_seqlens_k=cu_seqlens_k,
        seqused_k=seqused_k,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        deterministic=deterministic,
        block_table=block_table,
        return_softmax_lse=return_attn_probs,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
        num_splits=num_splits,
        s_aux=s_aux,
    )
    if return_attn_probs:
        out, lse = result
        return out, lse, None
    return result

"""``flash_attn_with_kvcache``: FlashAttention's decode entry point over kvflash's kernels.

Two steps, each through a public kvflash function: new keys/values go into the cache with
:func:`kvflash.fp8_utils.reshape_and_cache_flash` (which quantises for FP8 caches), then attention runs
through :func:`kvflash.flash_attn_interface.flash_attn_varlen_func`. A contiguous cache
``[batch_cache, seqlen_cache, Hkv, D]`` is read as a paged cache whose page is one whole row
(``block_size = seqlen_cache``, block table = the row index), so both layouts take the same path.
Write slots and key lengths are computed with device tensor ops: nothing is read back to the host.
"""

from __future__ import annotations

import torch

from kvflash.attn_common import FP8_TORCH_DTYPES, check_tensor
from kvflash.attn_common.output import output_dtypes
from kvflash.flash_attn_interface import flash_attn_varlen_func as _fork_varlen
from kvflash.fp8_utils import reshape_and_cache_flash

__all__ = ["flash_attn_with_kvcache"]

# The writer's kv_cache_dtype string for each FP8 cache dtype ("fp8_e4m3" means e4m3fnuz where the platform
# stores that variant; the writer checks the cache matches).
_FP8_CACHE_DTYPE_NAMES = {
    torch.float8_e4m3fn: "fp8_e4m3",
    torch.float8_e4m3fnuz: "fp8_e4m3",
    torch.float8_e5m2: "fp8_e5m2",
}


def _reject_unsupported(rotary_cos, rotary_sin, cache_leftpad, rotary_interleaved) -> None:
    if rotary_cos is not None or rotary_sin is not None:
        raise NotImplementedError(
            "rotary_cos/rotary_sin: kvflash does not apply rotary embeddings; rotate q and k before the call"
        )
    if cache_leftpad is not None:
        raise NotImplementedError("cache_leftpad: left-padded caches are not supported")
    if not isinstance(rotary_interleaved, bool):
        raise TypeError(f"rotary_interleaved: expected a bool, got {type(rotary_interleaved).__name__}")


def _cache_view(k_cache, v_cache, block_table, cache_batch_idx, batch, device):
    """``(k_pages, v_pages, block_table)``: the caches as pages plus the table that addresses them."""
    check_tensor("k_cache", k_cache, ndim=4)
    if block_table is not None:
        if cache_batch_idx is not None:
            raise NotImplementedError("cache_batch_idx: not supported together with block_table (as upstream)")
        return k_cache, v_cache, block_table
    # Contiguous: row b of the cache is page b; cache_batch_idx picks which row each sequence uses.
    if cache_batch_idx is None:
        rows = torch.arange(batch, dtype=torch.int32, device=device)
    else:
        check_tensor(
            "cache_batch_idx", cache_batch_idx, dtypes=(torch.int32, torch.int64), shape=(batch,), device=device
        )
        rows = cache_batch_idx.to(torch.int32)
    return k_cache, v_cache, rows[:, None]


def _write_slots(table: torch.Tensor, block_size: int, cache_seqlens: torch.Tensor, seqlen_new: int):
    """``[batch * seqlen_new]`` int64 cache slots of the new tokens (``-1`` past the table: not written)."""
    positions = cache_seqlens[:, None].long() + torch.arange(seqlen_new, device=table.device)[None, :]
    page_index = positions // block_size
    in_table = page_index < table.shape[1]
    pages = torch.gather(table.long(), 1, page_index.clamp(max=table.shape[1] - 1))
    slots = pages * block_size + positions % block_size
    return torch.where(in_table, slots, torch.full_like(slots, -1)).reshape(-1)


def _append(k, v, k_pages, v_pages, table, cache_seqlens, q, k_descale, v_descale) -> None:
    batch, seqlen_new = q.shape[0], k.shape[1]
    hkv, d = k_pages.shape[2], k_pages.shape[3]
    # New keys and values come in the model's dtype, an output's: q's, or (an fp8 q) fp16 / bf16.
    check_tensor("k", k, dtypes=output_dtypes(q), shape=(batch, seqlen_new, hkv, d))
    check_tensor("v", v, dtypes=(k.dtype,), shape=(batch, seqlen_new, hkv, d))
    if k_pages.dtype in FP8_TORCH_DTYPES:
        cache_dtype = _FP8_CACHE_DTYPE_NAMES.get(k_pages.dtype)
        if cache_dtype is None:
            raise NotImplementedError(f"k_cache: appending into a {k_pages.dtype} cache is not supported")
        for name, descale in (("k_descale", k_descale), ("v_descale", v_descale)):
            # The writer quantises with one scale per tensor or per KV head, not per sequence.
            per_head = isinstance(descale, torch.Tensor) and descale.numel() == hkv and descale.shape[-1] == hkv
            if isinstance(descale, torch.Tensor) and descale.numel() != 1 and not per_head:
                raise NotImplementedError(
                    f"{name}: appending k/v into an FP8 cache needs a per-tensor or per-KV-head descale "
                    f"(1 or {hkv} elements), got shape {tuple(descale.shape)}"
                )
        scales = (k_descale, v_descale)
    elif k_pages.dtype == q.dtype:
        cache_dtype, scales = "auto", (None, None)
    else:
        raise TypeError(f"k_cache: expected {q.dtype} or an FP8 dtype to append k/v, got {k_pages.dtype}")
    k_scale, v_scale = (s.reshape(-1) if isinstance(s, torch.Tensor) else s for s in scales)
    slots = _write_slots(table, k_pages.shape[1], cache_seqlens, seqlen_new)
    reshape_and_cache_flash(
        k.reshape(batch * seqlen_new, hkv, d),
        v.reshape(batch * seqlen_new, hkv, d),
        k_pages,
        v_pages,
        slots,
        cache_dtype,
        k_scale,
        v_scale,
    )


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] | list[int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    k_descale: torch.Tensor | float | None = None,
    v_descale: torch.Tensor | float | None = None,
    s_aux: torch.Tensor | None = None,
    q_descale: torch.Tensor | float | None = None,
):
    """Attention of ``q`` over a KV cache, after appending ``k``/``v`` to it in place (upstream semantics).

    Parameters
    ----------
    q : torch.Tensor
        ``[batch, seqlen_q, Hq, D]`` fp16 or bf16; or ``float8_e4m3fn`` with ``q_descale`` over an FP8 cache
        (appending ``k``/``v`` then needs them in a 16-bit dtype).
    k_cache, v_cache : torch.Tensor
        Contiguous ``[batch_cache, seqlen_cache, Hkv, D]``, or paged ``[num_blocks, page_block_size, Hkv, D]``
        with ``block_table``. dtype: ``q``'s, or ``float8_e4m3fn`` / ``float8_e5m2`` (with descales).
    k, v : torch.Tensor, optional
        ``[batch, seqlen_new, Hkv, D]`` in ``q``'s dtype: written into the cache at positions
        ``cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1`` (quantised as ``saturate(x / descale)`` for
        FP8), then attended to. Positions past the cache's capacity are not written.
    rotary_cos, rotary_sin, cache_leftpad
        Not supported: anything but ``None`` raises ``NotImplementedError``.
    cache_seqlens : int or torch.Tensor, optional
        ``[batch]`` int32 (or one int): keys already in the cache per sequence. ``None``: the whole capacity
        (``seqlen_cache``, or ``max_blocks * page_block_size``); required with ``k``/``v``. Attention covers
        ``cache_seqlens + seqlen_new`` keys.
    cache_batch_idx : torch.Tensor, optional
        ``[batch]`` int32/int64: the cache row each sequence uses (contiguous caches only).
    block_table : torch.Tensor, optional
        ``[batch, max_blocks]`` int32 page ids.
    softmax_scale, causal, window_size, softcap, alibi_slopes
        As in :func:`kvflash.flash_attn.flash_attn_varlen_func`; ``causal`` is bottom-right aligned.
    rotary_interleaved : bool
        Only meaningful with rotary, which is not supported; a bool is accepted.
    num_splits : int
        Split-KV for decode: 0 automatic, 1 none, ``n > 1`` at most ``n``.
    return_softmax_lse : bool
        Also return ``softmax_lse [batch, Hq, seqlen_q]`` float32.
    k_descale, v_descale : torch.Tensor or float, optional
        Keyword only. FP8 caches: the real value is ``stored * descale``. For reading, anything broadcastable
        to ``[batch, Hkv]``, or per-token-head float32 indexed like the cache (``[num_blocks, block_size, Hkv]``
        paged, ``[batch_cache, seqlen_cache, Hkv]`` contiguous: rank 3); when ``k``/``v`` are appended, per tensor
        (1 element) or per KV head (``[Hkv]``): appending with per-token-head descales raises
        ``NotImplementedError`` (write them with ``reshape_and_cache_flash`` under a ``*_per_token_head`` string).
    s_aux : torch.Tensor, optional
        Keyword only. Sinks ``[Hq]`` float32.
    q_descale : torch.Tensor or float, optional
        Keyword only, an fp8 ``q`` only: the real query is ``q * q_descale``, broadcastable to ``[batch, Hkv]``.

    Returns
    -------
    out : torch.Tensor
        ``[batch, seqlen_q, Hq, D]`` in ``q``'s dtype (bf16 for an fp8 ``q``).
    (out, softmax_lse) : tuple
        With ``return_softmax_lse``.
    """
    _reject_unsupported(rotary_cos, rotary_sin, cache_leftpad, rotary_interleaved)
    check_tensor("q", q, ndim=4)
    batch, seqlen_q, num_q_heads, head_size = q.shape
    if (k is None) != (v is None):
        raise ValueError("k, v: pass both new keys and new values, or neither")
    k_pages, v_pages, table = _cache_view(k_cache, v_cache, block_table, cache_batch_idx, batch, q.device)
    capacity = table.shape[1] * k_pages.shape[1]
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens: required with k/v (where in the cache the new tokens go)")
        cache_seqlens = capacity
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, torch.Tensor)):
        raise TypeError(f"cache_seqlens: expected an int or an int32 tensor, got {type(cache_seqlens).__name__}")
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    else:
        check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), shape=(batch,), device=q.device)
    seqlen_new = 0
    if k is not None:
        check_tensor("k", k, ndim=4)
        seqlen_new = k.shape[1]
        _append(k, v, k_pages, v_pages, table, cache_seqlens, q, k_descale, v_descale)
    seqused_k = (cache_seqlens + seqlen_new).clamp(max=capacity).to(torch.int32)
    cu_seqlens_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=q.device)
    result = _fork_varlen(
        q.reshape(batch * seqlen_q, num_q_heads, head_size),
        k_pages,
        v_pages,
        seqlen_q,
        cu_seqlens_q,
        capacity,
        seqused_k=seqused_k,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        block_table=table,
        return_softmax_lse=return_softmax_lse,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
        num_splits=num_splits,
        s_aux=s_aux,
    )
    out, lse = result if return_softmax_lse else (result, None)
    out = out.reshape(batch, seqlen_q, num_q_heads, head_size)
    if lse is None:
        return out
    return out, lse.reshape(num_q_heads, batch, seqlen_q).permute(1, 0, 2)

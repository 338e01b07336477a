"""Quantise a 16-bit query to fp8 e4m3 for the fp8-query attention path (``q`` + ``q_descale``).

The attention kernels take one query descale per (sequence, KV head) (``[num_seqs, Hkv]`` and its broadcastable
forms, as FlashAttention-3 and vLLM pass ``q_descale``: the query heads of a KV head's group share it), or one per
(token, query head) (``[total_q, Hq]`` with ``q_descale_per_token=True``). :func:`quantize_query` computes such a
descale dynamically (the amax of what it covers over the e4m3 maximum) at four granularities, or applies a static
one, and returns ``(q_fp8, q_descale)`` ready for ``flash_attn_varlen_func(q_fp8, ..., q_descale=q_descale)``.

Elementwise torch ops and scatter reductions on the device: no host synchronisation (the sequence of each token is
found with ``searchsorted`` over ``cu_seqlens_q``), so it runs inside CUDA graphs and ``torch.compile``.
"""

from __future__ import annotations

import torch

from kvflash.attn_common import (
    FP8_QUERY_DTYPE,
    QUERY_TORCH_DTYPES,
    check_gqa,
    check_index_tensor,
    check_tensor,
    normalize_descale,
    saturate_to_fp8,
)
from kvflash.fp8_utils.scales import amax_to_scale

__all__ = ["quantize_query", "QUERY_SCALE_GRANULARITIES"]

# "per_tensor": one descale, [1]; "per_kv_head": [Hkv]; "per_sequence_kv_head": [num_seqs, Hkv] (cu_seqlens_q);
# "per_token_head": [total_q, Hq] (attention then takes q_descale_per_token=True).
QUERY_SCALE_GRANULARITIES = ("per_tensor", "per_kv_head", "per_sequence_kv_head", "per_token_head")


def quantize_query(
    q: torch.Tensor,
    num_kv_heads: int,
    *,
    granularity: str = "per_kv_head",
    cu_seqlens_q: torch.Tensor | None = None,
    scale: torch.Tensor | float | None = None,
    margin: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``q`` to ``float8_e4m3fn``: ``q ≈ q_fp8 * q_descale`` (saturating, round to nearest even).

    Parameters
    ----------
    q : torch.Tensor
        ``[total_q, Hq, D]`` float16 or bfloat16.
    num_kv_heads : int
        ``Hkv`` of the cache the query will attend (``Hq % Hkv == 0``): query head ``h`` shares the descale of KV
        head ``h // (Hq / Hkv)``.
    granularity : str
        Dynamic scales (``scale=None``): ``"per_tensor"`` (``q_descale [1]``), ``"per_kv_head"`` (``[Hkv]``, the
        default), ``"per_sequence_kv_head"`` (``[num_seqs, Hkv]``, needs ``cu_seqlens_q``) or ``"per_token_head"``
        (``[total_q, Hq]``: pass ``q_descale_per_token=True`` to attention): the amax of the elements each descale
        covers, over 448, times ``margin``.
    cu_seqlens_q : torch.Tensor, optional
        ``[num_seqs + 1]`` int32 query offsets (``"per_sequence_kv_head"`` only). Rows past ``cu_seqlens_q[-1]``
        take the last sequence's descale.
    scale : torch.Tensor or float, optional
        A static descale instead (``granularity`` and ``margin`` are then not used): a positive float, or a
        float32/fp16/bf16 tensor broadcastable to ``[num_seqs, Hkv]`` (``[1]``, ``[Hkv]``; ``[num_seqs, Hkv]``
        with ``cu_seqlens_q``). Returned as float32.
    margin : float
        ``>= 1``: headroom over the observed amax (dynamic scales).

    Returns
    -------
    q_fp8 : torch.Tensor
        ``[total_q, Hq, D]`` float8_e4m3fn.
    q_descale : torch.Tensor
        float32 ``[1]``, ``[Hkv]``, ``[num_seqs, Hkv]`` or ``[total_q, Hq]``: pass it as ``q_descale``.
    """
    check_tensor("q", q, dtypes=QUERY_TORCH_DTYPES, ndim=3, last_dim_contiguous=False)
    total_q, num_q_heads, _ = q.shape
    check_gqa(num_q_heads, num_kv_heads)
    if granularity not in QUERY_SCALE_GRANULARITIES:
        raise ValueError(f"granularity: expected one of {QUERY_SCALE_GRANULARITIES}, got {granularity!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 1:
        raise ValueError(f"margin: expected a float >= 1, got {margin!r}")
    per_sequence = granularity == "per_sequence_kv_head" or (scale is not None and cu_seqlens_q is not None)
    if per_sequence and cu_seqlens_q is None:
        raise ValueError("cu_seqlens_q: granularity 'per_sequence_kv_head' needs the query offsets")
    if cu_seqlens_q is not None:
        check_index_tensor("cu_seqlens_q", cu_seqlens_q, shape=(None,), device=q.device)
        if cu_seqlens_q.shape[0] < 2:
            raise ValueError(f"cu_seqlens_q: expected at least 2 entries, got shape {tuple(cu_seqlens_q.shape)}")
    group = num_q_heads // num_kv_heads
    fp8_max = float(torch.finfo(FP8_QUERY_DTYPE).max)
    # [total_q, Hkv, group, D]: the query heads of one KV head together.
    grouped = q.reshape(total_q, num_kv_heads, group, q.shape[2])
    # [total_q]: each row's sequence, for the amax per sequence and for expanding the descales to the rows
    seq_of_row = _sequence_of_rows(cu_seqlens_q, total_q) if per_sequence else None
    if scale is not None:
        num_seqs = cu_seqlens_q.shape[0] - 1 if per_sequence else 1
        descale = normalize_descale("scale", scale, num_seqs, num_kv_heads, q.device)  # [num_seqs or 1, Hkv]
        descale = descale.contiguous() if per_sequence else descale[0].contiguous()
    elif granularity == "per_tensor":
        amax = grouped.abs().amax().reshape(1) if q.numel() else torch.zeros(1, device=q.device)
        descale = amax_to_scale(amax, fp8_max, margin)
    elif granularity == "per_token_head":  # [total_q, Hq]: each row of each head its own
        descale = amax_to_scale(q.abs().amax(dim=2).float(), fp8_max, margin)
        return saturate_to_fp8(q, descale[:, :, None], FP8_QUERY_DTYPE), descale
    else:
        head_amax = grouped.abs().amax(dim=(2, 3)).float()  # [total_q, Hkv]
        if granularity == "per_kv_head":
            descale = amax_to_scale(head_amax.amax(dim=0) if total_q else head_amax.sum(0), fp8_max, margin)
        else:
            num_seqs = cu_seqlens_q.shape[0] - 1
            seq_amax = torch.zeros(num_seqs, num_kv_heads, dtype=torch.float32, device=q.device)
            seq_amax.scatter_reduce_(0, seq_of_row[:, None].expand(-1, num_kv_heads), head_amax, "amax")
            descale = amax_to_scale(seq_amax, fp8_max, margin)
    if descale.dim() == 2:  # per (sequence, KV head): each row takes its sequence's
        row_descale = descale[seq_of_row]  # [total_q, Hkv]
    else:
        row_descale = descale.reshape(1, -1).expand(total_q, num_kv_heads)
    q_fp8 = saturate_to_fp8(grouped, row_descale[:, :, None, None], FP8_QUERY_DTYPE)
    return q_fp8.reshape(q.shape), descale


def _sequence_of_rows(cu_seqlens_q: torch.Tensor, total_q: int) -> torch.Tensor:
    """``[total_q]`` int64: the sequence of each query row, from the offsets, on the device (no host sync)."""
    rows = torch.arange(total_q, device=cu_seqlens_q.device, dtype=cu_seqlens_q.dtype)
    num_seqs = cu_seqlens_q.shape[0] - 1
    return torch.searchsorted(cu_seqlens_q[1:], rows, right=True).clamp_max(num_seqs - 1)

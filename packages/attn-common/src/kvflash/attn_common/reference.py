"""Plain PyTorch attention with every feature of the kvflash contract: the oracle for tests and the
path CPU tensors take when the Triton interpreter is off.

It loops over sequences on the host (it reads ``cu_seqlens`` and lengths with ``.tolist()``), gathers
each sequence's keys from the paged or contiguous cache, dequantises FP8 with the per-(sequence, KV head)
descales, repeats KV heads for GQA, masks, and takes the softmax in ``compute_dtype``. Slow and simple on
purpose.
"""

from __future__ import annotations

import torch

from kvflash.attn_common.descale import normalize_descale
from kvflash.attn_common.dtypes import saturate_to_fp8
from kvflash.attn_common.feature_args import (
    normalize_alibi_slopes,
    normalize_sinks,
    normalize_window,
    resolve_softmax_scale,
)

__all__ = ["reference_attention", "reference_attention_into", "gather_sequence_kv"]


def gather_sequence_kv(
    cache: torch.Tensor,
    seq: int,
    kv_len: int,
    *,
    block_table: torch.Tensor | None,
    cu_seqlens_k: list[int] | None,
) -> torch.Tensor:
    """The first ``kv_len`` tokens of sequence ``seq`` as ``[kv_len, Hkv, D]`` (cache dtype).

    ``cache`` is ``[num_blocks, block_size, Hkv, D]`` with ``block_table``, or ``[total_k, Hkv, D]``
    with ``cu_seqlens_k`` (host list).
    """
    if block_table is not None:
        block_size = cache.shape[1]
        positions = torch.arange(kv_len, device=cache.device)
        blocks = block_table[seq].long()[positions // block_size]
        return cache[blocks, positions % block_size]
    start = cu_seqlens_k[seq]
    return cache[start : start + kv_len]


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
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
    compute_dtype: torch.dtype = torch.float32,
    kv_descale_per_token: bool | None = None,
    q_descale: torch.Tensor | float | None = None,
    q_descale_per_token: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention of ``q`` over a paged or contiguous KV cache, computed per sequence.

    Parameters
    ----------
    q : torch.Tensor
        ``[total_q, Hq, D]``.
    k, v : torch.Tensor
        Paged ``[num_blocks, block_size, Hkv, D]`` (with ``block_table [num_seqs, max_blocks]`` and
        ``seqused_k [num_seqs]``) or contiguous ``[total_k, Hkv, D]`` (with ``cu_seqlens_k [num_seqs+1]``
        and optionally ``seqused_k``). FP8 caches are dequantised as ``stored * descale``.
    cu_seqlens_q : torch.Tensor
        ``[num_seqs + 1]`` int32 query offsets.
    causal, window_size, softcap, alibi_slopes, s_aux, k_descale, v_descale, kv_descale_per_token, q_descale,
    q_descale_per_token
        As in ``kvflash.flash_attn_interface.flash_attn_varlen_func`` (its docstring states the contract).
        Per-token-head descales (``[num_blocks, block_size, Hkv]`` paged; ``[total_k, Hkv]`` contiguous with
        ``kv_descale_per_token=True``, or the normalised ``[1, total_k, Hkv]``) are gathered like the cache:
        key ``j`` of a sequence is ``stored_j * descale_j`` per KV head. ``q_descale`` (per sequence and KV head,
        for an fp8 ``q``; per (token, query head) ``[total_q, Hq]`` with ``q_descale_per_token``, or the normalised
        ``[1, total_q, Hq]``): the real query is ``q * q_descale``, exactly (no fp8 rounding of P is modelled).
    compute_dtype : torch.dtype
        float64 or float32 for an oracle; fp16/bf16 to mimic a computation in the input precision.

    Returns
    -------
    out : torch.Tensor
        ``[total_q, Hq, D]`` in ``compute_dtype``; rows with no visible key (and no sink) are 0.
    lse : torch.Tensor
        ``[Hq, total_q]`` in float32 (float64 if ``compute_dtype`` is float64): the natural log of the
        softmax denominator, the sink included; ``-inf`` for rows with no visible key and no sink.
    """
    total_q, num_q_heads, head_size = q.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    num_kv_heads = k.shape[-2]
    group = num_q_heads // num_kv_heads
    scale = resolve_softmax_scale(softmax_scale, head_size)
    left, right = normalize_window(window_size, causal)
    slopes = normalize_alibi_slopes(alibi_slopes, num_seqs, num_q_heads, q.device)
    sinks = normalize_sinks(s_aux, num_q_heads, q.device)
    per_token = kv_descale_per_token
    if per_token is None:
        per_token = isinstance(k_descale, torch.Tensor) and k_descale.dim() == 3
    if per_token:  # per (stored token, KV head): gathered below like the cache itself
        k_tok, v_tok = (d[0] if block_table is None and d.dim() == 3 else d for d in (k_descale, v_descale))
    else:
        k_scale = normalize_descale("k_descale", k_descale, num_seqs, num_kv_heads, q.device)
        v_scale = normalize_descale("v_descale", v_descale, num_seqs, num_kv_heads, q.device)
    q_scale = q_token_scale = None
    if isinstance(q_descale, torch.Tensor) and (q_descale_per_token or q_descale.dim() == 3):
        q_token_scale = q_descale.reshape(total_q, num_q_heads)  # [total_q, Hq]
    elif q_descale is not None:  # [num_seqs, Hq]: each query head takes its KV head's descale
        q_scale = normalize_descale("q_descale", q_descale, num_seqs, num_kv_heads, q.device)
        q_scale = q_scale.repeat_interleave(group, dim=1)
    lse_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32

    q_starts = cu_seqlens_q.tolist()
    k_starts = cu_seqlens_k.tolist() if cu_seqlens_k is not None else None
    used = seqused_k.tolist() if seqused_k is not None else None

    out = torch.zeros(total_q, num_q_heads, head_size, dtype=compute_dtype, device=q.device)
    lse = torch.full((num_q_heads, total_q), float("-inf"), dtype=lse_dtype, device=q.device)
    for s in range(num_seqs):
        q0, q1 = q_starts[s], q_starts[s + 1]
        q_len = q1 - q0
        if k_starts is not None:
            kv_len = k_starts[s + 1] - k_starts[s]
            if used is not None:
                kv_len = min(kv_len, used[s])
        else:
            kv_len = used[s]
        if q_len == 0:
            continue
        ks = gather_sequence_kv(k, s, kv_len, block_table=block_table, cu_seqlens_k=k_starts)
        vs = gather_sequence_kv(v, s, kv_len, block_table=block_table, cu_seqlens_k=k_starts)
        if per_token:  # [kv_len, Hkv, D] * [kv_len, Hkv, 1]
            kd = gather_sequence_kv(k_tok, s, kv_len, block_table=block_table, cu_seqlens_k=k_starts)
            vd = gather_sequence_kv(v_tok, s, kv_len, block_table=block_table, cu_seqlens_k=k_starts)
            ks = ks.to(compute_dtype) * kd.to(compute_dtype)[:, :, None]
            vs = vs.to(compute_dtype) * vd.to(compute_dtype)[:, :, None]
        else:  # Dequantise in compute precision: [kv_len, Hkv, D] * [Hkv, 1].
            ks = ks.to(compute_dtype) * k_scale[s].to(compute_dtype)[:, None]
            vs = vs.to(compute_dtype) * v_scale[s].to(compute_dtype)[:, None]
        ks = ks.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, kv_len, D]
        vs = vs.repeat_interleave(group, dim=1).transpose(0, 1)
        qs = q[q0:q1].to(compute_dtype)
        if q_scale is not None:  # [q_len, Hq, D] * [Hq, 1]
            qs = qs * q_scale[s].to(compute_dtype)[:, None]
        if q_token_scale is not None:  # [q_len, Hq, D] * [q_len, Hq, 1]
            qs = qs * q_token_scale[q0:q1].to(compute_dtype)[:, :, None]
        qs = qs.transpose(0, 1)  # [Hq, q_len, D]

        scores = torch.matmul(qs, ks.transpose(1, 2)) * scale  # [Hq, q_len, kv_len]
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(q_len, device=q.device)[:, None] + (kv_len - q_len)  # bottom-right aligned
        k_pos = torch.arange(kv_len, device=q.device)[None, :]
        if slopes is not None:
            distance = (q_pos - k_pos).abs().to(compute_dtype)
            scores = scores - slopes[s].to(compute_dtype)[:, None, None] * distance
        visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device)
        if left >= 0:
            visible &= k_pos >= q_pos - left
        if right >= 0:
            visible &= k_pos <= q_pos + right
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink_col = sinks.to(compute_dtype)[:, None, None].expand(num_q_heads, q_len, 1)
            row_lse = torch.logsumexp(torch.cat([scores, sink_col], dim=-1), dim=-1)
        else:
            row_lse = torch.logsumexp(scores, dim=-1)  # [Hq, q_len]; -inf where nothing is visible
        safe_lse = torch.where(torch.isinf(row_lse), torch.zeros_like(row_lse), row_lse)
        probs = torch.exp(scores - safe_lse[..., None])
        out[q0:q1] = torch.matmul(probs, vs).transpose(0, 1)
        lse[:, q0:q1] = row_lse.to(lse_dtype)
    return out, lse


def reference_attention_into(
    out: torch.Tensor, lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, *, output_scale: torch.Tensor | None = None, **features,
) -> None:  # fmt: skip
    """The kernels' CPU fallback (interpreter off): :func:`reference_attention` in float32, written into the
    op's ``out [total_q, Hq, D]`` and, if given, ``lse [Hq, total_q]``. With ``output_scale`` (``[1]`` float32)
    ``out`` is fp8 e4m3 and receives ``saturate(attention / output_scale)``. Reads lengths on the host."""
    ref_out, ref_lse = reference_attention(q, k, v, cu_seqlens_q, **features)
    if output_scale is not None:
        ref_out = saturate_to_fp8(ref_out, output_scale, out.dtype)
    out.copy_(ref_out)
    if lse is not None:
        lse.copy_(ref_lse)

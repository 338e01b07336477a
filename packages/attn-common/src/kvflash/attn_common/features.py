"""All feature arguments of an attention call, validated and normalised in one place.

Both kernel packages' launchers call :func:`normalize_attention_features` after the KV layout is checked, so
the softmax scale, window, softcap, ALiBi slopes, sinks and descales mean the same thing on every path.
"""

from __future__ import annotations

import dataclasses

import torch

from kvflash.attn_common.descale import normalize_kv_descales, normalize_q_descale
from kvflash.attn_common.feature_args import (
    check_softcap,
    normalize_alibi_slopes,
    normalize_sinks,
    normalize_window,
    resolve_softmax_scale,
)
from kvflash.attn_common.kv_layout import KVLayout
from kvflash.attn_common.output import normalize_output_scale

__all__ = ["AttentionFeatures", "normalize_attention_features"]


@dataclasses.dataclass(frozen=True)
class AttentionFeatures:
    """Validated, normalised feature arguments (tensors on the query's device)."""

    softmax_scale: float
    window_left: int  # -1 = unbounded
    window_right: int  # -1 = unbounded; 0 with causal
    softcap: float  # 0 = off
    alibi_slopes: torch.Tensor | None  # [num_seqs, Hq] fp32 view
    s_aux: torch.Tensor | None  # [Hq] fp32, contiguous
    # [num_seqs, Hkv] fp32 views; per-token-head: [num_blocks, block_size, Hkv] (paged) or [1, total_k, Hkv]
    # (contiguous) fp32 views, rank 3 (attn_common.descale.normalize_kv_descales)
    k_descale: torch.Tensor
    v_descale: torch.Tensor
    output_scale: torch.Tensor | None = None  # [1] fp32: out = saturate(attention / output_scale) in fp8 e4m3
    # For an fp8 q only (real q = q * q_descale): a [num_seqs, Hkv] fp32 view, or per (token, query head) a
    # [1, total_q, Hq] fp32 view (rank 3; q_descale_per_token=True)
    q_descale: torch.Tensor | None = None


def normalize_attention_features(
    q: torch.Tensor,
    layout: KVLayout,
    *,
    softmax_scale: float | None,
    causal: bool,
    window_size,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    s_aux: torch.Tensor | None,
    k_descale: torch.Tensor | float | None,
    v_descale: torch.Tensor | float | None,
    k: torch.Tensor,
    output_scale: torch.Tensor | None = None,
    kv_descale_per_token: bool | None = None,
    q_descale: torch.Tensor | float | None = None,
    q_descale_per_token: bool | None = None,
) -> AttentionFeatures:
    """Validate and normalise the feature arguments of a call with query ``q [*, Hq, D]`` over ``layout``.

    ``k`` (the validated key cache) sizes per-token-head descales; ``kv_descale_per_token`` picks the descale
    mode (see :func:`kvflash.attn_common.descale.normalize_kv_descales`; the normalised descales' rank tells the
    mode apart afterwards). ``q_descale`` (an fp8 ``q`` only; ``None`` is 1.0) takes the per-(sequence, KV head)
    forms of the K/V descales, or with ``q_descale_per_token=True`` one float32 scale per (token, query head),
    ``[total_q, Hq]`` (:func:`kvflash.attn_common.descale.normalize_q_descale`). Raises ``TypeError`` /
    ``ValueError`` naming the argument; reads no tensor values.
    """
    num_q_heads = q.shape[1]
    left, right = normalize_window(window_size, causal)
    k_scale, v_scale = normalize_kv_descales(
        k_descale, v_descale, k=k, is_paged=layout.is_paged, kv_is_fp8=layout.types.kv_is_fp8,
        num_seqs=layout.num_seqs, num_kv_heads=layout.num_kv_heads, device=q.device,
        kv_descale_per_token=kv_descale_per_token,
    )  # fmt: skip
    if layout.types.q_is_fp8:
        q_scale = normalize_q_descale(
            q_descale, q=q, num_seqs=layout.num_seqs, num_kv_heads=layout.num_kv_heads, per_token=q_descale_per_token
        )
    elif q_descale is not None:
        raise ValueError(f"q_descale: descales an fp8 (float8_e4m3fn) query, but q is {q.dtype}")
    elif q_descale_per_token:
        raise ValueError(f"q_descale_per_token: applies to an fp8 (float8_e4m3fn) query, but q is {q.dtype}")
    else:
        q_scale = None
    return AttentionFeatures(
        softmax_scale=resolve_softmax_scale(softmax_scale, layout.head_size),
        window_left=left,
        window_right=right,
        softcap=check_softcap(softcap),
        alibi_slopes=normalize_alibi_slopes(alibi_slopes, layout.num_seqs, num_q_heads, q.device),
        s_aux=normalize_sinks(s_aux, num_q_heads, q.device),
        k_descale=k_scale,
        v_descale=v_scale,
        output_scale=normalize_output_scale(output_scale, q.device),
        q_descale=q_scale,
    )

"""All feature arguments of an attention call, validated and normalised in one place.

Both kernel packages' launchers call :func:`normalize_attention_features` after the KV layout is checked, so
the softmax scale, window, softcap, ALiBi slopes, sinks and descales mean the same thing on every path.
"""

from __future__ import annotations

import dataclasses

import torch

from kvflash.attn_common.descale import normalize_descale
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
    k_descale: torch.Tensor  # [num_seqs, Hkv] fp32 view
    v_descale: torch.Tensor  # [num_seqs, Hkv] fp32 view
    output_scale: torch.Tensor | None = None  # [1] fp32: out = saturate(attention / output_scale) in fp8 e4m3


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
    output_scale: torch.Tensor | None = None,
) -> AttentionFeatures:
    """Validate and normalise the feature arguments of a call with query ``q [*, Hq, D]`` over ``layout``.

    Raises ``TypeError`` / ``ValueError`` naming the argument; reads no tensor values.
    """
    num_q_heads = q.shape[1]
    left, right = normalize_window(window_size, causal)
    return AttentionFeatures(
        softmax_scale=resolve_softmax_scale(softmax_scale, layout.head_size),
        window_left=left,
        window_right=right,
        softcap=check_softcap(softcap),
        alibi_slopes=normalize_alibi_slopes(alibi_slopes, layout.num_seqs, num_q_heads, q.device),
        s_aux=normalize_sinks(s_aux, num_q_heads, q.device),
        k_descale=normalize_descale("k_descale", k_descale, layout.num_seqs, layout.num_kv_heads, q.device),
        v_descale=normalize_descale("v_descale", v_descale, layout.num_seqs, layout.num_kv_heads, q.device),
        output_scale=normalize_output_scale(output_scale, q.device),
    )

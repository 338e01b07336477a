"""Normalisation of the feature arguments every attention launcher shares: softmax scale, window,
softcap, ALiBi slopes and sinks (``s_aux``). Shapes and Python values only; no host synchronisation.
"""

from __future__ import annotations

import math

import torch

from kvflash.attn_common.checks import check_real, check_tensor

# An unbounded window edge as the kernels see it: larger than any position difference, small enough
# that ``position +/- UNBOUNDED_WINDOW`` stays inside int32.
UNBOUNDED_WINDOW = 1 << 30

__all__ = [
    "UNBOUNDED_WINDOW",
    "kernel_window",
    "resolve_softmax_scale",
    "normalize_window",
    "check_softcap",
    "normalize_alibi_slopes",
    "normalize_sinks",
]

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_softmax_scale(softmax_scale: float | None, head_size: int) -> float:
    """``None`` becomes ``1 / sqrt(head_size)``; otherwise a finite positive float."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_size)
    scale = check_real("softmax_scale", softmax_scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"softmax_scale: expected a finite positive float, got {softmax_scale}")
    return scale


def normalize_window(window_size, causal: bool) -> tuple[int, int]:
    """Return ``(left, right)`` with ``-1`` meaning unbounded; with ``causal`` the right edge is 0.

    ``window_size`` is ``None``, or a pair of ints ``>= -1``.
    """
    if window_size is None:
        left, right = -1, -1
    else:
        # Python ints only: int() of a tensor would synchronise, int() of a float would truncate.
        if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
            raise TypeError(f"window_size: expected None or a pair (left, right) of ints, got {window_size!r}")
        left, right = window_size
        for edge in (left, right):
            if isinstance(edge, bool) or not isinstance(edge, int):
                raise TypeError(f"window_size: expected None or a pair (left, right) of ints, got {window_size!r}")
        if left < -1 or right < -1:
            raise ValueError(f"window_size: entries must be >= -1 (-1 = unbounded), got {tuple(window_size)}")
    if causal:
        right = 0
    return left, right


def kernel_window(left: int, right: int) -> tuple[int, int]:
    """Map ``-1`` (unbounded) edges of a normalised window to :data:`UNBOUNDED_WINDOW` for the kernels."""
    return (UNBOUNDED_WINDOW if left < 0 else left, UNBOUNDED_WINDOW if right < 0 else right)


def check_softcap(softcap: float) -> float:
    """``0`` disables it; otherwise a finite positive float."""
    value = check_real("softcap", softcap)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"softcap: expected 0 (off) or a finite positive float, got {softcap}")
    return value


def normalize_alibi_slopes(
    alibi_slopes: torch.Tensor | None, num_seqs: int, num_q_heads: int, device: torch.device
) -> torch.Tensor | None:
    """``[Hq]`` or ``[num_seqs, Hq]`` float32 slopes as a ``[num_seqs, Hq]`` view (stride 0 on axis 0 for ``[Hq]``)."""
    if alibi_slopes is None:
        return None
    check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,), device=device, last_dim_contiguous=False)
    if alibi_slopes.dim() == 1 and alibi_slopes.shape[0] == num_q_heads:
        return alibi_slopes.unsqueeze(0).expand(num_seqs, num_q_heads)
    if alibi_slopes.dim() == 2 and tuple(alibi_slopes.shape) == (num_seqs, num_q_heads):
        return alibi_slopes
    raise ValueError(
        f"alibi_slopes: expected shape [Hq]=[{num_q_heads}] or [num_seqs, Hq]=[{num_seqs}, {num_q_heads}], "
        f"got {list(alibi_slopes.shape)}"
    )


def normalize_sinks(s_aux: torch.Tensor | None, num_q_heads: int, device: torch.device) -> torch.Tensor | None:
    """Sinks ``[Hq]`` (float32, fp16 or bf16) as float32 ``[Hq]``: one extra logit per head."""
    if s_aux is None:
        return None
    check_tensor("s_aux", s_aux, dtypes=_FLOAT_TYPES, shape=(num_q_heads,), device=device, last_dim_contiguous=False)
    # The kernels read sinks[h] at offset h: make a strided or stride-0 (expanded) view contiguous.
    return s_aux.to(torch.float32).contiguous()

"""Per-tensor FP8 quantise / dequantise of whole tensors (weights, activations, test data).

Saturating: ``x_fp8 = clamp(x / scale, -fp8_max, fp8_max)`` rounded to nearest even
(:func:`kvflash.attn_common.saturate_to_fp8`), so values beyond the range become ``±fp8_max`` instead of NaN
(torch's plain cast gives NaN for e4m3 and inf for e5m2).
Elementwise torch ops: they run on every device torch does, fuse under ``torch.compile`` and never
synchronise with the host.
"""

from __future__ import annotations

import math

import torch

from kvflash.attn_common import (
    FP8_TORCH_DTYPES,
    MODEL_TORCH_DTYPES,
    SCALE_TORCH_DTYPES,
    check_tensor,
    saturate_to_fp8,
)
from kvflash.attn_common.ops import define_op
from kvflash.fp8_utils.scales import amax_to_scale, fp8_finite_max

__all__ = ["scaled_fp8_quant", "dequantize_fp8"]


def _scaled_fp8_quant_impl(
    x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    fp8_max = fp8_finite_max("dtype", dtype)
    if scale is None:
        amax = x.abs().amax().reshape(1) if x.numel() else torch.zeros(1, device=x.device)
        scale = amax_to_scale(amax, fp8_max)
    else:
        # A fresh tensor: a custom op's outputs may not alias its inputs.
        scale = scale.reshape(1).to(torch.float32, copy=True)
    return saturate_to_fp8(x, scale, dtype), scale


def _scaled_fp8_quant_fake(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype):
    return torch.empty_like(x, dtype=dtype), x.new_empty(1, dtype=torch.float32)


# torch.ops.kvflash.scaled_fp8_quant (attn_common.ops: one C++ dispatch per eager call).
_scaled_fp8_quant_op = define_op("scaled_fp8_quant", _scaled_fp8_quant_impl, _scaled_fp8_quant_fake, mutates_args=())


def scaled_fp8_quant(
    x: torch.Tensor, scale: torch.Tensor | float | None = None, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` to FP8 with one scale for the whole tensor: ``x ≈ x_fp8 * scale``.

    Parameters
    ----------
    x : torch.Tensor
        Any shape, float16, bfloat16 or float32.
    scale : None, float or torch.Tensor
        Static: a positive float or a one-element float32/float16/bfloat16 tensor on ``x``'s device (its
        value is not checked: that would need a host synchronisation). Dynamic (``None``): computed on the
        device as ``amax(|x|) / fp8_max`` (at least ``1 / (fp8_max * 512)``, so zeros stay zeros).
    dtype : torch.dtype
        ``float8_e4m3fn`` (default), ``float8_e4m3fnuz`` or ``float8_e5m2``.

    Returns
    -------
    x_fp8 : torch.Tensor
        ``x``'s shape, ``dtype``; saturated to the format's finite range.
    scale : torch.Tensor
        float32 ``[1]``: the scale used.
    """
    check_tensor("x", x, dtypes=MODEL_TORCH_DTYPES, last_dim_contiguous=False)
    fp8_finite_max("dtype", dtype)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale: expected a positive finite float, got {scale!r}")
        scale = torch.full((1,), float(scale), dtype=torch.float32, device=x.device)
    elif scale is not None:
        check_tensor("scale", scale, dtypes=SCALE_TORCH_DTYPES, device=x.device, last_dim_contiguous=False)
        if scale.numel() != 1:
            raise ValueError(f"scale: expected one element (a per-tensor scale), got shape {list(scale.shape)}")
    return _scaled_fp8_quant_op(x, scale, dtype)


def dequantize_fp8(
    x_fp8: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``x_fp8 * scale`` in ``dtype`` (the product is taken in float32).

    Parameters
    ----------
    x_fp8 : torch.Tensor
        Any shape, one of the FP8 dtypes.
    scale : float or torch.Tensor
        A float, a one-element tensor, or a float32/float16/bfloat16 tensor that broadcasts to ``x_fp8``
        without enlarging it, e.g. ``[Hkv, 1]`` for ``x_fp8 [num_tokens, Hkv, D]`` with per-head scales.
    dtype : torch.dtype
        float16, bfloat16 (default) or float32.
    """
    check_tensor("x_fp8", x_fp8, dtypes=FP8_TORCH_DTYPES, last_dim_contiguous=False)
    if dtype not in MODEL_TORCH_DTYPES:
        raise TypeError(f"dtype: expected torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return (x_fp8.float() * float(scale)).to(dtype)
    check_tensor("scale", scale, dtypes=SCALE_TORCH_DTYPES, device=x_fp8.device, last_dim_contiguous=False)
    if scale.numel() != 1:
        try:
            broadcast = torch.broadcast_shapes(scale.shape, x_fp8.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != x_fp8.shape:
            raise ValueError(
                f"scale: shape {list(scale.shape)} does not broadcast to x_fp8's shape {list(x_fp8.shape)}"
            )
    else:
        scale = scale.reshape(())
    return (x_fp8.float() * scale.float()).to(dtype)

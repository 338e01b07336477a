"""FP8 scales: computing them (``amax / fp8_max``) and normalising the forms callers pass them in.

Everything here stays on the device: scales are computed with tensor ops and never read on the host,
so these functions add no host synchronisation and can be captured in CUDA graphs.
"""

from __future__ import annotations

import math

import torch

from kvflash.attn_common import FP8_TORCH_DTYPES, MODEL_TORCH_DTYPES, SCALE_TORCH_DTYPES, KVFlashDType, check_tensor

__all__ = ["compute_kv_scales", "amax_to_scale", "min_scale", "split_cache_scale", "fp8_finite_max"]

# Built once: a dict lookup traces under torch.compile, iterating the KVFlashDType enum does not.
_FP8_FINITE_MAX = {dtype: KVFlashDType.from_torch(dtype).finite_max for dtype in FP8_TORCH_DTYPES}


def fp8_finite_max(name: str, dtype: object) -> float:
    """The largest finite value of FP8 ``dtype``; ``TypeError`` naming ``name`` for any other dtype."""
    if dtype not in _FP8_FINITE_MAX:
        names = ", ".join(str(d) for d in FP8_TORCH_DTYPES)
        raise TypeError(f"{name}: expected one of {names}, got {dtype}")
    return _FP8_FINITE_MAX[dtype]


def min_scale(fp8_max: float) -> float:
    """The smallest scale :func:`amax_to_scale` returns: ``1 / (fp8_max * 512)``.

    An all-zero input would otherwise get scale 0 and quantise to NaN (``0 / 0``); with this floor it
    quantises to zeros. The floor follows vLLM's dynamic quantisation, so scales agree with it.
    """
    return 1.0 / (fp8_max * 512.0)


def amax_to_scale(amax: torch.Tensor, fp8_max: float, margin: float = 1.0) -> torch.Tensor:
    """``max(amax / fp8_max * margin, min_scale(fp8_max))`` in float32, on ``amax``'s device."""
    return (amax.float() / fp8_max * margin).clamp_min(min_scale(fp8_max))


def compute_kv_scales(
    x: torch.Tensor,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    *,
    per_head: bool = False,
    margin: float = 1.0,
) -> torch.Tensor:
    """Dynamic FP8 scales for keys or values: ``amax(|x|) / fp8_max * margin``.

    Parameters
    ----------
    x : torch.Tensor
        ``[num_tokens, Hkv, D]``, float16, bfloat16 or float32.
    fp8_dtype : torch.dtype
        The FP8 format the scales are for (its finite maximum is ``fp8_max``: 448 for e4m3fn, 240 for
        e4m3fnuz, 57344 for e5m2).
    per_head : bool
        One scale per KV head (amax over tokens and head dims) instead of one for the whole tensor.
    margin : float
        ``>= 1``: head room for later tokens larger than these (values beyond the range saturate).

    Returns
    -------
    torch.Tensor
        float32 ``[1]`` or ``[Hkv]`` on ``x``'s device, always positive: an all-zero input (or no tokens)
        gets ``1 / (fp8_max * 512)``. Pass it as ``k_scale`` / ``v_scale`` to ``reshape_and_cache_flash``
        and as ``k_descale`` / ``v_descale`` to the attention kernels.
    """
    check_tensor("x", x, dtypes=MODEL_TORCH_DTYPES, ndim=3, last_dim_contiguous=False)
    fp8_max = fp8_finite_max("fp8_dtype", fp8_dtype)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 1:
        raise ValueError(f"margin: expected a finite float >= 1, got {margin!r}")
    num_kv_heads = x.shape[1]
    if x.numel() == 0:
        amax = torch.zeros(num_kv_heads if per_head else 1, dtype=torch.float32, device=x.device)
    elif per_head:
        amax = x.abs().amax(dim=(0, 2))
    else:
        amax = x.abs().amax().reshape(1)
    return amax_to_scale(amax, fp8_max, float(margin))


def split_cache_scale(
    name: str, scale: torch.Tensor | float | None, num_kv_heads: int, device: torch.device
) -> tuple[torch.Tensor | None, float]:
    """Split a ``k_scale`` / ``v_scale`` argument into ``(tensor or None, python float)``.

    ``None`` gives ``(None, 1.0)``; a positive finite float ``s`` gives ``(None, s)``; a float32 / float16 /
    bfloat16 tensor with one element or of shape ``[Hkv]`` gives ``(tensor, 1.0)``. Tensor values are not
    read (no host synchronisation).
    """
    if scale is None:
        return None, 1.0
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        value = float(scale)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}: expected a positive finite scale, got {scale!r}")
        return None, value
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name}: expected None, a float or a tensor, got {type(scale).__name__}")
    check_tensor(name, scale, dtypes=SCALE_TORCH_DTYPES, device=device, last_dim_contiguous=False)
    if scale.numel() != 1 and tuple(scale.shape) != (num_kv_heads,):
        raise ValueError(
            f"{name}: expected 1 element (per tensor) or shape [Hkv]=[{num_kv_heads}] (per KV head), "
            f"got shape {list(scale.shape)}"
        )
    return scale, 1.0

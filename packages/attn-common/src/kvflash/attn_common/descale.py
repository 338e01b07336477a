"""Descale normalisation: every accepted form of ``k_descale`` / ``v_descale`` becomes one float32
``[num_seqs, Hkv]`` tensor that the kernels index as ``ptr + seq * stride_seq + kv_head * stride_head``.

Accepted forms: ``None`` (1.0), a Python float, or a float32/fp16/bf16 tensor broadcastable to
``[num_seqs, Hkv]``: one element, ``[Hkv]``, ``[1, Hkv]``, ``[num_seqs, 1]``, ``[num_seqs, Hkv]``, and
expanded stride-0 views of those. A float32 tensor is returned as a view (stride 0 on broadcast axes):
no copy, and no host synchronisation ever (values are never read on the host).
"""

from __future__ import annotations

import math

import torch

from kvflash.attn_common.call_plan import keep_constant
from kvflash.attn_common.platform import stream_capturing

__all__ = ["normalize_descale", "DESCALE_TORCH_DTYPES"]

DESCALE_TORCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def normalize_descale(
    name: str,
    descale: torch.Tensor | float | None,
    num_seqs: int,
    num_kv_heads: int,
    device: torch.device,
) -> torch.Tensor:
    """Return ``descale`` as a float32 ``[num_seqs, num_kv_heads]`` tensor (possibly a stride-0 view).

    Parameters
    ----------
    name : str
        ``"k_descale"`` or ``"v_descale"``, for error messages.
    descale : None, float or torch.Tensor
        The real value of a stored cache element is ``stored * descale``.
    num_seqs, num_kv_heads : int
        The broadcast target ``[num_seqs, Hkv]``.
    device : torch.device
        The query's device; tensors must already live there.

    Raises
    ------
    TypeError
        For a non-float, non-tensor value or a tensor of another dtype.
    ValueError
        For a Python number that is not finite and positive, a shape not broadcastable to ``[num_seqs, Hkv]``,
        or a tensor on another device.
    """
    if descale is None or isinstance(descale, (int, float)) and not isinstance(descale, bool):
        value = 1.0 if descale is None else float(descale)
        # A Python number is checked here for free (a tensor's values are not read: that would synchronise).
        # Zero, negative, NaN or infinite scales are mistakes the cache writer rejects too.
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: expected a finite positive float (or a tensor), got {descale!r}")
        return _constant_scale(value, device).expand(num_seqs, num_kv_heads)
    if not isinstance(descale, torch.Tensor):
        raise TypeError(f"{name}: expected None, a float or a tensor, got {type(descale).__name__}")
    if descale.dtype not in DESCALE_TORCH_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {descale.dtype}")
    if descale.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the query's device), got one on {descale.device}")
    target = (num_seqs, num_kv_heads)
    shape = tuple(descale.shape)
    if descale.numel() == 1:
        scale_2d = descale.reshape(1, 1)
    elif descale.dim() <= 2 and _broadcasts(shape, target):
        scale_2d = descale if descale.dim() == 2 else descale.reshape(1, -1)
    else:
        raise ValueError(
            f"{name}: expected 1 element, [Hkv]=[{num_kv_heads}] or a shape broadcastable to "
            f"[num_seqs, Hkv]=[{num_seqs}, {num_kv_heads}], got shape {list(shape)}"
        )
    if scale_2d.dtype != torch.float32:
        scale_2d = scale_2d.float()
    return scale_2d.expand(num_seqs, num_kv_heads)


# (value, device) -> a [1, 1] float32 tensor holding it. A scale given as None or a float would otherwise cost a
# tensor allocation and a fill kernel in every call (~5 µs of host time on a GPU, and one more launch). The
# tensors are never written and never freed (a captured CUDA graph may hold their address), so the number of
# distinct values kept is bounded; past it, new values get a fresh tensor per call as before.
_CONSTANT_SCALES: dict[tuple[float, torch.device], torch.Tensor] = {}
_MAX_CONSTANT_SCALES = 256


def _constant_scale(value: float, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced: a fresh constant in the graph, no module state captured
        return torch.full((1, 1), value, dtype=torch.float32, device=device)
    key = (value, device)
    found = _CONSTANT_SCALES.get(key)
    if found is None:
        if stream_capturing(device):  # filled by the graph's replay only: never kept for eager calls
            return torch.full((1, 1), value, dtype=torch.float32, device=device)
        with torch.inference_mode(False), torch.no_grad():  # usable inside and outside inference mode
            found = torch.full((1, 1), value, dtype=torch.float32, device=device)
        if len(_CONSTANT_SCALES) < _MAX_CONSTANT_SCALES:
            _CONSTANT_SCALES[key] = keep_constant(found)
    return found


def _broadcasts(shape: tuple[int, ...], target: tuple[int, int]) -> bool:
    padded = (1,) * (2 - len(shape)) + shape
    return all(s in (1, t) for s, t in zip(padded, target))

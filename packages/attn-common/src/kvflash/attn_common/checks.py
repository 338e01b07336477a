"""Argument checks shared by every launcher.

Each failure raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong rank, shape, stride,
device or value) with a message that names the argument, says what was expected and what came.
None of these read tensor values: they look at shapes, dtypes, strides and devices only, so they cost no
host synchronisation and work on fake tensors under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "check_tensor",
    "check_index_tensor",
    "check_same_device",
    "check_gqa",
    "check_head_size",
    "check_block_size",
    "check_int",
    "check_bool",
    "check_real",
    "check_device_type",
    "DEVICE_TYPES",
    "MIN_HEAD_SIZE",
    "MAX_HEAD_SIZE",
]

MIN_HEAD_SIZE = 8
MAX_HEAD_SIZE = 512
HEAD_SIZE_STEP = 8
# Devices the kernels run on: GPUs (ROCm answers as "cuda") and the CPU (Triton interpreter or the reference).
DEVICE_TYPES = ("cpu", "cuda", "xpu")


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    last_dim_contiguous: bool = True,
) -> torch.Tensor:
    """Check one tensor argument and return it.

    Parameters
    ----------
    name : str
        The argument's name, used in the error message.
    t : object
        The value to check.
    dtypes : sequence of torch.dtype, optional
        Allowed dtypes.
    ndim : int, optional
        Required rank.
    shape : sequence of int or None, optional
        Required sizes; ``None`` entries are free. Implies ``ndim``.
    device : torch.device, optional
        Required device (the query's for attention, the key's for the cache writer).
    last_dim_contiguous : bool
        Require ``stride(-1) == 1`` (kernels vectorise along the last dimension).
    """
    # Every eager attention call runs about ten of these: each attribute is read once (shape, dim) and the
    # messages are only formatted on failure.
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    got = t.shape
    if shape is not None:
        if len(got) != len(shape):
            raise ValueError(f"{name}: expected a {len(shape)}-D tensor, got {len(got)}-D with shape {tuple(got)}")
        for want, size in zip(shape, got):
            if want is not None and want != size:
                axis = next(i for i, (w, g) in enumerate(zip(shape, got)) if w is not None and w != g)
                expected = tuple("*" if s is None else s for s in shape)
                raise ValueError(f"{name}: expected shape {expected}, got {tuple(got)} (dimension {axis} differs)")
    elif ndim is not None and len(got) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {len(got)}-D with shape {tuple(got)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if last_dim_contiguous and got and got[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name}: the last dimension must be contiguous (stride(-1) == 1), got strides {tuple(t.stride())}"
        )
    return t


def check_index_tensor(
    name: str,
    t: object,
    *,
    shape: Sequence[int | None],
    device: torch.device,
) -> torch.Tensor:
    """Check an int32 index tensor (``cu_seqlens_*``, ``seqused_k``, ``block_table``)."""
    return check_tensor(name, t, dtypes=(torch.int32,), shape=shape, device=device)


def check_device_type(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` lives on a device kvflash computes on (:data:`DEVICE_TYPES`); ``meta`` tensors and others are
    rejected here, by their own name, before any other argument is compared with their device."""
    if t.device.type not in DEVICE_TYPES:
        raise ValueError(f"{name}: expected a tensor on a CPU or GPU (cuda, xpu) device, got one on {t.device}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors (``None`` skipped) live on one device; the message names the first odd one."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: expected a tensor on {first.device} (like {first_name}), got one on {t.device}")


def check_int(name: str, value: object, minimum: int = 0) -> int:
    """A Python int (not a bool, not a tensor: reading a tensor would synchronise) that is ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a Python int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """A Python bool (a tensor would need a host synchronisation to read)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def check_real(name: str, value: object) -> float:
    """A Python int or float (not a bool, not a tensor), returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a Python float, got {type(value).__name__}")
    return float(value)


def check_gqa(num_q_heads: int, num_kv_heads: int) -> int:
    """``Hq % Hkv == 0``; returns the group size ``Hq // Hkv``."""
    if num_kv_heads <= 0 or num_q_heads <= 0:
        raise ValueError(f"head counts must be positive, got Hq={num_q_heads} and Hkv={num_kv_heads}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"the number of query heads ({num_q_heads}) must be a multiple of the number of KV heads "
            f"({num_kv_heads}) for GQA/MQA"
        )
    return num_q_heads // num_kv_heads


def check_head_size(head_size: int, name: str = "head size") -> int:
    """Head sizes from 8 to 512 in steps of 8, as FlashAttention accepts them (the kernels pad to a power of
    two, at least 16 for ``tl.dot``, and mask the padding)."""
    if head_size % HEAD_SIZE_STEP != 0 or not MIN_HEAD_SIZE <= head_size <= MAX_HEAD_SIZE:
        raise ValueError(
            f"{name}: expected a multiple of {HEAD_SIZE_STEP} between {MIN_HEAD_SIZE} and {MAX_HEAD_SIZE}, "
            f"got {head_size}"
        )
    return head_size


def check_block_size(block_size: int) -> int:
    """A positive page size (1, 16, 32, 64, 128, 256 are the tested set; any positive size is accepted)."""
    if block_size < 1:
        raise ValueError(f"block_size (k.shape[1]): expected a positive page size, got {block_size}")
    return block_size

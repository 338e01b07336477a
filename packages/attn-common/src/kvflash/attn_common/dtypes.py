"""The element types kvflash takes: every dtype set, the :class:`KVFlashDType` enum, and the one plain-torch
saturating FP8 quantisation (:func:`saturate_to_fp8`) that writers, quantisers and tests are checked against.

Nothing else in the packages spells a dtype tuple. (The kernels' own FP8 constants live beside the jit code
that uses them, in :mod:`kvflash.attn_common.jit_helpers`.)
"""

from __future__ import annotations

import enum

import torch

__all__ = [
    "KVFlashDType",
    "FP8_TORCH_DTYPES",
    "OCP_FP8_TORCH_DTYPES",
    "QUERY_TORCH_DTYPES",
    "MODEL_TORCH_DTYPES",
    "SCALE_TORCH_DTYPES",
    "OUTPUT_FP8_DTYPE",
    "FP8_QUERY_DTYPE",
    "ATTENTION_QUERY_DTYPES",
    "saturate_to_fp8",
]


class KVFlashDType(enum.Enum):
    """Element types accepted by the kvflash kernels.

    Values are the torch dtype names. ``FLOAT8_E4M3FNUZ`` exists for the AMD targets (MI300) whose FP8
    hardware format it is; elsewhere ``FLOAT8_E4M3FN`` is the e4m3 format.
    """

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT8_E4M3FN = "float8_e4m3fn"
    FLOAT8_E4M3FNUZ = "float8_e4m3fnuz"
    FLOAT8_E5M2 = "float8_e5m2"

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype, e.g. ``torch.float8_e4m3fn``."""
        return getattr(torch, self.value)

    @property
    def is_fp8(self) -> bool:
        """True for the three FP8 formats."""
        return self.value.startswith("float8")

    @property
    def finite_max(self) -> float:
        """Largest finite value of the format (448 for e4m3fn, 240 for e4m3fnuz, 57344 for e5m2)."""
        return float(torch.finfo(self.torch_dtype).max)

    @classmethod
    def from_torch(cls, dtype: torch.dtype, name: str = "tensor") -> KVFlashDType:
        """Map a torch dtype to the enum; ``TypeError`` naming ``name`` for a dtype kvflash does not take."""
        # A dict lookup, not a loop over the enum: torch.compile traces dict lookups but not enum iteration.
        member = _FROM_TORCH.get(dtype)
        if member is None:
            valid = ", ".join(m.value for m in cls)
            raise TypeError(f"{name}: dtype {dtype} is not supported by kvflash; expected one of {valid}")
        return member


_FROM_TORCH = {member.torch_dtype: member for member in KVFlashDType}

# Every set of dtypes kvflash accepts, in one place.
QUERY_TORCH_DTYPES = (torch.float16, torch.bfloat16)  # q, and out without output_scale
FP8_TORCH_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2)  # FP8 KV caches
OCP_FP8_TORCH_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # the FP8 caches NVIDIA converts in hardware
MODEL_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the cache writer and quantiser read
SCALE_TORCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # descale / scale tensors
OUTPUT_FP8_DTYPE = torch.float8_e4m3fn  # out with output_scale
FP8_QUERY_DTYPE = torch.float8_e4m3fn  # an fp8 query (with q_descale, over an FP8 cache)
ATTENTION_QUERY_DTYPES = QUERY_TORCH_DTYPES + (FP8_QUERY_DTYPE,)  # every q an attention call takes


def saturate_to_fp8(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """``saturate(x / scale)`` in the FP8 ``dtype``: the division in float32 (IEEE, round to nearest even),
    clamped to the format's finite range, so nothing becomes NaN or inf. The plain torch form every kvflash
    writer and quantiser is checked against. ``scale`` broadcasts against ``x`` (a float, ``[]``, per row...)."""
    fp8_max = float(torch.finfo(dtype).max)
    scale = scale.float() if isinstance(scale, torch.Tensor) else float(scale)
    return (x.float() / scale).clamp(-fp8_max, fp8_max).to(dtype)

"""The output of an attention call: its dtype, the ``out`` buffer a caller passes, and ``output_scale``.

``output_scale`` (a float32 tensor of one element) asks for a ``float8_e4m3fn`` output holding
``saturate(attention / output_scale)``, the static output quantisation engines fuse into attention. Without it
the output has the query's dtype, or bf16 for an fp8 query (an ``out`` buffer may then be fp16 or bf16). Shapes
and dtypes only: no tensor value is read.
"""

from __future__ import annotations

import torch

from kvflash.attn_common.call_plan import empty_buffer
from kvflash.attn_common.checks import check_tensor
from kvflash.attn_common.dtypes import FP8_QUERY_DTYPE, FP8_TORCH_DTYPES, OUTPUT_FP8_DTYPE, QUERY_TORCH_DTYPES

__all__ = ["normalize_output_scale", "empty_out", "check_out", "output_dtypes"]


def normalize_output_scale(output_scale: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """``output_scale`` as a float32 ``[1]`` view (no copy), or ``None``; ``TypeError`` / ``ValueError`` naming it."""
    if output_scale is None:
        return None
    check_tensor("output_scale", output_scale, dtypes=(torch.float32,), device=device, last_dim_contiguous=False)
    if output_scale.numel() != 1:
        raise ValueError(
            f"output_scale: expected one element (a static per-tensor scale), got shape {list(output_scale.shape)}"
        )
    return output_scale.reshape(1)


def output_dtypes(q: torch.Tensor) -> tuple[torch.dtype, ...]:
    """The dtypes of an output without ``output_scale`` (the model's dtypes): ``q``'s, or fp16 and bf16 for an fp8
    ``q``."""
    return QUERY_TORCH_DTYPES if q.dtype == FP8_QUERY_DTYPE else (q.dtype,)


def empty_out(q: torch.Tensor, output_scale: torch.Tensor | None) -> torch.Tensor:
    """A contiguous output for the caller, shaped like ``q``: fp8 e4m3 with ``output_scale``, else ``q``'s dtype
    (bf16 for an fp8 ``q``, as FlashAttention-3 returns)."""
    if output_scale is not None:
        dtype = OUTPUT_FP8_DTYPE
    else:
        dtype = torch.bfloat16 if q.dtype == FP8_QUERY_DTYPE else q.dtype
    return empty_buffer(q.shape, dtype, q.device)


def check_out(
    out: torch.Tensor,
    q: torch.Tensor,
    output_scale: torch.Tensor | None,
    extra_dtypes: tuple[torch.dtype, ...] = (),
) -> torch.Tensor:
    """Check a caller's ``out [total_q, Hq, D]`` against ``q`` and ``output_scale`` (normalised).

    With ``output_scale`` it must be ``float8_e4m3fn``; without it, ``q``'s dtype (fp16 or bf16 for an fp8 ``q``)
    or one of ``extra_dtypes``; an fp8 ``out`` without ``output_scale`` names ``output_scale``.
    """
    if output_scale is not None:
        return check_tensor("out", out, dtypes=(OUTPUT_FP8_DTYPE,), shape=tuple(q.shape), device=q.device)
    if isinstance(out, torch.Tensor) and out.dtype in FP8_TORCH_DTYPES:
        raise ValueError(
            f"output_scale: an fp8 out ({out.dtype}) needs output_scale (out = saturate(attention / output_scale))"
        )
    return check_tensor("out", out, dtypes=output_dtypes(q) + extra_dtypes, shape=tuple(q.shape), device=q.device)

"""Tiny @triton.jit kernels for the launch-key tests beside this file."""

import triton
import triton.language as tl


@triton.jit
def scale_kernel(
    x_ptr,  # [n] fp32
    out_ptr,  # [n] fp32
    n,
    scale,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * scale, mask=mask)


@triton.jit(do_not_specialize=["n"])
def scale_kernel_unspecialized_n(
    x_ptr,  # [n] fp32
    out_ptr,  # [n] fp32
    n,
    scale,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * scale, mask=mask)

"""The Hopper path of chunked prefill: when it applies, and its launch (the kernel: ``hopper_kernel``, Gluon).

Experimental, off unless ``KVFLASH_GLUON=1`` (:func:`kvflash.attn_common.platform.hopper_gluon_available`): on an
sm_90 GPU, a paged, causal call over a 16-bit cache without softcap, ALiBi, sinks or a window takes a
FlashAttention-3-style kernel: a producer warp loads Q and the K/V pages by TMA into a shared-memory ring, two
consumer warpgroups run wgmma and the online softmax in turns. H200, D 128, page 16, Hq/Hkv 32/8, 4 x (2048 +
2048): the prototype 573 TFLOP/s (1 x 16384: 571), this form in the quick bench 531, against 380 for the portable
kernel and 574-594 for cuDNN's dense causal attention. Every other call, and every call with an explicit launch
config (the tuning sweeps), takes the portable kernel. Nothing here reads a tensor value: the choice comes from
dtypes, shapes, strides and Python scalars.
"""

from __future__ import annotations

import functools

import torch
import triton

from kvflash.attn_common.launch import launch
from kvflash.attn_common.platform import hopper_gluon_available, multiprocessor_count

__all__ = ["hopper_prefill_applies", "launch_hopper_prefill"]

HEAD_SIZES = (64, 128, 256)
BLOCK_M = 128  # query tokens of one query head per work item: two consumer warpgroups of 64 rows
STAGES = 2  # K/V tiles in flight (3 do not fit beside two Q buffers at D 128)
# Registers per thread: ptxas gets 168 (64K / 384 threads); the warpgroups re-split them as 232 per consumer and
# 40 for the producer (3 * 168 = 232 + 232 + 40).
MAX_REGISTERS = 168
CONSUMER_REGISTERS = 232
PRODUCER_REGISTERS = 40
SHARED_MEMORY_LIMIT = 227 * 1024
TMA_ALIGNMENT = 16  # bytes: base addresses and row strides of TMA views


def _block_n(head_size: int) -> int:
    return 128 if head_size <= 128 else 64


def hopper_prefill_applies(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    *,
    block_table: torch.Tensor | None,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    s_aux: torch.Tensor | None,
    k_descale: torch.Tensor,
    output_scale: torch.Tensor | None,
    q_descale: torch.Tensor | None,
) -> bool:
    """Whether the Hopper kernel serves this (already checked and normalised) call.

    It takes: a paged cache in ``q``'s 16-bit dtype laid out ``[num_blocks, page, Hkv, D]`` without padding
    (TMA views it as ``[num_blocks * page, Hkv * D]``), pages of a power of two >= 8 tokens, ``D`` 64, 128 or 256,
    ``q`` with ``stride(1) == D``, causal (no other window), per-(sequence, KV head) descales, no softcap, ALiBi,
    sinks, fp8 output or fp8 query, 16-byte-aligned bases and row strides. The switch and the device are asked first:
    with the path off (the default) a call pays one environment read here.
    """
    if not hopper_gluon_available(q.device):
        return False
    if block_table is None or k.dtype != q.dtype or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not (window_left < 0 and window_right == 0) or softcap > 0:
        return False
    if alibi_slopes is not None or s_aux is not None or output_scale is not None or q_descale is not None:
        return False
    if k_descale.dim() != 2:  # per-token-head descales (FP8 caches only)
        return False
    num_blocks, page, num_kv_heads, head_size = k.shape
    if head_size not in HEAD_SIZES or page < 8 or page & (page - 1) or num_blocks * page >= 2**31:
        return False
    packed = (page * num_kv_heads * head_size, num_kv_heads * head_size, head_size, 1)
    if k.stride() != packed or v.stride() != packed or q.stride(1) != head_size or q.stride(2) != 1:
        return False
    if (q.stride(0) * q.element_size()) % TMA_ALIGNMENT or out.stride(2) != 1:
        return False
    if lse is not None and lse.stride(1) != 1:
        return False
    return not any(t.data_ptr() % TMA_ALIGNMENT for t in (q, k, v))


@functools.lru_cache(maxsize=64)
def _shared_layouts(head_size: int, page: int, is_bf16: bool):
    """TMA box shapes and their shared-memory layouts: Q ``[BLOCK_M, D]``, K/V ``[min(page, BLOCK_N), D]``."""
    from triton.experimental.gluon import language as gl

    dtype = gl.bfloat16 if is_bf16 else gl.float16
    q_box = [BLOCK_M, head_size]
    kv_box = [min(page, _block_n(head_size)), head_size]
    return q_box, kv_box, gl.NVMMASharedLayout.get_default_for(q_box, dtype), gl.NVMMASharedLayout.get_default_for(
        kv_box, dtype
    )


def launch_hopper_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    *,
    block_table: torch.Tensor,
    seqused_k: torch.Tensor,
    softmax_scale: float,
    k_descale: torch.Tensor,
    v_descale: torch.Tensor,
    skip_q_len: int,
) -> None:
    """Launch the Hopper kernel (after :func:`hopper_prefill_applies`): writes ``out [total_q, Hq, D]`` and, when
    given, ``lse [Hq, total_q]`` fp32; sequences with at most ``skip_q_len`` queries are left untouched.

    ``k_descale`` / ``v_descale``: ``[num_seqs, Hkv]`` fp32 views. Persistent: one program per SM at most, each
    walking work items (128 query tokens of one query head) from the longest causal rows down. Launched through
    :func:`kvflash.attn_common.launch.launch` like the Triton kernels (specialisation keys, warm-up, call plans).
    """
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from kvflash.chunk_prefill.hopper_kernel import hopper_prefill_kernel

    total_q, num_q_heads, head_size = q.shape
    num_blocks, page, num_kv_heads, _ = k.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    block_n = _block_n(head_size)
    q_box, kv_box, q_layout, kv_layout = _shared_layouts(head_size, page, q.dtype == torch.bfloat16)
    # A second Q buffer lets the next work item's Q load while this one finishes, where shared memory allows.
    q_buffers = 2 if (2 * BLOCK_M + 2 * STAGES * block_n) * head_size * 2 + 1024 <= SHARED_MEMORY_LIMIT else 1
    rows, width = num_blocks * page, num_kv_heads * head_size
    q_desc = TensorDescriptor(q, [total_q, num_q_heads * head_size], [q.stride(0), 1], q_box, q_layout)
    k_desc = TensorDescriptor(k, [rows, width], [width, 1], kv_box, kv_layout)
    v_desc = TensorDescriptor(v, [rows, width], [width, 1], kv_box, kv_layout)
    num_q_tiles = triton.cdiv(total_q, BLOCK_M) + num_seqs
    grid = (min(num_q_tiles * num_q_heads, multiprocessor_count(q.device)),)
    kd, vd = k_descale.stride(), v_descale.stride()
    launch(
        hopper_prefill_kernel,
        grid,
        False,
        q_desc=q_desc,
        k_desc=k_desc,
        v_desc=v_desc,
        out_ptr=out,
        lse_ptr=lse if lse is not None else out,
        cu_seqlens_q_ptr=cu_seqlens_q,
        seqused_k_ptr=seqused_k,
        block_table_ptr=block_table,
        k_descale_ptr=k_descale,
        v_descale_ptr=v_descale,
        num_seqs=num_seqs,
        num_q_tiles=num_q_tiles,
        num_heads=num_q_heads,
        total_q=total_q,
        num_blocks=num_blocks,
        kv_capacity=block_table.shape[1] * page,
        skip_q_len=skip_q_len,
        softmax_scale=float(softmax_scale),
        stride_o_token=out.stride(0),
        stride_o_head=out.stride(1),
        stride_lse_head=lse.stride(0) if lse is not None else 0,
        stride_bt_seq=block_table.stride(0),
        stride_kd_seq=kd[0],
        stride_kd_head=kd[1],
        stride_vd_seq=vd[0],
        stride_vd_head=vd[1],
        GROUP=num_q_heads // num_kv_heads,
        BLOCK_M=BLOCK_M,
        BLOCK_N=block_n,
        HEAD_D=head_size,
        PAGE=page,
        STAGES=STAGES,
        Q_BUFS=q_buffers,
        WRITE_LSE=lse is not None,
        PINGPONG=True,
        ASM_CVT=q.dtype == torch.bfloat16,
        CONSUMER_REGS=CONSUMER_REGISTERS,
        PRODUCER_REGS=PRODUCER_REGISTERS,
        PRODUCER_WARPS=1,
        num_warps=4,
        maxnreg=MAX_REGISTERS,
    )

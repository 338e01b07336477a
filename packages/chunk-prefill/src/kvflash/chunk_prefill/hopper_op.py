"""The Hopper path of chunked prefill: when it applies, and its launch (the kernel: ``hopper_kernel``, Gluon).

The default on sm_90 GPUs with Triton 3.6 (``KVFLASH_GLUON=0`` keeps every call on the portable kernel; see
:func:`kvflash.attn_common.platform.hopper_gluon_available`): a paged, causal call over a 16-bit or FP8 cache without
softcap, ALiBi, sinks or a window takes a FlashAttention-3-style kernel: a producer loads Q and the K/V pages by TMA
into a shared-memory ring, two consumer warpgroups run wgmma and the online softmax in turns. An FP8 cache the
producer gathers by cp.async; it widens V to fp16, and K too for an fp16 query; with a bf16 query (split in two e4m3
terms, exact) or an fp8 one, K stays fp8 for the fp8 QK^T wgmma. A 16-bit query at D 128 (an fp16 one at D 64 too)
takes a one-warp TMA loader and a 4-warp widener instead of that producer (``hopper_tma_loader``). An fp8 query at D
64 / 128 runs PV on fp8 operands too (P rounded to e4m3; the producer transposes V in fp8 instead of widening it).
Figures: BENCHMARKS.md and docs/chunk_prefill_perf.md. Every other call, and every call with an explicit launch
config (the tuning sweeps), takes the portable kernel. Nothing here reads a tensor value: the choice comes from
dtypes, shapes, strides and Python scalars.
"""

from __future__ import annotations

import functools

import torch
import triton

from kvflash.attn_common.dtypes import OCP_FP8_TORCH_DTYPES, QUERY_TORCH_DTYPES
from kvflash.attn_common.launch import launch
from kvflash.attn_common.platform import hopper_gluon_available, multiprocessor_count

__all__ = ["hopper_prefill_applies", "launch_hopper_prefill"]

HEAD_SIZES = (64, 128, 256)  # the 16-bit and the FP8 caches
BLOCK_M = 128  # query tokens of one query head per work item: two consumer warpgroups of 64 rows
STAGES = 2  # K/V tiles in flight (3 do not fit beside two Q buffers at D 128)
# Registers per thread: ptxas gets 168 (64K / 384 threads); the warpgroups re-split them (3 * 168 = 504). A 16-bit
# cache: 232 per consumer, 40 for the producer (one warp issuing TMA). An FP8 cache: 208 and 88, the producer's four
# warps gathering by cp.async (page ids a tile ahead) and widening 128 rows at a time, 32 at D 256; the consumer loops
# compile to the same instructions at 208 as at 224. H200, 4 x (2048 + 2048): 224/56 widening 64 rows against 208/88
# widening 128, e4m3 bf16 q page 16 466-470 -> 474 TFLOP/s, at D 256 380-383 -> 407, e5m2 fp16 q page 64 464-466 ->
# 495 (216/72: 468-470, 399-402, 482-487). Before the page ids ran ahead (TMA gathers: 232/40 with 16 rows 290
# TFLOP/s, 32 rows 318, 64 rows 322; 224/56 with 32 rows 364, 64 rows 381; cp.async gathers, 224/56: 32 rows 410,
# 64 rows 430).
MAX_REGISTERS = 168
REGISTER_SPLIT = {False: (232, 40), True: (208, 88)}  # KV_FP8 -> (consumer, producer)
# PV on fp8 operands: the producer's transpose holds 16 keys x 8 d bytes per thread and more addresses, the consumer
# no packed P across the back edge. Compiled for sm_90 at D 128: 216/72 keeps the per-tile loops free of spills
# (24 bytes of stack per item at page 16, none at page 64 or D 64); 224/56 spills in the producer's loop (4 stores and
# 4 loads per tile). H200, 4 x (2048 + 2048) e4m3 page 16: 216/72 617 TFLOP/s, 224/56 598. With the page ids a tile
# ahead (8 more producer registers), D 128 takes 208/88 (consumer loops unchanged, the producer's per-tile swap
# through local memory gone): page 16 619-620 -> 639-643, page 64 618 -> 629-633, 1 x 16384 692 -> 710; D 64 keeps
# 216/72 (433-435 against 424-426).
REGISTER_SPLIT_PV_FP8 = {64: (216, 72), 128: (208, 88)}  # head size -> (consumer, producer)
PV_FP8_HEAD_SIZES = (64, 128)  # D 256: O (128 registers per thread) and a PV accumulator spill whatever the split
# A 16-bit query over an FP8 cache (the exact path): K and V loaded by a one-warp TMA loader, V (and an fp16 query's K)
# widened by four warps (hopper_tma_loader), instead of the 4-warp cp.async producer, whose gathers cost the consumers
# 12-18 % (tools/prefill_isolation.py). 16 warps: 128 registers each at launch (64K / 512 threads), re-split 208
# consumer / 56 widener / 40 loader warpgroup; at D 256 the consumers' 64 x 256 wgmma needs 158 at launch. H200,
# e4m3, TFLOP/s at 4 x (2048 + 2048) / 1 x 16384, cp.async producer -> loader, same device call:
#   bf16 q, D 128: page 16 476 / 509 -> 524 / 560, page 64 481 / 520 -> 534 / 565
#   fp16 q, D 128: page 16 499 / 523 -> 512 / 541, page 64 492 / 525 -> 528 / 551
#   fp16 q, D 64: page 16 366 / 406 -> 377 / 411, page 64 365 / 403 -> 377 / 417
#   bf16 q, D 64: page 16 343 / 389 -> 332 / 375, page 64 346 / 391 -> 349 / 393 (loses or ties: not taken)
# (An fp8 query would need its transpose to read the TMA-swizzled staging tile: 639 / 699 -> 512 / 563 in session
# 20's prototype.)
TMA_LOADER_HEAD_SIZES = {torch.bfloat16: (128,), torch.float16: (64, 128)}  # query dtype -> head sizes
TMA_LOADER_REGISTERS = (208, 56, 40)  # consumer, widener, loader warpgroup
TMA_LOADER_MAX_REGISTERS = 128
WIDEN_ROWS = 128  # FP8 caches: K/V rows the producer's warps widen per step, at most a tile (at D 128: 16 pieces of
# 8 elements per thread, an 8-byte shared load and a 16-byte store each)
SHARED_MEMORY_LIMIT = 227 * 1024
TMA_ALIGNMENT = 16  # bytes: base addresses and row strides of TMA views


def _block_n(head_size: int, kv_fp8: bool, q_fp8: bool) -> int:
    """Keys per tile: 128 up to D 128; at D 256, 64, or 32 over an FP8 cache with a 16-bit query (compiled for sm_90,
    64-key tiles there spill the consumers' 224 registers (72 bytes of stack with a split bf16 query, 32-key tiles 24);
    with an fp16 query's widened K they do not fit in shared memory either)."""
    if head_size <= 128:
        return 128
    return 32 if kv_fp8 and not q_fp8 else 64


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

    It takes: a paged cache in ``q``'s 16-bit dtype or in ``float8_e4m3fn`` / ``float8_e5m2``, ``D`` 64, 128 or
    256, laid out ``[num_blocks, page, Hkv, D]`` without padding (TMA views it as ``[num_blocks * page, Hkv * D]``;
    FP8 tiles are gathered by cp.async), pages of a power of two >= 8 tokens, ``q`` with ``stride(1) == D``, causal
    (no other window), per-(sequence, KV head) descales (an fp8 query's ``q_descale`` too), no softcap, ALiBi,
    sinks or fp8 output, 16-byte-aligned bases and row strides. The switch and the device are asked first: with the
    path off (``KVFLASH_GLUON=0``) or another GPU a call pays one environment read here.
    """
    if not hopper_gluon_available(q.device):
        return False
    kv_fp8 = k.dtype in OCP_FP8_TORCH_DTYPES
    # an fp8 query comes with its q_descale, over an FP8 cache (check_attention_call)
    q_fp8 = q.dtype == torch.float8_e4m3fn
    if block_table is None or not (q.dtype in QUERY_TORCH_DTYPES or q_fp8):
        return False
    if k.dtype != q.dtype and not kv_fp8:
        return False
    if q_fp8 and q_descale.dim() != 2:  # per-(token, query head) query descales: the portable kernel
        return False
    if not (window_left < 0 and window_right == 0) or softcap > 0:
        return False
    if alibi_slopes is not None or s_aux is not None or output_scale is not None:
        return False
    if k_descale.dim() != 2:  # per-token-head descales (FP8 caches only)
        return False
    num_blocks, page, num_kv_heads, head_size = k.shape
    if head_size not in HEAD_SIZES or page < 8 or page & (page - 1) or num_blocks * page >= 2**31:
        return False
    if page * num_kv_heads * head_size >= 2**31:  # offsets inside a page are int32 (the FP8 gathers compute them)
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
def _shared_layouts(head_size: int, page: int, q_dtype: torch.dtype, kv_dtype: torch.dtype, block_n: int):
    """TMA box shapes and their shared-memory layouts: Q ``[BLOCK_M, D]``, K/V ``[min(page, BLOCK_N), D]`` (over an
    FP8 cache the fp8 staging ring's layout: cp.async fills it, or with the TMA loader these boxes)."""
    from triton.experimental.gluon import language as gl

    gl_dtypes = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.float8_e4m3fn: gl.float8e4nv,
                 torch.float8_e5m2: gl.float8e5}  # fmt: skip
    q_box = [BLOCK_M, head_size]
    kv_box = [min(page, block_n), head_size]
    q_layout = gl.NVMMASharedLayout.get_default_for(q_box, gl_dtypes[q_dtype])
    return q_box, kv_box, q_layout, gl.NVMMASharedLayout.get_default_for(kv_box, gl_dtypes[kv_dtype])


def _shared_bytes(q_buffers: int, head_size: int, q_bytes: int, kv_fp8: bool, k_as_stored: bool,
                  pv_fp8: bool) -> int:
    """Shared memory of one program: Q buffers (``q_bytes`` per element); the K/V ring (16-bit; with K as stored for
    the fp8 QK^T dot, K fp8 and V fp16; with ``pv_fp8`` K and V^T fp8); the fp8 staging ring (K and V; V only with K
    as stored, in a power-of-two number of slots with ``pv_fp8``); and 1 KiB for the barriers (under 128 bytes) and
    the query rows' powers of two (512 bytes)."""
    tile = STAGES * _block_n(head_size, kv_fp8, q_bytes == 1) * head_size  # elements of one ring of K or V tiles
    if pv_fp8:
        from kvflash.chunk_prefill.hopper_pv_fp8 import vt_staging_slots  # the kernel's own count (Gluon: lazily)

        ring = tile * 2 + tile // STAGES * vt_staging_slots(STAGES)  # K fp8, V^T fp8, V staging fp8
    elif k_as_stored:
        ring = tile * (1 + 2 + 1)  # K fp8, V fp16, V staging fp8
    elif kv_fp8:
        ring = tile * (2 + 2 + 1 + 1)  # K, V fp16; K, V staging fp8
    else:
        ring = tile * (2 + 2)
    return q_buffers * BLOCK_M * head_size * q_bytes + ring + 1024


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
    q_descale: torch.Tensor | None,
) -> None:
    """Launch the Hopper kernel (after :func:`hopper_prefill_applies`): writes ``out [total_q, Hq, D]`` and, when
    given, ``lse [Hq, total_q]`` fp32; sequences with at most ``skip_q_len`` queries are left untouched.

    ``k_descale`` / ``v_descale``, and ``q_descale`` with an fp8 ``q`` (else ``None``): ``[num_seqs, Hkv]`` fp32
    views. Persistent: one program per SM at most, each walking work items (128 query tokens of one query head) from
    the longest causal rows down. Launched through :func:`kvflash.attn_common.launch.launch` like the Triton kernels
    (specialisation keys, warm-up, call plans).
    """
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from kvflash.chunk_prefill.hopper_kernel import hopper_prefill_kernel

    total_q, num_q_heads, head_size = q.shape
    num_blocks, page, num_kv_heads, _ = k.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    kv_fp8 = k.dtype in OCP_FP8_TORCH_DTYPES
    q_fp8 = q.dtype == torch.float8_e4m3fn
    # A bf16 query over an FP8 cache is split in two e4m3 terms (exact) for two fp8 QK^T dots against K as stored.
    q_split = kv_fp8 and q.dtype == torch.bfloat16
    pv_fp8 = q_fp8 and head_size in PV_FP8_HEAD_SIZES
    block_n = _block_n(head_size, kv_fp8, q_fp8)
    q_box, kv_box, q_layout, kv_layout = _shared_layouts(head_size, page, q.dtype, k.dtype, block_n)
    # A second Q buffer lets the next work item's Q load while this one finishes, where shared memory allows.
    two_buffers = _shared_bytes(2, head_size, q.element_size(), kv_fp8, q_fp8 or q_split, pv_fp8)
    q_buffers = 2 if two_buffers <= SHARED_MEMORY_LIMIT else 1
    tma_loader = kv_fp8 and head_size in TMA_LOADER_HEAD_SIZES.get(q.dtype, ())
    if tma_loader:
        registers = TMA_LOADER_REGISTERS
    elif pv_fp8:
        registers = REGISTER_SPLIT_PV_FP8[head_size]
    else:
        registers = REGISTER_SPLIT[kv_fp8]
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
        k_ptr=k,
        v_ptr=v,
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
        stride_kv_block=k.stride(0),  # K and V are packed alike (hopper_prefill_applies)
        stride_kv_token=k.stride(1),
        stride_kd_seq=kd[0],
        stride_kd_head=kd[1],
        stride_vd_seq=vd[0],
        stride_vd_head=vd[1],
        q_descale_ptr=q_descale if q_fp8 else k_descale,
        stride_qd_seq=q_descale.stride(0) if q_fp8 else 0,
        stride_qd_head=q_descale.stride(1) if q_fp8 else 0,
        GROUP=num_q_heads // num_kv_heads,
        BLOCK_M=BLOCK_M,
        BLOCK_N=block_n,
        HEAD_D=head_size,
        PAGE=page,
        STAGES=STAGES,
        Q_BUFS=q_buffers,
        WRITE_LSE=lse is not None,
        PINGPONG=True,
        ASM_CVT=q.dtype == torch.bfloat16 and not kv_fp8,
        KV_FP8=kv_fp8,
        Q_SPLIT=q_split,
        Q_FP8=q_fp8,
        PV_FP8=pv_fp8,
        WIDEN_ROWS=min(WIDEN_ROWS, block_n),
        TMA_LOADER=tma_loader,
        CONSUMER_REGS=registers[0],
        PRODUCER_REGS=registers[1],
        LOADER_REGS=registers[2] if tma_loader else 0,
        PRODUCER_WARPS=4 if kv_fp8 else 1,  # FP8: the producer's (or widener's) warps also widen the tiles
        num_warps=4,
        maxnreg=TMA_LOADER_MAX_REGISTERS if tma_loader else MAX_REGISTERS,
    )

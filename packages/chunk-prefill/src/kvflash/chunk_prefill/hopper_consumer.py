"""The consumer partitions of the Hopper prefill kernel (Gluon; jit only): wgmma and the online softmax.

Two warpgroups, 64 query rows of each work item each (``WG`` 0 and 1), run ``S = Q K^T`` and ``O += P V`` as async
wgmma with the online softmax between them, taking turns on the tensor cores (``PINGPONG``), and write ``out`` and
``lse``. Over an FP8 cache a bf16 query is first rewritten as two e4m3 terms (:func:`_query_to_fp8_pair`); an fp8
query runs PV on fp8 operands too (``PV_FP8``). The walk over an item's key tiles is in
:mod:`kvflash.chunk_prefill.hopper_key_tiles`.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
)

from kvflash.chunk_prefill.hopper_key_tiles import item_tiles_pv16, item_tiles_pv_fp8
from kvflash.chunk_prefill.hopper_pv_fp8 import P_LOG2
from kvflash.chunk_prefill.hopper_schedule import work_item


@gluon.jit
def _query_to_fp8_pair(src, hi, lo, row_scale_smem, row_layout: gl.constexpr):
    """Each of this warpgroup's ``[64, HEAD_D]`` bf16 query rows (``src``), times the power of two ``2^e`` that puts
    the row's largest ``|q|`` in ``[2^7, 2^8)``, written as two e4m3 terms ``hi + lo`` (``hi`` the row rounded to 4
    significant bits, ``lo`` the rest; bf16 has 8): exact for elements down to ``2^-9`` of the row's largest, within
    ``2^-17`` of it below; no overflow (448 is e4m3's largest), and one row's magnitude leaves the other rows alone.
    ``hi`` and ``lo`` are the bytes of ``src`` itself (each ``[64, HEAD_D]`` e4m3), so all of ``src`` is read first.
    Returns the 64 powers, ``[64]`` fp32 in ``row_layout``, through ``row_scale_smem`` (``[64]`` fp32, this
    warpgroup's own)."""
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    x = src.load(blk)  # kept bf16 (half the registers of fp32; 64 per thread at D 256)
    # every warp has read its rows (hi and lo overwrite them) and the previous item's powers (overwritten next)
    gl.thread_barrier()
    top = gl.max(gl.abs(x.to(gl.float32)), axis=1)  # [64], per row
    e = gl.floor(gl.log2(gl.where(top > 0, top, 1.0)))
    mult = gl.exp2(gl.minimum(7.0 - e, 126.0))
    xs = x.to(gl.float32) * gl.expand_dims(mult, 1)
    x_hi = xs.to(gl.float8e4nv)  # round to nearest even
    hi.store(x_hi)
    lo.store((xs - x_hi.to(gl.float32)).to(gl.float8e4nv))  # the difference is exact in fp32 and in e4m3
    row_scale_smem.store(mult)
    fence_async_shared()  # generic stores before the async-proxy wgmma reads
    gl.thread_barrier()
    return row_scale_smem.load(row_layout)


@gluon.jit
def _consumer_item(q_view, q_mma, k_smem, v_smem, q_ready_bar, q_empty_bar, qph, k_ready, k_empty, v_ready, v_empty,
                   turn, it, tc, out_ptr, lse_ptr, head, q_start, q_len, kv_len, tok0, n_tiles, n_full, qk_scale,
                   v_scale, stride_o_token, stride_o_head, stride_lse_head, WG: gl.constexpr, BLOCK_N: gl.constexpr,
                   HEAD_D: gl.constexpr, STAGES: gl.constexpr, WRITE_LSE: gl.constexpr, PINGPONG: gl.constexpr,
                   ASM_CVT: gl.constexpr, Q_SPLIT: gl.constexpr, q_lo, row_scale_smem, PV_FP8: gl.constexpr):
    """One work item for this warpgroup's 64 rows; ``q_view`` is its Q slice as loaded, ``q_mma`` what the QK^T MMA
    reads (with ``Q_SPLIT``: the high e4m3 terms of :func:`_query_to_fp8_pair`, ``q_lo`` the low ones); ``v_smem``
    holds V^T in fp8 with ``PV_FP8``."""
    M: gl.constexpr = 64
    QK_K: gl.constexpr = 32 if q_mma.dtype.primitive_bitwidth == 8 else 16  # wgmma K per instruction
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, QK_K])
    PV_K: gl.constexpr = 32 if PV_FP8 else 16  # wgmma K per PV instruction
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, PV_K])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4 if PV_FP8 else 2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    rows = tok0 + WG * M + gl.arange(0, M, layout=row_layout)
    # rows past the sequence (their output is not stored) see every key, never an empty row
    q_pos = gl.minimum(kv_len - q_len + rows, kv_len - 1)

    s_acc = gl.zeros([M, BLOCK_N], gl.float32, s_layout)
    o = gl.zeros([M, HEAD_D], gl.float32, o_layout)
    m_i = gl.full([M], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([M], gl.float32, row_layout)

    mbarrier.wait(q_ready_bar, qph)
    qk_scalar = qk_scale
    if Q_SPLIT:
        qk_scale = qk_scale / _query_to_fp8_pair(q_view, q_mma, q_lo, row_scale_smem, row_layout)
    if PV_FP8:
        o, m_i, l_i = item_tiles_pv_fp8(q_mma, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, it, tc,
                                        n_tiles, n_full, qk_scale, qk_scalar, q_pos, s_acc, o, m_i, l_i, p_layout,
                                        o_layout, WG, BLOCK_N, HEAD_D, STAGES, PINGPONG)
        mbarrier.arrive(q_empty_bar)  # every QK wgmma of the item is complete: Q may be overwritten
    else:
        o, m_i, l_i = item_tiles_pv16(q_mma, q_lo, k_smem, v_smem, q_empty_bar, k_ready, k_empty, v_ready, v_empty,
                                       turn, it, tc, n_tiles, n_full, qk_scale, qk_scalar, q_pos, s_acc, o, m_i, l_i,
                                       p_layout, o_layout, WG, BLOCK_N, STAGES, PINGPONG, ASM_CVT, Q_SPLIT)

    # ---- epilogue ----
    o_rows_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_o = gl.convert_layout(l_i, o_rows_layout)
    inv = gl.where(l_o > 0, v_scale / l_o, gl.zeros_like(l_o))  # V's descale applies once, to the output
    out = (o * gl.expand_dims(inv, 1)).to(out_ptr.dtype.element_ty)
    rows_o = tok0 + WG * M + gl.arange(0, M, layout=o_rows_layout)
    cols_o = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
    offs = (q_start + rows_o).to(gl.int64) * stride_o_token + head * stride_o_head
    ptrs = out_ptr + gl.expand_dims(offs, 1) + gl.expand_dims(cols_o, 0)
    gl.store(ptrs, out, mask=gl.expand_dims(rows_o < q_len, 1))
    if WRITE_LSE:
        LN2: gl.constexpr = 0.6931471805599453
        l_log2 = gl.log2(l_i)
        if PV_FP8:  # l is times 2^P_LOG2, as P
            l_log2 = l_log2 - P_LOG2
        lse = gl.where(l_i > 0, (m_i + l_log2) * LN2, gl.full_like(l_i, float("-inf")))
        gl.store(lse_ptr + head.to(gl.int64) * stride_lse_head + q_start + rows, lse, mask=rows < q_len)


@gluon.jit
def _write_empty(out_ptr, lse_ptr, head, q_start, q_len, tok0, stride_o_token, stride_o_head, stride_lse_head,
                 WG: gl.constexpr, HEAD_D: gl.constexpr, WRITE_LSE: gl.constexpr):
    """A valid tile no key is visible to: zeros (lse = -inf) for this warpgroup's 64 rows."""
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    r = tok0 + WG * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, blk))
    c = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, blk))
    offs = (q_start + r).to(gl.int64) * stride_o_token + head * stride_o_head
    ptrs = out_ptr + gl.expand_dims(offs, 1) + gl.expand_dims(c, 0)
    gl.store(ptrs, gl.zeros([64, HEAD_D], out_ptr.dtype.element_ty, blk), mask=gl.expand_dims(r < q_len, 1))
    if WRITE_LSE:
        l1: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        r1 = tok0 + WG * 64 + gl.arange(0, 64, layout=l1)
        gl.store(lse_ptr + head.to(gl.int64) * stride_lse_head + q_start + r1,
                 gl.full([64], float("-inf"), gl.float32, l1), mask=r1 < q_len)


@gluon.jit
def consumer_partition(
    q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn, out_ptr, lse_ptr,
    cu_seqlens_q_ptr, seqused_k_ptr, k_descale_ptr, v_descale_ptr, num_seqs, num_q_tiles, num_heads, total_q,
    kv_capacity, skip_q_len, pid, nprog, qk_scale, stride_o_token, stride_o_head, stride_lse_head, stride_kd_seq,
    stride_kd_head, stride_vd_seq, stride_vd_head, q_descale_ptr, stride_qd_seq, stride_qd_head, GROUP: gl.constexpr,
    WG: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr, Q_BUFS: gl.constexpr, WRITE_LSE: gl.constexpr,
    PINGPONG: gl.constexpr, ASM_CVT: gl.constexpr, Q_SPLIT: gl.constexpr, Q_FP8: gl.constexpr, q_row_scales,
    PV_FP8: gl.constexpr,
):
    # Q_SPLIT: the e4m3 view of a Q buffer (rows of HEAD_D bytes), as TMA would lay out an fp8 box. A swizzled tile
    # whose rows pass 128 bytes is stored as column blocks of 128 bytes, each [rows, 128 B]. So a warpgroup's bf16 rows
    # are one contiguous 128-row stretch of the e4m3 view up to D 64 (bf16 rows of at most 128 bytes), and rows
    # 64 WG.. plus BLOCK_M + 64 WG.. of it beyond (in every column block of either view).
    q8_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=min(HEAD_D, 128), element_bitwidth=8, rank=2)
    HI_ROW: gl.constexpr = 128 * WG if HEAD_D <= 64 else 64 * WG
    LO_ROW: gl.constexpr = HI_ROW + 64 if HEAD_D <= 64 else BLOCK_M + 64 * WG
    it = 0  # K/V tiles consumed so far (ring position)
    tc = 0  # turn waits so far
    qc = 0  # Q tiles consumed so far
    for w in range(pid, num_q_tiles * num_heads, nprog):
        valid, head, seq, q_start, q_len, tok0, kv_len, n_tiles, n_full = work_item(
            w, cu_seqlens_q_ptr, seqused_k_ptr, num_seqs, num_q_tiles, num_heads, total_q, kv_capacity, skip_q_len,
            BLOCK_M, BLOCK_N)
        if n_tiles > 0:
            qb = qc % Q_BUFS
            q_buf = q_smem.index(qb)
            q_view = q_buf.slice(WG * 64, 64)
            if Q_SPLIT:
                # this warpgroup's 64 bf16 rows become 64 rows of high terms and 64 of low ones in the same bytes: the
                # buffer viewed as [2 * BLOCK_M, HEAD_D] e4m3 (rows of HEAD_D bytes), rows HI_ROW.. and LO_ROW..
                q8 = q_buf._reinterpret(gl.float8e4nv, [2 * BLOCK_M, HEAD_D], q8_layout)
                q_mma = q8.slice(HI_ROW, 64)
                q_lo = q8.slice(LO_ROW, 64)
            else:
                q_mma = q_view
                q_lo = q_view
            kv_head = head // GROUP
            k_scale = gl.load(k_descale_ptr + seq * stride_kd_seq + kv_head * stride_kd_head)
            v_scale = gl.load(v_descale_ptr + seq * stride_vd_seq + kv_head * stride_vd_head)
            if Q_FP8:  # an fp8 query's descale scales every score, as K's does
                k_scale = k_scale * gl.load(q_descale_ptr + seq * stride_qd_seq + kv_head * stride_qd_head)
            _consumer_item(q_view, q_mma, k_smem, v_smem, q_ready.index(qb), q_empty.index(qb), (qc // Q_BUFS) & 1,
                           k_ready, k_empty, v_ready, v_empty, turn, it, tc, out_ptr, lse_ptr, head, q_start, q_len,
                           kv_len, tok0, n_tiles, n_full, qk_scale * k_scale, v_scale, stride_o_token, stride_o_head,
                           stride_lse_head,
                           WG, BLOCK_N, HEAD_D, STAGES, WRITE_LSE, PINGPONG, ASM_CVT, Q_SPLIT, q_lo,
                           q_row_scales.slice(WG * 64, 64), PV_FP8)
            it += n_tiles
            tc += n_tiles + 1
            qc += 1
        elif valid:
            _write_empty(out_ptr, lse_ptr, head, q_start, q_len, tok0, stride_o_token, stride_o_head,
                         stride_lse_head, WG, HEAD_D, WRITE_LSE)

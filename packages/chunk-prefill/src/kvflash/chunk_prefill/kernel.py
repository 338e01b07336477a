"""The varlen chunked-prefill attention kernel (``@triton.jit`` code only; launched by ``op.py``).

One program computes one *query tile* of one KV head: ``BLOCK_M`` rows, each a (query token, query head)
pair. The ``G_PACK`` query heads that share a KV head are packed into the rows (row ``m`` is token
``m // G_PACK``, head ``m % G_PACK`` of the group), so every K/V tile loaded serves all of them: decode rows
of a mixed batch fill ``G_PACK`` rows instead of one, and prefill tiles read each K/V tile once per group.

The grid is 1-D and depends only on shapes: ``(cdiv(total_q, BLOCK_Q) + num_seqs) * Hkv * NUM_HEAD_GROUPS``
programs. Sequence ``s`` owns the tiles ``cu_seqlens_q[s] // BLOCK_Q + s + (0, 1, ...)``; a program finds
its sequence by a binary search over ``cu_seqlens_q`` and leaves at once if its tile is past the sequence's
end. Tiles are visited in reverse so the longest (last, causal) tiles start first.

The key range of a tile is split into three loops: masked tiles at the window's left edge, full tiles that
need no mask at all (the hot loop), and masked tiles at the causal diagonal / right edge / end of the
sequence. Tiles no row can see are never loaded.

FP8 caches: K/V tiles are converted to fp16 in registers (one exact instruction per pair on sm_90; bf16 takes
three) and both dots run in fp16; a bf16 q is moved to fp16 once per program with a per-row power of two.
K's descale folds into the score scale, V's into the output, once per program.

``Q_FP8`` (an fp8 e4m3 query with its per-(sequence, KV head) descale, over an FP8 cache): the QK dot runs on the
fp8 tensor cores, q and the K tile as stored (q's descale folds into the score scale beside K's). With ``PV_FP8`` so
does the PV dot: P is quantised to e4m3 in units of ``1 / P_FP8_SCALE`` (so probabilities down to 2^-16 keep a
value) and meets the V tile as stored (e4m3 or e5m2). Two-level accumulation: each tile's ``P V`` is a fresh dot
whose sum over the tile's keys stays in the tensor core's own accumulator, and is added to the fp32 accumulator
outside the dot (Triton does not fold that add into an fp8 dot on sm_90), so the long sum over tiles is exact fp32.
Without it (the default: Triton transposes fp8 V tiles through registers, which halves the throughput) P and V
(converted exactly) meet in fp16, as for a 16-bit query, and P is not rounded to fp8.

``Q_SPLIT`` (a bf16 query over an FP8 cache, a launch-config option): the query, scaled per row by a power of two
that puts its largest element in [2^7, 2^8), is written as two e4m3 terms ``q_hi + q_lo`` (a bf16 value has 8
significant bits, each term holds 4; exact for elements down to 2^-9 of the row's largest, within 2^-17 of it
below), and the QK dot is two fp8 dots against the K tile as stored: the MMA work of one fp16 dot, without
converting K. PV as for ``Q_FP8``.

``PER_TOKEN_SCALES`` (its own specialisation; off, the kernel is unchanged): one descale per stored (token, KV
head), loaded per tile beside K and V through the same page ids. K's multiplies the score column before the softmax,
``s_j = (q . k_j) * kscale_j * softmax_scale``; V's multiplies P's column before the PV dot, in units of a running
power of two (:func:`kvflash.attn_common.jit_helpers.scale_p_columns`), so values stay exactly dequantised.
"""

import triton
import triton.language as tl

from kvflash.attn_common.jit_helpers import (
    add_sink_to_denominator,
    alibi_bias,
    cast_to_e4m3,
    finalize_softmax,
    key_visibility,
    online_softmax_step_scaled,
    scale_p_columns,
    softcap_scores,
    to_e4m3,
)

# Q_FP8: P goes to e4m3 as P * P_FP8_SCALE. P <= 1 (below 2 with per-token V scales) stays below 448 without a
# clamp, and a probability of 2^-16 is still e4m3's smallest subnormal instead of zero.
P_FP8_SCALE = tl.constexpr(128.0)


@triton.jit
def _find_sequence(
    cu_seqlens_q_ptr,  # [num_seqs + 1] int32
    tile,
    num_seqs,
    BLOCK_Q: tl.constexpr,
):
    """The last sequence ``s`` whose first tile ``cu_seqlens_q[s] // BLOCK_Q + s`` is ``<= tile``, or -1."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tile_pages(
    block_table_row_ptr,  # [max_blocks] int32: this sequence's pages
    offs_n,  # [BLOCK_N] key positions
    kv_len,
    num_blocks,
    IS_PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    """``[BLOCK_N]`` int32 page ids of key positions ``offs_n`` (0 past ``kv_len``; zeros when not paged).

    One gathered load per tile (with pages of ``BLOCK_N`` or more every row reads the same entry); table
    entries past the sequence's length are not read. Page ids are clamped to ``[0, num_blocks)``: a bad id
    reads a wrong page of this cache, never memory outside it. The loops load a tile's page ids one tile
    ahead of its K/V: when K/V addresses come from a load in the same iteration, Triton's pipeliner treats
    K/V as indirect loads and waits for every outstanding copy at the top of each iteration
    (``cp.async.wait_group 0``), so no copy overlaps the dots.
    """
    if IS_PAGED:
        pages = tl.load(block_table_row_ptr + offs_n // PAGE_SIZE, mask=offs_n < kv_len, other=0)
        return tl.minimum(tl.maximum(pages, 0), num_blocks - 1)
    return tl.zeros_like(offs_n)


@triton.jit
def _kv_row_offsets(
    pages,  # [BLOCK_N] int32 page ids of the tile (paged)
    kv_start,
    offs_n,
    stride_block,
    stride_token,
    IS_PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    """int64 element offsets ``[BLOCK_N]`` of the cache rows for key positions ``offs_n``.

    ``block_id * stride`` is int64 so caches over 4 GiB work.
    """
    if IS_PAGED:
        return pages.to(tl.int64) * stride_block + (offs_n % PAGE_SIZE).to(tl.int64) * stride_token
    return (kv_start + offs_n).to(tl.int64) * stride_token


@triton.jit
def _attend_tile(
    acc,  # [BLOCK_M, HEAD_PAD] fp32
    m_i,  # [BLOCK_M] fp32, log2 domain
    l_i,  # [BLOCK_M] fp32
    v_exp,  # fp32 scalar: PER_TOKEN_SCALES' running exponent (acc holds sum p * vscale * v / 2^v_exp)
    q,  # [BLOCK_M, HEAD_PAD] DOT_DTYPE (Q_SPLIT: the high e4m3 term)
    q_lo,  # [BLOCK_M, HEAD_PAD] e4m3: Q_SPLIT's low term (else unused)
    k_head_ptr,  # k_ptr + kv_head * stride_k_head: [num_blocks, block_size, D] or [total_k, D] of one KV head
    v_head_ptr,  # v_ptr + kv_head * stride_v_head: [num_blocks, block_size, D] or [total_k, D] of one KV head
    pages,  # [BLOCK_N] int32 page ids of this tile (paged), loaded one tile ahead by the caller
    kv_start,
    start_n,
    kv_len,
    q_pos,  # [BLOCK_M] int32 bottom-right aligned positions
    slopes_log2,  # [BLOCK_M] fp32 ALiBi slopes times log2(e)
    qk_scale,  # [BLOCK_M] fp32 > 0: q . k to the natural-log score domain
    softcap,
    window_left,
    window_right,
    stride_k_block,
    stride_k_token,
    stride_v_block,
    stride_v_token,
    kd_head_ptr,  # PER_TOKEN_SCALES: k_descale_ptr + kv_head * stride_kd_head, [num_blocks, PAGE_SIZE] / [total_k] fp32
    vd_head_ptr,  # PER_TOKEN_SCALES: v_descale_ptr + kv_head * stride_vd_head, [num_blocks, PAGE_SIZE] / [total_k] fp32
    stride_kd_block,
    stride_kd_token,
    stride_vd_block,
    stride_vd_token,
    BLOCK_N: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    IS_PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SAME_KV_STRIDES: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    MASKED: tl.constexpr,
    MASK_LEFT: tl.constexpr,
    PER_TOKEN_SCALES: tl.constexpr,
    Q_FP8: tl.constexpr,
    PV_FP8: tl.constexpr,
    Q_SPLIT: tl.constexpr,
    ROUND_IN_SOFTWARE: tl.constexpr,
):
    """Attend one ``BLOCK_N`` key tile; returns ``(acc, m_i, l_i, v_exp)``.

    ``MASKED`` tiles apply the length / window / causal mask; without ``MASK_LEFT`` the tile is known to lie
    right of every row's left window edge (the diagonal tiles) and that comparison is skipped.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_PAD)
    k_rows = _kv_row_offsets(pages, kv_start, offs_n, stride_k_block, stride_k_token, IS_PAGED, PAGE_SIZE)
    if SAME_KV_STRIDES:  # one offset computation serves K and V (the usual case: equal shapes or a joint cache)
        v_rows = k_rows
    else:
        v_rows = _kv_row_offsets(pages, kv_start, offs_n, stride_v_block, stride_v_token, IS_PAGED, PAGE_SIZE)
    k_ptrs = k_head_ptr + k_rows[:, None] + offs_d[None, :]
    v_ptrs = v_head_ptr + v_rows[:, None] + offs_d[None, :]
    # Out-of-range rows are never read: the cache may hold anything there (NaN bit patterns in FP8).
    if MASKED:
        kv_mask = (offs_n < kv_len)[:, None] & (offs_d < HEAD_SIZE)[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    elif HEAD_PAD != HEAD_SIZE:
        k = tl.load(k_ptrs, mask=(offs_d < HEAD_SIZE)[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=(offs_d < HEAD_SIZE)[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)

    if Q_FP8:  # fp8 x fp8 (K e4m3 or e5m2, as stored)
        qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] fp32
    elif Q_SPLIT:  # (q_hi + q_lo) . k: two fp8 dots, one accumulator
        k_t = tl.trans(k)
        qk = tl.dot(q_lo, k_t, tl.dot(q, k_t))  # [BLOCK_M, BLOCK_N] fp32
    else:
        qk = tl.dot(q, tl.trans(k.to(DOT_DTYPE)))  # [BLOCK_M, BLOCK_N] fp32
    if PER_TOKEN_SCALES:
        kd_rows = _kv_row_offsets(pages, kv_start, offs_n, stride_kd_block, stride_kd_token, IS_PAGED, PAGE_SIZE)
        vd_rows = _kv_row_offsets(pages, kv_start, offs_n, stride_vd_block, stride_vd_token, IS_PAGED, PAGE_SIZE)
        if MASKED:  # 0 past the sequence: those columns are masked below, and add nothing to E
            k_tok_scale = tl.load(kd_head_ptr + kd_rows, mask=offs_n < kv_len, other=0.0)
            v_tok_scale = tl.load(vd_head_ptr + vd_rows, mask=offs_n < kv_len, other=0.0)
        else:
            k_tok_scale = tl.load(kd_head_ptr + kd_rows)
            v_tok_scale = tl.load(vd_head_ptr + vd_rows)
        qk = qk * k_tok_scale[None, :]  # the score column of key j: q . k_j * kscale_j
    if USE_SOFTCAP or USE_ALIBI:  # scores in the log2 domain, scale 1
        if USE_SOFTCAP:
            scores = softcap_scores(qk * qk_scale[:, None], softcap) * LOG2E
        else:
            scores = qk * (qk_scale * LOG2E)[:, None]
        if USE_ALIBI:
            scores += alibi_bias(slopes_log2, q_pos, offs_n)
        scale_log2 = tl.zeros_like(qk_scale) + 1.0
    else:  # raw scores: the scale goes into the exp2 argument as one FMA
        scores = qk
        scale_log2 = qk_scale * LOG2E
    if MASKED:
        if MASK_LEFT:
            visible = key_visibility(q_pos, offs_n, kv_len, window_left, window_right)
        else:
            visible = (offs_n < kv_len)[None, :] & (offs_n[None, :] <= (q_pos + window_right)[:, None])
        scores = tl.where(visible, scores, float("-inf"))
    m_i, l_i, p, alpha = online_softmax_step_scaled(m_i, l_i, scores, scale_log2)
    if PER_TOKEN_SCALES:
        p, alpha, v_exp = scale_p_columns(p, alpha, v_tok_scale, v_exp)
    if PV_FP8:  # P in e4m3 units of 1 / P_FP8_SCALE; the tile's dot, then an fp32 add (two-level accumulation)
        acc = acc * alpha[:, None] + tl.dot(cast_to_e4m3(p * P_FP8_SCALE, ROUND_IN_SOFTWARE), v)
    elif Q_FP8 or Q_SPLIT:  # P and V (converted exactly) in fp16
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(tl.float16), v.to(tl.float16), acc)
    else:
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc)
    return acc, m_i, l_i, v_exp


@triton.jit
def chunk_prefill_kernel(
    q_ptr,  # [total_q, Hq, D] fp16/bf16, or fp8 e4m3 (Q_FP8)
    k_ptr,  # paged [num_blocks, block_size, Hkv, D] or contiguous [total_k, Hkv, D]; q dtype or fp8
    v_ptr,  # paged [num_blocks, block_size, Hkv, D] or contiguous [total_k, Hkv, D]; k's dtype
    out_ptr,  # [total_q, Hq, D] q dtype, or fp8 e4m3 (OUTPUT_FP8)
    lse_ptr,  # [Hq, total_q] fp32 (written when WRITE_LSE)
    cu_seqlens_q_ptr,  # [num_seqs + 1] int32
    seqused_k_ptr,  # [num_seqs] int32 (paged, or contiguous with USE_SEQUSED)
    cu_seqlens_k_ptr,  # [num_seqs + 1] int32 (contiguous only)
    block_table_ptr,  # [num_seqs, max_blocks] int32 (paged only)
    # Descales: views (strides may be 0); PER_TOKEN_SCALES: one per stored (token, KV head), indexed like the cache.
    k_descale_ptr,  # [num_seqs, Hkv] fp32; PER_TOKEN_SCALES: [num_blocks, PAGE_SIZE, Hkv] or [total_k, Hkv] fp32
    v_descale_ptr,  # [num_seqs, Hkv] fp32; PER_TOKEN_SCALES: [num_blocks, PAGE_SIZE, Hkv] or [total_k, Hkv] fp32
    alibi_slopes_ptr,  # [num_seqs, Hq] fp32 (a view; strides may be 0) (USE_ALIBI)
    sinks_ptr,  # [Hq] fp32 (USE_SINKS)
    output_scale_ptr,  # [1] fp32 (OUTPUT_FP8)
    q_descale_ptr,  # [num_seqs, Hkv] fp32 (a view; strides may be 0) (Q_FP8); Q_PER_TOKEN: [total_q, Hq] fp32
    num_seqs,
    num_q_tiles,
    num_kv_heads,
    total_q,  # q.shape[0]: query ranges are clamped to [0, total_q]
    kv_capacity,  # max_blocks * PAGE_SIZE (paged) or total_k (contiguous): KV lengths are clamped to it
    num_blocks,  # paged: page ids are clamped to [0, num_blocks)
    skip_q_len,  # sequences with at most this many queries are the decode kernel's (a mixed batch); 0 = none
    softmax_scale,
    softcap,
    window_left,  # UNBOUNDED_WINDOW when unbounded
    window_right,  # 0 when causal
    stride_q_token,
    stride_q_head,
    stride_k_block,  # paged only
    stride_k_token,
    stride_k_head,
    stride_v_block,
    stride_v_token,
    stride_v_head,
    stride_o_token,
    stride_o_head,
    stride_lse_head,
    stride_bt_seq,
    stride_kd_seq,  # PER_TOKEN_SCALES: the token (in-page) stride
    stride_kd_head,
    stride_vd_seq,  # PER_TOKEN_SCALES: the token (in-page) stride
    stride_vd_head,
    stride_kd_block,  # PER_TOKEN_SCALES and paged only
    stride_vd_block,  # PER_TOKEN_SCALES and paged only
    stride_alibi_seq,
    stride_alibi_head,
    stride_qd_seq,  # Q_PER_TOKEN: the token stride
    stride_qd_head,  # Q_PER_TOKEN: the query-head stride
    GROUP: tl.constexpr,  # Hq // Hkv
    G_PACK: tl.constexpr,  # query heads per program (<= GROUP)
    NUM_HEAD_GROUPS: tl.constexpr,  # cdiv(GROUP, G_PACK)
    BLOCK_M: tl.constexpr,  # rows per program: BLOCK_Q tokens x G_PACK heads (+ unused rows)
    BLOCK_N: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,  # next power of two >= HEAD_SIZE
    IS_PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SAME_KV_STRIDES: tl.constexpr,  # K and V share block/token strides
    KV_FP8: tl.constexpr,  # FP8 cache: both dots run in fp16 (exact FP8 -> fp16 conversion)
    DOT_FP32: tl.constexpr,  # dots in fp32 (bf16 under the interpreter, whose bf16 tl.dot is wrong)
    USE_SEQUSED: tl.constexpr,  # contiguous layout capped by seqused_k
    USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    USE_SINKS: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    OUTPUT_FP8: tl.constexpr,  # out = saturate(attention / output_scale) in fp8 e4m3
    ROUND_IN_SOFTWARE: tl.constexpr,  # the interpreter: round to the fp8 grid before fp8 casts
    PER_TOKEN_SCALES: tl.constexpr,  # k/v descales per (stored token, KV head) (KV_FP8 only)
    Q_FP8: tl.constexpr,  # fp8 e4m3 q with q_descale (KV_FP8 only): the QK dot on fp8 tensor cores
    PV_FP8: tl.constexpr,  # (Q_FP8 only) the PV dot on fp8 tensor cores too; else P and V in fp16
    Q_SPLIT: tl.constexpr,  # bf16 q over an FP8 cache: QK as two fp8 dots of q's two e4m3 terms
    Q_PER_TOKEN: tl.constexpr,  # (Q_FP8 only) q_descale per (token, query head): one factor per row
):
    LOG2E: tl.constexpr = 1.4426950408889634
    BLOCK_Q: tl.constexpr = BLOCK_M // G_PACK
    # FP8 tiles convert to fp16 in one instruction per pair (to bf16 it takes three on sm_90), exactly; an fp8 q
    # keeps every operand in fp8.
    DOT_DTYPE: tl.constexpr = (
        tl.float8e4nv if Q_SPLIT
        else tl.float32 if DOT_FP32 else (tl.float16 if KV_FP8 and not Q_FP8 else q_ptr.dtype.element_ty)
    )  # fmt: skip

    # ---- which (tile, KV head, head group) this program computes ----
    pid = tl.program_id(0)
    num_head_programs = num_kv_heads * NUM_HEAD_GROUPS
    head_program = pid % num_head_programs
    tile = num_q_tiles - 1 - pid // num_head_programs
    kv_head = head_program // NUM_HEAD_GROUPS
    head_group = head_program % NUM_HEAD_GROUPS

    seq = _find_sequence(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_Q)
    if seq < 0:
        return
    # Memory safety whatever the index tensors hold (their values are never checked on the host): the query
    # range is clamped to [0, total_q] (a decreasing range is empty), the KV range to what the block table or
    # the contiguous cache can address. Valid inputs pass through unchanged.
    q_first = tl.load(cu_seqlens_q_ptr + seq)
    q_start = tl.minimum(tl.maximum(q_first, 0), total_q)
    q_len = tl.minimum(tl.maximum(tl.load(cu_seqlens_q_ptr + seq + 1), q_start), total_q) - q_start
    tile_in_seq = tile - (q_first // BLOCK_Q + seq)
    if (tile_in_seq < 0) | (tile_in_seq >= tl.cdiv(q_len, BLOCK_Q)) | (q_len <= skip_q_len):
        return
    tok0 = tile_in_seq * BLOCK_Q

    if IS_PAGED:
        kv_start = 0
        kv_len = tl.minimum(tl.maximum(tl.load(seqused_k_ptr + seq), 0), kv_capacity)
    else:
        kv_start = tl.minimum(tl.maximum(tl.load(cu_seqlens_k_ptr + seq), 0), kv_capacity)
        kv_len = tl.minimum(tl.maximum(tl.load(cu_seqlens_k_ptr + seq + 1), kv_start), kv_capacity) - kv_start
        if USE_SEQUSED:
            kv_len = tl.maximum(tl.minimum(kv_len, tl.load(seqused_k_ptr + seq)), 0)

    # ---- rows: (token, head) pairs ----
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    tok = tok0 + offs_m // G_PACK
    head_in_group = head_group * G_PACK + offs_m % G_PACK
    head = kv_head * GROUP + head_in_group
    row_valid = (offs_m < BLOCK_Q * G_PACK) & (tok < q_len) & (head_in_group < GROUP)
    q_pos = kv_len - q_len + tok

    q_rows = (q_start + tok).to(tl.int64) * stride_q_token + head.to(tl.int64) * stride_q_head
    q_mask = row_valid[:, None] & (offs_d < HEAD_SIZE)[None, :]
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0)

    # Descales are per (sequence, KV head): K's folds into the score scale, V's into the output, once each.
    # K's sign moves into q so that the score scale is >= 0 (the hot loop scales the row max after it).
    if PER_TOKEN_SCALES:  # per-token descales are loaded per tile, in _attend_tile
        k_scale = tl.full([], 1.0, dtype=tl.float32)
        v_scale = tl.full([], 1.0, dtype=tl.float32)
    else:
        k_scale = tl.load(k_descale_ptr + seq * stride_kd_seq + kv_head * stride_kd_head)
        v_scale = tl.load(v_descale_ptr + seq * stride_vd_seq + kv_head * stride_vd_head)
    if Q_PER_TOKEN:  # [BLOCK_M]: each row's (token, head) descale; the rows' factors below become per row
        q_rows_qd = (q_start + tok).to(tl.int64) * stride_qd_seq + head.to(tl.int64) * stride_qd_head
        k_scale = k_scale * tl.load(q_descale_ptr + q_rows_qd, mask=row_valid, other=1.0)
    elif Q_FP8:  # q's descale scales every score of the row, as K's does: (q . k) * qd * kd
        k_scale = k_scale * tl.load(q_descale_ptr + seq * stride_qd_seq + kv_head * stride_qd_head)
    kd_head_ptr = k_descale_ptr + kv_head.to(tl.int64) * stride_kd_head
    vd_head_ptr = v_descale_ptr + kv_head.to(tl.int64) * stride_vd_head
    v_exp = tl.full([], -100.0, dtype=tl.float32)
    q_mult = tl.where(k_scale < 0, -1.0, 1.0) + tl.zeros([BLOCK_M], dtype=tl.float32)
    if KV_FP8 and not Q_FP8:
        # q goes to fp16 with a per-row power of two that puts its largest element in [2^14, 2^15): exact for
        # bf16 values (8 significant bits) down to 2^-31 of the row's largest, and no overflow. Q_SPLIT: in
        # [2^7, 2^8), so that its high e4m3 term stays below 448.
        TOP_EXP: tl.constexpr = 7.0 if Q_SPLIT else 14.0
        q_max = tl.max(tl.abs(q.to(tl.float32)), 1)
        q_exp = tl.floor(tl.math.log2(tl.where(q_max > 0, q_max, 1.0)))
        q_mult = q_mult * tl.math.exp2(tl.minimum(TOP_EXP - q_exp, 126.0))
    q = q.to(tl.float32) * q_mult[:, None]
    if Q_SPLIT:  # q = q_hi + q_lo: the high term rounds q to 4 significant bits, the low term holds the rest
        q_hi = cast_to_e4m3(q, ROUND_IN_SOFTWARE)
        q_lo = cast_to_e4m3(q - q_hi.to(tl.float32), ROUND_IN_SOFTWARE)  # the difference is exact in fp32
        q = q_hi
    else:
        q = q.to(DOT_DTYPE)
        q_lo = q
    # Strictly positive so that masked (-inf) scores stay -inf after scaling; a zero descale becomes 1e-30,
    # which still makes every visible key equally likely.
    qk_scale = tl.maximum(softmax_scale * tl.abs(k_scale) / tl.abs(q_mult), 1e-30)
    if USE_ALIBI:
        alibi_offs = seq * stride_alibi_seq + head * stride_alibi_head
        slopes = tl.load(alibi_slopes_ptr + alibi_offs, mask=row_valid, other=0.0)
        slopes_log2 = slopes * LOG2E
    else:
        slopes_log2 = tl.zeros([BLOCK_M], dtype=tl.float32)

    k_head_ptr = k_ptr + kv_head.to(tl.int64) * stride_k_head
    v_head_ptr = v_ptr + kv_head.to(tl.int64) * stride_v_head
    block_table_row_ptr = block_table_ptr + seq.to(tl.int64) * stride_bt_seq

    # ---- key range of this tile (see the module docstring) ----
    last_tok = tl.minimum(tok0 + BLOCK_Q, q_len) - 1
    p_first = kv_len - q_len + tok0
    p_last = kv_len - q_len + last_tok
    lo = tl.maximum(p_first - window_left, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(p_last + window_right + 1, kv_len)
    full_lo = tl.cdiv(tl.maximum(p_last - window_left, 0), BLOCK_N) * BLOCK_N
    full_hi = tl.maximum(tl.minimum(p_first + window_right + 1, kv_len), 0) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)

    offs_tile = tl.arange(0, BLOCK_N)
    pages = _tile_pages(block_table_row_ptr, lo + offs_tile, kv_len, num_blocks, IS_PAGED, PAGE_SIZE)
    for start_n in range(lo, tl.minimum(full_lo, hi), BLOCK_N):
        next_pages = _tile_pages(block_table_row_ptr, start_n + BLOCK_N + offs_tile, kv_len, num_blocks, IS_PAGED,
                                 PAGE_SIZE)  # fmt: skip
        acc, m_i, l_i, v_exp = _attend_tile(
            acc, m_i, l_i, v_exp, q, q_lo, k_head_ptr, v_head_ptr, pages, kv_start, start_n, kv_len, q_pos,
            slopes_log2, qk_scale, softcap, window_left, window_right,
            stride_k_block, stride_k_token, stride_v_block, stride_v_token,
            kd_head_ptr, vd_head_ptr, stride_kd_block, stride_kd_seq, stride_vd_block, stride_vd_seq,
            BLOCK_N, HEAD_SIZE, HEAD_PAD, IS_PAGED, PAGE_SIZE, SAME_KV_STRIDES, DOT_DTYPE, USE_SOFTCAP, USE_ALIBI,
            PER_TOKEN_SCALES=PER_TOKEN_SCALES, MASKED=True, MASK_LEFT=True, Q_FP8=Q_FP8, PV_FP8=PV_FP8,
            Q_SPLIT=Q_SPLIT, ROUND_IN_SOFTWARE=ROUND_IN_SOFTWARE,
        )  # fmt: skip
        pages = next_pages
    pages = _tile_pages(block_table_row_ptr, full_lo + offs_tile, kv_len, num_blocks, IS_PAGED, PAGE_SIZE)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        next_pages = _tile_pages(block_table_row_ptr, start_n + BLOCK_N + offs_tile, kv_len, num_blocks, IS_PAGED,
                                 PAGE_SIZE)  # fmt: skip
        acc, m_i, l_i, v_exp = _attend_tile(
            acc, m_i, l_i, v_exp, q, q_lo, k_head_ptr, v_head_ptr, pages, kv_start, start_n, kv_len, q_pos,
            slopes_log2, qk_scale, softcap, window_left, window_right,
            stride_k_block, stride_k_token, stride_v_block, stride_v_token,
            kd_head_ptr, vd_head_ptr, stride_kd_block, stride_kd_seq, stride_vd_block, stride_vd_seq,
            BLOCK_N, HEAD_SIZE, HEAD_PAD, IS_PAGED, PAGE_SIZE, SAME_KV_STRIDES, DOT_DTYPE, USE_SOFTCAP, USE_ALIBI,
            PER_TOKEN_SCALES=PER_TOKEN_SCALES, MASKED=False, MASK_LEFT=False, Q_FP8=Q_FP8, PV_FP8=PV_FP8,
            Q_SPLIT=Q_SPLIT, ROUND_IN_SOFTWARE=ROUND_IN_SOFTWARE,
        )  # fmt: skip
        pages = next_pages
    tail_lo = tl.maximum(full_lo, full_hi)
    pages = _tile_pages(block_table_row_ptr, tail_lo + offs_tile, kv_len, num_blocks, IS_PAGED, PAGE_SIZE)
    for start_n in range(tail_lo, hi, BLOCK_N):
        next_pages = _tile_pages(block_table_row_ptr, start_n + BLOCK_N + offs_tile, kv_len, num_blocks, IS_PAGED,
                                 PAGE_SIZE)  # fmt: skip
        acc, m_i, l_i, v_exp = _attend_tile(
            acc, m_i, l_i, v_exp, q, q_lo, k_head_ptr, v_head_ptr, pages, kv_start, start_n, kv_len, q_pos,
            slopes_log2, qk_scale, softcap, window_left, window_right,
            stride_k_block, stride_k_token, stride_v_block, stride_v_token,
            kd_head_ptr, vd_head_ptr, stride_kd_block, stride_kd_seq, stride_vd_block, stride_vd_seq,
            BLOCK_N, HEAD_SIZE, HEAD_PAD, IS_PAGED, PAGE_SIZE, SAME_KV_STRIDES, DOT_DTYPE, USE_SOFTCAP, USE_ALIBI,
            PER_TOKEN_SCALES=PER_TOKEN_SCALES, MASKED=True, MASK_LEFT=False, Q_FP8=Q_FP8, PV_FP8=PV_FP8,
            Q_SPLIT=Q_SPLIT, ROUND_IN_SOFTWARE=ROUND_IN_SOFTWARE,
        )  # fmt: skip
        pages = next_pages

    if USE_SINKS:
        sinks = tl.load(sinks_ptr + head, mask=row_valid, other=0.0)
        m_i, l_i, alpha = add_sink_to_denominator(m_i, l_i, sinks * LOG2E)
        acc = acc * alpha[:, None]
    out, lse = finalize_softmax(acc, m_i, l_i)
    if PER_TOKEN_SCALES:
        out = out * tl.math.exp2(v_exp)
    if PV_FP8:
        v_scale = v_scale * (1.0 / P_FP8_SCALE)
    if OUTPUT_FP8:  # the V descale and the output scale's reciprocal (loaded once) fold into one factor
        out = to_e4m3(out * (v_scale * (1.0 / tl.load(output_scale_ptr))), ROUND_IN_SOFTWARE)
    else:
        out = (out * v_scale).to(out_ptr.dtype.element_ty)

    o_rows = (q_start + tok).to(tl.int64) * stride_o_token + head.to(tl.int64) * stride_o_head
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out, mask=q_mask)
    if WRITE_LSE:
        lse_ptrs = lse_ptr + head.to(tl.int64) * stride_lse_head + (q_start + tok)
        tl.store(lse_ptrs, lse, mask=row_valid)

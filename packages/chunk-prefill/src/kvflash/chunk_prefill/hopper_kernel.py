"""The Hopper (sm_90) chunked-prefill kernel in Gluon (Triton 3.6; jit only), FlashAttention-3 style: the entry
point, its shared memory and barriers, and the design. The partitions are in ``hopper_producer`` and
``hopper_consumer`` (its walk over an item's key tiles in ``hopper_key_tiles``), the work items in
``hopper_schedule``, the fp8 PV operands in ``hopper_pv_fp8``.

The path :mod:`kvflash.chunk_prefill.hopper_op` takes on sm_90 for paged 16-bit caches (loaded page by page through
TMA) and FP8 caches (gathered by cp.async), causal, without softcap, ALiBi, sinks or windows (the portable kernel in
:mod:`kvflash.chunk_prefill.kernel` serves everything else). ``k_descale`` / ``v_descale`` are per (sequence, KV
head) as there: K's folds into the score scale (its sign picks the row maximum or minimum), V's into the output.
Sequences with at most ``skip_q_len`` queries are left alone (the decode kernel serves them in a mixed batch).

Work item = one query tile of ``BLOCK_M = 128`` tokens of ONE query head. Work ids run heads fastest (the ``GROUP``
query heads of a KV head are adjacent ids, so neighbouring CTAs read the same K/V tiles from L2) and query tiles from
the last (longest under the causal mask) to the first. Programs are persistent: program ``pid`` takes work ids
``pid, pid + nprog, ...`` (with ``nprog`` = the grid, one work item per program when the grid covers them all).

Partitions (``gl.warp_specialize``), 12 warps = 3 warpgroups:

* default partition (4 warps, warpgroup 0): consumer of query rows 0..63 of each work item;
* worker 0 (4 warps, warpgroup 1): consumer of rows 64..127 (the same function, ``WG = 1``);
* worker 1 (``PRODUCER_WARPS`` = 1 warp by default, in warpgroup 2 with 3 idle padding warps): producer (a 4-warp
  producer gets a 128-thread bar.sync before every TMA issue from Triton). Per work item: Q by TMA into one of
  ``Q_BUFS`` buffers (two: the next item's Q loads while the current one finishes), then K and V tiles of ``BLOCK_N``
  keys into a ``STAGES``-deep ring, one TMA box per page (``BLOCK_N / PAGE`` boxes per tile for pages smaller than a
  tile; the cache viewed as ``[num_blocks * PAGE, Hkv * D]``), page ids read from the block table once per tile.
  Boxes at or past ``kv_len`` use an out-of-bounds row (TMA fills zeros); the rows past ``kv_len`` of a partly valid
  page are zeroed by the producer in shared memory (the sequence's last tile only), so garbage (NaN) in unused cache
  slots never meets P = 0 in the PV MMA. K garbage is harmless (those scores are masked to -inf).

FP8 caches (``KV_FP8``): the producer partition is 4 warps. They gather each K/V tile as stored by cp.async (16
bytes per copy, the page id of every key row read from the block table; no TMA, whose one box per page costs a
barrier per box in a 4-warp partition) into an fp8 staging ring one tile ahead, and widen it to fp16 (one hardware
conversion per pair, exact) into the consumers' ring, zeroing V rows past ``kv_len`` on the way; the consumers then
run the 16-bit loop in fp16. That is the fp16 query's path.

K stays as stored (``K_AS_STORED``: the producer gathers it straight into the consumers' fp8 ring and stages and
widens only V; QK^T runs on the fp8 tensor cores, QGMMA) for
* a bf16 query (``Q_SPLIT``): each consumer warpgroup rewrites its Q rows in shared memory, once per item, times a
  power of two per row, as two e4m3 terms ``hi + lo`` (``hopper_consumer._query_to_fp8_pair``; exact for elements
  down to 2^-9 of the row's largest), and QK^T is two fp8 dots into one accumulator; the powers' inverses fold into
  the rows' score scales. The portable kernel's ``Q_SPLIT`` arithmetic;
* an fp8 query (``Q_FP8``, e4m3 with a per-(sequence, KV head) ``q_descale``): Q as loaded; q's descale joins K's in
  the score scale.
With ``TMA_LOADER`` (a 16-bit query at D 128, an fp16 one at D 64) that producer is two partitions instead
(``hopper_tma_loader``): one warp loads Q, K and V by TMA, one box per page, and four warps widen V (and an fp16
query's K); 16 warps in all.
PV runs in fp16 (P not rounded to fp8) on the FP8 paths, except an fp8 query's at D 64 / 128 (``PV_FP8``): there the
producer transposes V in fp8 instead of widening it, and P, rounded to e4m3, meets it on the fp8 tensor cores
(``hopper_pv_fp8``). The fp8 tensor cores accumulate a dot below fp32 precision (about 2^-14 relative per step),
which the GPU tier's FlashAttention rule judges.

Consumer step (per warpgroup, FA3's intra-warpgroup pipelining): at step j it issues S_j = Q K_j^T and
O += P_{j-1} V_{j-1} as two async wgmma groups, waits for S_j only, releases K_j, runs the online softmax of S_j,
waits for PV, releases V_{j-1}, rescales O and packs P_j. (ptxas hoists the PV wait above the softmax:
docs/chunk_prefill_perf.md.)
With ``PINGPONG`` the two consumer warpgroups take turns issuing their wgmma pair (mbarriers ``turn[0/1]``), so one
warpgroup's softmax runs while the other's MMAs occupy the tensor cores. Tile 0 is peeled (always masked), then the
unmasked tiles, then the causal-diagonal / sequence-end tiles (masked).

Causal is bottom-right aligned: query i of a sequence with Lq queries and Lk keys sits at p = Lk - Lq + i and sees
keys j <= p. Rows no key is visible to (only with Lk < Lq) get 0 and lse = -inf.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
)

from kvflash.chunk_prefill.hopper_consumer import consumer_partition
from kvflash.chunk_prefill.hopper_producer import producer_partition
from kvflash.chunk_prefill.hopper_pv_fp8 import vt_shared_layout, vt_staging_layout, vt_staging_slots
from kvflash.chunk_prefill.hopper_tma_loader import loader_partition, widener_partition


@gluon.jit(do_not_specialize=["num_seqs", "num_q_tiles", "num_heads", "total_q", "num_blocks", "kv_capacity",
                              "skip_q_len"])
def hopper_prefill_kernel(
    q_desc,  # TMA over q viewed as [total_q, Hq * D], block [BLOCK_M, D]
    k_desc,  # TMA over the K cache viewed as [num_blocks * PAGE, Hkv * D], block [min(PAGE, BLOCK_N), D], q's dtype;
    # over an FP8 cache (KV_FP8) it only lends the fp8 staging ring its dtype and layout
    v_desc,  # same for V
    k_ptr,  # [num_blocks, PAGE, Hkv, D] fp8, the K cache itself (KV_FP8: gathered by cp.async)
    v_ptr,  # [num_blocks, PAGE, Hkv, D] fp8, V (the same strides as K)
    out_ptr,  # [total_q, Hq, D]
    lse_ptr,  # [Hq, total_q] fp32 (WRITE_LSE)
    cu_seqlens_q_ptr,  # [num_seqs + 1] int32
    seqused_k_ptr,  # [num_seqs] int32
    block_table_ptr,  # [num_seqs, max_blocks] int32
    k_descale_ptr,  # [num_seqs, Hkv] fp32 (a view: strides may be 0)
    v_descale_ptr,  # [num_seqs, Hkv] fp32 (a view: strides may be 0)
    num_seqs,
    num_q_tiles,  # cdiv(total_q, BLOCK_M) + num_seqs
    num_heads,  # Hq
    total_q,
    num_blocks,
    kv_capacity,  # max_blocks * PAGE
    skip_q_len,  # sequences with at most this many queries are the decode kernel's
    softmax_scale,
    stride_o_token,
    stride_o_head,
    stride_lse_head,
    stride_bt_seq,
    stride_kv_block,  # elements; k_ptr and v_ptr
    stride_kv_token,
    stride_kd_seq,
    stride_kd_head,
    stride_vd_seq,
    stride_vd_head,
    q_descale_ptr,  # [num_seqs, Hkv] fp32 (Q_FP8; a view: strides may be 0)
    stride_qd_seq,
    stride_qd_head,
    GROUP: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_D: gl.constexpr,
    PAGE: gl.constexpr,
    STAGES: gl.constexpr,
    Q_BUFS: gl.constexpr,
    WRITE_LSE: gl.constexpr,
    PINGPONG: gl.constexpr,
    ASM_CVT: gl.constexpr,
    KV_FP8: gl.constexpr,  # fp8 cache: cp.async into an fp8 staging ring, widened to fp16 by the producer's 4 warps
    Q_SPLIT: gl.constexpr,  # (KV_FP8 with a bf16 q) each consumer rewrites its Q rows as two e4m3 terms (times a
    # power of two per row) for two fp8 QK^T dots against K as stored
    WIDEN_ROWS: gl.constexpr,  # (KV_FP8) rows of a K/V tile the producer widens per step
    Q_FP8: gl.constexpr,  # (KV_FP8) an fp8 e4m3 query: QK^T on fp8 operands (K as stored), PV in fp16
    PV_FP8: gl.constexpr,  # (Q_FP8) PV on fp8 operands too: the producer writes V^T in fp8 instead of widening V; P in
    # e4m3 (times 2^7, keys relabelled: hopper_pv_fp8), a fresh accumulator per tile added in fp32
    TMA_LOADER: gl.constexpr,  # (KV_FP8, 16-bit q) a one-warp TMA loader and a 4-warp widener instead of the producer
    # (hopper_tma_loader): 16 warps
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,  # with TMA_LOADER: the widener's
    LOADER_REGS: gl.constexpr,  # (TMA_LOADER) the loader warpgroup's (one warp and three idle)
    PRODUCER_WARPS: gl.constexpr,
    num_warps: gl.constexpr,
):
    gl.static_assert(BLOCK_M == 128)
    gl.static_assert(num_warps == 4)
    gl.static_assert(STAGES >= 2)  # FP8: the staging prefetch of tile g + 1 reuses the slot widened at g + 1 - STAGES
    gl.static_assert(not TMA_LOADER or (KV_FP8 and not Q_FP8))
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    qk_scale = softmax_scale * 1.4426950408889634

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [Q_BUFS, BLOCK_M, HEAD_D], q_desc.layout)
    K_AS_STORED: gl.constexpr = Q_FP8 or Q_SPLIT  # the fp8 QK^T dot: K needs no widening
    # FP8 caches: the consumers' widened tiles in fp16 (the MMA dtype), laid out as TMA would lay out a 16-bit tile
    kv16: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    if PV_FP8:
        gl.static_assert(Q_FP8)
        # K as stored, V^T in fp8 (the PV wgmma's K-major B operand), the V staging ring laid out for the transpose
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, HEAD_D, BLOCK_N], vt_shared_layout(BLOCK_N, HEAD_D))
        k8_smem = k_smem
        v8_smem = gl.allocate_shared_memory(v_desc.dtype, [vt_staging_slots(STAGES), BLOCK_N, HEAD_D],
                                            vt_staging_layout(BLOCK_N, HEAD_D))
    elif K_AS_STORED:
        # K as stored (the fp8 QK^T operand), V widened to fp16 through an fp8 staging ring
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_N, HEAD_D], kv16)
        k8_smem = k_smem
        v8_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    elif KV_FP8:
        # the consumers' ring in fp16, fp8 staging beside it (the layout TMA would give an fp8 box: the descriptors
        # only lend it here)
        k_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_N, HEAD_D], kv16)
        v_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_N, HEAD_D], kv16)
        k8_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
        v8_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    else:
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
        k8_smem = k_smem
        v8_smem = v_smem
    q_ready = gl.allocate_shared_memory(gl.int64, [Q_BUFS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_BUFS, 1], mbarrier.MBarrierLayout())
    v_fix = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    # TMA_LOADER: the staging slots (V's, and K's unless K_AS_STORED), loaded (staged_ready, by TMA) and widened
    # (staged_empty)
    staged_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    staged_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    # Q_SPLIT: the powers of two of the query rows, 64 per consumer warpgroup (hopper_consumer._query_to_fp8_pair)
    q_row_scales = gl.allocate_shared_memory(gl.float32, [BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    for i in gl.static_range(Q_BUFS):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # one arrival per consumer warpgroup
    mbarrier.init(v_fix, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
        mbarrier.init(staged_ready.index(i), count=1)
        mbarrier.init(staged_empty.index(i), count=1)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    mbarrier.arrive(turn.index(0))  # warpgroup 0 issues first
    fence_async_shared()  # initialised barriers visible to the async proxy (TMA complete_tx), as CUDA's TMA example

    # The two consumer argument tuples differ only in WG. They are written out, in both calls: Gluon (3.6) turns the
    # constexprs of a tuple built by concatenation, or bound to a name, into tensors.
    if TMA_LOADER:
        gl.warp_specialize([
            (consumer_partition, (
                q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn, out_ptr, lse_ptr,
                cu_seqlens_q_ptr, seqused_k_ptr, k_descale_ptr, v_descale_ptr, num_seqs, num_q_tiles, num_heads,
                total_q, kv_capacity, skip_q_len, pid, nprog, qk_scale, stride_o_token, stride_o_head, stride_lse_head,
                stride_kd_seq, stride_kd_head, stride_vd_seq, stride_vd_head, q_descale_ptr, stride_qd_seq,
                stride_qd_head, GROUP, 0, BLOCK_M, BLOCK_N, HEAD_D, STAGES, Q_BUFS, WRITE_LSE, PINGPONG, ASM_CVT,
                Q_SPLIT, Q_FP8, q_row_scales, PV_FP8
            )),
            (consumer_partition, (
                q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn, out_ptr, lse_ptr,
                cu_seqlens_q_ptr, seqused_k_ptr, k_descale_ptr, v_descale_ptr, num_seqs, num_q_tiles, num_heads,
                total_q, kv_capacity, skip_q_len, pid, nprog, qk_scale, stride_o_token, stride_o_head, stride_lse_head,
                stride_kd_seq, stride_kd_head, stride_vd_seq, stride_vd_head, q_descale_ptr, stride_qd_seq,
                stride_qd_head, GROUP, 1, BLOCK_M, BLOCK_N, HEAD_D, STAGES, Q_BUFS, WRITE_LSE, PINGPONG, ASM_CVT,
                Q_SPLIT, Q_FP8, q_row_scales, PV_FP8
            )),
            (widener_partition, (
                k_smem, v_smem, k8_smem, v8_smem, k_ready, k_empty, v_ready, v_empty, staged_ready, staged_empty,
                cu_seqlens_q_ptr, seqused_k_ptr, num_seqs, num_q_tiles, num_heads, total_q, kv_capacity, skip_q_len,
                pid, nprog, BLOCK_M, BLOCK_N, HEAD_D, STAGES, PRODUCER_WARPS, WIDEN_ROWS, K_AS_STORED
            )),
            (loader_partition, (
                q_desc, k_desc, v_desc, q_smem, k_smem, k8_smem, v8_smem, q_ready, q_empty, k_ready, k_empty,
                staged_ready, staged_empty, cu_seqlens_q_ptr, seqused_k_ptr, block_table_ptr, stride_bt_seq, num_seqs,
                num_q_tiles, num_heads, total_q, kv_capacity, num_blocks, skip_q_len, pid, nprog, BLOCK_M, BLOCK_N,
                HEAD_D, PAGE, GROUP, STAGES, Q_BUFS, K_AS_STORED
            )),
        ], [4, PRODUCER_WARPS, 1], [CONSUMER_REGS, PRODUCER_REGS, LOADER_REGS])
    else:
        gl.warp_specialize([
            (consumer_partition, (
                q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn, out_ptr, lse_ptr,
                cu_seqlens_q_ptr, seqused_k_ptr, k_descale_ptr, v_descale_ptr, num_seqs, num_q_tiles, num_heads,
                total_q, kv_capacity, skip_q_len, pid, nprog, qk_scale, stride_o_token, stride_o_head, stride_lse_head,
                stride_kd_seq, stride_kd_head, stride_vd_seq, stride_vd_head, q_descale_ptr, stride_qd_seq,
                stride_qd_head, GROUP, 0, BLOCK_M, BLOCK_N, HEAD_D, STAGES, Q_BUFS, WRITE_LSE, PINGPONG, ASM_CVT,
                Q_SPLIT, Q_FP8, q_row_scales, PV_FP8
            )),
            (consumer_partition, (
                q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn, out_ptr, lse_ptr,
                cu_seqlens_q_ptr, seqused_k_ptr, k_descale_ptr, v_descale_ptr, num_seqs, num_q_tiles, num_heads,
                total_q, kv_capacity, skip_q_len, pid, nprog, qk_scale, stride_o_token, stride_o_head, stride_lse_head,
                stride_kd_seq, stride_kd_head, stride_vd_seq, stride_vd_head, q_descale_ptr, stride_qd_seq,
                stride_qd_head, GROUP, 1, BLOCK_M, BLOCK_N, HEAD_D, STAGES, Q_BUFS, WRITE_LSE, PINGPONG, ASM_CVT,
                Q_SPLIT, Q_FP8, q_row_scales, PV_FP8
            )),
            (producer_partition, (
                q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, k8_smem, v8_smem, q_ready, q_empty, k_ready,
                k_empty, v_ready, v_empty, v_fix, k_ptr, v_ptr, stride_kv_block, stride_kv_token, cu_seqlens_q_ptr,
                seqused_k_ptr, block_table_ptr, stride_bt_seq, num_seqs, num_q_tiles, num_heads, total_q, kv_capacity,
                num_blocks, skip_q_len, pid, nprog, BLOCK_M, BLOCK_N, HEAD_D, PAGE, GROUP, STAGES, Q_BUFS, KV_FP8,
                PRODUCER_WARPS, WIDEN_ROWS, K_AS_STORED, PV_FP8
            )),
        ], [4, PRODUCER_WARPS], [CONSUMER_REGS, PRODUCER_REGS])

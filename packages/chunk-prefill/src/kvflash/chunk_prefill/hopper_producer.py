"""The producer partition of the Hopper prefill kernel (Gluon; jit only): Q and the K/V tiles into shared memory.

Per work item: Q by TMA into one of ``Q_BUFS`` buffers, then the item's key tiles, one TMA box per page of the cache
viewed as ``[num_blocks * PAGE, Hkv * D]`` (the page ids of a tile read once, for K and V). A 16-bit cache lands
straight in the consumers' ``STAGES``-deep ring; the V rows past ``kv_len`` of a sequence's last tile are zeroed
in shared memory (unused cache slots may hold NaN). An FP8 cache is gathered by the producer's 4 warps with
cp.async (16 bytes per copy, page ids per key row, read a tile ahead of the copies) into an fp8 staging ring one
tile ahead, and the same warps widen each tile to fp16 into the consumers' ring. Every hand-over to the consumers
is an mbarrier (``*_ready`` / ``*_empty`` pairs per ring slot).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
)
from triton.runtime.jit import constexpr_function

from kvflash.chunk_prefill.hopper_pv_fp8 import transpose_v_tile
from kvflash.chunk_prefill.hopper_schedule import work_item


@gluon.jit
def box_rows(bt_row_ptr, start_n, kv_len, num_blocks, PAGE: gl.constexpr, BOX: gl.constexpr, NBOX: gl.constexpr,
              NUM_WARPS: gl.constexpr):
    """Rows of the flattened ``[num_blocks * PAGE, Hkv * D]`` cache where the ``NBOX`` page boxes of the key tile
    starting at ``start_n`` begin: ``[NBOX]`` int32, every thread holding all of them (one vector load of page ids
    per tile, for K and V). A box at or past ``kv_len`` gets the out-of-bounds row ``num_blocks * PAGE``, which TMA
    fills with zeros; page ids are clamped."""
    layout: gl.constexpr = gl.BlockedLayout([NBOX], [32], [NUM_WARPS], [0])
    key = start_n + gl.arange(0, NBOX, layout=layout) * BOX
    valid = key < kv_len
    page = gl.load(bt_row_ptr + key // PAGE, mask=valid, other=0)
    page = gl.minimum(gl.maximum(page, 0), num_blocks - 1)
    return gl.where(valid, page * PAGE + key % PAGE, num_blocks * PAGE)


@gluon.jit
def _zero_tail(buf, valid, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NUM_WARPS: gl.constexpr):
    """Zero rows ``>= valid`` of a ``[BLOCK_N, HEAD_D]`` shared tile, 16 (8 with one warp) rows at a time (generic
    proxy stores; the caller fences before the async-proxy wgmma reads them)."""
    CH: gl.constexpr = 16 if NUM_WARPS >= 4 else 8
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NUM_WARPS, 1], [1, 0])
    rows = gl.arange(0, CH, layout=gl.SliceLayout(1, blk))
    for c in gl.static_range(BLOCK_N // CH):
        if c * CH + CH > valid:
            chunk = buf.slice(c * CH, CH)
            x = chunk.load(blk)
            keep = gl.expand_dims(c * CH + rows < valid, 1)
            x = gl.where(keep, x, gl.zeros_like(x))
            chunk.store(x)


@gluon.jit
def widen_tile(src, dst, valid, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NUM_WARPS: gl.constexpr,
                MASK_TAIL: gl.constexpr, ROWS: gl.constexpr):
    """``dst [BLOCK_N, HEAD_D]`` fp16 = ``src`` fp8 (e4m3 or e5m2; exact: one hardware conversion per pair), ``ROWS``
    rows at a time, 8 elements per thread per piece: an 8-byte shared load in, a 16-byte store out, so a warp's
    stores cover whole 128-byte swizzle rows (no bank conflicts). With ``MASK_TAIL`` rows ``>= valid`` become 0."""
    TPR: gl.constexpr = HEAD_D // 8  # threads per row
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPR, TPR], [NUM_WARPS, 1], [1, 0])
    gl.static_assert(ROWS % ((32 // TPR) * NUM_WARPS) == 0)
    gl.static_assert(BLOCK_N % ROWS == 0)
    rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, blk))
    for c in gl.static_range(BLOCK_N // ROWS):
        x = src.slice(c * ROWS, ROWS).load(blk).to(gl.float16)
        if MASK_TAIL:
            x = gl.where(gl.expand_dims(c * ROWS + rows < valid, 1), x, gl.zeros_like(x))
        dst.slice(c * ROWS, ROWS).store(x)


@gluon.jit
def widen_v_tile(src, dst, start_n, kv_len, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NUM_WARPS: gl.constexpr,
                 ROWS: gl.constexpr):
    """:func:`widen_tile` for the V tile of keys ``start_n ..``: on a sequence's last, partly valid tile the rows at or
    past ``kv_len`` are zeroed (the unused slots of its last page may hold anything, NaN included); full tiles take
    the unmasked form."""
    if start_n + BLOCK_N <= kv_len:
        widen_tile(src, dst, BLOCK_N, BLOCK_N, HEAD_D, NUM_WARPS, False, ROWS)
    else:
        widen_tile(src, dst, kv_len - start_n, BLOCK_N, HEAD_D, NUM_WARPS, True, ROWS)


@gluon.jit
def load_tile(desc, rows, col, bar, buf, BOX: gl.constexpr, NBOX: gl.constexpr):
    """TMA loads of a key tile's ``NBOX`` page boxes (first rows ``rows``, from :func:`box_rows`) into ``buf`` on
    ``bar``. Each box's row is picked out of the thread's own registers (no shuffles)."""
    box = gl.arange(0, NBOX, layout=rows.type.layout)
    for b in gl.static_range(NBOX):
        r = gl.sum(gl.where(box == b, rows, 0), axis=0)
        tma.async_copy_global_to_shared(desc, [r, col], bar, buf.slice(b * BOX, BOX))


@gluon.jit
def _load_item_16bit(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, v_fix, vfc, bt_row, col, it,
                     n_tiles, kv_len, num_blocks, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, PAGE: gl.constexpr,
                     STAGES: gl.constexpr, PRODUCER_WARPS: gl.constexpr):
    """The item's K/V tiles straight into the ring (16-bit cache); returns the new ``v_fix`` use count."""
    BOX: gl.constexpr = PAGE if PAGE < BLOCK_N else BLOCK_N
    NBOX: gl.constexpr = BLOCK_N // BOX
    TILE_BYTES: gl.constexpr = BLOCK_N * HEAD_D * 2
    for j in range(n_tiles):
        g = it + j
        s = g % STAGES
        ph = ((g // STAGES) & 1) ^ 1  # fresh barriers: phase 1 counts as done
        start_n = j * BLOCK_N
        rows = box_rows(bt_row, start_n, kv_len, num_blocks, PAGE, BOX, NBOX, PRODUCER_WARPS)
        mbarrier.wait(k_empty.index(s), ph)
        mbarrier.expect(k_ready.index(s), TILE_BYTES)
        load_tile(k_desc, rows, col, k_ready.index(s), k_smem.index(s), BOX, NBOX)
        mbarrier.wait(v_empty.index(s), ph)
        if start_n + BLOCK_N <= kv_len:
            mbarrier.expect(v_ready.index(s), TILE_BYTES)
            load_tile(v_desc, rows, col, v_ready.index(s), v_smem.index(s), BOX, NBOX)
        else:
            # the sequence's last tile: land V on a private barrier, zero the rows past kv_len (unused slots of the
            # last page may hold anything, NaN included), then publish
            mbarrier.expect(v_fix, TILE_BYTES)
            load_tile(v_desc, rows, col, v_fix, v_smem.index(s), BOX, NBOX)
            mbarrier.wait(v_fix, vfc & 1)
            vfc += 1
            _zero_tail(v_smem.index(s), kv_len - start_n, BLOCK_N, HEAD_D, PRODUCER_WARPS)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(v_ready.index(s))
    return vfc


@constexpr_function
def _gather_layout(HEAD_D, NUM_WARPS):
    """The producer's gather layout of a ``[BLOCK_N, HEAD_D]`` fp8 tile: 16 bytes per copy, a row's copies in
    adjacent threads."""
    tpr = HEAD_D // 16  # threads per row
    return gl.BlockedLayout([1, 16], [32 // tpr, tpr], [NUM_WARPS, 1], [1, 0])


@gluon.jit
def _tile_pages(bt_row, start_n, kv_len, num_blocks, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                PAGE: gl.constexpr, NUM_WARPS: gl.constexpr):
    """``[BLOCK_N]`` int32 page ids of keys ``start_n ..`` (each thread those of its rows in the gather layout),
    clamped to the cache; rows at or past ``kv_len`` read nothing and get 0 (their copies are masked). The loops
    below load a tile's page ids one tile ahead of its copies, so the block-table latency is off the producer's
    chain."""
    blk: gl.constexpr = _gather_layout(HEAD_D, NUM_WARPS)
    keys = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, blk))
    page = gl.load(bt_row + keys // PAGE, mask=keys < kv_len, other=0)
    return gl.minimum(gl.maximum(page, 0), num_blocks - 1)


@gluon.jit
def _gather_kv(k_ptr, v_ptr, pages, start_n, kv_len, col, stride_block, stride_token, k_dst, v_dst,
               BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, PAGE: gl.constexpr, NUM_WARPS: gl.constexpr):
    """cp.async of the ``[BLOCK_N, HEAD_D]`` fp8 K and V tiles of keys ``start_n ..`` of one KV head (column ``col``
    of the caches ``[num_blocks, PAGE, Hkv, D]``, which share strides) into ``k_dst`` and ``v_dst``, 16 bytes per
    copy, on the page ids ``pages`` from :func:`_tile_pages`. Rows at or past ``kv_len`` are not read (masked copies:
    zero-filled). Call ``async_copy.commit_group`` after."""
    blk: gl.constexpr = _gather_layout(HEAD_D, NUM_WARPS)
    keys = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, blk))
    valid = gl.expand_dims(keys < kv_len, 1)
    # strides and col are multiples of 16 bytes (hopper_prefill_applies: packed layout, D a multiple of 64)
    in_page = (keys % PAGE) * stride_token + col  # int32: PAGE * Hkv * D < 2^31
    row_off = gl.multiple_of(pages.to(gl.int64) * stride_block + in_page, 16)
    cols = gl.max_contiguous(gl.multiple_of(gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, blk)), 16), 16)
    offs = gl.expand_dims(row_off, 1) + gl.expand_dims(cols, 0)
    async_copy.async_copy_global_to_shared(k_dst, k_ptr + offs, mask=valid)
    async_copy.async_copy_global_to_shared(v_dst, v_ptr + offs, mask=valid)


@gluon.jit
def _load_item_fp8(k_ptr, v_ptr, stride_block, stride_token, k8_smem, v8_smem, k_smem, v_smem, k_ready, k_empty,
                   v_ready, v_empty, bt_row, col, it, n_tiles, kv_len, num_blocks, BLOCK_N: gl.constexpr,
                   HEAD_D: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr, PRODUCER_WARPS: gl.constexpr,
                   WIDEN_ROWS: gl.constexpr):
    """The item's K/V tiles of an FP8 cache: cp.async gathers into the fp8 staging ring one tile ahead (one commit
    group per tile, an empty one past the last; page ids a tile further ahead), then the producer's warps widen each
    tile to fp16 into the consumers' ring (rows of V past ``kv_len`` zeroed). A tile costs each thread
    ``BLOCK_N * D / 2048`` copies of K and of V."""
    s0 = it % STAGES
    pages = _tile_pages(bt_row, 0, kv_len, num_blocks, BLOCK_N, HEAD_D, PAGE, PRODUCER_WARPS)
    _gather_kv(k_ptr, v_ptr, pages, 0, kv_len, col, stride_block, stride_token, k8_smem.index(s0), v8_smem.index(s0),
               BLOCK_N, HEAD_D, PAGE, PRODUCER_WARPS)
    async_copy.commit_group()
    pages = _tile_pages(bt_row, BLOCK_N, kv_len, num_blocks, BLOCK_N, HEAD_D, PAGE, PRODUCER_WARPS)
    for j in range(n_tiles):
        g = it + j
        s = g % STAGES
        ph = (g // STAGES) & 1
        start_n = j * BLOCK_N
        if j + 1 < n_tiles:  # staging slot (g + 1) % STAGES was last widened at step g + 1 - STAGES, behind a barrier
            s1 = (g + 1) % STAGES
            _gather_kv(k_ptr, v_ptr, pages, start_n + BLOCK_N, kv_len, col, stride_block, stride_token,
                       k8_smem.index(s1), v8_smem.index(s1), BLOCK_N, HEAD_D, PAGE, PRODUCER_WARPS)
            pages = _tile_pages(bt_row, start_n + 2 * BLOCK_N, kv_len, num_blocks, BLOCK_N, HEAD_D, PAGE,
                                PRODUCER_WARPS)
        async_copy.commit_group()
        async_copy.wait_group(1)  # this thread's copies of tile j are in
        gl.thread_barrier()  # and everyone's
        mbarrier.wait(k_empty.index(s), ph ^ 1)
        widen_tile(k8_smem.index(s), k_smem.index(s), BLOCK_N, BLOCK_N, HEAD_D, PRODUCER_WARPS, False, WIDEN_ROWS)
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(k_ready.index(s))
        mbarrier.wait(v_empty.index(s), ph ^ 1)
        widen_v_tile(v8_smem.index(s), v_smem.index(s), start_n, kv_len, BLOCK_N, HEAD_D, PRODUCER_WARPS, WIDEN_ROWS)
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(v_ready.index(s))
    async_copy.wait_group(0)  # the empty group of the last step


@gluon.jit
def _load_item_k_as_stored(k_ptr, v_ptr, stride_block, stride_token, v8_smem, k_smem, v_smem, k_ready, k_empty,
                           v_ready, v_empty, bt_row, col, it, n_tiles, kv_len, num_blocks, BLOCK_N: gl.constexpr,
                           HEAD_D: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr,
                           PRODUCER_WARPS: gl.constexpr, WIDEN_ROWS: gl.constexpr, PV_FP8: gl.constexpr):
    """The item's K/V tiles over an FP8 cache when QK^T runs on fp8 operands (an fp8 query, or a bf16 one split in
    two e4m3 terms): K as stored straight into the consumers' fp8 ring, V into the staging ring and widened to fp16
    (with ``PV_FP8``: transposed in fp8, :func:`~kvflash.chunk_prefill.hopper_pv_fp8.transpose_v_tile`); both
    gathered by cp.async one tile ahead (one commit group per tile), their page ids a tile further ahead."""
    g0 = it
    s0 = g0 % STAGES
    pages = _tile_pages(bt_row, 0, kv_len, num_blocks, BLOCK_N, HEAD_D, PAGE, PRODUCER_WARPS)
    mbarrier.wait(k_empty.index(s0), ((g0 // STAGES) & 1) ^ 1)
    _gather_kv(k_ptr, v_ptr, pages, 0, kv_len, col, stride_block, stride_token, k_smem.index(s0), v8_smem.index(s0),
               BLOCK_N, HEAD_D, PAGE, PRODUCER_WARPS)
    async_copy.commit_group()
    pages = _tile_pages(bt_row, BLOCK_N, kv_len, num_blocks, BLOCK_N, HEAD_D, PAGE, PRODUCER_WARPS)
    for j in range(n_tiles):
        g = it + j
        s = g % STAGES
        ph = (g // STAGES) & 1
        start_n = j * BLOCK_N
        if j + 1 < n_tiles:
            s1 = (g + 1) % STAGES
            # the consumers' K slot of tile g + 1 held tile g + 1 - STAGES: released after its QK^T
            mbarrier.wait(k_empty.index(s1), (((g + 1) // STAGES) & 1) ^ 1)
            _gather_kv(k_ptr, v_ptr, pages, start_n + BLOCK_N, kv_len, col, stride_block, stride_token,
                       k_smem.index(s1), v8_smem.index(s1), BLOCK_N, HEAD_D, PAGE, PRODUCER_WARPS)
            pages = _tile_pages(bt_row, start_n + 2 * BLOCK_N, kv_len, num_blocks, BLOCK_N, HEAD_D, PAGE,
                                PRODUCER_WARPS)
        async_copy.commit_group()
        async_copy.wait_group(1)  # this thread's copies of tile g are in
        fence_async_shared()  # cp.async (generic proxy) writes before the wgmma (async proxy) reads K
        gl.thread_barrier()  # and everyone's
        mbarrier.arrive(k_ready.index(s))
        mbarrier.wait(v_empty.index(s), ph ^ 1)
        if PV_FP8:  # rows past kv_len are zero in the staging tile (masked cp.async): no tail to fix
            transpose_v_tile(v8_smem.index(s), v_smem.index(s), BLOCK_N, HEAD_D, PRODUCER_WARPS)
        else:
            widen_v_tile(v8_smem.index(s), v_smem.index(s), start_n, kv_len, BLOCK_N, HEAD_D, PRODUCER_WARPS,
                         WIDEN_ROWS)
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(v_ready.index(s))
    async_copy.wait_group(0)  # the empty group of the last step


@gluon.jit
def load_query_tile(q_desc, q_smem, q_ready, q_empty, qc, row, col, Q_BUFS: gl.constexpr):
    """The ``qc``-th work item's Q tile (``[BLOCK_M, D]`` at ``[row, col]`` of the ``[total_q, Hq * D]`` view) by TMA
    into buffer ``qc % Q_BUFS`` once the consumers have released it; ``q_ready`` completes on its bytes."""
    qb = qc % Q_BUFS
    mbarrier.wait(q_empty.index(qb), ((qc // Q_BUFS) & 1) ^ 1)  # fresh barriers: phase 1 counts as done
    mbarrier.expect(q_ready.index(qb), q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [row, col], q_ready.index(qb), q_smem.index(qb))


@gluon.jit
def producer_partition(
    q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, k8_smem, v8_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
    v_empty, v_fix, k_ptr, v_ptr, stride_kv_block, stride_kv_token, cu_seqlens_q_ptr, seqused_k_ptr, block_table_ptr,
    stride_bt_seq, num_seqs, num_q_tiles, num_heads, total_q, kv_capacity, num_blocks, skip_q_len, pid, nprog,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, PAGE: gl.constexpr, GROUP: gl.constexpr,
    STAGES: gl.constexpr, Q_BUFS: gl.constexpr, KV_FP8: gl.constexpr, PRODUCER_WARPS: gl.constexpr,
    WIDEN_ROWS: gl.constexpr, K_AS_STORED: gl.constexpr, PV_FP8: gl.constexpr,
):
    it = 0  # K/V tiles loaded so far (ring position)
    qc = 0  # Q tiles loaded so far
    vfc = 0  # uses of the v_fix barrier so far (16-bit caches)
    for w in range(pid, num_q_tiles * num_heads, nprog):
        valid, head, seq, q_start, q_len, tok0, kv_len, n_tiles, n_full = work_item(
            w, cu_seqlens_q_ptr, seqused_k_ptr, num_seqs, num_q_tiles, num_heads, total_q, kv_capacity, skip_q_len,
            BLOCK_M, BLOCK_N)
        if n_tiles > 0:
            load_query_tile(q_desc, q_smem, q_ready, q_empty, qc, q_start + tok0, head * HEAD_D, Q_BUFS)
            bt_row = block_table_ptr + seq.to(gl.int64) * stride_bt_seq
            col = (head // GROUP) * HEAD_D
            if K_AS_STORED:
                _load_item_k_as_stored(k_ptr, v_ptr, stride_kv_block, stride_kv_token, v8_smem, k_smem, v_smem, k_ready,
                                       k_empty, v_ready, v_empty, bt_row, col, it, n_tiles, kv_len, num_blocks,
                                       BLOCK_N, HEAD_D, PAGE, STAGES, PRODUCER_WARPS, WIDEN_ROWS, PV_FP8)
            elif KV_FP8:
                _load_item_fp8(k_ptr, v_ptr, stride_kv_block, stride_kv_token, k8_smem, v8_smem, k_smem, v_smem,
                               k_ready, k_empty, v_ready, v_empty, bt_row, col, it, n_tiles, kv_len, num_blocks,
                               BLOCK_N, HEAD_D, PAGE, STAGES, PRODUCER_WARPS, WIDEN_ROWS)
            else:
                vfc = _load_item_16bit(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, v_fix, vfc,
                                       bt_row, col, it, n_tiles, kv_len, num_blocks, BLOCK_N, HEAD_D, PAGE, STAGES,
                                       PRODUCER_WARPS)
            it += n_tiles
            qc += 1

"""The Hopper (sm_90) chunked-prefill kernel in Gluon (Triton 3.6; jit only), FlashAttention-3 style.

The path :mod:`kvflash.chunk_prefill.hopper_op` takes on sm_90 for 16-bit and FP8 caches viewed page by page through
TMA, causal, without softcap, ALiBi, sinks or windows (the portable kernel in :mod:`kvflash.chunk_prefill.kernel`
serves everything else). ``k_descale`` / ``v_descale`` are per (sequence, KV head) as there: K's folds into the score
scale (its sign picks the row maximum or minimum), V's into the output. Sequences with at most ``skip_q_len``
queries are left alone (the decode kernel serves them in a mixed batch).

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
  tile; the cache viewed as ``[num_blocks * PAGE, Hkv * D]``), page ids read from the block table per box. Boxes at or
  past ``kv_len`` use an out-of-bounds row (TMA fills zeros); the rows past ``kv_len`` of a partly valid page are
  zeroed by the producer in shared memory (the sequence's last tile only), so garbage (NaN) in unused cache slots
  never meets P = 0 in the PV MMA. K garbage is harmless (those scores are masked to -inf).

FP8 caches (``KV_FP8``): the producer partition is 4 warps. TMA brings each K/V tile as stored into an fp8
staging ring (one tile ahead), and the producer's warps widen it to fp16 (one hardware conversion per pair, exact)
into the consumers' ring, zeroing V rows past ``kv_len`` on the way; the consumers then run the 16-bit loop in fp16.
A bf16 query is rewritten in shared memory by each consumer warpgroup, once per item, as fp16 times a power of two
(:func:`_query_to_fp16`), whose inverse folds into the score scale: the same exact arithmetic as the portable
kernel's FP8 path.

Consumer step (per warpgroup, FA3's intra-warpgroup pipelining): at step j it issues S_j = Q K_j^T and
O += P_{j-1} V_{j-1} as two async wgmma groups, waits for S_j only, releases K_j, runs the online softmax of S_j,
waits for PV, releases V_{j-1}, rescales O and packs P_j. (ptxas hoists the PV wait above the softmax, see NOTES.md.)
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
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)


@gluon.jit
def _find_sequence(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_Q: gl.constexpr):
    """The last sequence ``s`` whose first tile ``cu_seqlens_q[s] // BLOCK_Q + s`` is ``<= tile``."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = gl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@gluon.jit
def _work_item(w, cu_seqlens_q_ptr, seqused_k_ptr, num_seqs, num_q_tiles, num_heads, total_q, kv_capacity,
               skip_q_len, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Decode work id ``w``: (valid, head, seq, q_start, q_len, tok0, kv_len, n_tiles, n_full).

    Sequence ``s`` owns query tiles ``cu_seqlens_q[s] // BLOCK_M + s + (0, 1, ...)`` (the grid depends on shapes
    only); ids past a sequence's end are not valid. Ranges are clamped as in the Triton kernel. ``n_tiles`` key tiles
    are visited (0 when not valid), the first ``n_full`` need no mask for any row of the tile."""
    head = w % num_heads
    tile = num_q_tiles - 1 - w // num_heads  # longest (last) tiles first
    seq = _find_sequence(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_M)
    s = gl.maximum(seq, 0)
    q_first = gl.load(cu_seqlens_q_ptr + s)
    q_start = gl.minimum(gl.maximum(q_first, 0), total_q)
    q_len = gl.minimum(gl.maximum(gl.load(cu_seqlens_q_ptr + s + 1), q_start), total_q) - q_start
    tile_in_seq = tile - (q_first // BLOCK_M + s)
    valid = (seq >= 0) & (tile_in_seq >= 0) & (tile_in_seq < gl.cdiv(q_len, BLOCK_M)) & (q_len > skip_q_len)
    tok0 = tile_in_seq * BLOCK_M
    kv_len = gl.minimum(gl.maximum(gl.load(seqused_k_ptr + s), 0), kv_capacity)
    last_tok = gl.minimum(tok0 + BLOCK_M, q_len) - 1
    p_first = kv_len - q_len + tok0
    p_last = kv_len - q_len + last_tok
    hi = gl.minimum(p_last + 1, kv_len)
    n_tiles = gl.cdiv(gl.maximum(hi, 0), BLOCK_N) * valid.to(gl.int32)
    n_full = gl.minimum(gl.maximum(gl.minimum(p_first + 1, kv_len), 0) // BLOCK_N, n_tiles)
    return valid, head, s, q_start, q_len, tok0, kv_len, n_tiles, n_full


# ---------------------------------------------------------------------------------------------------------------
# producer
# ---------------------------------------------------------------------------------------------------------------


@gluon.jit
def _box_rows(bt_row_ptr, start_n, kv_len, num_blocks, PAGE: gl.constexpr, BOX: gl.constexpr, NBOX: gl.constexpr,
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
def _widen_tile(src, dst, valid, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NUM_WARPS: gl.constexpr,
                MASK_TAIL: gl.constexpr, ROWS: gl.constexpr):
    """``dst [BLOCK_N, HEAD_D]`` fp16 = ``src`` fp8 (e4m3 or e5m2; exact: one hardware conversion per pair), ``ROWS``
    rows at a time (at least one 16-byte load per thread), 16 bytes per thread per load; with ``MASK_TAIL`` rows
    ``>= valid`` become 0 (unused cache slots may hold NaN)."""
    TPR: gl.constexpr = HEAD_D // 16  # threads per row
    MIN_CH: gl.constexpr = (32 // TPR) * NUM_WARPS
    CH: gl.constexpr = ROWS if ROWS > MIN_CH else MIN_CH
    blk: gl.constexpr = gl.BlockedLayout([1, 16], [32 // TPR, TPR], [NUM_WARPS, 1], [1, 0])
    rows = gl.arange(0, CH, layout=gl.SliceLayout(1, blk))
    for c in gl.static_range(BLOCK_N // CH):
        x = src.slice(c * CH, CH).load(blk).to(gl.float16)
        if MASK_TAIL:
            x = gl.where(gl.expand_dims(c * CH + rows < valid, 1), x, gl.zeros_like(x))
        dst.slice(c * CH, CH).store(x)


@gluon.jit
def _load_tile(desc, rows, col, bar, buf, BOX: gl.constexpr, NBOX: gl.constexpr):
    """TMA loads of a key tile's ``NBOX`` page boxes (first rows ``rows``, from :func:`_box_rows`) into ``buf`` on
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
        rows = _box_rows(bt_row, start_n, kv_len, num_blocks, PAGE, BOX, NBOX, PRODUCER_WARPS)
        mbarrier.wait(k_empty.index(s), ph)
        mbarrier.expect(k_ready.index(s), TILE_BYTES)
        _load_tile(k_desc, rows, col, k_ready.index(s), k_smem.index(s), BOX, NBOX)
        mbarrier.wait(v_empty.index(s), ph)
        if start_n + BLOCK_N <= kv_len:
            mbarrier.expect(v_ready.index(s), TILE_BYTES)
            _load_tile(v_desc, rows, col, v_ready.index(s), v_smem.index(s), BOX, NBOX)
        else:
            # the sequence's last tile: land V on a private barrier, zero the rows past kv_len (unused slots of the
            # last page may hold anything, NaN included), then publish
            mbarrier.expect(v_fix, TILE_BYTES)
            _load_tile(v_desc, rows, col, v_fix, v_smem.index(s), BOX, NBOX)
            mbarrier.wait(v_fix, vfc & 1)
            vfc += 1
            _zero_tail(v_smem.index(s), kv_len - start_n, BLOCK_N, HEAD_D, PRODUCER_WARPS)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(v_ready.index(s))
    return vfc


@gluon.jit
def _load_item_fp8(k_desc, v_desc, k8_smem, v8_smem, kv8_ready, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                   bt_row, col, it, n_tiles, kv_len, num_blocks, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                   PAGE: gl.constexpr, STAGES: gl.constexpr, PRODUCER_WARPS: gl.constexpr,
                   WIDEN_ROWS: gl.constexpr):
    """The item's K/V tiles of an FP8 cache: TMA into the fp8 staging ring (one tile ahead), then the producer's
    warps widen each tile to fp16 into the consumers' ring (rows of V past ``kv_len`` zeroed)."""
    BOX: gl.constexpr = PAGE if PAGE < BLOCK_N else BLOCK_N
    NBOX: gl.constexpr = BLOCK_N // BOX
    STAGED_BYTES: gl.constexpr = 2 * BLOCK_N * HEAD_D  # K and V tiles, one byte per element
    s0 = it % STAGES
    rows = _box_rows(bt_row, 0, kv_len, num_blocks, PAGE, BOX, NBOX, PRODUCER_WARPS)
    mbarrier.expect(kv8_ready.index(s0), STAGED_BYTES)
    _load_tile(k_desc, rows, col, kv8_ready.index(s0), k8_smem.index(s0), BOX, NBOX)
    _load_tile(v_desc, rows, col, kv8_ready.index(s0), v8_smem.index(s0), BOX, NBOX)
    for j in range(n_tiles):
        g = it + j
        s = g % STAGES
        ph = (g // STAGES) & 1
        start_n = j * BLOCK_N
        if j + 1 < n_tiles:  # staging slot (g + 1) % STAGES was widened one step ago, behind a thread barrier
            s1 = (g + 1) % STAGES
            rows = _box_rows(bt_row, start_n + BLOCK_N, kv_len, num_blocks, PAGE, BOX, NBOX, PRODUCER_WARPS)
            mbarrier.expect(kv8_ready.index(s1), STAGED_BYTES)
            _load_tile(k_desc, rows, col, kv8_ready.index(s1), k8_smem.index(s1), BOX, NBOX)
            _load_tile(v_desc, rows, col, kv8_ready.index(s1), v8_smem.index(s1), BOX, NBOX)
        mbarrier.wait(kv8_ready.index(s), ph)
        mbarrier.wait(k_empty.index(s), ph ^ 1)
        # K rows past kv_len need no zeroing: their scores are masked
        _widen_tile(k8_smem.index(s), k_smem.index(s), BLOCK_N, BLOCK_N, HEAD_D, PRODUCER_WARPS, False,
                    WIDEN_ROWS)
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(k_ready.index(s))
        mbarrier.wait(v_empty.index(s), ph ^ 1)
        if start_n + BLOCK_N <= kv_len:
            _widen_tile(v8_smem.index(s), v_smem.index(s), BLOCK_N, BLOCK_N, HEAD_D, PRODUCER_WARPS, False,
                        WIDEN_ROWS)
        else:
            _widen_tile(v8_smem.index(s), v_smem.index(s), kv_len - start_n, BLOCK_N, HEAD_D, PRODUCER_WARPS, True,
                        WIDEN_ROWS)
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(v_ready.index(s))


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, k8_smem, v8_smem, q_ready, q_empty, k_ready, k_empty,
              v_ready, v_empty, v_fix, kv8_ready, cu_seqlens_q_ptr, seqused_k_ptr, block_table_ptr, stride_bt_seq,
              num_seqs, num_q_tiles, num_heads, total_q, kv_capacity, num_blocks, skip_q_len, pid, nprog,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, PAGE: gl.constexpr,
              GROUP: gl.constexpr, STAGES: gl.constexpr, Q_BUFS: gl.constexpr, KV_FP8: gl.constexpr,
              PRODUCER_WARPS: gl.constexpr, WIDEN_ROWS: gl.constexpr):
    it = 0  # K/V tiles loaded so far (ring position)
    qc = 0  # Q tiles loaded so far
    vfc = 0  # uses of the v_fix barrier so far (16-bit caches)
    for w in range(pid, num_q_tiles * num_heads, nprog):
        valid, head, seq, q_start, q_len, tok0, kv_len, n_tiles, n_full = _work_item(
            w, cu_seqlens_q_ptr, seqused_k_ptr, num_seqs, num_q_tiles, num_heads, total_q, kv_capacity, skip_q_len,
            BLOCK_M, BLOCK_N)
        if n_tiles > 0:
            qb = qc % Q_BUFS
            mbarrier.wait(q_empty.index(qb), ((qc // Q_BUFS) & 1) ^ 1)  # fresh barriers: phase 1 counts as done
            mbarrier.expect(q_ready.index(qb), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [q_start + tok0, head * HEAD_D], q_ready.index(qb),
                                            q_smem.index(qb))
            bt_row = block_table_ptr + seq.to(gl.int64) * stride_bt_seq
            col = (head // GROUP) * HEAD_D
            if KV_FP8:
                _load_item_fp8(k_desc, v_desc, k8_smem, v8_smem, kv8_ready, k_smem, v_smem, k_ready, k_empty,
                               v_ready, v_empty, bt_row, col, it, n_tiles, kv_len, num_blocks, BLOCK_N, HEAD_D, PAGE,
                               STAGES, PRODUCER_WARPS, WIDEN_ROWS)
            else:
                vfc = _load_item_16bit(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, v_fix, vfc,
                                       bt_row, col, it, n_tiles, kv_len, num_blocks, BLOCK_N, HEAD_D, PAGE, STAGES,
                                       PRODUCER_WARPS)
            it += n_tiles
            qc += 1


# ---------------------------------------------------------------------------------------------------------------
# consumers
# ---------------------------------------------------------------------------------------------------------------


@gluon.jit
def _softmax(s, m_i, l_i, qk_scale, q_pos, start_n, MASKED: gl.constexpr):
    """Online-softmax step in the log2 domain: returns (P in fp32, alpha, m, l).

    P stays fp32 (in S's registers) here and is packed to bf16 by :func:`_to_operand` after the previous PV wgmma
    has completed: the packed P is loop-carried and shares registers with the P that wgmma reads."""
    if MASKED:
        # Scale first, then hide: with K's descale negative or zero, a hidden -inf score would scale to +inf or NaN.
        cols = start_n + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
        visible = gl.expand_dims(cols, 0) <= gl.expand_dims(q_pos, 1)
        t = gl.where(visible, s * qk_scale, gl.full_like(s, float("-inf")))
        m_new = gl.maximum(m_i, gl.max(t, axis=1))
        # a row with nothing visible yet keeps m = -inf; subtract 0 instead (no inf - inf)
        m_use = gl.where(m_new == float("-inf"), gl.zeros_like(m_new), m_new)
        p = gl.exp2(t - gl.expand_dims(m_use, 1))
    else:
        # Every score visible and finite: the largest scaled score of a row is its largest score times a
        # non-negative scale, or its smallest times a negative one (K's descale may be negative); one FFMA per score.
        if qk_scale >= 0:
            row_top = gl.max(s, axis=1)
        else:
            row_top = gl.min(s, axis=1)
        m_new = gl.maximum(m_i, row_top * qk_scale)
        m_use = m_new
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@gluon.jit
def _to_operand(p, dtype: gl.constexpr, p_layout: gl.constexpr, ASM_CVT: gl.constexpr):
    if ASM_CVT:  # one cvt.rn.bf16x2 per pair in the order the wgmma operand wants (no PRMT fix-ups)
        p16 = gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [p], dtype=gl.bfloat16,
                                        is_pure=False, pack=2)
    else:
        p16 = p.to(dtype)
    return gl.convert_layout(p16, p_layout)


@gluon.jit
def _consumer_step(j, g, t, q_view, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, s_acc, o, p, m_i, l_i,
                   qk_scale, q_pos, p_layout: gl.constexpr, o_layout: gl.constexpr, WG: gl.constexpr,
                   BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, MASKED: gl.constexpr,
                   ASM_CVT: gl.constexpr):
    """Key tile j of the item (ring slot of global tile g = it + j; turn wait number t)."""
    sk = g % STAGES
    phk = (g // STAGES) & 1
    sv = (g - 1) % STAGES
    phv = ((g - 1) // STAGES) & 1
    mbarrier.wait(k_ready.index(sk), phk)
    mbarrier.wait(v_ready.index(sv), phv)
    if PINGPONG:
        mbarrier.wait(turn.index(WG), t & 1)
    s_acc = warpgroup_mma(q_view, k_smem.index(sk).permute((1, 0)), s_acc, use_acc=False, is_async=True)
    o = warpgroup_mma(p, v_smem.index(sv), o, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))
    s_acc = warpgroup_mma_wait(1, deps=(s_acc, ))
    mbarrier.arrive(k_empty.index(sk))
    p32, alpha, m_i, l_i = _softmax(s_acc, m_i, l_i, qk_scale, q_pos, j * BLOCK_N, MASKED)
    o = warpgroup_mma_wait(0, deps=(o, ))
    p = _to_operand(p32, p.dtype, p_layout, ASM_CVT)
    alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
    o = o * gl.expand_dims(alpha_o, 1)
    mbarrier.arrive(v_empty.index(sv))
    return s_acc, o, p, m_i, l_i


@gluon.jit
def _query_to_fp16(src, dst, HEAD_D: gl.constexpr):
    """In place: this warpgroup's ``[64, HEAD_D]`` bf16 query rows (``src``) become fp16 (``dst``, the same bytes)
    times the power of two ``2^e`` that puts the largest ``|q|`` of the 64 rows in ``[2^14, 2^15)``: exact for
    bf16's 8 significant bits down to ``2^-31`` of that maximum, and no overflow. Returns ``2^e``. Each element is
    read and written by the same thread (one layout), so the rewrite needs no barrier of its own."""
    CH: gl.constexpr = 16
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    top = gl.max(gl.max(gl.abs(src.slice(0, CH).load(blk).to(gl.float32)), axis=1), axis=0)
    for c in gl.static_range(1, 64 // CH):
        top = gl.maximum(top, gl.max(gl.max(gl.abs(src.slice(c * CH, CH).load(blk).to(gl.float32)), axis=1), axis=0))
    e = gl.floor(gl.log2(gl.where(top > 0, top, 1.0)))
    mult = gl.exp2(gl.minimum(14.0 - e, 126.0))
    for c in gl.static_range(64 // CH):
        x = src.slice(c * CH, CH).load(blk).to(gl.float32) * mult
        dst.slice(c * CH, CH).store(x.to(gl.float16))
    fence_async_shared()  # generic stores before the async-proxy wgmma reads
    gl.thread_barrier()
    return mult


@gluon.jit
def _consumer_item(q_view, q_mma, k_smem, v_smem, q_ready_bar, q_empty_bar, qph, k_ready, k_empty, v_ready, v_empty,
                   turn, it, tc, out_ptr, lse_ptr, head, q_start, q_len, kv_len, tok0, n_tiles, n_full, qk_scale,
                   v_scale, stride_o_token, stride_o_head, stride_lse_head, WG: gl.constexpr, BLOCK_N: gl.constexpr,
                   HEAD_D: gl.constexpr, STAGES: gl.constexpr, WRITE_LSE: gl.constexpr, PINGPONG: gl.constexpr,
                   ASM_CVT: gl.constexpr, Q_TO_FP16: gl.constexpr):
    """One work item for this warpgroup's 64 rows; ``q_view`` is its Q slice as loaded, ``q_mma`` the same bytes as
    the MMA reads them (fp16 over an FP8 cache with a bf16 query: :func:`_query_to_fp16`)."""
    M: gl.constexpr = 64
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    rows = tok0 + WG * M + gl.arange(0, M, layout=row_layout)
    # rows past the sequence (their output is not stored) see every key, never an empty row
    q_pos = gl.minimum(kv_len - q_len + rows, kv_len - 1)

    s_acc = gl.zeros([M, BLOCK_N], gl.float32, s_layout)
    o = gl.zeros([M, HEAD_D], gl.float32, o_layout)
    m_i = gl.full([M], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([M], gl.float32, row_layout)

    mbarrier.wait(q_ready_bar, qph)
    if Q_TO_FP16:
        qk_scale = qk_scale / _query_to_fp16(q_view, q_mma, HEAD_D)
    # ---- tile 0 (peeled, masked) ----
    s0 = it % STAGES
    mbarrier.wait(k_ready.index(s0), (it // STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(turn.index(WG), tc & 1)
    s_acc = warpgroup_mma(q_mma, k_smem.index(s0).permute((1, 0)), s_acc, use_acc=False, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))
    s_acc = warpgroup_mma_wait(0, deps=(s_acc, ))
    mbarrier.arrive(k_empty.index(s0))
    p32, alpha, m_i, l_i = _softmax(s_acc, m_i, l_i, qk_scale, q_pos, 0, True)
    p = _to_operand(p32, q_mma.dtype, p_layout, ASM_CVT)

    # ---- unmasked tiles, then the diagonal / sequence-end tiles ----
    for j in range(1, n_full):
        s_acc, o, p, m_i, l_i = _consumer_step(j, it + j, tc + j, q_mma, k_smem, v_smem, k_ready, k_empty, v_ready,
                                               v_empty, turn, s_acc, o, p, m_i, l_i, qk_scale, q_pos, p_layout,
                                               o_layout, WG, BLOCK_N, STAGES, PINGPONG, False, ASM_CVT)
    for j in range(gl.maximum(n_full, 1), n_tiles):
        s_acc, o, p, m_i, l_i = _consumer_step(j, it + j, tc + j, q_mma, k_smem, v_smem, k_ready, k_empty, v_ready,
                                               v_empty, turn, s_acc, o, p, m_i, l_i, qk_scale, q_pos, p_layout,
                                               o_layout, WG, BLOCK_N, STAGES, PINGPONG, True, ASM_CVT)
    mbarrier.arrive(q_empty_bar)  # every QK wgmma of the item is complete: Q may be overwritten

    # ---- PV of the last tile ----
    gl_ = it + n_tiles - 1
    sv = gl_ % STAGES
    mbarrier.wait(v_ready.index(sv), (gl_ // STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(turn.index(WG), (tc + n_tiles) & 1)
    o = warpgroup_mma(p, v_smem.index(sv), o, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))
    o = warpgroup_mma_wait(0, deps=(o, ))
    mbarrier.arrive(v_empty.index(sv))

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
        lse = gl.where(l_i > 0, (m_i + gl.log2(l_i)) * LN2, gl.full_like(l_i, float("-inf")))
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
def _consumer(q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn, out_ptr, lse_ptr,
              cu_seqlens_q_ptr, seqused_k_ptr, k_descale_ptr, v_descale_ptr, num_seqs, num_q_tiles, num_heads,
              total_q, kv_capacity, skip_q_len, pid, nprog, qk_scale, stride_o_token, stride_o_head, stride_lse_head,
              stride_kd_seq, stride_kd_head, stride_vd_seq, stride_vd_head, GROUP: gl.constexpr, WG: gl.constexpr,
              BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr, Q_BUFS: gl.constexpr,
              WRITE_LSE: gl.constexpr, PINGPONG: gl.constexpr, ASM_CVT: gl.constexpr, Q_TO_FP16: gl.constexpr):
    it = 0  # K/V tiles consumed so far (ring position)
    tc = 0  # turn waits so far
    qc = 0  # Q tiles consumed so far
    for w in range(pid, num_q_tiles * num_heads, nprog):
        valid, head, seq, q_start, q_len, tok0, kv_len, n_tiles, n_full = _work_item(
            w, cu_seqlens_q_ptr, seqused_k_ptr, num_seqs, num_q_tiles, num_heads, total_q, kv_capacity, skip_q_len,
            BLOCK_M, BLOCK_N)
        if n_tiles > 0:
            qb = qc % Q_BUFS
            q_buf = q_smem.index(qb)
            q_view = q_buf.slice(WG * 64, 64)
            if Q_TO_FP16:
                q_mma = q_buf._reinterpret(gl.float16, [BLOCK_M, HEAD_D], q_buf.layout).slice(WG * 64, 64)
            else:
                q_mma = q_view
            kv_head = head // GROUP
            k_scale = gl.load(k_descale_ptr + seq * stride_kd_seq + kv_head * stride_kd_head)
            v_scale = gl.load(v_descale_ptr + seq * stride_vd_seq + kv_head * stride_vd_head)
            _consumer_item(q_view, q_mma, k_smem, v_smem, q_ready.index(qb), q_empty.index(qb), (qc // Q_BUFS) & 1,
                           k_ready, k_empty, v_ready, v_empty, turn, it, tc, out_ptr, lse_ptr, head, q_start, q_len,
                           kv_len, tok0, n_tiles, n_full, qk_scale * k_scale, v_scale, stride_o_token, stride_o_head,
                           stride_lse_head,
                           WG, BLOCK_N, HEAD_D, STAGES, WRITE_LSE, PINGPONG, ASM_CVT, Q_TO_FP16)
            it += n_tiles
            tc += n_tiles + 1
            qc += 1
        elif valid:
            _write_empty(out_ptr, lse_ptr, head, q_start, q_len, tok0, stride_o_token, stride_o_head,
                         stride_lse_head, WG, HEAD_D, WRITE_LSE)


# ---------------------------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------------------------


@gluon.jit(do_not_specialize=["num_seqs", "num_q_tiles", "num_heads", "total_q", "num_blocks", "kv_capacity",
                              "skip_q_len"])
def hopper_prefill_kernel(
    q_desc,  # TMA over q viewed as [total_q, Hq * D], block [BLOCK_M, D]
    k_desc,  # TMA over the K cache viewed as [num_blocks * PAGE, Hkv * D], block [min(PAGE, BLOCK_N), D]; q's dtype
    # or fp8 (KV_FP8)
    v_desc,  # same for V
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
    stride_kd_seq,
    stride_kd_head,
    stride_vd_seq,
    stride_vd_head,
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
    KV_FP8: gl.constexpr,  # fp8 cache: TMA into an fp8 staging ring, widened to fp16 by the producer's 4 warps
    Q_TO_FP16: gl.constexpr,  # (KV_FP8 with a bf16 q) each consumer rewrites its Q rows as fp16 times a power of two
    WIDEN_ROWS: gl.constexpr,  # (KV_FP8) rows of a K/V tile the producer widens per step
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
    PRODUCER_WARPS: gl.constexpr,
    num_warps: gl.constexpr,
):
    gl.static_assert(BLOCK_M == 128)
    gl.static_assert(num_warps == 4)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    qk_scale = softmax_scale * 1.4426950408889634

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [Q_BUFS, BLOCK_M, HEAD_D], q_desc.layout)
    if KV_FP8:
        # the consumers' ring in fp16 (the MMA dtype; the layout TMA would give a 16-bit tile), fp8 staging beside it
        kv16: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
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
    kv8_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(Q_BUFS):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # one arrival per consumer warpgroup
    mbarrier.init(v_fix, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
        mbarrier.init(kv8_ready.index(i), count=1)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    mbarrier.arrive(turn.index(0))  # warpgroup 0 issues first
    fence_async_shared()  # initialised barriers visible to the async proxy (TMA complete_tx), as CUDA's TMA example

    gl.warp_specialize([
        (_consumer, (q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn, out_ptr,
                     lse_ptr, cu_seqlens_q_ptr, seqused_k_ptr, k_descale_ptr, v_descale_ptr, num_seqs, num_q_tiles,
                     num_heads, total_q, kv_capacity, skip_q_len, pid, nprog, qk_scale, stride_o_token, stride_o_head,
                     stride_lse_head, stride_kd_seq, stride_kd_head, stride_vd_seq, stride_vd_head, GROUP, 0,
                     BLOCK_M, BLOCK_N,
                     HEAD_D, STAGES, Q_BUFS, WRITE_LSE, PINGPONG, ASM_CVT, Q_TO_FP16)),
        (_consumer, (q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn, out_ptr,
                     lse_ptr, cu_seqlens_q_ptr, seqused_k_ptr, k_descale_ptr, v_descale_ptr, num_seqs, num_q_tiles,
                     num_heads, total_q, kv_capacity, skip_q_len, pid, nprog, qk_scale, stride_o_token, stride_o_head,
                     stride_lse_head, stride_kd_seq, stride_kd_head, stride_vd_seq, stride_vd_head, GROUP, 1,
                     BLOCK_M, BLOCK_N,
                     HEAD_D, STAGES, Q_BUFS, WRITE_LSE, PINGPONG, ASM_CVT, Q_TO_FP16)),
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, k8_smem, v8_smem, q_ready, q_empty, k_ready,
                     k_empty, v_ready, v_empty, v_fix, kv8_ready, cu_seqlens_q_ptr, seqused_k_ptr, block_table_ptr,
                     stride_bt_seq, num_seqs, num_q_tiles, num_heads, total_q, kv_capacity, num_blocks, skip_q_len,
                     pid, nprog, BLOCK_M, BLOCK_N, HEAD_D, PAGE, GROUP, STAGES, Q_BUFS, KV_FP8, PRODUCER_WARPS,
                     WIDEN_ROWS)),
    ], [4, PRODUCER_WARPS], [CONSUMER_REGS, PRODUCER_REGS])

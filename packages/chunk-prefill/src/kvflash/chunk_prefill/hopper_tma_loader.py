"""The exact FP8 path's producer as two partitions of the Hopper prefill kernel (Gluon; jit only): a one-warp TMA
loader and a 4-warp widener (``TMA_LOADER``).

For a 16-bit query over an FP8 cache (D 128; D 64 with an fp16 query: hopper_op), the 4-warp producer of
:mod:`kvflash.chunk_prefill.hopper_producer` gathers K and V by cp.async, 16 copies per thread and tile with their
per-row address arithmetic, and the consumers lose 12-18 % to those gathers running beside them on the same
schedulers (``tools/prefill_isolation.py``). Here one warp loads Q, K and V by TMA, one box per page
(:func:`~kvflash.chunk_prefill.hopper_producer.load_tile`, without the 128-thread barrier Triton puts before each TMA
issue of a 4-warp partition), and four warps widen the staged fp8 tiles to fp16 into the consumers' ring: V for a
bf16 query (split in two e4m3 terms, ``K_AS_STORED``: K goes straight into the consumers' fp8 ring), K and V for an
fp16 one. A box at or past ``kv_len`` reads the out-of-bounds row (zeros); the unused slots of a sequence's last,
partly valid page come in as stored: K's give scores the consumers mask, V's rows past ``kv_len`` are zeroed by the
widening. ``staged_ready`` / ``staged_empty`` hand the staging slots from the loader to the widener.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
)

from kvflash.chunk_prefill.hopper_producer import box_rows, load_query_tile, load_tile, widen_tile, widen_v_tile
from kvflash.chunk_prefill.hopper_schedule import work_item


@gluon.jit
def loader_partition(
    q_desc, k_desc, v_desc, q_smem, k_smem, k8_smem, v8_smem, q_ready, q_empty, k_ready, k_empty, staged_ready,
    staged_empty, cu_seqlens_q_ptr, seqused_k_ptr, block_table_ptr, stride_bt_seq, num_seqs, num_q_tiles, num_heads,
    total_q, kv_capacity, num_blocks, skip_q_len, pid, nprog, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    HEAD_D: gl.constexpr, PAGE: gl.constexpr, GROUP: gl.constexpr, STAGES: gl.constexpr, Q_BUFS: gl.constexpr,
    K_AS_STORED: gl.constexpr,
):
    """One warp: per work item Q into one of ``Q_BUFS`` buffers, then each key tile's K and V by TMA, one box per
    page: with ``K_AS_STORED`` K into the consumers' fp8 ring (``k_ready`` completes on its bytes) and V into the
    staging slot (``staged_ready``); otherwise both into their staging slots, on ``staged_ready``."""
    BOX: gl.constexpr = PAGE if PAGE < BLOCK_N else BLOCK_N
    NBOX: gl.constexpr = BLOCK_N // BOX
    TILE_BYTES: gl.constexpr = BLOCK_N * HEAD_D  # fp8
    it = 0  # K/V tiles loaded so far (ring position)
    qc = 0  # Q tiles loaded so far
    for w in range(pid, num_q_tiles * num_heads, nprog):
        valid, head, seq, q_start, q_len, tok0, kv_len, n_tiles, n_full = work_item(
            w, cu_seqlens_q_ptr, seqused_k_ptr, num_seqs, num_q_tiles, num_heads, total_q, kv_capacity, skip_q_len,
            BLOCK_M, BLOCK_N)
        if n_tiles > 0:
            load_query_tile(q_desc, q_smem, q_ready, q_empty, qc, q_start + tok0, head * HEAD_D, Q_BUFS)
            bt_row = block_table_ptr + seq.to(gl.int64) * stride_bt_seq
            col = (head // GROUP) * HEAD_D
            for j in range(n_tiles):
                g = it + j
                s = g % STAGES
                ph = ((g // STAGES) & 1) ^ 1
                rows = box_rows(bt_row, j * BLOCK_N, kv_len, num_blocks, PAGE, BOX, NBOX, 1)
                if K_AS_STORED:
                    mbarrier.wait(k_empty.index(s), ph)
                    mbarrier.expect(k_ready.index(s), TILE_BYTES)
                    load_tile(k_desc, rows, col, k_ready.index(s), k_smem.index(s), BOX, NBOX)
                    mbarrier.wait(staged_empty.index(s), ph)
                    mbarrier.expect(staged_ready.index(s), TILE_BYTES)
                else:
                    mbarrier.wait(staged_empty.index(s), ph)
                    mbarrier.expect(staged_ready.index(s), 2 * TILE_BYTES)
                    load_tile(k_desc, rows, col, staged_ready.index(s), k8_smem.index(s), BOX, NBOX)
                load_tile(v_desc, rows, col, staged_ready.index(s), v8_smem.index(s), BOX, NBOX)
            it += n_tiles
            qc += 1


@gluon.jit
def widener_partition(
    k_smem, v_smem, k8_smem, v8_smem, k_ready, k_empty, v_ready, v_empty, staged_ready, staged_empty, cu_seqlens_q_ptr,
    seqused_k_ptr, num_seqs, num_q_tiles, num_heads, total_q, kv_capacity, skip_q_len, pid, nprog,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr,
    WIDENER_WARPS: gl.constexpr, WIDEN_ROWS: gl.constexpr, K_AS_STORED: gl.constexpr,
):
    """Four warps: each staged fp8 tile widened to fp16 into the consumers' ring slot: K first (unless
    ``K_AS_STORED``; ``k_ready`` published), then V (rows past ``kv_len`` of a sequence's last tile zeroed;
    ``v_ready``), then the staging slot handed back to the loader."""
    it = 0
    for w in range(pid, num_q_tiles * num_heads, nprog):
        valid, head, seq, q_start, q_len, tok0, kv_len, n_tiles, n_full = work_item(
            w, cu_seqlens_q_ptr, seqused_k_ptr, num_seqs, num_q_tiles, num_heads, total_q, kv_capacity, skip_q_len,
            BLOCK_M, BLOCK_N)
        for j in range(n_tiles):
            g = it + j
            s = g % STAGES
            ph = (g // STAGES) & 1
            start_n = j * BLOCK_N
            mbarrier.wait(staged_ready.index(s), ph)
            if not K_AS_STORED:  # K's rows past kv_len give scores the consumers mask: no tail to zero
                mbarrier.wait(k_empty.index(s), ph ^ 1)
                widen_tile(k8_smem.index(s), k_smem.index(s), BLOCK_N, BLOCK_N, HEAD_D, WIDENER_WARPS, False,
                           WIDEN_ROWS)
                fence_async_shared()
                gl.thread_barrier()
                mbarrier.arrive(k_ready.index(s))
            mbarrier.wait(v_empty.index(s), ph ^ 1)
            widen_v_tile(v8_smem.index(s), v_smem.index(s), start_n, kv_len, BLOCK_N, HEAD_D, WIDENER_WARPS,
                         WIDEN_ROWS)
            fence_async_shared()  # generic stores before the consumers' wgmma reads them
            gl.thread_barrier()  # every warp's rows are in (and every warp has read the staging slot)
            mbarrier.arrive(v_ready.index(s))
            mbarrier.arrive(staged_empty.index(s))
        it += n_tiles

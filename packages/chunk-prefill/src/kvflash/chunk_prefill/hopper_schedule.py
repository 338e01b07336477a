"""Work items of the Hopper prefill kernel (Gluon; jit only): which query tile of which head and sequence a work id
names, and the key tiles it visits. Shared by the producer (:mod:`kvflash.chunk_prefill.hopper_producer`) and the
consumers (:mod:`kvflash.chunk_prefill.hopper_consumer`), which walk the same ids in the same order.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

SEARCH_WIDTH = gl.constexpr(128)  # sequences probed per dependent load of the search


@gluon.jit
def _find_sequence(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_M: gl.constexpr):
    """The last sequence ``s`` whose first tile ``cu_seqlens_q[s] // BLOCK_M + s`` is ``<= tile``, or -1: the
    portable kernel's ``_find_sequence``, ``SEARCH_WIDTH`` probes at a time (one vector load each step, every warp
    holding all of them: the count is a reduction within a warp). One dependent load up to 128 sequences, two up to
    16384, where the binary search takes 7 and 14: the walk's cost per work id (a mixed batch's decode rows give
    thousands of ids this kernel skips; 120 of them cost the prefill launch about 40 us on an H200 with the binary
    search)."""
    layout: gl.constexpr = gl.BlockedLayout([SEARCH_WIDTH // 32], [32], [gl.num_warps()], [0])
    offs = gl.arange(0, SEARCH_WIDTH, layout=layout)
    # Sequences below lo start at or before the tile, those at or above hi after it (first tiles strictly increase).
    lo = 0
    hi = num_seqs
    while lo < hi:
        step = (hi - lo + SEARCH_WIDTH - 1) // SEARCH_WIDTH
        probe = lo + offs * step
        inside = probe < hi
        first_tile = gl.load(cu_seqlens_q_ptr + probe, mask=inside, other=0) // BLOCK_M + probe
        count = gl.sum(((first_tile <= tile) & inside).to(gl.int32), axis=0)  # probes 0 .. count - 1 start at or before
        hi = gl.minimum(lo + count * step, hi)
        lo = gl.where(count > 0, lo + (count - 1) * step + 1, lo)
    return lo - 1


@gluon.jit
def work_item(w, cu_seqlens_q_ptr, seqused_k_ptr, num_seqs, num_q_tiles, num_heads, total_q, kv_capacity,
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

"""Work items of the Hopper prefill kernel (Gluon; jit only): which query tile of which head and sequence a work id
names, and the key tiles it visits. Shared by the producer (:mod:`kvflash.chunk_prefill.hopper_producer`) and the
consumers (:mod:`kvflash.chunk_prefill.hopper_consumer`), which walk the same ids in the same order. The sequence
of a query tile is found by the portable kernel's own binary search, which Gluon compiles in its dialect (the SASS is
the same as that of a Gluon copy of it).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from kvflash.chunk_prefill.kernel import find_sequence


@gluon.jit
def work_item(w, cu_seqlens_q_ptr, seqused_k_ptr, num_seqs, num_q_tiles, num_heads, total_q, kv_capacity,
               skip_q_len, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Decode work id ``w``: (valid, head, seq, q_start, q_len, tok0, kv_len, n_tiles, n_full).

    Sequence ``s`` owns query tiles ``cu_seqlens_q[s] // BLOCK_M + s + (0, 1, ...)`` (the grid depends on shapes
    only); ids past a sequence's end are not valid. Ranges are clamped as in the Triton kernel. ``n_tiles`` key tiles
    are visited (0 when not valid), the first ``n_full`` need no mask for any row of the tile."""
    head = w % num_heads
    tile = num_q_tiles - 1 - w // num_heads  # longest (last) tiles first
    seq = find_sequence(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_M)  # the portable kernel's search (@triton.jit)
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

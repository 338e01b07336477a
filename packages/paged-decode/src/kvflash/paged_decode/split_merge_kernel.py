"""The n-way merge kernel (jit only): combine ``W`` partial attentions over disjoint key sets by their LSE.

It serves decode's split-KV (the fp32 partials of the splits, sinks added here) and
:func:`kvflash.paged_decode.merge_partial_attentions` (context-parallel shards). One program handles one
(token, query head) and one ``BLOCK_D`` slice of its head columns (a long single sequence has few rows and many
parts: slicing D spreads its merge over more programs). Each part left a normalised fp32 output row and the
natural-log LSE of its keys (``-inf`` for a part without keys, whose output row is loaded but dropped by a select:
it may hold anything, NaN included). The weights, the merged LSE and the ``-inf`` handling are
:func:`kvflash.attn_common.jit_helpers.lse_merge_weights`: with ``m`` the largest LSE (the sink's logit included),
the merged row is ``sum_i exp(lse_i - m) * out_i / Z`` with ``Z = sum_i exp(lse_i - m) + exp(sink - m)``, and its
LSE is ``m + log Z``; a row empty in every part gives 0 and ``-inf``. The sink is counted here, once, never per
part.
"""

import triton
import triton.language as tl

from kvflash.attn_common.jit_helpers import lse_merge_weights, to_e4m3, wait_for_prior_grid


@triton.jit
def _load_part_rows(outs_row_ptr, splits, offs_d, d_mask, num_splits, stride_outs_split):
    """``[len(splits), BLOCK_D]`` fp32: the head columns ``offs_d`` of one output row in the parts ``splits``
    (0 past ``num_splits``)."""
    mask = (splits < num_splits)[:, None] & d_mask[None, :]
    return tl.load(outs_row_ptr + splits.to(tl.int64)[:, None] * stride_outs_split + offs_d[None, :], mask=mask,
                   other=0.0)  # fmt: skip


@triton.jit
def _load_part_lses(lses_row_ptr, splits, num_splits, stride_lses_split):
    """``[len(splits)]`` fp32: one row's LSEs in the parts ``splits`` (``-inf``, an empty part, past ``num_splits``)."""
    return tl.load(lses_row_ptr + splits * stride_lses_split, mask=splits < num_splits, other=float("-inf"))


@triton.jit
def _weighted_sum(rows, lses, m):
    """``sum_i exp(lse_i - m) * rows_i`` (``[BLOCK_D]``; :func:`lse_merge_weights`' weights, a chunk at a time). An
    empty part (lse ``-inf``: weight 0) is dropped by a select, so whatever its row holds (NaN, inf) cannot leak."""
    weight = tl.exp(lses - m)
    return tl.sum(tl.where(weight[:, None] > 0, rows * weight[:, None], 0.0), 0)


@triton.jit
def split_merge_kernel(
    outs_ptr,  # [num_splits, T, Hq, HEAD_SIZE] fp32, stride(-1) == 1
    lses_ptr,  # [num_splits, Hq, T] fp32, any strides; natural log, -inf for an empty part
    sinks_ptr,  # [Hq] fp32 (USE_SINKS)
    output_scale_ptr,  # [1] fp32 (OUTPUT_FP8)
    out_ptr,  # [T, Hq, HEAD_SIZE] fp16/bf16/fp32, or fp8 e4m3 (OUTPUT_FP8); stride(-1) == 1
    lse_ptr,  # [Hq, T] fp32 (WRITE_LSE)
    cu_seqlens_q_ptr,  # [num_seqs + 1] int32 (SEQUENCE_ROWS > 0)
    total_q,  # rows of out (SEQUENCE_ROWS > 0: query ranges are clamped to [0, total_q])
    num_splits,  # W, the parts
    stride_outs_split,
    stride_outs_token,
    stride_outs_head,
    stride_lses_split,
    stride_lses_token,
    stride_lses_head,
    stride_o_token,
    stride_o_head,
    stride_lse_token,
    stride_lse_head,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,  # head columns per program (a power of two); program_id(2) picks the slice
    SPLITS_PAD: tl.constexpr,  # next power of two >= num_splits
    SPLIT_CHUNK: tl.constexpr,  # partial rows loaded per step (a power of two <= SPLITS_PAD)
    USE_SINKS: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    OUTPUT_FP8: tl.constexpr,  # out = saturate(merged / output_scale) in fp8 e4m3
    # > 0: part row r is token r % SEQUENCE_ROWS of sequence r // SEQUENCE_ROWS (a mixed batch's decode rows), merged
    # into out row cu_seqlens_q[seq] + token, and only for sequences with at most SEQUENCE_ROWS queries (the others
    # are the prefill kernel's); 0: part row r is out row r
    SEQUENCE_ROWS: tl.constexpr,
    # (SEQUENCE_ROWS > 0) sequences with fewer queries are left alone too (another decode launch served them)
    MIN_QUERIES: tl.constexpr,
    ROUND_IN_SOFTWARE: tl.constexpr,  # the interpreter: round to the fp8 grid before the fp8 cast
    # Launched with programmatic dependent launch right after the kernel that wrote the parts (decode's split-KV):
    # wait for it before the first read of a part.
    WAIT_FOR_PRIOR_GRID: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    token = row.to(tl.int64)  # the out row
    if SEQUENCE_ROWS > 0:
        seq = row // SEQUENCE_ROWS
        q_first = tl.minimum(tl.maximum(tl.load(cu_seqlens_q_ptr + seq), 0), total_q)
        q_len = tl.minimum(tl.maximum(tl.load(cu_seqlens_q_ptr + seq + 1), q_first), total_q) - q_first
        if (q_len > SEQUENCE_ROWS) | (q_len < MIN_QUERIES) | (row % SEQUENCE_ROWS >= q_len):
            return
        token = (q_first + row % SEQUENCE_ROWS).to(tl.int64)
    wait_for_prior_grid(WAIT_FOR_PRIOR_GRID)
    lses_row_ptr = lses_ptr + row.to(tl.int64) * stride_lses_token + head * stride_lses_head
    outs_row_ptr = outs_ptr + row.to(tl.int64) * stride_outs_token + head * stride_outs_head
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_SIZE
    offs_c = tl.arange(0, SPLIT_CHUNK)

    # The first chunk's rows are loaded beside the LSEs, before the largest LSE is known: a merge of at most
    # SPLIT_CHUNK parts (decode's usual 2-8 splits) waits for memory once.
    first_rows = _load_part_rows(outs_row_ptr, offs_c, offs_d, d_mask, num_splits, stride_outs_split)
    first_lses = _load_part_lses(lses_row_ptr, offs_c, num_splits, stride_lses_split)
    if SPLIT_CHUNK == SPLITS_PAD:  # one step holds every part: its LSEs are all of them
        lse_all = first_lses
    else:
        lse_all = _load_part_lses(lses_row_ptr, tl.arange(0, SPLITS_PAD), num_splits, stride_lses_split)
    sink = float("-inf")
    if USE_SINKS:
        sink = tl.load(sinks_ptr + head)
    _, m, denom, merged_lse = lse_merge_weights(lse_all, sink, 0, USE_SINKS)

    acc = _weighted_sum(first_rows, first_lses, m)
    for first in range(SPLIT_CHUNK, num_splits, SPLIT_CHUNK):
        splits = first + offs_c
        # The rows are loaded without waiting for their LSEs (one memory latency per step, not two).
        rows = _load_part_rows(outs_row_ptr, splits, offs_d, d_mask, num_splits, stride_outs_split)
        lses = _load_part_lses(lses_row_ptr, splits, num_splits, stride_lses_split)
        acc += _weighted_sum(rows, lses, m)

    if OUTPUT_FP8:  # one reciprocal of the output scale, folded into the normalisation
        out = to_e4m3(acc * (1.0 / (denom * tl.load(output_scale_ptr))), ROUND_IN_SOFTWARE)
    else:
        out = (acc / denom).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + token * stride_o_token + head * stride_o_head + offs_d, out, mask=d_mask)
    if WRITE_LSE and tl.program_id(2) == 0:
        tl.store(lse_ptr + head * stride_lse_head + token * stride_lse_token, merged_lse)

"""The split-merge kernel: combine the per-split partial attentions of the decode kernel.

One program handles one (sequence, query head). Each split left a normalised fp32 output row and the
natural-log LSE of its keys (``-inf`` for a split without keys). With ``M = max_i lse_i`` (the sink's
logit included), the merged row is ``sum_i exp(lse_i - M) * out_i / Z`` with
``Z = sum_i exp(lse_i - M) + exp(sink - M)``, and its LSE is ``M + log Z``. The sink is counted here,
once, never per split.
"""

import triton
import triton.language as tl

from kvflash.attn_common.jit_helpers import to_e4m3


@triton.jit
def split_merge_kernel(
    partial_out_ptr,  # [num_splits, num_seqs, Hq, HEAD_SIZE] fp32, contiguous
    partial_lse_ptr,  # [num_seqs, Hq, num_splits] fp32, contiguous; natural log
    sinks_ptr,  # [Hq] fp32 (USE_SINKS)
    output_scale_ptr,  # [1] fp32 (OUTPUT_FP8)
    out_ptr,  # [num_seqs, Hq, HEAD_SIZE] q dtype (fp32 allowed), or fp8 e4m3 (OUTPUT_FP8)
    lse_ptr,  # [Hq, num_seqs] fp32
    num_q_heads,
    num_splits,
    stride_po_split,
    stride_o_seq,
    stride_o_head,
    stride_lse_head,
    stride_lse_seq,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,  # next power of two >= HEAD_SIZE
    SPLITS_PAD: tl.constexpr,  # next power of two >= num_splits
    SPLIT_CHUNK: tl.constexpr,  # partial rows loaded per step (a power of two <= SPLITS_PAD)
    USE_SINKS: tl.constexpr,
    OUTPUT_FP8: tl.constexpr,  # out = saturate(merged / output_scale) in fp8 e4m3
    ROUND_IN_SOFTWARE: tl.constexpr,  # the interpreter: round to the fp8 grid before the fp8 cast
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = seq * num_q_heads + head  # index of (seq, head) in the contiguous partial buffers

    offs_s = tl.arange(0, SPLITS_PAD)
    lse_all = tl.load(partial_lse_ptr + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse_all, 0)
    if USE_SINKS:
        sink = tl.load(sinks_ptr + head)
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.exp(lse_all - m_safe), 0)
    if USE_SINKS:
        denom += tl.exp(sink - m_safe)

    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_SIZE
    offs_c = tl.arange(0, SPLIT_CHUNK)
    acc = tl.zeros([HEAD_PAD], dtype=tl.float32)
    for first in range(0, num_splits, SPLIT_CHUNK):
        splits = first + offs_c
        s_mask = splits < num_splits
        lse = tl.load(partial_lse_ptr + row * num_splits + splits, mask=s_mask, other=float("-inf"))
        weight = tl.exp(lse - m_safe)  # 0 for empty splits, whose partial rows are 0 too
        part_offs = splits.to(tl.int64)[:, None] * stride_po_split + row * HEAD_SIZE + offs_d[None, :]
        part = tl.load(partial_out_ptr + part_offs, mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        acc += tl.sum(part * weight[:, None], 0)

    empty = denom == 0.0
    denom_safe = tl.where(empty, 1.0, denom)
    if OUTPUT_FP8:  # one reciprocal of the output scale, folded into the normalisation
        out = to_e4m3(acc * (1.0 / (denom_safe * tl.load(output_scale_ptr))), ROUND_IN_SOFTWARE)
    else:
        out = (acc / denom_safe).to(out_ptr.dtype.element_ty)
    lse_out = tl.where(empty, float("-inf"), m_safe + tl.log(denom_safe))
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + offs_d, out, mask=d_mask)
    tl.store(lse_ptr + head * stride_lse_head + seq * stride_lse_seq, lse_out)

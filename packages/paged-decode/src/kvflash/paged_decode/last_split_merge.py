"""The merge of a decode call's split partials by the split that finishes last (jit only).

Without it, split-KV decode is two launches: the decode kernel writes each split's fp32 partial (a normalised output
row and its natural-log LSE) and the n-way merge kernel (``split_merge_kernel.py``) combines them. The second launch
waits for the whole first grid and pays its own ramp: 7.7 µs of a 145 µs call at 64 x 4096 e4m3 (H200). Here the
``num_splits`` programs of the same rows share an int32 counter. A program that has stored its partials (every query
chunk of its sequence) adds 1 to it (acquire-release, GPU scope, after a CTA barrier so that every thread's stores
precede the release); the program that sees ``num_splits - 1`` comes last, so every other split's partials are
visible to it, and it merges them into the output itself, chunk by chunk. The counters must be zero when the decode
kernel starts: :func:`zero_counters_kernel` writes them, launched just before it (with programmatic dependent launch
the decode kernel starts beside it and waits for it only at its first counter update, see :func:`claim_last_split`).
A call therefore owns its counters: nothing carries over between calls, streams or CUDA-graph replays.

The merged row is :func:`kvflash.attn_common.jit_helpers.lse_merge_weights`' (sinks counted once, here): with ``m``
the largest LSE, ``out = sum_i exp(lse_i - m) * out_i / Z`` and ``lse = m + log Z``. It reads every split's partial,
its own included, through L2 (``.cg``: another SM wrote them, and this SM's L1 may hold stale lines);
``MERGE_SPLITS`` (a power of two >= ``num_splits``) unrolls the reads so their latencies overlap.
"""

import triton
import triton.language as tl

from kvflash.attn_common.jit_helpers import allow_dependent_launch, lse_merge_weights, wait_for_prior_grid


@triton.jit
def zero_counters_kernel(
    counters_ptr,  # [n] int32
    n,
    BLOCK: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,  # the decode kernel launched next may start at once (it waits at its counters)
):
    allow_dependent_launch(LAUNCH_DEPENDENTS)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(counters_ptr + offs, tl.zeros([BLOCK], dtype=tl.int32), mask=offs < n)


@triton.jit
def claim_last_split(counter_ptr, num_splits, WAIT_FOR_COUNTERS: tl.constexpr):
    """Count this program's split as done; True in the program whose split is the last of ``num_splits`` to get
    here (the one that merges). Call it after the program's partial is stored. ``WAIT_FOR_COUNTERS``: the kernel
    was launched with programmatic dependent launch after :func:`zero_counters_kernel`; wait for the zeros first."""
    wait_for_prior_grid(WAIT_FOR_COUNTERS)
    tl.debug_barrier()  # every thread's partial stores come before the release below
    # One thread adds (acq_rel: this CTA's stores are released, the other splits' acquired by the last one) and
    # Triton broadcasts the old value through shared memory behind another CTA barrier.
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == num_splits - 1


@triton.jit
def merge_split_partials(
    part_out_ptr,  # [num_splits, rows, Hq, HEAD_SIZE] fp32 (strides below)
    part_lse_ptr,  # [num_splits, Hq, rows] fp32 (strides below), natural log, -inf for an empty split
    out_offs,  # [BLOCK_H, HEAD_PAD] int64: element offsets of the program's rows and columns in one split's partial
    lse_offs,  # [BLOCK_H] int64: offsets of the program's rows in one split's LSEs
    mask,  # [BLOCK_H, HEAD_PAD]: rows and columns that exist
    row_mask,  # [BLOCK_H]
    sinks,  # [BLOCK_H] fp32 sink logits (natural log; USE_SINKS)
    num_splits,
    stride_part_out_split,
    stride_part_lse_split,
    MERGE_SPLITS: tl.constexpr,  # power of two >= num_splits
    USE_SINKS: tl.constexpr,
):
    """``(acc, denom, lse)``: the merged output of the program's rows is ``acc / denom[:, None]`` (``[BLOCK_H,
    HEAD_PAD]`` fp32 and ``[BLOCK_H]``; 0 for a row no split saw a key of) and ``lse [BLOCK_H]`` its natural-log
    LSE (``-inf`` for such a row)."""
    splits = tl.arange(0, MERGE_SPLITS)
    lses = tl.load(
        part_lse_ptr + splits[:, None].to(tl.int64) * stride_part_lse_split + lse_offs[None, :],
        mask=(splits < num_splits)[:, None] & row_mask[None, :],
        other=float("-inf"),
        cache_modifier=".cg",
    )  # [MERGE_SPLITS, BLOCK_H]
    weights, _, denom, lse = lse_merge_weights(lses, sinks, 0, USE_SINKS)
    acc = tl.zeros(out_offs.shape, dtype=tl.float32)
    for s in tl.static_range(MERGE_SPLITS):
        # A padding split (s >= num_splits, weight 0) re-reads the last split: in bounds, and dropped below.
        part = tl.minimum(s, num_splits - 1).to(tl.int64)
        rows = tl.load(part_out_ptr + part * stride_part_out_split + out_offs, mask=mask, other=0.0,
                       cache_modifier=".cg")  # fmt: skip
        weight = tl.sum(tl.where(splits[:, None] == s, weights, 0.0), 0)  # [BLOCK_H]: split s's
        # An empty split (weight 0) is dropped by a select: its row may hold anything, NaN included.
        acc += tl.where(weight[:, None] > 0, rows * weight[:, None], 0.0)
    return acc, denom, lse

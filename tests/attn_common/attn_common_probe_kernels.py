"""Tiny @triton.jit kernels that exercise attn_common.jit_helpers, for the tests beside this file."""

import triton
import triton.language as tl

from kvflash.attn_common.jit_helpers import (
    add_sink_to_denominator,
    alibi_bias,
    div_rn_by_row_scale,
    finalize_softmax,
    key_visibility,
    merge_lse_pair,
    online_softmax_step,
    softcap_scores,
)


@triton.jit
def streaming_softmax_kernel(
    scores_ptr,  # [M, N] fp32 natural-log logits
    values_ptr,  # [N, D] fp32
    sinks_ptr,  # [M] fp32
    out_ptr,  # [M, D] fp32
    lse_ptr,  # [M] fp32
    kv_len,
    window_left,
    window_right,
    softcap,
    slope,
    M: tl.constexpr,
    N: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SINK: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    rows = tl.arange(0, M)
    cols_d = tl.arange(0, D)
    q_pos = rows + (kv_len - M)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    for start in range(0, N, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        s = tl.load(scores_ptr + rows[:, None] * N + k_pos[None, :])
        if USE_SOFTCAP:
            s = softcap_scores(s, softcap)
        s += alibi_bias(tl.full([M], 1.0, tl.float32) * slope, q_pos, k_pos)
        visible = key_visibility(q_pos, k_pos, kv_len, window_left, window_right)
        s = tl.where(visible, s * LOG2E, float("-inf"))
        m_i, l_i, p, alpha = online_softmax_step(m_i, l_i, s)
        v = tl.load(values_ptr + k_pos[:, None] * D + cols_d[None, :])
        # An fp32 dot in full precision: a broadcast-multiply-sum may be lowered to a TF32 dot on the GPU.
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    if USE_SINK:
        sink = tl.load(sinks_ptr + rows) * LOG2E
        m_i, l_i, alpha = add_sink_to_denominator(m_i, l_i, sink)
        acc = acc * alpha[:, None]
    out, lse = finalize_softmax(acc, m_i, l_i)
    tl.store(out_ptr + rows[:, None] * D + cols_d[None, :], out)
    tl.store(lse_ptr + rows, lse)


@triton.jit
def merge_pair_kernel(
    out_a_ptr,  # [M, D] fp32
    lse_a_ptr,  # [M] fp32
    out_b_ptr,
    lse_b_ptr,
    out_ptr,
    lse_ptr,
    M: tl.constexpr,
    D: tl.constexpr,
):
    rows = tl.arange(0, M)
    offs = rows[:, None] * D + tl.arange(0, D)[None, :]
    out, lse = merge_lse_pair(
        tl.load(out_a_ptr + offs), tl.load(lse_a_ptr + rows), tl.load(out_b_ptr + offs), tl.load(lse_b_ptr + rows)
    )
    tl.store(out_ptr + offs, out)
    tl.store(lse_ptr + rows, lse)


@triton.jit
def div_rn_by_row_scale_kernel(
    x_ptr,  # [rows, COLS] fp32
    scale_ptr,  # [rows] fp32, or [1] with SCALAR_SCALE
    out_ptr,  # [rows, COLS] fp32
    COLS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    ANY_SCALE: tl.constexpr,
    SCALAR_SCALE: tl.constexpr,  # the scale as a scalar, as the writer's float scale arrives
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs = rows[:, None] * COLS + tl.arange(0, COLS)[None, :]
    if SCALAR_SCALE:
        scale = tl.load(scale_ptr)
    else:
        scale = tl.load(scale_ptr + rows)[:, None]
    tl.store(out_ptr + offs, div_rn_by_row_scale(tl.load(x_ptr + offs), scale, ANY_SCALE))


@triton.jit
def fma_kernel(a_ptr, b_ptr, c_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.fma(tl.load(a_ptr + offs), tl.load(b_ptr + offs), tl.load(c_ptr + offs)))

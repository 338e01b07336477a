"""The ``merge_attn_states`` kernel: combine two partial attentions over disjoint key sets by their LSE.

One program handles one token and ``BLOCK_HQ`` query heads. ``+inf`` LSE values are read as ``-inf``:
some FlashAttention builds report an empty row that way, and either means "no keys" here. The output
of an empty part is ignored (it may hold anything, NaN included).
"""

import triton
import triton.language as tl

from kvflash.attn_common.jit_helpers import merge_lse_pair


@triton.jit
def merge_states_kernel(
    prefix_out_ptr,  # [T, Hq, HEAD_SIZE] fp16/bf16/fp32
    prefix_lse_ptr,  # [Hq, T] fp32, natural log
    suffix_out_ptr,  # [T, Hq, HEAD_SIZE] fp16/bf16/fp32
    suffix_lse_ptr,  # [Hq, T] fp32, natural log
    out_ptr,  # [T, Hq, HEAD_SIZE] fp16/bf16/fp32
    out_lse_ptr,  # [Hq, T] fp32 (WRITE_LSE)
    num_q_heads,
    stride_p_tok,
    stride_p_head,
    stride_plse_head,
    stride_plse_tok,
    stride_s_tok,
    stride_s_head,
    stride_slse_head,
    stride_slse_tok,
    stride_o_tok,
    stride_o_head,
    stride_olse_head,
    stride_olse_tok,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,  # next power of two >= HEAD_SIZE
    BLOCK_HQ: tl.constexpr,  # query heads per program
    WRITE_LSE: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_HQ + tl.arange(0, BLOCK_HQ)
    h_mask = heads < num_q_heads
    offs_d = tl.arange(0, HEAD_PAD)
    mask = h_mask[:, None] & (offs_d < HEAD_SIZE)[None, :]

    lse_p = tl.load(prefix_lse_ptr + heads * stride_plse_head + tok * stride_plse_tok, mask=h_mask, other=float("-inf"))
    lse_s = tl.load(suffix_lse_ptr + heads * stride_slse_head + tok * stride_slse_tok, mask=h_mask, other=float("-inf"))
    lse_p = tl.where(lse_p == float("inf"), float("-inf"), lse_p)
    lse_s = tl.where(lse_s == float("inf"), float("-inf"), lse_s)
    p_offs = tok * stride_p_tok + heads[:, None] * stride_p_head + offs_d[None, :]
    s_offs = tok * stride_s_tok + heads[:, None] * stride_s_head + offs_d[None, :]
    out_p = tl.load(prefix_out_ptr + p_offs, mask=mask, other=0.0).to(tl.float32)
    out_s = tl.load(suffix_out_ptr + s_offs, mask=mask, other=0.0).to(tl.float32)
    # An empty part's output carries no weight; zero it so a NaN left there cannot leak through 0 * NaN.
    out_p = tl.where((lse_p == float("-inf"))[:, None], 0.0, out_p)
    out_s = tl.where((lse_s == float("-inf"))[:, None], 0.0, out_s)

    out, lse = merge_lse_pair(out_p, lse_p, out_s, lse_s)
    o_offs = tok * stride_o_tok + heads[:, None] * stride_o_head + offs_d[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_LSE:
        tl.store(out_lse_ptr + heads * stride_olse_head + tok * stride_olse_tok, lse, mask=h_mask)

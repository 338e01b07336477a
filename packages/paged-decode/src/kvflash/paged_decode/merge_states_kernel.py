"""The ``merge_attn_states`` kernel (jit only): combine two partial attentions over disjoint key sets by their LSE.

One program handles one token and ``BLOCK_HQ`` query heads; the merge is
:func:`kvflash.attn_common.jit_helpers.merge_lse_pair`, the two-part case of the LSE merge the n-way kernel
(``split_merge_kernel.py``) uses. ``+inf`` LSE values are read as ``-inf``:
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
    stride_p_token,
    stride_p_head,
    stride_plse_head,
    stride_plse_token,
    stride_s_token,
    stride_s_head,
    stride_slse_head,
    stride_slse_token,
    stride_o_token,
    stride_o_head,
    stride_olse_head,
    stride_olse_token,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,  # next power of two >= HEAD_SIZE
    BLOCK_HQ: tl.constexpr,  # query heads per program
    WRITE_LSE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_HQ + tl.arange(0, BLOCK_HQ)
    h_mask = heads < num_q_heads
    offs_d = tl.arange(0, HEAD_PAD)
    mask = h_mask[:, None] & (offs_d < HEAD_SIZE)[None, :]

    lse_p = tl.load(
        prefix_lse_ptr + heads * stride_plse_head + token * stride_plse_token, mask=h_mask, other=float("-inf")
    )
    lse_s = tl.load(
        suffix_lse_ptr + heads * stride_slse_head + token * stride_slse_token, mask=h_mask, other=float("-inf")
    )
    lse_p = tl.where(lse_p == float("inf"), float("-inf"), lse_p)
    lse_s = tl.where(lse_s == float("inf"), float("-inf"), lse_s)
    p_offs = token * stride_p_token + heads[:, None] * stride_p_head + offs_d[None, :]
    s_offs = token * stride_s_token + heads[:, None] * stride_s_head + offs_d[None, :]
    out_p = tl.load(prefix_out_ptr + p_offs, mask=mask, other=0.0).to(tl.float32)
    out_s = tl.load(suffix_out_ptr + s_offs, mask=mask, other=0.0).to(tl.float32)
    # An empty part's output carries no weight; zero it so a NaN left there cannot leak through 0 * NaN.
    out_p = tl.where((lse_p == float("-inf"))[:, None], 0.0, out_p)
    out_s = tl.where((lse_s == float("-inf"))[:, None], 0.0, out_s)

    out, lse = merge_lse_pair(out_p, lse_p, out_s, lse_s)
    o_offs = token * stride_o_token + heads[:, None] * stride_o_head + offs_d[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_LSE:
        tl.store(out_lse_ptr + heads * stride_olse_head + token * stride_olse_token, lse, mask=h_mask)

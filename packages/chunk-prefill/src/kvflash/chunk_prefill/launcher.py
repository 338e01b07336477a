"""Argument checks and the kernel launch for chunked prefill.

:func:`check_chunk_prefill_args` validates and normalises what a caller passes (through ``attn_common``);
:func:`launch_chunk_prefill` launches the kernel on already-normalised arguments. Neither reads tensor
values on the host: every decision comes from shapes and Python ints, so launches are CUDA-graph capturable.
"""

from __future__ import annotations

import torch

from kvflash.attn_common import (
    FP8_TORCH_DTYPES,
    QUERY_TORCH_DTYPES,
    AttentionFeatures,
    check_bool,
    check_device_type,
    check_index_tensor,
    check_int,
    check_kv_cache,
    check_out,
    check_tensor,
    kernel_window,
    normalize_attention_features,
)
from kvflash.attn_common.descale import descale_kernel_strides, is_per_token_descale
from kvflash.attn_common.intmath import cdiv, next_power_of_2
from kvflash.attn_common.launch import launch
from kvflash.attn_common.platform import interpreter_enabled
from kvflash.chunk_prefill.kernel import chunk_prefill_kernel
from kvflash.chunk_prefill.launch_config import LaunchConfig, choose_launch_config, pack_heads

__all__ = ["check_chunk_prefill_args", "launch_chunk_prefill"]


def check_chunk_prefill_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    block_table: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    softmax_scale: float | None,
    causal: bool,
    window_size,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    s_aux: torch.Tensor | None,
    k_descale,
    v_descale,
    out: torch.Tensor | None,
    output_scale: torch.Tensor | None = None,
    kv_descale_per_token: bool | None = None,
) -> AttentionFeatures:
    """Validate every argument of :func:`kvflash.chunk_prefill.chunk_prefill_attention`.

    Raises ``TypeError`` / ``ValueError`` naming the argument, what was expected and what came.
    """
    check_tensor("q", q, dtypes=QUERY_TORCH_DTYPES, ndim=3)
    check_device_type("q", q)
    check_index_tensor("cu_seqlens_q", cu_seqlens_q, shape=(None,), device=q.device)
    if cu_seqlens_q.shape[0] < 2:
        raise ValueError(f"cu_seqlens_q: expected [num_seqs + 1] with num_seqs >= 1, got {tuple(cu_seqlens_q.shape)}")
    num_seqs = cu_seqlens_q.shape[0] - 1
    check_int("max_seqlen_q", max_seqlen_q)
    check_int("max_seqlen_k", max_seqlen_k)
    check_bool("causal", causal)
    layout = check_kv_cache(
        q,
        k,
        v,
        num_seqs,
        block_table=block_table,
        seqused_k=seqused_k,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_k=max_seqlen_k,
    )
    features = normalize_attention_features(
        q, layout, softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, s_aux=s_aux, k_descale=k_descale, v_descale=v_descale, output_scale=output_scale,
        k=k, kv_descale_per_token=kv_descale_per_token,
    )  # fmt: skip
    if out is not None:
        check_out(out, q, features.output_scale)
    return features


def launch_chunk_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    *,
    block_table: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    s_aux: torch.Tensor | None,
    k_descale: torch.Tensor,
    v_descale: torch.Tensor,
    skip_q_len: int = 0,
    output_scale: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> None:
    """Launch the kernel: writes ``out [total_q, Hq, D]`` and, when given, ``lse [Hq, total_q]`` fp32.

    Arguments are the normalised ones of :class:`kvflash.attn_common.AttentionFeatures` (``-1`` window edges =
    unbounded).
    Sequences with at most ``skip_q_len`` queries are left untouched (the decode kernel serves them).
    ``output_scale`` (``[1]`` fp32): ``out`` is fp8 e4m3 and receives ``saturate(attention / output_scale)``.
    ``config`` overrides :func:`choose_launch_config` (tuning tools only).
    """
    total_q, num_q_heads, head_size = q.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    is_paged = block_table is not None
    num_kv_heads = k.shape[-2]
    group = num_q_heads // num_kv_heads
    kv_is_fp8 = k.dtype in FP8_TORCH_DTYPES  # the (q, kv) pair was validated by check_chunk_prefill_args
    interpreter = interpreter_enabled()
    if config is None:
        config = choose_launch_config(head_size, kv_is_fp8, group, max_seqlen_q, interpreter=interpreter)
    if total_q == 0:
        return
    g_pack, num_head_groups = pack_heads(group, config.block_m)
    # Each sequence adds at most one partial tile to cdiv(total_q, block_q); spare programs exit at once.
    num_q_tiles = cdiv(total_q, config.block_m // g_pack) + num_seqs
    grid = (num_q_tiles * num_kv_heads * num_head_groups,)
    left, right = kernel_window(window_left, window_right)
    # Unused pointer arguments get a valid tensor of the right kind; their constexpr flags keep them unread.
    seqused = seqused_k if seqused_k is not None else cu_seqlens_q
    alibi = alibi_slopes if alibi_slopes is not None else k_descale
    sinks = s_aux if s_aux is not None else k_descale
    # Stride tuples read once (each .stride(i) is a separate call into torch).
    qs, ks, vs, os_ = q.stride(), k.stride(), v.stride(), out.stride()
    per_token = is_per_token_descale(k_descale)
    kd_block, kd_seq, kd_head = descale_kernel_strides(k_descale)
    vd_block, vd_seq, vd_head = descale_kernel_strides(v_descale)
    alibi_strides = alibi_slopes.stride() if alibi_slopes is not None else (0, 0)
    launch(
        chunk_prefill_kernel,
        grid,
        interpreter,
        q_ptr=q,
        k_ptr=k,
        v_ptr=v,
        out_ptr=out,
        lse_ptr=lse if lse is not None else out,
        cu_seqlens_q_ptr=cu_seqlens_q,
        seqused_k_ptr=seqused,
        cu_seqlens_k_ptr=cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens_q,
        block_table_ptr=block_table if is_paged else cu_seqlens_q,
        k_descale_ptr=k_descale,
        v_descale_ptr=v_descale,
        alibi_ptr=alibi,
        sinks_ptr=sinks,
        output_scale_ptr=output_scale if output_scale is not None else k_descale,
        num_seqs=num_seqs,
        num_q_tiles=num_q_tiles,
        num_kv_heads=num_kv_heads,
        total_q=total_q,
        kv_capacity=block_table.shape[1] * k.shape[1] if is_paged else k.shape[0],
        num_blocks=k.shape[0] if is_paged else 1,
        skip_q_len=skip_q_len,
        softmax_scale=softmax_scale,
        softcap=softcap,
        window_left=left,
        window_right=right,
        stride_q_token=qs[0],
        stride_q_head=qs[1],
        stride_k_block=ks[0] if is_paged else 0,
        stride_k_token=ks[1] if is_paged else ks[0],
        stride_k_head=ks[-2],
        stride_v_block=vs[0] if is_paged else 0,
        stride_v_token=vs[1] if is_paged else vs[0],
        stride_v_head=vs[-2],
        stride_o_token=os_[0],
        stride_o_head=os_[1],
        stride_lse_head=lse.stride(0) if lse is not None else 0,
        stride_bt_seq=block_table.stride(0) if is_paged else 0,
        stride_kd_seq=kd_seq,
        stride_kd_head=kd_head,
        stride_vd_seq=vd_seq,
        stride_vd_head=vd_head,
        stride_kd_block=kd_block,
        stride_vd_block=vd_block,
        stride_alibi_seq=alibi_strides[0],
        stride_alibi_head=alibi_strides[1],
        GROUP=group,
        G_PACK=g_pack,
        NUM_HEAD_GROUPS=num_head_groups,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        HEAD_SIZE=head_size,
        # At least 16: tl.dot needs K >= 16 (D = 8); the padding is masked on every load and store.
        HEAD_PAD=max(16, next_power_of_2(head_size)),
        IS_PAGED=is_paged,
        PAGE_SIZE=k.shape[1] if is_paged else 1,
        SAME_KV_STRIDES=ks[:-2] == vs[:-2],
        KV_FP8=kv_is_fp8,
        # The interpreter's bf16 tl.dot returns garbage (triton issue 11584): there, bf16 dots run in fp32.
        DOT_FP32=interpreter and not kv_is_fp8 and q.dtype == torch.bfloat16,
        USE_SEQUSED=seqused_k is not None,
        USE_SOFTCAP=softcap > 0,
        USE_ALIBI=alibi_slopes is not None,
        USE_SINKS=s_aux is not None,
        RETURN_LSE=lse is not None,
        OUTPUT_FP8=output_scale is not None,
        ROUND_IN_SOFTWARE=interpreter,
        PER_TOKEN_SCALES=per_token,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )

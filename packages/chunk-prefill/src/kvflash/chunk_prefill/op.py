"""The public entry point, its custom op ``torch.ops.kvflash.chunk_prefill`` and the kernel launch.

One flow (docs/house_style.md): :func:`chunk_prefill_attention` checks its arguments (through
:func:`kvflash.attn_common.check_attention_call`), allocates ``out`` and calls the custom op; the op, which takes
only tensors, ints, floats and bools (descales already ``[num_seqs, Hkv]`` fp32 tensors), writes ``out`` in place
and returns the LSE through :func:`launch_chunk_prefill` (CPU tensors without the Triton interpreter take the
PyTorch reference). The op has a fake implementation, so it traces under ``torch.compile`` and is captured by
CUDA graphs like any other. Nothing reads a tensor value on the host: every decision comes from shapes and Python
ints.
"""

from __future__ import annotations

import torch
import triton

from kvflash.attn_common import (
    FP8_TORCH_DTYPES,
    AttentionFeatures,
    check_attention_call,
    check_int,
    check_query,
    empty_out,
    kernel_window,
    num_seqs_from_cu_seqlens_q,
    reference_attention_into,
    validate_index_tensors,
)
from kvflash.attn_common.call_plan import empty_buffer, planned
from kvflash.attn_common.descale import descale_kernel_strides, is_per_token_descale
from kvflash.attn_common.launch import launch
from kvflash.attn_common.ops import define_op
from kvflash.attn_common.platform import interpreter_enabled, runs_triton
from kvflash.chunk_prefill.hopper_op import hopper_prefill_applies, launch_hopper_prefill
from kvflash.chunk_prefill.kernel import chunk_prefill_kernel
from kvflash.chunk_prefill.launch_config import ChunkPrefillLaunchConfig, choose_chunk_prefill_config, pack_heads

__all__ = ["chunk_prefill_attention", "run_chunk_prefill", "launch_chunk_prefill"]


@planned
def chunk_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    block_table: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    s_aux: torch.Tensor | None = None,
    k_descale: torch.Tensor | float | None = None,
    v_descale: torch.Tensor | float | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    skip_q_len: int = 0,
    output_scale: torch.Tensor | None = None,
    kv_descale_per_token: bool | None = None,
    q_descale: torch.Tensor | float | None = None,
    q_descale_per_token: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention of new query tokens over a paged or contiguous (possibly FP8) KV cache.

    Handles chunked prefill and mixed batches (decode rows with one query beside prefill rows) in one
    launch, with no host synchronisation.

    Parameters
    ----------
    q : torch.Tensor
        ``[total_q, Hq, D]`` fp16 or bf16, any strides with ``stride(-1) == 1``. ``D`` is 8..512, a
        multiple of 8. Or ``float8_e4m3fn`` over an FP8 cache, with ``q_descale``: the QK dot then runs on fp8
        tensor cores, PV in fp16 (or in fp8 with P quantised to e4m3 and two-level accumulation, when the launch
        config's ``pv_fp8`` asks for it).
    k, v : torch.Tensor
        Paged ``[num_blocks, block_size, Hkv, D]`` (strided views allowed, e.g. ``[:, 0]`` / ``[:, 1]`` of a
        joint ``[num_blocks, 2, block_size, Hkv, D]`` cache) with ``block_table`` and ``seqused_k``, or
        contiguous ``[total_k, Hkv, D]`` with ``cu_seqlens_k``. Dtype: ``q``'s, or ``float8_e4m3fn`` /
        ``float8_e5m2`` (real value = ``stored * descale``). ``Hq % Hkv == 0``.
    cu_seqlens_q : torch.Tensor
        ``[num_seqs + 1]`` int32 query offsets: from 0, never decreasing, up to ``total_q``. Values are not
        checked on the host (``KVFLASH_VALIDATE=1`` checks them); the kernel clamps every range to
        ``[0, total_q]`` and treats a decreasing one as empty, so bad offsets never address memory outside
        ``q`` / ``out`` (rows outside every range are then left unwritten).
    max_seqlen_q, max_seqlen_k : int
        Upper bounds of the per-sequence query and key lengths (launch heuristics only; never trusted for
        memory safety).
    block_table : torch.Tensor, optional
        ``[num_seqs, max_blocks]`` int32 page ids (paged layout).
    seqused_k : torch.Tensor, optional
        ``[num_seqs]`` int32 KV lengths, new tokens included (required when paged; with ``cu_seqlens_k``
        it caps each sequence's length).
    cu_seqlens_k : torch.Tensor, optional
        ``[num_seqs + 1]`` int32 key offsets (contiguous layout).
    softmax_scale : float, optional
        Defaults to ``1 / sqrt(D)``.
    causal : bool
        Bottom-right aligned: query ``i`` of a sequence with ``Lq`` queries and ``Lk`` keys sits at
        ``p = Lk - Lq + i`` and sees keys ``j <= p``.
    window_size : (int, int), optional
        ``(left, right)``, ``-1`` = unbounded: key ``j`` is visible iff ``p - left <= j <= p + right``.
    softcap : float
        ``> 0``: ``score = softcap * tanh(score / softcap)`` on the scaled score.
    alibi_slopes : torch.Tensor, optional
        ``[Hq]`` or ``[num_seqs, Hq]`` fp32: ``score += -slope * |p - j|``.
    s_aux : torch.Tensor, optional
        Sinks ``[Hq]``: one extra logit per head in the denominator (scaled-score domain, not softcapped).
    k_descale, v_descale : torch.Tensor or float, optional
        ``None`` (1.0), a float, or a tensor broadcastable to ``[num_seqs, Hkv]`` (fp32/fp16/bf16). Or
        per-token-head (FP8 caches only): one float32 scale per stored (token, KV head), indexed like the cache
        (as ``reshape_and_cache_flash`` writes them under a ``*_per_token_head`` ``kv_cache_dtype``):
        ``[num_blocks, block_size, Hkv]`` for a paged cache (rank 3: recognised by its shape), ``[total_k, Hkv]``
        for a contiguous one (with ``kv_descale_per_token=True``). Key ``j`` is ``k_stored_j * k_descale_j``; K
        and V take the same mode.
    kv_descale_per_token : bool, optional
        ``None`` (default): per-token-head iff a paged descale has rank 3. ``True``: both descales are
        per-token-head (the only way to pass the contiguous ``[total_k, Hkv]`` form, which would read like
        ``[num_seqs, Hkv]`` when the counts are equal). ``False``: per-(sequence, KV head) forms only.
    q_descale : torch.Tensor or float, optional
        An fp8 ``q`` only (else ``ValueError``): the real query is ``q * q_descale``, with the per-(sequence, KV
        head) forms of ``k_descale`` (``None`` = 1.0; :func:`kvflash.fp8_utils.quantize_query` makes both), or one
        float32 scale per (token, query head), ``[total_q, Hq]``, with ``q_descale_per_token=True``.
    q_descale_per_token : bool, optional
        ``True``: ``q_descale`` is the per-(token, query head) ``[total_q, Hq]`` form (explicit: it would read like
        ``[num_seqs, Hkv]`` when the counts are equal).
    out : torch.Tensor, optional
        ``[total_q, Hq, D]`` in ``q``'s dtype (fp16 or bf16 for an fp8 ``q``; may be a strided view); written in
        place. ``float8_e4m3fn`` with ``output_scale`` (and only then).
    return_lse : bool
        Also return the natural-log softmax denominator.
    skip_q_len : int
        Leave the ``out`` (and ``lse``) rows of sequences with at most this many queries untouched: in a mixed
        batch :func:`kvflash.paged_decode.paged_decode_attention` (``defer_longer_sequences``) serves them at
        decode speed. 0 (the default) serves every sequence.
    output_scale : torch.Tensor, optional
        float32, one element: the output is ``float8_e4m3fn``, ``out = saturate(attention / output_scale)``
        (clamped to +-448, applied in the kernel's epilogue; never NaN for finite input). ``lse`` is unscaled.

    Returns
    -------
    out : torch.Tensor
        ``[total_q, Hq, D]`` in ``q``'s dtype (bf16 for an fp8 ``q``; ``float8_e4m3fn`` with ``output_scale``).
        Rows with no visible key are 0.
    lse : torch.Tensor
        Only with ``return_lse``: ``[Hq, total_q]`` float32, the sink included; ``-inf`` for rows with no
        visible key and no sink.
    """
    check_query(q)
    num_seqs = num_seqs_from_cu_seqlens_q(q, cu_seqlens_q)
    features = check_attention_call(
        q, k, v, num_seqs, cu_seqlens_q=None,  # checked (and counted) by num_seqs_from_cu_seqlens_q above
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, block_table=block_table, seqused_k=seqused_k,
        cu_seqlens_k=cu_seqlens_k, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, s_aux=s_aux, k_descale=k_descale, v_descale=v_descale,
        output_scale=output_scale, kv_descale_per_token=kv_descale_per_token, out=out, q_descale=q_descale,
        q_descale_per_token=q_descale_per_token,
    )  # fmt: skip
    check_int("skip_q_len", skip_q_len, 0)
    return run_chunk_prefill(
        q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, features, block_table=block_table, seqused_k=seqused_k,
        cu_seqlens_k=cu_seqlens_k, out=out, return_lse=return_lse, skip_q_len=skip_q_len,
    )  # fmt: skip


def run_chunk_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    features: AttentionFeatures,
    *,
    block_table: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    out: torch.Tensor | None,
    return_lse: bool,
    skip_q_len: int,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`chunk_prefill_attention` after its checks (:func:`kvflash.attn_common.check_attention_call` returned
    ``features`` for these arguments, ``out`` included, and ``skip_q_len`` is an int >= 0): the ``KVFLASH_VALIDATE``
    checks, the output allocation and the op. For callers that checked the arguments themselves
    (``flash_attn_varlen_func``), so an eager call checks each argument once."""
    validate_index_tensors(
        q, k, cu_seqlens_q=cu_seqlens_q, block_table=block_table, seqused_k=seqused_k, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )  # fmt: skip
    f = features
    if out is None:
        out = empty_out(q, f.output_scale)
    lse = _chunk_prefill_op(
        q, k, v, out, cu_seqlens_q, max_seqlen_q, block_table, seqused_k, cu_seqlens_k, f.softmax_scale,
        f.window_left, f.window_right, f.softcap, f.alibi_slopes, f.s_aux, f.k_descale, f.v_descale, return_lse,
        skip_q_len, f.output_scale, f.q_descale,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def _chunk_prefill_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
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
    return_lse: bool,
    skip_q_len: int,
    output_scale: torch.Tensor | None,
    q_descale: torch.Tensor | None,
) -> torch.Tensor:
    """Write attention into ``out [total_q, Hq, D]``; return ``lse [Hq, total_q]`` fp32 (``[Hq, 0]`` when
    ``return_lse`` is False). Arguments are normalised: window edges ``-1`` = unbounded, causal folded
    into ``window_right = 0``, descales ``[num_seqs, Hkv]`` fp32 (or rank-3 per-token-head
    ``[num_blocks, block_size, Hkv]`` / ``[1, total_k, Hkv]`` fp32), ``output_scale`` ``[1]`` fp32 (fp8 ``out``),
    ``q_descale`` ``[num_seqs, Hkv]`` (or per token and query head ``[1, total_q, Hq]``) fp32 for an fp8 ``q`` (else
    ``None``)."""
    total_q, num_q_heads, _ = q.shape
    lse = empty_buffer((num_q_heads, total_q if return_lse else 0), torch.float32, q.device)
    if not runs_triton(q.device):
        reference_attention_into(
            out, lse if return_lse else None, q, k, v, cu_seqlens_q, block_table=block_table, seqused_k=seqused_k,
            cu_seqlens_k=cu_seqlens_k, softmax_scale=softmax_scale, window_size=(window_left, window_right),
            softcap=softcap, alibi_slopes=alibi_slopes, s_aux=s_aux, k_descale=k_descale, v_descale=v_descale,
            output_scale=output_scale, q_descale=q_descale,
        )  # fmt: skip
        return lse
    launch_chunk_prefill(
        q, k, v, out, lse if return_lse else None, cu_seqlens_q, max_seqlen_q,
        block_table=block_table, seqused_k=seqused_k, cu_seqlens_k=cu_seqlens_k, softmax_scale=softmax_scale,
        window_left=window_left, window_right=window_right, softcap=softcap, alibi_slopes=alibi_slopes,
        s_aux=s_aux, k_descale=k_descale, v_descale=v_descale, skip_q_len=skip_q_len, output_scale=output_scale,
        q_descale=q_descale, config=None,
    )  # fmt: skip
    return lse


def _chunk_prefill_fake(q, k, v, out, cu_seqlens_q, max_seqlen_q, block_table, seqused_k, cu_seqlens_k, softmax_scale,
      window_left, window_right, softcap, alibi_slopes, s_aux, k_descale, v_descale, return_lse,
      skip_q_len, output_scale, q_descale):  # fmt: skip
    total_q, num_q_heads, _ = q.shape
    return q.new_empty((num_q_heads, total_q if return_lse else 0), dtype=torch.float32)


# torch.ops.kvflash.chunk_prefill (attn_common.ops: one C++ dispatch per eager call).
_chunk_prefill_op = define_op("chunk_prefill", _chunk_prefill_impl, _chunk_prefill_fake, mutates_args=("out",))


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
    q_descale: torch.Tensor | None = None,
    config: ChunkPrefillLaunchConfig | None = None,
) -> None:
    """Launch the kernel: writes ``out [total_q, Hq, D]`` and, when given, ``lse [Hq, total_q]`` fp32.

    Arguments are the normalised ones of :class:`kvflash.attn_common.AttentionFeatures` (``-1`` window edges =
    unbounded).
    Sequences with at most ``skip_q_len`` queries are left untouched (the decode kernel serves them).
    ``output_scale`` (``[1]`` fp32): ``out`` is fp8 e4m3 and receives ``saturate(attention / output_scale)``.
    ``q_descale`` (``[num_seqs, Hkv]`` fp32, or ``[1, total_q, Hq]`` per token and query head): given exactly for an
    fp8 ``q``.
    ``config`` overrides :func:`kvflash.chunk_prefill.launch_config.choose_chunk_prefill_config` (the tuning
    sweeps of ``tools/bench``). Without it, calls the Hopper kernel serves go there
    (:func:`kvflash.chunk_prefill.hopper_op.hopper_prefill_applies`).
    """
    if config is None and q.shape[0] > 0 and hopper_prefill_applies(
        q, k, v, out, lse, block_table=block_table, window_left=window_left, window_right=window_right,
        softcap=softcap, alibi_slopes=alibi_slopes, s_aux=s_aux, k_descale=k_descale, output_scale=output_scale,
        q_descale=q_descale,
    ):  # fmt: skip
        launch_hopper_prefill(
            q, k, v, out, lse, cu_seqlens_q, block_table=block_table, seqused_k=seqused_k,
            softmax_scale=softmax_scale, k_descale=k_descale, v_descale=v_descale, skip_q_len=skip_q_len,
            q_descale=q_descale,
        )  # fmt: skip
        return
    total_q, num_q_heads, head_size = q.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    is_paged = block_table is not None
    num_kv_heads = k.shape[-2]
    group = num_q_heads // num_kv_heads
    kv_is_fp8 = k.dtype in FP8_TORCH_DTYPES  # the (q, kv) pair was checked by check_attention_call
    q_is_fp8 = q_descale is not None
    interpreter = interpreter_enabled()
    if config is None:
        config = choose_chunk_prefill_config(
            head_size, kv_is_fp8, group, max_seqlen_q, interpreter=interpreter, q_is_fp8=q_is_fp8
        )
    if total_q == 0:
        return
    split_query = bool(config.split_query) and kv_is_fp8 and q.dtype == torch.bfloat16
    g_pack, num_head_groups = pack_heads(group, config.block_m)
    # Each sequence adds at most one partial tile to cdiv(total_q, block_q); spare programs exit at once.
    num_q_tiles = triton.cdiv(total_q, config.block_m // g_pack) + num_seqs
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
        alibi_slopes_ptr=alibi,
        sinks_ptr=sinks,
        output_scale_ptr=output_scale if output_scale is not None else k_descale,
        q_descale_ptr=q_descale if q_is_fp8 else k_descale,
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
        stride_qd_seq=q_descale.stride(-2) if q_is_fp8 else 0,
        stride_qd_head=q_descale.stride(-1) if q_is_fp8 else 0,
        GROUP=group,
        G_PACK=g_pack,
        NUM_HEAD_GROUPS=num_head_groups,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        HEAD_SIZE=head_size,
        # At least 16: tl.dot needs K >= 16 (D = 8), 32 for fp8 operands; the padding is masked on every load and
        # store.
        HEAD_PAD=max(32 if q_is_fp8 or split_query else 16, triton.next_power_of_2(head_size)),
        IS_PAGED=is_paged,
        PAGE_SIZE=k.shape[1] if is_paged else 1,
        SAME_KV_STRIDES=ks[:-2] == vs[:-2],
        KV_FP8=kv_is_fp8,
        # The interpreter's bf16 tl.dot returns wrong values: there, bf16 dots run in fp32
        # (tests/kvflash/test_malformed_inputs.py::test_bf16_q_and_cache_on_every_device).
        DOT_FP32=interpreter and not kv_is_fp8 and q.dtype == torch.bfloat16,
        USE_SEQUSED=seqused_k is not None,
        USE_SOFTCAP=softcap > 0,
        USE_ALIBI=alibi_slopes is not None,
        USE_SINKS=s_aux is not None,
        WRITE_LSE=lse is not None,
        OUTPUT_FP8=output_scale is not None,
        ROUND_IN_SOFTWARE=interpreter,
        PER_TOKEN_SCALES=per_token,
        Q_FP8=q_is_fp8,
        PV_FP8=q_is_fp8 and bool(config.pv_fp8),
        Q_SPLIT=split_query,
        Q_PER_TOKEN=q_is_fp8 and q_descale.dim() == 3,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )

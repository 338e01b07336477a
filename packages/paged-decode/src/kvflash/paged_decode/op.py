"""``paged_decode_attention``: split-KV decode over a paged (or contiguous) KV cache, FP8 included.

The flow of docs/house_style.md: :func:`paged_decode_attention` checks its arguments (through
:func:`kvflash.attn_common.check_attention_call` and its own decode checks) and allocates, then calls the
``kvflash::paged_decode_attention`` custom op, which chooses the launch settings
(:func:`kvflash.paged_decode.launch_config.choose_paged_decode_config`) and launches through
:func:`launch_paged_decode`: the decode kernel (``kernel.py``) and, when the keys are split, the n-way merge kernel
(``split_merge_kernel.py``, through :func:`kvflash.paged_decode.merge_states_op.launch_merge_partial_attentions`).
No tensor value is read on the host.
"""

import functools

import torch
import triton

from kvflash.attn_common import (
    FP8_TORCH_DTYPES,
    AttentionFeatures,
    check_attention_call,
    check_bool,
    check_int,
    check_query,
    check_tensor,
    empty_out,
    kernel_window,
    platform,
    reference_attention_into,
    validate_index_tensors,
)
from kvflash.attn_common.call_plan import empty_buffer, planned
from kvflash.attn_common.descale import descale_kernel_strides, is_per_token_descale
from kvflash.attn_common.launch import launch
from kvflash.attn_common.ops import define_op
from kvflash.paged_decode.kernel import paged_decode_kernel
from kvflash.paged_decode.launch_config import (
    MAX_BLOCK_H,
    PagedDecodeLaunchConfig,
    choose_paged_decode_config,
    one_query_rows_apart,
)
from kvflash.paged_decode.merge_states_op import launch_merge_partial_attentions

__all__ = ["paged_decode_attention", "run_paged_decode", "launch_paged_decode"]


@planned
def paged_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
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
    num_splits: int = 0,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    cu_seqlens_q: torch.Tensor | None = None,
    max_seqlen_q: int = 1,
    defer_longer_sequences: bool = False,
    lse: torch.Tensor | None = None,
    output_scale: torch.Tensor | None = None,
    kv_descale_per_token: bool | None = None,
    q_descale: torch.Tensor | float | None = None,
    q_descale_per_token: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of the few query tokens of each sequence over its KV cache (decode), split over the keys.

    Plain decode is one query per sequence; with ``cu_seqlens_q`` each sequence brings its own number of
    queries (speculative-decode verification, the decode rows of a mixed batch), and the K/V of a sequence
    is read once for up to ``max_seqlen_q`` of its queries and all heads of a GQA group.

    Parameters
    ----------
    q : torch.Tensor
        ``[num_seqs, Hq, D]`` fp16/bf16, ``stride(-1) == 1``, or ``[total_q, Hq, D]`` with ``cu_seqlens_q``.
        Query ``i`` of a sequence with ``q_len`` queries and ``kv_len`` keys sits at position
        ``p = kv_len - q_len + i`` (bottom-right aligned; ``p = kv_len - 1`` for a single query). Or
        ``float8_e4m3fn`` over an FP8 cache, with ``q_descale``: converted to fp16 exactly in the kernel (decode
        reads each key once per token, so fp8 tensor cores would save nothing), the same dots as a 16-bit query.
    k, v : torch.Tensor
        Paged ``[num_blocks, block_size, Hkv, D]`` (strided views allowed) with ``block_table`` and
        ``seqused_k``, or contiguous ``[total_k, Hkv, D]`` with ``cu_seqlens_k``. Dtype: ``q``'s, or
        ``float8_e4m3fn`` / ``float8_e5m2`` (real value = stored * descale). With an FP8 cache both dots run
        in fp16 (exact for FP8 values): a bf16 ``q`` must satisfy ``|q| < 65504`` (values under 6.1e-5 round
        to fp16 subnormals, negligible in a dot product).
    max_seqlen_k : int
        An upper bound on the KV length of any sequence; it sizes the split-KV (never read from tensors).
    block_table : torch.Tensor, optional
        ``[num_seqs, max_blocks]`` int32 page ids.
    seqused_k : torch.Tensor, optional
        ``[num_seqs]`` int32 KV lengths (paged); with ``cu_seqlens_k`` it caps each length.
    cu_seqlens_k : torch.Tensor, optional
        ``[num_seqs + 1]`` int32 key offsets of the contiguous layout.
    softmax_scale : float, optional
        Defaults to ``1 / sqrt(D)``.
    causal : bool
        Queries see no later key (``window_size`` right edge 0). A no-op for a sequence's last query, which
        sees every key.
    window_size : (int, int), optional
        ``(left, right)``, ``-1`` unbounded: key ``j`` visible iff ``p - left <= j <= p + right``.
    softcap : float
        ``> 0``: ``score = softcap * tanh(score / softcap)``.
    alibi_slopes : torch.Tensor, optional
        ``[Hq]`` or ``[num_seqs, Hq]`` fp32: ``score -= slope * |p - j|``.
    s_aux : torch.Tensor, optional
        ``[Hq]`` sink logits (counted once in the denominator, no value row).
    k_descale, v_descale : torch.Tensor or float, optional
        Broadcastable to ``[num_seqs, Hkv]``; per (sequence, KV head). Or per-token-head (FP8 caches only): one
        float32 scale per stored (token, KV head), indexed like the cache, as ``reshape_and_cache_flash`` writes
        them under a ``*_per_token_head`` ``kv_cache_dtype``: ``[num_blocks, block_size, Hkv]`` for a paged
        cache (rank 3: recognised by its shape), ``[total_k, Hkv]`` for a contiguous one (with
        ``kv_descale_per_token=True``). Key ``j`` is ``k_stored_j * k_descale_j``; K and V take the same mode.
    kv_descale_per_token : bool, optional
        ``None`` (default): per-token-head iff a paged descale has rank 3. ``True``: both descales are
        per-token-head (the only way to pass the contiguous ``[total_k, Hkv]`` form, which would read like
        ``[num_seqs, Hkv]`` when the counts are equal). ``False``: per-(sequence, KV head) forms only.
    q_descale : torch.Tensor or float, optional
        An fp8 ``q`` only (else ``ValueError``): the real query is ``q * q_descale``, per (sequence, KV head) in the
        forms ``k_descale`` takes (``None`` = 1.0), or per (token, query head) ``[q.shape[0], Hq]`` float32 with
        ``q_descale_per_token=True``.
    q_descale_per_token : bool, optional
        ``True``: ``q_descale`` is the per-(token, query head) form (explicit: it would read like ``[num_seqs, Hkv]``
        when the counts are equal).
    num_splits : int
        0 = automatic split-KV (from shapes and the SM count), 1 = no split, ``n > 1`` = at most ``n``.
    out : torch.Tensor, optional
        Shaped like ``q``, in ``q``'s dtype (fp16 or bf16 for an fp8 ``q``) or float32 (the unrounded result, for
        callers that merge partial attentions themselves, such as context-parallel decode), ``stride(-1) == 1``; written
        in place. ``float8_e4m3fn`` with ``output_scale`` (and only then).
    return_lse : bool
        Also return ``lse [Hq, q.shape[0]]`` float32 (natural log; ``-inf`` for a row without keys and
        sinks).
    cu_seqlens_q : torch.Tensor, optional
        ``[num_seqs + 1]`` int32 offsets of each sequence's query rows in ``q``. Without it, row ``s`` is the
        one query of sequence ``s``.
    max_seqlen_q : int
        The caller's bound on queries per sequence (with ``cu_seqlens_q``): it sizes the rows of a program
        (tokens x the group's heads, up to 64 rows). A sequence with more queries is still served exactly,
        in several passes over its keys.
    defer_longer_sequences : bool
        With ``cu_seqlens_q``: leave the ``out`` and ``lse`` rows of sequences with more than
        ``max_seqlen_q`` queries untouched, for :func:`kvflash.chunk_prefill.chunk_prefill_attention` with
        ``skip_q_len=max_seqlen_q`` to serve (a mixed batch, two launches). ``max_seqlen_q`` must fit one pass
        (``max_seqlen_q * Hq / Hkv <= 64``). Split-KV works as usual: the merge writes the decode rows only.
    lse : torch.Tensor, optional
        ``[Hq, q.shape[0]]`` float32 buffer the LSE rows are written into (returned with ``return_lse``):
        with ``defer_longer_sequences``, the one the prefill kernel wrote the other rows of.
    output_scale : torch.Tensor, optional
        float32, one element: the output is ``float8_e4m3fn``, ``out = saturate(attention / output_scale)``
        (clamped to +-448 in the epilogue of the decode kernel, or of the split merge; never NaN for finite
        input). ``lse`` is unscaled.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        ``out`` shaped like ``q`` in ``q``'s dtype (``out``'s; bf16 for an fp8 ``q``; fp8 e4m3 with ``output_scale``),
        and ``lse`` when ``return_lse``.
    """
    check_query(q)
    if block_table is not None:
        check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2)
        num_seqs = block_table.shape[0]
    elif cu_seqlens_k is not None:
        check_tensor("cu_seqlens_k", cu_seqlens_k, dtypes=(torch.int32,), ndim=1)
        num_seqs = cu_seqlens_k.shape[0] - 1
    else:
        raise ValueError("cu_seqlens_k: required for a contiguous KV cache (or pass block_table and seqused_k)")
    if cu_seqlens_q is None and q.shape[0] != num_seqs:
        raise ValueError(
            f"q: expected shape [num_seqs, Hq, D] with num_seqs={num_seqs} (one query token per sequence without "
            f"cu_seqlens_q), got {tuple(q.shape)}"
        )
    check_int("max_seqlen_q", max_seqlen_q, 1)
    check_bool("defer_longer_sequences", defer_longer_sequences)
    check_int("num_splits", num_splits)  # 0 = automatic, 1 = no split, n = at most n
    # out: q's dtype, or float32 (context-parallel partials), or fp8 e4m3 with output_scale.
    f = check_attention_call(
        q, k, v, num_seqs, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        block_table=block_table, seqused_k=seqused_k, cu_seqlens_k=cu_seqlens_k, softmax_scale=softmax_scale,
        causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, s_aux=s_aux,
        k_descale=k_descale, v_descale=v_descale, output_scale=output_scale,
        kv_descale_per_token=kv_descale_per_token, out=out, out_extra_dtypes=(torch.float32,), q_descale=q_descale,
        q_descale_per_token=q_descale_per_token,
    )  # fmt: skip
    return run_paged_decode(
        q, k, v, f, max_seqlen_k, block_table=block_table, seqused_k=seqused_k, cu_seqlens_k=cu_seqlens_k,
        cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, num_splits=num_splits, out=out, lse=lse,
        return_lse=return_lse, defer_longer_sequences=defer_longer_sequences,
    )  # fmt: skip


def run_paged_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    features: AttentionFeatures,
    max_seqlen_k: int,
    *,
    block_table: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    max_seqlen_q: int,
    num_splits: int,
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    return_lse: bool,
    defer_longer_sequences: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`paged_decode_attention` after its checks: ``features`` is what
    :func:`kvflash.attn_common.check_attention_call` returned for these arguments (``out`` included), and the
    decode's own ints are checked. Checks ``lse`` and the ``defer_longer_sequences`` bound, allocates what is
    missing and runs the op.

    For callers that have done those checks themselves (``flash_attn_varlen_func``: the mixed route runs this and
    the chunked-prefill kernel on one set of checked arguments), so an eager call checks each argument once.
    """
    num_q_heads = q.shape[1]
    if defer_longer_sequences:
        if cu_seqlens_q is None:
            raise ValueError("defer_longer_sequences: needs cu_seqlens_q (which sequences are longer is read there)")
        if max_seqlen_q * num_q_heads > MAX_BLOCK_H * k.shape[-2]:
            raise ValueError(
                f"max_seqlen_q: with defer_longer_sequences, max_seqlen_q * Hq / Hkv must be <= {MAX_BLOCK_H} (one "
                f"pass), got {max_seqlen_q} * {num_q_heads} / {k.shape[-2]}"
            )
    f = features
    if out is None:
        out = empty_out(q, f.output_scale)
    if lse is None:
        lse = empty_buffer((num_q_heads, q.shape[0]), torch.float32, q.device)
    else:
        check_tensor("lse", lse, dtypes=(torch.float32,), shape=(num_q_heads, q.shape[0]), device=q.device)
    validate_index_tensors(
        q, k, cu_seqlens_q=cu_seqlens_q, block_table=block_table, seqused_k=seqused_k, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=None, max_seqlen_k=max_seqlen_k,
    )  # fmt: skip
    _PAGED_DECODE_OP(
        q, k, v, block_table, seqused_k, cu_seqlens_k, cu_seqlens_q, f.k_descale, f.v_descale, f.alibi_slopes,
        f.s_aux, out, lse, max_seqlen_q, max_seqlen_k, f.softmax_scale, f.window_left, f.window_right, f.softcap,
        num_splits, defer_longer_sequences, f.output_scale, f.q_descale,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def _paged_decode_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_table: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    k_descale: torch.Tensor,
    v_descale: torch.Tensor,
    alibi_slopes: torch.Tensor | None,
    s_aux: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    num_splits: int,
    defer_longer_sequences: bool,
    output_scale: torch.Tensor | None,
    q_descale: torch.Tensor | None,
) -> None:
    """The op on normalised arguments (descales ``[num_seqs, Hkv]`` fp32, or rank-3 per-token-head
    ``[num_blocks, block_size, Hkv]`` / ``[1, total_k, Hkv]`` fp32; window edges ``-1`` = unbounded,
    ``output_scale`` ``[1]`` fp32 with an fp8 ``out``; ``q_descale`` ``[num_seqs, Hkv]`` or, per token and query
    head, ``[1, total_q, Hq]`` fp32, exactly for an fp8 ``q``): the CPU reference without Triton, else the launch
    (which chooses the launch settings)."""
    if not platform.runs_triton(q.device, platform.interpreter_enabled()):
        _reference_decode(
            q, k, v, block_table, seqused_k, cu_seqlens_k, cu_seqlens_q, k_descale, v_descale, alibi_slopes, s_aux,
            out, lse, softmax_scale, window_left, window_right, softcap, output_scale, q_descale,
        )  # fmt: skip
        return

    def launch_rows(max_queries: int, config: PagedDecodeLaunchConfig | None, min_queries: int) -> None:
        launch_paged_decode(
            q, k, v, block_table, seqused_k, cu_seqlens_k, cu_seqlens_q, k_descale, v_descale, alibi_slopes, s_aux,
            out, lse, max_queries, max_seqlen_k, softmax_scale, window_left, window_right, softcap, num_splits,
            defer_longer_sequences, output_scale, q_descale, config=config, min_queries=min_queries,
        )  # fmt: skip

    config = None  # launch_paged_decode chooses it
    if defer_longer_sequences and max_seqlen_q > 1:
        # A mixed batch's decode rows: the 1-query rows may take the decode config (and its split-KV) in a launch of
        # their own, the sequences of 2..max_seqlen_q queries a second launch (one_query_rows_apart).
        choose = functools.partial(
            _choose_config, q, k, block_table, cu_seqlens_k, cu_seqlens_q, k_descale,
            max_seqlen_k=max_seqlen_k, window_left=window_left, num_splits=num_splits,
            defer_longer_sequences=True, interpreter=platform.interpreter_enabled(),
        )  # fmt: skip
        one_query, config = choose(max_seqlen_q=1), choose(max_seqlen_q=max_seqlen_q)
        if one_query_rows_apart(one_query, config):
            launch_rows(1, one_query, 0)
            launch_rows(max_seqlen_q, config, 2)
            return
    launch_rows(max_seqlen_q, config, 0)


def _paged_decode_fake(q, k, v, block_table, seqused_k, cu_seqlens_k, cu_seqlens_q, k_descale, v_descale, alibi_slopes,
      s_aux, out, lse, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap, num_splits,
      defer_longer_sequences, output_scale, q_descale) -> None:  # fmt: skip
    return None


# torch.ops.kvflash.paged_decode_attention (attn_common.ops: one C++ dispatch per eager call).
_PAGED_DECODE_OP = define_op(
    "paged_decode_attention", _paged_decode_impl, _paged_decode_fake, mutates_args=("out", "lse")
)


def _choose_config(
    q, k, block_table, cu_seqlens_k, cu_seqlens_q, k_descale, max_seqlen_q, max_seqlen_k, window_left, num_splits,
    defer_longer_sequences, interpreter,
) -> PagedDecodeLaunchConfig:  # fmt: skip
    """:func:`choose_paged_decode_config` for the op's normalised arguments."""
    num_kv_heads = k.shape[-2]
    return choose_paged_decode_config(
        num_seqs=block_table.shape[0] if block_table is not None else cu_seqlens_k.shape[0] - 1,
        num_kv_heads=num_kv_heads,
        group=q.shape[1] // num_kv_heads,
        head_size=q.shape[2],
        kv_itemsize=k.element_size(),
        max_seqlen_k=max_seqlen_k,
        window_left=window_left,
        num_splits=num_splits,
        multiprocessor_count=platform.multiprocessor_count(q.device),
        interpreter=interpreter,
        max_seqlen_q=max_seqlen_q if cu_seqlens_q is not None else 1,
        fill_rows=not defer_longer_sequences,
        per_token_scales=is_per_token_descale(k_descale),
    )


def launch_paged_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_table: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    k_descale: torch.Tensor,
    v_descale: torch.Tensor,
    alibi_slopes: torch.Tensor | None,
    s_aux: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    num_splits: int,
    defer_longer_sequences: bool,
    output_scale: torch.Tensor | None,
    q_descale: torch.Tensor | None = None,
    config: PagedDecodeLaunchConfig | None = None,
    min_queries: int = 0,
) -> None:
    """The keyword launches of a decode call on the op's normalised arguments: the decode kernel, then, when the
    keys are split, the n-way merge of the fp32 split partials into ``out`` and ``lse`` (sinks and the fp8 output
    applied there). ``config`` overrides :func:`choose_paged_decode_config` (the tuning sweeps pass it).
    ``min_queries`` (with ``defer_longer_sequences``): sequences with fewer queries are left alone too (another
    launch serves them)."""
    interpreter = platform.interpreter_enabled()
    cfg = config
    if cfg is None:
        cfg = _choose_config(
            q, k, block_table, cu_seqlens_k, cu_seqlens_q, k_descale, max_seqlen_q, max_seqlen_k, window_left,
            num_splits, defer_longer_sequences, interpreter,
        )  # fmt: skip
    if config is not None and is_per_token_descale(k_descale) and cfg.kv_heads not in (1, 2, 4):
        raise ValueError(f"config: per-token-head descales take 1, 2 or 4 KV heads per program, got {cfg.kv_heads}")
    if defer_longer_sequences and cfg.q_tokens != max_seqlen_q:
        raise ValueError(f"max_seqlen_q: {max_seqlen_q} queries do not fit one pass of the decode kernel")
    total_q, num_q_heads, head_size = q.shape
    is_paged = block_table is not None
    num_seqs = block_table.shape[0] if is_paged else cu_seqlens_k.shape[0] - 1
    num_kv_heads = k.shape[-2]
    kv_fp8 = k.dtype in FP8_TORCH_DTYPES  # the pair was validated by paged_decode_attention
    is_split = cfg.num_splits > 1
    # A mixed batch's partials hold its decode rows only: seq * q_tokens + token (its prefill chunks' tokens would
    # make them total_q rows long).
    rows_by_sequence = is_split and defer_longer_sequences
    if is_split:
        part_rows = num_seqs * cfg.q_tokens if rows_by_sequence else total_q
        part_out = empty_buffer((cfg.num_splits, part_rows, num_q_heads, head_size), torch.float32, q.device)
        # [num_splits, Hq, rows], a view of a [rows, Hq, num_splits] buffer: a row's split LSEs lie together for the
        # merge.
        part_lse = empty_buffer((part_rows, num_q_heads, cfg.num_splits), torch.float32, q.device).permute(2, 1, 0)
        dst_out, dst_lse = part_out, part_lse
        o_strides = part_out.stride()[:3]
        lse_strides = part_lse.stride()
    else:
        dst_out, dst_lse = out, lse
        out_strides = out.stride()
        o_strides = (0, out_strides[0], out_strides[1])
        lse_strides = (0,) + lse.stride()
    # o_strides: (split, token, head); lse_strides: (split, head, token).
    # Unused pointers get a valid tensor of the right kind; the constexpr flags keep them unread.
    # Stride tuples read once (each .stride(i) is a separate call into torch).
    k_strides = k.stride()[:3] if is_paged else (0,) + k.stride()[:2]
    v_strides = v.stride()[:3] if is_paged else (0,) + v.stride()[:2]
    q_strides = q.stride()
    kd_block, kd_seq, kd_head = descale_kernel_strides(k_descale)
    vd_block, vd_seq, vd_head = descale_kernel_strides(v_descale)
    alibi_strides = alibi_slopes.stride() if alibi_slopes is not None else (0, 0)
    index_dummy = seqused_k if seqused_k is not None else cu_seqlens_k
    grid = (num_seqs * triton.cdiv(num_kv_heads, cfg.kv_heads) * cfg.head_chunks, cfg.num_splits)
    kernel_left, kernel_right = kernel_window(window_left, window_right)
    if grid[0] > 0:
        launch(
            paged_decode_kernel,
            grid,
            interpreter,
            q_ptr=q,
            k_ptr=k,
            v_ptr=v,
            block_table_ptr=block_table if is_paged else index_dummy,
            seqused_k_ptr=index_dummy,
            cu_seqlens_k_ptr=index_dummy if is_paged else cu_seqlens_k,
            cu_seqlens_q_ptr=cu_seqlens_q if cu_seqlens_q is not None else index_dummy,
            k_descale_ptr=k_descale,
            v_descale_ptr=v_descale,
            alibi_slopes_ptr=alibi_slopes if alibi_slopes is not None else k_descale,
            sinks_ptr=s_aux if s_aux is not None else k_descale,
            output_scale_ptr=output_scale if output_scale is not None else k_descale,
            q_descale_ptr=q_descale if q_descale is not None else k_descale,
            out_ptr=dst_out,
            lse_ptr=dst_lse,
            num_kv_heads=num_kv_heads,
            num_splits=cfg.num_splits,
            total_q=total_q,
            kv_capacity=block_table.shape[1] * k.shape[1] if is_paged else k.shape[0],
            num_blocks=k.shape[0] if is_paged else 1,
            stride_q_token=q_strides[0],
            stride_q_head=q_strides[1],
            stride_k_block=k_strides[0],
            stride_k_token=k_strides[1],
            stride_k_head=k_strides[2],
            stride_v_block=v_strides[0],
            stride_v_token=v_strides[1],
            stride_v_head=v_strides[2],
            stride_bt_seq=block_table.stride(0) if is_paged else 0,
            stride_kd_seq=kd_seq,
            stride_kd_head=kd_head,
            stride_vd_seq=vd_seq,
            stride_vd_head=vd_head,
            stride_kd_block=kd_block,
            stride_vd_block=vd_block,
            stride_alibi_seq=alibi_strides[0],
            stride_alibi_head=alibi_strides[1],
            stride_qd_seq=q_descale.stride(-2) if q_descale is not None else 0,
            stride_qd_head=q_descale.stride(-1) if q_descale is not None else 0,
            stride_o_split=o_strides[0],
            stride_o_token=o_strides[1],
            stride_o_head=o_strides[2],
            stride_lse_split=lse_strides[0],
            stride_lse_token=lse_strides[2],
            stride_lse_head=lse_strides[1],
            softmax_scale=softmax_scale,
            softcap=softcap,
            window_left=kernel_left,
            window_right=kernel_right,
            GROUP=num_q_heads // num_kv_heads,
            KV_HEADS=cfg.kv_heads,
            HEAD_CHUNKS=cfg.head_chunks,
            H_ROWS=cfg.h_rows,
            Q_TOKENS=cfg.q_tokens,
            BLOCK_H=cfg.block_h,
            HEAD_SIZE=head_size,
            HEAD_PAD=cfg.head_pad,
            BLOCK_N=cfg.block_n,
            PAGE_SIZE=k.shape[1] if is_paged else 1,
            IS_PAGED=is_paged,
            USE_SEQUSED=seqused_k is not None,
            KV_FP8=kv_fp8,
            IS_SPLIT=is_split,
            PARTIAL_ROWS_BY_SEQUENCE=rows_by_sequence,
            USE_CU_SEQLENS_Q=cu_seqlens_q is not None,
            DEFER_LONGER_SEQUENCES=defer_longer_sequences,
            MIN_QUERIES=min_queries,
            ROW_MASK=cfg.q_tokens > 1,
            # The interpreter's bf16 tl.dot is wrong (docs/design.md, Tests): there, bf16 dots run in fp32.
            DOT_FP32=interpreter and not kv_fp8 and q.dtype == torch.bfloat16,
            USE_SOFTCAP=softcap > 0,
            USE_ALIBI=alibi_slopes is not None,
            USE_SINKS=s_aux is not None,
            FP8_V_FENCE=kv_fp8 and not interpreter and platform.compiles_to_ptx(q.device),
            V_HALVES=bool(cfg.v_halves),
            RUNTIME_QUERY_COUNT=bool(cfg.runtime_query_count),
            OUTPUT_FP8=output_scale is not None and not is_split,  # split partials stay fp32 for the merge
            ROUND_IN_SOFTWARE=interpreter,
            PER_TOKEN_SCALES=is_per_token_descale(k_descale),
            Q_FP8=q_descale is not None,
            Q_PER_TOKEN=q_descale is not None and q_descale.dim() == 3,
            LAUNCH_DEPENDENTS=is_split and platform.programmatic_launch_available(q.device),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    if is_split:
        launch_merge_partial_attentions(
            part_out, part_lse, out, lse, s_aux=s_aux, output_scale=output_scale,
            rows_by_sequence=(cu_seqlens_q, cfg.q_tokens, min_queries) if rows_by_sequence else None,
            after_partials_kernel=True,
        )  # fmt: skip


def _reference_decode(
    q, k, v, block_table, seqused_k, cu_seqlens_k, cu_seqlens_q, k_descale, v_descale, alibi_slopes, s_aux, out,
    lse, softmax_scale, window_left, window_right, softcap, output_scale, q_descale,
) -> None:  # fmt: skip
    """CPU tensors without the interpreter: the plain PyTorch reference (reads lengths on the host)."""
    num_seqs = q.shape[0]
    if cu_seqlens_q is None:
        cu_seqlens_q = torch.arange(num_seqs + 1, dtype=torch.int32, device=q.device)
    reference_attention_into(
        out, lse, q, k, v, cu_seqlens_q,
        block_table=block_table, seqused_k=seqused_k, cu_seqlens_k=cu_seqlens_k, softmax_scale=softmax_scale,
        window_size=(window_left, window_right), softcap=softcap, alibi_slopes=alibi_slopes, s_aux=s_aux,
        k_descale=k_descale, v_descale=v_descale, output_scale=output_scale, q_descale=q_descale,
    )  # fmt: skip

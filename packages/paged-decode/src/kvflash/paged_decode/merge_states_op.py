"""The LSE merges of partial attentions over disjoint key sets, and their custom ops.

- :func:`merge_attn_states` (vLLM's signature): two parts, a cached prefix and new tokens, say, in any model
  dtype; ``torch.ops.kvflash.merge_attn_states``, launched by :func:`launch_merge_attn_states`
  (``merge_states_kernel.py``).
- :func:`merge_partial_attentions`: ``W`` float32 parts at once, context-parallel shards, say;
  ``torch.ops.kvflash.merge_partial_attentions``, launched by :func:`launch_merge_partial_attentions`
  (``split_merge_kernel.py``, the n-way kernel that also merges decode's split-KV partials).

Both kernels take the weights, the merged LSE and the ``-inf`` handling from one jit helper,
:func:`kvflash.attn_common.jit_helpers.lse_merge_weights`. Each public function checks and allocates, then calls
its op; the op runs the launch (or, for CPU tensors without the interpreter, the same formula in PyTorch). No
tensor value is read on the host.
"""

import torch
import triton

from kvflash.attn_common import MODEL_TORCH_DTYPES, check_tensor, platform
from kvflash.attn_common.call_plan import empty_buffer, planned
from kvflash.attn_common.launch import launch
from kvflash.attn_common.ops import define_op
from kvflash.paged_decode.merge_states_kernel import merge_states_kernel
from kvflash.paged_decode.split_merge_kernel import split_merge_kernel

__all__ = [
    "merge_attn_states",
    "merge_partial_attentions",
    "launch_merge_attn_states",
    "launch_merge_partial_attentions",
]

# merge_attn_states: elements of one [BLOCK_HQ, HEAD_PAD] tile per program: a few KiB in flight, few registers.
MERGE_STATES_TILE_ELEMENTS = 2048
# The n-way merge: partial-output elements loaded per step: all parts at once up to 64 x 128, so the merge of a
# long single sequence's splits (few programs, many splits) is not a chain of dependent loads.
MERGE_TILE_ELEMENTS = 8192
# Programs the n-way merge aims for per SM: when the rows alone give fewer, each row's head columns are sliced
# (down to MIN_MERGE_BLOCK_D columns) across programs. 1 x 131072 decode: 32 rows of 256 splits.
MERGE_PROGRAMS_PER_SM = 4
MIN_MERGE_BLOCK_D = 16
# Warps per n-way merge program: one per this many elements of its step's [SPLIT_CHUNK, BLOCK_D] tile, 1 to 4. A split
# decode's merge starts while the decode programs still hold the SMs; small programs can all fit beside them (the
# likely reason for the gain, not profiled). H200, e4m3 decode (4 splits: 2048 programs of a [4, 128] tile), op time
# with the merge at 4 / 2 / 1 warps: 64 x 4096 0.1465 / 0.1423 / 0.1415 ms; 4 x 32768 (a [64, 16] tile) 0.0788 /
# 0.0785 / 0.0783 ms; 1 x 131072 (a [256, 16] tile, 4 warps) 0.0782 / 0.0785 / 0.0787 ms; 128 x 8192 within noise.
MERGE_ELEMENTS_PER_WARP = 1024


@planned
def merge_attn_states(
    prefix_out: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_out: torch.Tensor,
    suffix_lse: torch.Tensor,
    out: torch.Tensor | None = None,
    out_lse: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions by their LSE.

    With ``M = max(lse_p, lse_s)``: ``out = (exp(lse_p - M) out_p + exp(lse_s - M) out_s) / Z`` with
    ``Z = exp(lse_p - M) + exp(lse_s - M)``, and ``out_lse = M + log Z``. A part with ``lse = -inf``
    (no keys; ``+inf`` is read the same way) has no weight and its output is ignored; both empty gives
    ``out = 0`` and ``out_lse = -inf``.

    Parameters
    ----------
    prefix_out, suffix_out : torch.Tensor
        ``[T, Hq, D]`` fp16/bf16/fp32, each normalised by its own softmax denominator; ``stride(-1) == 1``.
    prefix_lse, suffix_lse : torch.Tensor
        ``[Hq, T]`` float32, natural log (any strides).
    out : torch.Tensor, optional
        ``[T, Hq, D]`` fp16/bf16/fp32 output buffer; by default a new tensor in ``prefix_out``'s dtype.
    out_lse : torch.Tensor, optional
        ``[Hq, T]`` float32; written when given.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        ``out``, or ``(out, out_lse)`` when ``out_lse`` is given.
    """
    check_tensor("prefix_out", prefix_out, dtypes=MODEL_TORCH_DTYPES, ndim=3)
    num_tokens, num_q_heads, _ = prefix_out.shape
    device = prefix_out.device
    shape = tuple(prefix_out.shape)
    lse_shape = (num_q_heads, num_tokens)
    check_tensor("suffix_out", suffix_out, dtypes=MODEL_TORCH_DTYPES, shape=shape, device=device)
    for name, t in (("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse)):
        check_tensor(name, t, dtypes=(torch.float32,), shape=lse_shape, device=device, last_dim_contiguous=False)
    out = _merged_out(out, out_lse, shape, lse_shape, prefix_out.dtype, device)
    _MERGE_ATTN_STATES_OP(prefix_out, prefix_lse, suffix_out, suffix_lse, out, out_lse)
    return out if out_lse is None else (out, out_lse)


def _merge_attn_states_impl(
    prefix_out: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_out: torch.Tensor,
    suffix_lse: torch.Tensor,
    out: torch.Tensor,
    out_lse: torch.Tensor | None,
) -> None:
    """The op on checked arguments."""
    if not platform.runs_triton(out.device):
        # +inf marks an empty part too (some FlashAttention builds): -inf for the formula.
        lses = torch.stack([prefix_lse.float(), suffix_lse.float()])
        outs = torch.stack([prefix_out.float(), suffix_out.float()])
        _merge_by_lse_torch(outs, lses.masked_fill(lses == float("inf"), float("-inf")), out, out_lse)
        return
    launch_merge_attn_states(prefix_out, prefix_lse, suffix_out, suffix_lse, out, out_lse)


def _merge_attn_states_fake(prefix_out, prefix_lse, suffix_out, suffix_lse, out, out_lse) -> None:
    return None


# torch.ops.kvflash.merge_attn_states (attn_common.ops: one C++ dispatch per eager call).
_MERGE_ATTN_STATES_OP = define_op(
    "merge_attn_states", _merge_attn_states_impl, _merge_attn_states_fake, mutates_args=("out", "out_lse")
)


def launch_merge_attn_states(
    prefix_out: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_out: torch.Tensor,
    suffix_lse: torch.Tensor,
    out: torch.Tensor,
    out_lse: torch.Tensor | None,
) -> None:
    """The keyword launch of ``merge_states_kernel`` on checked arguments: one program per (token, block of
    ``BLOCK_HQ`` query heads)."""
    num_tokens, num_q_heads, head_size = out.shape
    if num_tokens == 0 or num_q_heads == 0:
        return
    head_pad = max(16, triton.next_power_of_2(head_size))
    block_hq = max(1, min(triton.next_power_of_2(num_q_heads), MERGE_STATES_TILE_ELEMENTS // head_pad))
    lse_out = out_lse if out_lse is not None else prefix_lse  # unread without WRITE_LSE
    launch(
        merge_states_kernel,
        (num_tokens, triton.cdiv(num_q_heads, block_hq)),
        platform.interpreter_enabled(),
        prefix_out_ptr=prefix_out,
        prefix_lse_ptr=prefix_lse,
        suffix_out_ptr=suffix_out,
        suffix_lse_ptr=suffix_lse,
        out_ptr=out,
        out_lse_ptr=lse_out,
        num_q_heads=num_q_heads,
        stride_p_token=prefix_out.stride(0),
        stride_p_head=prefix_out.stride(1),
        stride_plse_head=prefix_lse.stride(0),
        stride_plse_token=prefix_lse.stride(1),
        stride_s_token=suffix_out.stride(0),
        stride_s_head=suffix_out.stride(1),
        stride_slse_head=suffix_lse.stride(0),
        stride_slse_token=suffix_lse.stride(1),
        stride_o_token=out.stride(0),
        stride_o_head=out.stride(1),
        stride_olse_head=lse_out.stride(0),
        stride_olse_token=lse_out.stride(1),
        HEAD_SIZE=head_size,
        HEAD_PAD=head_pad,
        BLOCK_HQ=block_hq,
        WRITE_LSE=out_lse is not None,
        num_warps=4,
    )


@planned
def merge_partial_attentions(
    outs: torch.Tensor,
    lses: torch.Tensor,
    out: torch.Tensor | None = None,
    out_lse: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Merge ``W`` partial attentions over disjoint key sets by their LSE, in one launch.

    With ``M = max_i lse_i``: ``out = sum_i exp(lse_i - M) out_i / Z`` with ``Z = sum_i exp(lse_i - M)``, and
    ``out_lse = M + log Z``. A part with ``lse = -inf`` (no keys) has no weight and its output is not read (it may
    hold anything, NaN included); a row empty in every part gives ``out = 0`` and ``out_lse = -inf``.

    Parameters
    ----------
    outs : torch.Tensor
        ``[W, T, Hq, D]`` float32, ``W >= 1``, each part normalised by its own softmax denominator;
        ``stride(-1) == 1``.
    lses : torch.Tensor
        ``[W, Hq, T]`` float32, natural log (any strides).
    out : torch.Tensor, optional
        ``[T, Hq, D]`` fp16/bf16/fp32 (``stride(-1) == 1``); by default a new float32 tensor.
    out_lse : torch.Tensor, optional
        ``[Hq, T]`` float32 (any strides); written when given.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        ``out``, or ``(out, out_lse)`` when ``out_lse`` is given.
    """
    check_tensor("outs", outs, dtypes=(torch.float32,), ndim=4)
    num_parts, num_tokens, num_q_heads, head_size = outs.shape
    if num_parts < 1:
        raise ValueError(f"outs: expected at least one part (shape [W, T, Hq, D], W >= 1), got {tuple(outs.shape)}")
    device = outs.device
    shape = (num_tokens, num_q_heads, head_size)
    lse_shape = (num_q_heads, num_tokens)
    check_tensor("lses", lses, dtypes=(torch.float32,), shape=(num_parts, *lse_shape), device=device,
                 last_dim_contiguous=False)  # fmt: skip
    out = _merged_out(out, out_lse, shape, lse_shape, torch.float32, device)
    _MERGE_PARTIAL_ATTENTIONS_OP(outs, lses, out, out_lse)
    return out if out_lse is None else (out, out_lse)


def _merge_partial_attentions_impl(
    outs: torch.Tensor, lses: torch.Tensor, out: torch.Tensor, out_lse: torch.Tensor | None
) -> None:
    """The op on checked arguments."""
    if not platform.runs_triton(out.device):
        _merge_by_lse_torch(outs, lses, out, out_lse)
        return
    launch_merge_partial_attentions(outs, lses, out, out_lse)


def _merge_partial_attentions_fake(outs, lses, out, out_lse) -> None:
    return None


# torch.ops.kvflash.merge_partial_attentions (attn_common.ops: one C++ dispatch per eager call).
_MERGE_PARTIAL_ATTENTIONS_OP = define_op(
    "merge_partial_attentions",
    _merge_partial_attentions_impl,
    _merge_partial_attentions_fake,
    mutates_args=("out", "out_lse"),
)


_PDL_LAUNCH = {"launch_pdl": True}  # the launch option (only passed where the platform has it)


def launch_merge_partial_attentions(
    outs: torch.Tensor,
    lses: torch.Tensor,
    out: torch.Tensor,
    out_lse: torch.Tensor | None,
    *,
    s_aux: torch.Tensor | None = None,
    output_scale: torch.Tensor | None = None,
    rows_by_sequence: tuple[torch.Tensor, int, int] | None = None,
    after_partials_kernel: bool = False,
) -> None:
    """The keyword launch of the n-way merge kernel (``split_merge_kernel``): one program per (part row, query
    head, slice of head columns); the columns are sliced only when the rows alone leave SMs idle.

    ``outs [W, T, Hq, D]`` float32 and ``lses [W, Hq, T]`` float32 with any strides (``stride(-1) == 1`` for the
    outputs), ``out [T, Hq, D]`` in a model dtype, or ``float8_e4m3fn`` with ``output_scale`` (``[1]`` float32:
    ``out = saturate(merged / output_scale)``), ``out_lse [Hq, T]`` float32 or ``None``. ``s_aux [Hq]`` float32
    sink logits are counted once in the merged denominator. ``rows_by_sequence = (cu_seqlens_q, n, min_q)``:
    part row ``r`` is token ``r % n`` of sequence ``r // n`` (``outs [W, num_seqs * n, Hq, D]``), merged into ``out``
    row ``cu_seqlens_q[seq] + token``, for sequences of ``min_q`` to ``n`` queries only (a mixed batch's decode rows,
    or some of them; the other rows of ``out`` and ``out_lse`` are left alone). Used by
    :func:`merge_partial_attentions` and by decode's split-KV (:func:`kvflash.paged_decode.op.launch_paged_decode`).
    ``after_partials_kernel``: the kernel launched just before this one wrote ``outs`` and ``lses`` and let
    dependents launch early; where the platform has programmatic dependent launch the merge then starts as that
    kernel finishes and waits for its writes on the device.
    """
    num_splits, num_tokens, num_q_heads, head_size = outs.shape
    if num_tokens == 0 or num_q_heads == 0:
        return
    head_pad = max(16, triton.next_power_of_2(head_size))
    splits_pad = max(2, triton.next_power_of_2(num_splits))
    interpreter = platform.interpreter_enabled()
    rows = num_tokens * num_q_heads
    wanted = MERGE_PROGRAMS_PER_SM * platform.multiprocessor_count(out.device)
    # head_pad is a power of two >= 16, so the slices are too and block_d >= MIN_MERGE_BLOCK_D
    slices = 1
    if rows < wanted:
        slices = min(head_pad // MIN_MERGE_BLOCK_D, triton.next_power_of_2(triton.cdiv(wanted, rows)))
    block_d = head_pad // slices
    split_chunk = max(1, min(splits_pad, MERGE_TILE_ELEMENTS // block_d))
    num_warps = min(4, max(1, split_chunk * block_d // MERGE_ELEMENTS_PER_WARP))
    lse_out = out_lse if out_lse is not None else lses  # unread without WRITE_LSE
    pdl = after_partials_kernel and platform.programmatic_launch_available(out.device)
    outs_strides, lses_strides = outs.stride(), lses.stride()
    out_strides, lse_out_strides = out.stride(), lse_out.stride()
    launch(
        split_merge_kernel,
        (num_tokens, num_q_heads, slices),
        interpreter,
        outs_ptr=outs,
        lses_ptr=lses,
        sinks_ptr=s_aux if s_aux is not None else lses,
        output_scale_ptr=output_scale if output_scale is not None else lses,
        out_ptr=out,
        lse_ptr=lse_out,
        cu_seqlens_q_ptr=rows_by_sequence[0] if rows_by_sequence is not None else lses,
        total_q=out.shape[0],
        num_splits=num_splits,
        stride_outs_split=outs_strides[0],
        stride_outs_token=outs_strides[1],
        stride_outs_head=outs_strides[2],
        stride_lses_split=lses_strides[0],
        stride_lses_token=lses_strides[2],
        stride_lses_head=lses_strides[1],
        stride_o_token=out_strides[0],
        stride_o_head=out_strides[1],
        stride_lse_token=lse_out_strides[-1],
        stride_lse_head=lse_out_strides[-2],
        HEAD_SIZE=head_size,
        BLOCK_D=block_d,
        SPLITS_PAD=splits_pad,
        SPLIT_CHUNK=split_chunk,
        USE_SINKS=s_aux is not None,
        WRITE_LSE=out_lse is not None,
        OUTPUT_FP8=output_scale is not None,
        ROUND_IN_SOFTWARE=interpreter,
        SEQUENCE_ROWS=rows_by_sequence[1] if rows_by_sequence is not None else 0,
        MIN_QUERIES=rows_by_sequence[2] if rows_by_sequence is not None else 0,
        WAIT_FOR_PRIOR_GRID=pdl,
        num_warps=num_warps,
        **_PDL_LAUNCH if pdl else {},
    )


def _merged_out(
    out: torch.Tensor | None,
    out_lse: torch.Tensor | None,
    shape: tuple[int, int, int],
    lse_shape: tuple[int, int],
    default_dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Check the caller's ``out [T, Hq, D]`` (fp16/bf16/fp32) and ``out_lse [Hq, T]`` (fp32), or allocate ``out``
    in ``default_dtype``: the output side of both merges."""
    if out is None:
        out = empty_buffer(shape, default_dtype, device)
    else:
        check_tensor("out", out, dtypes=MODEL_TORCH_DTYPES, shape=shape, device=device)
    if out_lse is not None:
        check_tensor("out_lse", out_lse, dtypes=(torch.float32,), shape=lse_shape, device=device,
                     last_dim_contiguous=False)  # fmt: skip
    return out


def _merge_by_lse_torch(
    outs: torch.Tensor, lses: torch.Tensor, out: torch.Tensor, out_lse: torch.Tensor | None
) -> None:
    """The LSE merge in PyTorch (float32), for CPU tensors without the interpreter: ``outs [W, T, Hq, D]``,
    ``lses [W, Hq, T]`` (``-inf``: an empty part, whose output is ignored)."""
    lses = lses.float()
    m = lses.amax(0)
    m_safe = m.masked_fill(m == float("-inf"), 0.0)
    weights = torch.exp(lses - m_safe)
    denom = weights.sum(0)
    denom_safe = denom.masked_fill(denom == 0, 1.0)
    parts = outs.float().masked_fill((lses == float("-inf")).transpose(1, 2)[..., None], 0.0)
    out.copy_((parts * (weights / denom_safe).transpose(1, 2)[..., None]).sum(0))
    if out_lse is not None:
        out_lse.copy_(torch.where(denom == 0, float("-inf"), m_safe + torch.log(denom_safe)))

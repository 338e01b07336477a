"""``merge_attn_states``: combine two partial attentions over disjoint key sets (e.g. a cached prefix and
new tokens, or two context-parallel shards) by their log-sum-exp.

The public function checks the arguments and calls the ``kvflash::merge_attn_states`` custom op, which
launches the Triton kernel (or, for CPU tensors without the interpreter, the same formula in PyTorch).
"""

import torch

from kvflash.attn_common import check_tensor, platform
from kvflash.attn_common.call_plan import empty_buffer, planned
from kvflash.attn_common.intmath import cdiv, next_power_of_2
from kvflash.attn_common.launch import launch
from kvflash.attn_common.ops import define_op
from kvflash.paged_decode.merge_states_kernel import merge_states_kernel

__all__ = ["merge_attn_states"]

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements of one [BLOCK_HQ, HEAD_PAD] tile per program: a few KiB in flight, few registers.
_TILE_ELEMENTS = 2048


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
    check_tensor("prefix_out", prefix_out, dtypes=_OUT_DTYPES, ndim=3)
    num_tokens, num_q_heads, _ = prefix_out.shape
    device = prefix_out.device
    shape = tuple(prefix_out.shape)
    lse_shape = (num_q_heads, num_tokens)
    check_tensor("suffix_out", suffix_out, dtypes=_OUT_DTYPES, shape=shape, device=device)
    for name, t in (("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse)):
        check_tensor(name, t, dtypes=(torch.float32,), shape=lse_shape, device=device, last_dim_contiguous=False)
    if out is None:
        out = empty_buffer(shape, prefix_out.dtype, device)
    else:
        check_tensor("out", out, dtypes=_OUT_DTYPES, shape=shape, device=device)
    if out_lse is not None:
        check_tensor("out_lse", out_lse, dtypes=(torch.float32,), shape=lse_shape, device=device,
                     last_dim_contiguous=False)  # fmt: skip
    _MERGE_ATTN_STATES_OP(prefix_out, prefix_lse, suffix_out, suffix_lse, out, out_lse)
    return out if out_lse is None else (out, out_lse)


def _merge_attn_states_op(
    prefix_out: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_out: torch.Tensor,
    suffix_lse: torch.Tensor,
    out: torch.Tensor,
    out_lse: torch.Tensor | None,
) -> None:
    """The op on checked arguments."""
    interpreter = platform.interpreter_enabled()
    if not platform.runs_triton(out.device, interpreter):
        _merge_torch(prefix_out, prefix_lse, suffix_out, suffix_lse, out, out_lse)
        return
    num_tokens, num_q_heads, head_size = out.shape
    if num_tokens == 0 or num_q_heads == 0:
        return
    head_pad = max(16, next_power_of_2(head_size))
    block_hq = max(1, min(next_power_of_2(num_q_heads), _TILE_ELEMENTS // head_pad))
    lse_out = out_lse if out_lse is not None else prefix_lse
    grid = (num_tokens, cdiv(num_q_heads, block_hq))
    launch(
        merge_states_kernel,
        grid,
        interpreter,
        prefix_out_ptr=prefix_out,
        prefix_lse_ptr=prefix_lse,
        suffix_out_ptr=suffix_out,
        suffix_lse_ptr=suffix_lse,
        out_ptr=out,
        out_lse_ptr=lse_out,
        num_q_heads=num_q_heads,
        stride_p_tok=prefix_out.stride(0),
        stride_p_head=prefix_out.stride(1),
        stride_plse_head=prefix_lse.stride(0),
        stride_plse_tok=prefix_lse.stride(1),
        stride_s_tok=suffix_out.stride(0),
        stride_s_head=suffix_out.stride(1),
        stride_slse_head=suffix_lse.stride(0),
        stride_slse_tok=suffix_lse.stride(1),
        stride_o_tok=out.stride(0),
        stride_o_head=out.stride(1),
        stride_olse_head=lse_out.stride(0),
        stride_olse_tok=lse_out.stride(1),
        HEAD_SIZE=head_size,
        HEAD_PAD=head_pad,
        BLOCK_HQ=block_hq,
        WRITE_LSE=out_lse is not None,
        num_warps=4,
    )


def _merge_attn_states_fake(prefix_out, prefix_lse, suffix_out, suffix_lse, out, out_lse) -> None:
    return None


# torch.ops.kvflash.merge_attn_states (attn_common.ops: one C++ dispatch per eager call).
_MERGE_ATTN_STATES_OP = define_op(
    "merge_attn_states", _merge_attn_states_op, _merge_attn_states_fake, mutates_args=("out", "out_lse")
)


def _merge_torch(prefix_out, prefix_lse, suffix_out, suffix_lse, out, out_lse) -> None:
    """The merge formula in PyTorch (float32), for CPU tensors without the interpreter."""
    lse_p = prefix_lse.float().masked_fill(prefix_lse == float("inf"), float("-inf"))
    lse_s = suffix_lse.float().masked_fill(suffix_lse == float("inf"), float("-inf"))
    m = torch.maximum(lse_p, lse_s)
    m_safe = m.masked_fill(m == float("-inf"), 0.0)
    w_p, w_s = torch.exp(lse_p - m_safe), torch.exp(lse_s - m_safe)
    denom = w_p + w_s
    denom_safe = denom.masked_fill(denom == 0, 1.0)
    out_p = prefix_out.float().masked_fill((lse_p == float("-inf")).t()[:, :, None], 0.0)
    out_s = suffix_out.float().masked_fill((lse_s == float("-inf")).t()[:, :, None], 0.0)
    merged = (out_p * (w_p / denom_safe).t()[:, :, None]) + (out_s * (w_s / denom_safe).t()[:, :, None])
    out.copy_(merged)
    if out_lse is not None:
        out_lse.copy_(torch.where(denom == 0, float("-inf"), m_safe + torch.log(denom_safe)))

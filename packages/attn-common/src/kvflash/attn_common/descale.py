"""Descale normalisation: every accepted form of ``k_descale`` / ``v_descale`` becomes one float32
``[num_seqs, Hkv]`` tensor that the kernels index as ``ptr + seq * stride_seq + kv_head * stride_head``.

Accepted forms: ``None`` (1.0), a Python float, or a float32/fp16/bf16 tensor broadcastable to
``[num_seqs, Hkv]``: one element, ``[Hkv]``, ``[1, Hkv]``, ``[num_seqs, 1]``, ``[num_seqs, Hkv]``, and
expanded stride-0 views of those. A float32 tensor is returned as a view (stride 0 on broadcast axes):
no copy, and no host synchronisation ever (values are never read on the host).

Per-token-head descales (:func:`normalize_kv_descales`): one float32 scale per stored (token, KV head), indexed
like the cache. Paged: ``[num_blocks, block_size, Hkv]`` (rank 3, unambiguous: no per-sequence form has rank 3).
Contiguous: ``[total_k, Hkv]``, which reads like ``[num_seqs, Hkv]`` when the two counts are equal, so that form
needs ``kv_descale_per_token=True``. The normalised per-token form is always rank 3 (contiguous: a
``[1, total_k, Hkv]`` view) and the per-sequence form always rank 2, so an op tells them apart by ``dim()``.
"""

from __future__ import annotations

import math

import torch

from kvflash.attn_common.call_plan import keep_constant
from kvflash.attn_common.dtypes import SCALE_TORCH_DTYPES
from kvflash.attn_common.platform import stream_capturing

__all__ = [
    "normalize_descale",
    "normalize_q_descale",
    "normalize_kv_descales",
    "is_per_token_descale",
    "descale_kernel_strides",
]


def normalize_descale(
    name: str,
    descale: torch.Tensor | float | None,
    num_seqs: int,
    num_kv_heads: int,
    device: torch.device,
) -> torch.Tensor:
    """Return ``descale`` as a float32 ``[num_seqs, num_kv_heads]`` tensor (possibly a stride-0 view).

    Parameters
    ----------
    name : str
        ``"k_descale"`` or ``"v_descale"``, for error messages.
    descale : None, float or torch.Tensor
        The real value of a stored cache element is ``stored * descale``.
    num_seqs, num_kv_heads : int
        The broadcast target ``[num_seqs, Hkv]``.
    device : torch.device
        The query's device; tensors must already live there.

    Raises
    ------
    TypeError
        For a non-float, non-tensor value or a tensor of another dtype.
    ValueError
        For a Python number that is not finite and positive, a shape not broadcastable to ``[num_seqs, Hkv]``,
        or a tensor on another device.
    """
    if descale is None or isinstance(descale, (int, float)) and not isinstance(descale, bool):
        value = 1.0 if descale is None else float(descale)
        # A Python number is checked here for free (a tensor's values are not read: that would synchronise).
        # Zero, negative, NaN or infinite scales are mistakes the cache writer rejects too.
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: expected a finite positive float (or a tensor), got {descale!r}")
        return _constant_scale(value, device).expand(num_seqs, num_kv_heads)
    if not isinstance(descale, torch.Tensor):
        raise TypeError(f"{name}: expected None, a float or a tensor, got {type(descale).__name__}")
    if descale.dtype not in SCALE_TORCH_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {descale.dtype}")
    if descale.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the query's device), got one on {descale.device}")
    target = (num_seqs, num_kv_heads)
    shape = tuple(descale.shape)
    if descale.numel() == 1:
        scale_2d = descale.reshape(1, 1)
    elif descale.dim() <= 2 and _broadcasts(shape, target):
        scale_2d = descale if descale.dim() == 2 else descale.reshape(1, -1)
    else:
        raise ValueError(
            f"{name}: expected 1 element, [Hkv]=[{num_kv_heads}] or a shape broadcastable to "
            f"[num_seqs, Hkv]=[{num_seqs}, {num_kv_heads}], got shape {list(shape)}"
        )
    if scale_2d.dtype != torch.float32:
        scale_2d = scale_2d.float()
    return scale_2d.expand(num_seqs, num_kv_heads)


# (value, device) -> a [1, 1] float32 tensor holding it. A scale given as None or a float would otherwise cost a
# tensor allocation and a fill kernel in every call (~5 µs of host time on a GPU, and one more launch). The
# tensors are never written and never freed (a captured CUDA graph may hold their address), so the number of
# distinct values kept is bounded; past it, new values get a fresh tensor per call as before.
_CONSTANT_SCALES: dict[tuple[float, torch.device], torch.Tensor] = {}
_MAX_CONSTANT_SCALES = 256


def _constant_scale(value: float, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced: a fresh constant in the graph, no module state captured
        return torch.full((1, 1), value, dtype=torch.float32, device=device)
    key = (value, device)
    found = _CONSTANT_SCALES.get(key)
    if found is None:
        if stream_capturing(device):  # filled by the graph's replay only: never kept for eager calls
            return torch.full((1, 1), value, dtype=torch.float32, device=device)
        with torch.inference_mode(False), torch.no_grad():  # usable inside and outside inference mode
            found = torch.full((1, 1), value, dtype=torch.float32, device=device)
        if len(_CONSTANT_SCALES) < _MAX_CONSTANT_SCALES:
            _CONSTANT_SCALES[key] = keep_constant(found)
    return found


def _broadcasts(shape: tuple[int, ...], target: tuple[int, int]) -> bool:
    padded = (1,) * (2 - len(shape)) + shape
    return all(s in (1, t) for s, t in zip(padded, target))


def normalize_q_descale(
    q_descale: torch.Tensor | float | None,
    *,
    q: torch.Tensor,
    num_seqs: int,
    num_kv_heads: int,
    per_token: bool | None,
) -> torch.Tensor:
    """An fp8 query's descale, normalised: a float32 ``[num_seqs, Hkv]`` view (the forms of :func:`normalize_descale`),
    or, with ``per_token=True``, the per-(token, query head) form ``[total_q, Hq]`` float32 as a ``[1, total_q, Hq]``
    view (rank 3, so the ops tell the modes apart by ``dim()``; a ``[total_q, Hq]`` tensor would read like
    ``[num_seqs, Hkv]`` when the counts are equal, hence the explicit mode). ``TypeError`` / ``ValueError`` naming
    ``q_descale`` or ``q_descale_per_token``."""
    if per_token is not None and not isinstance(per_token, bool):
        raise TypeError(f"q_descale_per_token: expected None, True or False, got {type(per_token).__name__}")
    if not per_token:
        return normalize_descale("q_descale", q_descale, num_seqs, num_kv_heads, q.device)
    expected = (q.shape[0], q.shape[1])
    form = f"[total_q, Hq]={list(expected)}"
    if not isinstance(q_descale, torch.Tensor):
        raise TypeError(
            f"q_descale: q_descale_per_token=True needs a float32 tensor {form}, got {type(q_descale).__name__}"
        )
    _check_per_token_tensor("q_descale", q_descale, expected, form, q.device)
    return q_descale.unsqueeze(0)


def _check_per_token_tensor(
    name: str, descale: torch.Tensor, expected: tuple[int, ...], form: str, device: torch.device
) -> None:
    """A per-token-head descale tensor (K, V or the query's): float32, on the query's ``device``, shape ``expected``
    (``form`` spells it for the message)."""
    if descale.dtype != torch.float32:
        raise TypeError(f"{name}: per-token-head descales must be float32 {form}, got dtype {descale.dtype}")
    if descale.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the query's device), got one on {descale.device}")
    if tuple(descale.shape) != expected:
        raise ValueError(f"{name}: per-token-head descales must have shape {form}, got {list(descale.shape)}")


def descale_kernel_strides(descale: torch.Tensor) -> tuple[int, int, int]:
    """``(block, seq, head)`` strides the kernels index a *normalised* descale with: ``[num_seqs, Hkv]`` gives
    ``(0, seq, head)``; the per-token-head ``[num_blocks, block_size, Hkv]`` (or ``[1, total_k, Hkv]``) form gives
    its page, token and head strides (the token stride in the ``seq`` slot)."""
    strides = descale.stride()
    return (strides[0], strides[1], strides[2]) if descale.dim() == 3 else (0, strides[0], strides[1])


def is_per_token_descale(descale: torch.Tensor) -> bool:
    """Whether a *normalised* descale (from :func:`normalize_kv_descales`) is the per-token-head form (rank 3)."""
    return descale.dim() == 3


def normalize_kv_descales(
    k_descale: torch.Tensor | float | None,
    v_descale: torch.Tensor | float | None,
    *,
    k: torch.Tensor,
    is_paged: bool,
    kv_is_fp8: bool,
    num_seqs: int,
    num_kv_heads: int,
    device: torch.device,
    kv_descale_per_token: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise both descales and decide the descale mode (the returned rank tells it: 3 is per-token-head).

    Parameters
    ----------
    k_descale, v_descale : None, float or torch.Tensor
        Per-(sequence, KV head) forms (see :func:`normalize_descale`), or per-token-head tensors: float32
        ``[num_blocks, block_size, Hkv]`` for a paged ``k [num_blocks, block_size, Hkv, D]``, float32
        ``[total_k, Hkv]`` for a contiguous ``k [total_k, Hkv, D]``. Any strides. K and V take the same mode.
    k : torch.Tensor
        The (validated) key cache: its leading dims size the per-token form.
    is_paged, kv_is_fp8 : bool
        The cache's layout and whether it is FP8 (per-token-head descales need an FP8 cache).
    num_seqs, num_kv_heads : int
        The per-sequence broadcast target ``[num_seqs, Hkv]``.
    device : torch.device
        The query's device.
    kv_descale_per_token : bool, optional
        ``None``: per-token-head iff a paged descale has rank 3 (a contiguous cache then takes the
        per-sequence forms only); ``True``: both descales must be per-token-head tensors (the only way to pass
        the contiguous ``[total_k, Hkv]`` form); ``False``: per-sequence forms only.

    Returns
    -------
    (k_descale, v_descale)
        float32 ``[num_seqs, Hkv]`` views, or (per-token-head) ``[num_blocks, block_size, Hkv]`` /
        ``[1, total_k, Hkv]`` views of the given tensors (never copied).

    Raises
    ------
    TypeError
        ``kv_descale_per_token`` not None or a bool; a per-token-head descale that is not a float32 tensor.
    ValueError
        Naming the argument: a per-token-head shape that does not match the cache, rank 3 under
        ``kv_descale_per_token=False``, only one of the two descales per-token-head, per-token-head descales
        over a non-FP8 cache, a contiguous ``[total_k, Hkv]`` tensor without ``kv_descale_per_token=True``.
    """
    if kv_descale_per_token is not None and not isinstance(kv_descale_per_token, bool):
        raise TypeError(
            f"kv_descale_per_token: expected None, True or False, got {type(kv_descale_per_token).__name__}"
        )
    rank3 = [
        name for name, d in (("k_descale", k_descale), ("v_descale", v_descale))
        if isinstance(d, torch.Tensor) and d.dim() == 3
    ]  # fmt: skip
    if kv_descale_per_token is None:
        per_token = is_paged and bool(rank3)
    else:
        per_token = kv_descale_per_token
    if not per_token:
        if rank3:
            raise ValueError(
                f"{rank3[0]}: a rank-3 descale is per-token-head ([num_blocks, block_size, Hkv] over a paged "
                f"cache); kv_descale_per_token=False asks for a per-(sequence, KV head) form"
            )
        if not is_paged:
            total_k = k.shape[0]
            for name, d in (("k_descale", k_descale), ("v_descale", v_descale)):
                if (
                    isinstance(d, torch.Tensor) and d.dim() == 2 and total_k != num_seqs
                    and tuple(d.shape) == (total_k, num_kv_heads)
                ):  # fmt: skip
                    raise ValueError(
                        f"{name}: shape [total_k, Hkv]=[{total_k}, {num_kv_heads}] is not broadcastable to "
                        f"[num_seqs, Hkv]=[{num_seqs}, {num_kv_heads}]; for per-token-head descales over a "
                        "contiguous cache pass kv_descale_per_token=True"
                    )
        return (
            normalize_descale("k_descale", k_descale, num_seqs, num_kv_heads, device),
            normalize_descale("v_descale", v_descale, num_seqs, num_kv_heads, device),
        )
    if is_paged:
        expected = (k.shape[0], k.shape[1], num_kv_heads)
        form = f"[num_blocks, block_size, Hkv]={list(expected)}"
    else:
        expected = (k.shape[0], num_kv_heads)
        form = f"[total_k, Hkv]={list(expected)}"
    result = []
    for name, d in (("k_descale", k_descale), ("v_descale", v_descale)):
        if not isinstance(d, torch.Tensor):
            other = rank3[0] if rank3 else "kv_descale_per_token=True"
            raise TypeError(
                f"{name}: per-token-head descales ({other}) need a float32 tensor {form} for K and for V, "
                f"got {type(d).__name__}"
            )
        _check_per_token_tensor(name, d, expected, form, device)
        result.append(d if is_paged else d.unsqueeze(0))
    if not kv_is_fp8:
        raise ValueError(
            f"k_descale: per-token-head descales need an FP8 cache (float8_e4m3fn / float8_e5m2), got k of dtype "
            f"{k.dtype}"
        )
    return result[0], result[1]

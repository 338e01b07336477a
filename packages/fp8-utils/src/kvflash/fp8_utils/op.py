"""``reshape_and_cache_flash`` and its custom ops: write new keys and values into the paged KV cache, quantising
to FP8.

One flow (docs/house_style.md): :func:`reshape_and_cache_flash` checks every argument (shapes, dtypes, devices
only: no tensor value is read on the host, so the call is CUDA-graph capturable), then calls the custom op
``torch.ops.kvflash.reshape_and_cache_flash`` (``..._per_token_head`` for per-token-head strings); the op chooses
the launch settings and launches :func:`~kvflash.fp8_utils.kernel.reshape_and_cache_kernel` through
:func:`launch_reshape_and_cache`. CPU tensors with the Triton interpreter off take a plain PyTorch path with the
same results.
"""

from __future__ import annotations

import math

import torch
import triton

from kvflash.attn_common import (
    FP8_TORCH_DTYPES,
    MODEL_TORCH_DTYPES,
    check_device_type,
    check_head_size,
    check_same_device,
    check_tensor,
    platform,
    saturate_to_fp8,
)
from kvflash.attn_common.call_plan import planned
from kvflash.attn_common.launch import launch
from kvflash.attn_common.ops import define_op
from kvflash.fp8_utils.cache_dtype import (
    check_kv_cache_dtype,
    is_per_token_head,
    kv_cache_torch_dtype,
    resolve_cache_storage_dtype,
)
from kvflash.fp8_utils.kernel import reshape_and_cache_kernel
from kvflash.fp8_utils.launch_config import ReshapeAndCacheLaunchConfig, choose_reshape_and_cache_config
from kvflash.fp8_utils.scales import min_scale, split_cache_scale

__all__ = ["reshape_and_cache_flash", "launch_reshape_and_cache"]


@planned
def reshape_and_cache_flash(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str,
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
) -> None:
    """Write ``key`` and ``value`` into the paged cache at ``slot_mapping``, in place.

    Parameters
    ----------
    key, value : torch.Tensor
        ``[num_tokens, Hkv, D]``, float16, bfloat16 or float32 (one dtype), ``stride(-1) == 1``, other
        strides free (e.g. slices of a fused QKV projection).
    key_cache, value_cache : torch.Tensor
        ``[num_blocks, block_size, Hkv, D]``, ``stride(-1) == 1``; strided views allowed (``[:, 0]`` and
        ``[:, 1]`` of a joint ``[num_blocks, 2, block_size, Hkv, D]`` cache). Dtype: key's for ``"auto"``;
        the string's FP8 format otherwise, or ``uint8`` (then the string alone decides the format).
    slot_mapping : torch.Tensor
        ``[num_tokens]`` int64, contiguous: token ``t`` goes to block ``slot // block_size``, position
        ``slot % block_size``. Negative slots (padding) are skipped. Slots ``>= num_blocks * block_size``
        cannot be rejected without a host synchronisation: they are skipped as well, never written out of
        bounds. Two tokens with one slot: one of them wins, which one is unspecified.
    kv_cache_dtype : str
        ``"auto"``, ``"fp8"`` / ``"fp8_e4m3"`` (e4m3fn, or e4m3fnuz on gfx94x) or ``"fp8_e5m2"``.
        ``"fp8_e4m3_per_token_head"`` / ``"fp8_e5m2_per_token_head"``: the same formats with one dynamic scale
        per stored (token, KV head), computed here and written into ``k_scale`` / ``v_scale``.
    k_scale, v_scale : None, float or torch.Tensor
        FP8 only: ``stored = saturate(x / scale)``, clamped to the format's finite range (never NaN or inf);
        the real value of a stored element is ``stored * scale``. ``None`` (1.0), a positive float, or a
        float32 (float16, bfloat16) tensor with one element (per tensor) or of shape ``[Hkv]`` (per KV head).
        For ``"auto"``, float scales must be ``None`` or ``1.0``; tensors are accepted (engines always pass
        them) and unused, since checking their values would need a host synchronisation.

        Per-token-head strings: *outputs*, float32 ``[num_blocks, block_size, Hkv]`` (any strides; two
        distinct tensors) on the cache's device. Each written token ``t`` and KV head ``h`` gets
        ``scale = max(amax_d |x[t, h, d]| / fp8_max, 1 / (fp8_max * 512))`` (IEEE division; the floor gives an
        all-zero token a finite positive scale, as :func:`~kvflash.fp8_utils.compute_kv_scales` does) at its
        slot, and ``stored = saturate(x / scale)``. Slots not written keep their old scales. Pass these tensors
        as ``k_descale`` / ``v_descale`` to the attention functions (a rank-3 descale is per-token-head).

    Raises
    ------
    TypeError, ValueError
        Naming the argument: wrong dtypes, ranks, shapes (head size or Hkv differing from the cache),
        devices, non-int64 ``slot_mapping``, an unknown ``kv_cache_dtype`` (the message lists the valid
        ones), an FP8 cache whose format differs from the string, a scale of another shape.
    """
    check_tensor("key", key, dtypes=MODEL_TORCH_DTYPES, ndim=3)
    per_token = is_per_token_head(check_kv_cache_dtype(kv_cache_dtype))
    if per_token:
        check_tensor("key_cache", key_cache, ndim=4)  # before the scales, which take its [:3] shape
        _check_per_token_scales(k_scale, v_scale, key_cache)  # before the op: its schema takes tensors only
    else:
        k_tensor, k_value = split_cache_scale("k_scale", k_scale, key.shape[1], key.device)
        v_tensor, v_value = split_cache_scale("v_scale", v_scale, key.shape[1], key.device)
        if kv_cache_dtype == "auto" and (k_value != 1.0 or v_value != 1.0):
            raise ValueError(
                f"k_scale/v_scale: kv_cache_dtype='auto' stores values unscaled; got k_scale={k_scale!r}, "
                f"v_scale={v_scale!r} (use an FP8 kv_cache_dtype to scale)"
            )
    _check_tensors(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, cache_rank_checked=per_token)
    if per_token:
        _reshape_and_cache_per_token_head_op(
            key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale
        )
    else:
        _reshape_and_cache_flash_op(
            key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_tensor, v_tensor, k_value, v_value
        )


def _check_tensors(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, *, cache_rank_checked: bool):
    """Check ``key`` (dtype and rank checked already) against the other tensors and the string: head size, shapes,
    dtypes, devices, and the element type the cache stores (:func:`resolve_cache_storage_dtype`)."""
    check_device_type("key", key)
    num_tokens, num_kv_heads, head_size = key.shape
    check_head_size(head_size, "head size (key.shape[-1])")
    check_tensor("value", value, dtypes=(key.dtype,), shape=tuple(key.shape))
    if not cache_rank_checked:
        check_tensor("key_cache", key_cache, ndim=4)
    check_tensor("key_cache", key_cache, shape=(None, None, num_kv_heads, head_size))
    check_tensor("value_cache", value_cache, dtypes=(key_cache.dtype,), shape=tuple(key_cache.shape))
    check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), shape=(num_tokens,))
    check_same_device(key=key, value=value, key_cache=key_cache, value_cache=value_cache, slot_mapping=slot_mapping)
    resolve_cache_storage_dtype(kv_cache_dtype, key_cache.dtype, key.dtype)


def _check_per_token_scales(k_scale, v_scale, key_cache) -> None:
    """Per-token-head strings: both scales are float32 outputs ``[num_blocks, block_size, Hkv]`` on the cache's
    device, not one and the same tensor."""
    shape = tuple(key_cache.shape[:3])
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(scale, torch.Tensor):
            raise TypeError(
                f"{name}: a per-token-head kv_cache_dtype writes the scales: expected a float32 tensor "
                f"[num_blocks, block_size, Hkv]={list(shape)}, got {type(scale).__name__}"
            )
        check_tensor(name, scale, dtypes=(torch.float32,), shape=shape, device=key_cache.device,
                     last_dim_contiguous=False)  # fmt: skip
    if k_scale.data_ptr() == v_scale.data_ptr() and k_scale.stride() == v_scale.stride():
        raise ValueError("v_scale: must be another tensor than k_scale (each receives its own scales)")


def _write_cache(
    key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, k_scale_value, v_scale_value
) -> None:
    """Both custom ops' body, on checked arguments: the plain PyTorch writes (CPU without the Triton interpreter)
    or :func:`launch_reshape_and_cache`, which chooses the launch settings."""
    if key.shape[0] == 0 or key_cache.shape[0] * key_cache.shape[1] == 0:
        return
    # A uint8 cache is reinterpreted (no copy) as the format the string names.
    storage = kv_cache_torch_dtype(kv_cache_dtype, key.dtype) if key_cache.dtype == torch.uint8 else key_cache.dtype
    key_cache, value_cache = key_cache.view(storage), value_cache.view(storage)
    per_token = is_per_token_head(kv_cache_dtype)
    if per_token:
        pass  # k_scale / v_scale are the [num_blocks, block_size, Hkv] outputs
    elif storage not in FP8_TORCH_DTYPES:
        k_scale = v_scale = None  # "auto": documented as unused
    elif (k_scale is None) != (v_scale is None):
        # One path for both: the float one becomes a one-element tensor (rare; costs a fill kernel).
        if k_scale is None:
            k_scale = torch.full((1,), k_scale_value, dtype=torch.float32, device=key.device)
        else:
            v_scale = torch.full((1,), v_scale_value, dtype=torch.float32, device=key.device)
    if not platform.runs_triton(key.device):
        _write_with_torch(
            key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, k_scale_value, v_scale_value,
            per_token,
        )  # fmt: skip
        return
    launch_reshape_and_cache(
        key, value, key_cache, value_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale,
        k_scale_value=k_scale_value, v_scale_value=v_scale_value, per_token_scales=per_token, config=None,
    )  # fmt: skip


def _reshape_and_cache_flash_impl(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    k_scale_value: float,
    v_scale_value: float,
) -> None:
    _write_cache(
        key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, k_scale_value, v_scale_value
    )


def _reshape_and_cache_flash_fake(
    key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, k_scale_value, v_scale_value
):
    return None  # writes in place: nothing to allocate (the public function checked the arguments)


# torch.ops.kvflash.reshape_and_cache_flash (attn_common.ops: one C++ dispatch per eager call).
_reshape_and_cache_flash_op = define_op(
    "reshape_and_cache_flash", _reshape_and_cache_flash_impl, _reshape_and_cache_flash_fake,
    mutates_args=("key_cache", "value_cache"),
)  # fmt: skip


def _reshape_and_cache_per_token_head_impl(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
) -> None:
    _write_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, 1.0, 1.0)


def _reshape_and_cache_per_token_head_fake(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale,
                                           v_scale):  # fmt: skip
    return None  # writes in place (the scales too): nothing to allocate


# torch.ops.kvflash.reshape_and_cache_flash_per_token_head: the scales are outputs too.
_reshape_and_cache_per_token_head_op = define_op(
    "reshape_and_cache_flash_per_token_head", _reshape_and_cache_per_token_head_impl,
    _reshape_and_cache_per_token_head_fake, mutates_args=("key_cache", "value_cache", "k_scale", "v_scale"),
)  # fmt: skip


def _write_with_torch(
    key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, k_scale_value, v_scale_value, per_token=False
) -> None:
    """The same writes in plain PyTorch (CPU tensors without the interpreter); reads slots on the host. FP8 values
    are :func:`kvflash.attn_common.saturate_to_fp8` of the rows, with a tensor divisor (IEEE division, as the
    kernel: torch divides a CUDA tensor by a Python number via its reciprocal)."""
    is_fp8 = key_cache.dtype in FP8_TORCH_DTYPES
    fp8_max = float(torch.finfo(key_cache.dtype).max)
    num_blocks, block_size = key_cache.shape[:2]
    valid = (slot_mapping >= 0) & (slot_mapping < num_blocks * block_size)
    slots = slot_mapping[valid]
    blocks, offsets = slots // block_size, slots % block_size
    for src, cache, scale, scale_value in (
        (key, key_cache, k_scale, k_scale_value),
        (value, value_cache, v_scale, v_scale_value),
    ):
        rows = src[valid]
        if per_token:  # [n, Hkv] scales from each row's amax, written beside the values
            amax = rows.float().abs().amax(-1)
            row_scale = (amax / amax.new_tensor(fp8_max)).clamp_min(min_scale(fp8_max))
            scale[blocks, offsets] = row_scale
            rows = saturate_to_fp8(rows, row_scale[..., None], cache.dtype)
        elif is_fp8:
            if scale is None:
                scale = torch.full((1,), scale_value, dtype=torch.float32, device=src.device)
            rows = saturate_to_fp8(rows, scale.reshape(-1, 1), cache.dtype)
        else:
            rows = rows.to(cache.dtype)
        if is_fp8:  # index_put_ on float8 dtypes is missing from older torch releases; bytes always work
            cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
        cache[blocks, offsets] = rows


def _fp8_constants(dtype: torch.dtype) -> tuple[float, int, float]:
    """``(finite max, mantissa bits, smallest normal)`` of an FP8 dtype, computed once per dtype."""
    found = _FP8_CONSTANTS.get(dtype)
    if found is None:
        finfo = torch.finfo(dtype)
        found = _FP8_CONSTANTS[dtype] = (float(finfo.max), -round(math.log2(finfo.eps)), float(finfo.tiny))
    return found


_FP8_CONSTANTS: dict[torch.dtype, tuple[float, int, float]] = {}


def _scale_stride(scale: torch.Tensor | None) -> int:
    return 0 if scale is None or scale.numel() == 1 else scale.stride(0)


def launch_reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    k_scale_value: float,
    v_scale_value: float,
    per_token_scales: bool = False,
    config: ReshapeAndCacheLaunchConfig | None = None,
) -> None:
    """Launch the kernel on checked arguments: ``key``, ``value`` ``[num_tokens, Hkv, D]`` into ``key_cache``,
    ``value_cache`` ``[num_blocks, block_size, Hkv, D]`` already viewed as the format they store (fp8 or key's
    dtype, not uint8).

    FP8 scales: ``k_scale`` and ``v_scale`` both ``None`` (the floats ``k_scale_value`` / ``v_scale_value`` apply)
    or both tensors of one element or ``[Hkv]``; with ``per_token_scales``, the float32 ``[num_blocks, block_size,
    Hkv]`` outputs. ``config`` overrides :func:`choose_reshape_and_cache_config` (the tuning sweeps of
    ``tools/bench``).
    """
    num_tokens, num_kv_heads, head_size = key.shape
    num_rows = num_tokens * num_kv_heads
    if config is None:
        config = choose_reshape_and_cache_config(num_rows, head_size)
    kv_fp8 = key_cache.dtype in FP8_TORCH_DTYPES
    fp8_max, fp8_mantissa_bits, fp8_min_normal = _fp8_constants(key_cache.dtype) if kv_fp8 else (0.0, 0, 0.0)
    use_scale_tensor = k_scale is not None and not per_token_scales
    if per_token_scales:  # [num_blocks, block_size, Hkv]: (block, token, head) strides
        ks_strides, vs_strides = k_scale.stride(), v_scale.stride()
    else:
        ks_strides = (0, 0, _scale_stride(k_scale))
        vs_strides = (0, 0, _scale_stride(v_scale))
    grid = (triton.cdiv(num_rows, config.block_rows),)
    launch(
        reshape_and_cache_kernel,
        grid,
        platform.interpreter_enabled(),
        key_ptr=key,
        value_ptr=value,
        key_cache_ptr=key_cache,
        value_cache_ptr=value_cache,
        slot_mapping_ptr=slot_mapping,
        # Never read without USE_SCALE_TENSOR or PER_TOKEN_SCALES; any pointer will do.
        k_scale_ptr=k_scale if use_scale_tensor or per_token_scales else slot_mapping,
        v_scale_ptr=v_scale if use_scale_tensor or per_token_scales else slot_mapping,
        k_scale_value=k_scale_value,
        v_scale_value=v_scale_value,
        stride_k_scale_head=ks_strides[2],
        stride_v_scale_head=vs_strides[2],
        stride_k_scale_block=ks_strides[0],
        stride_k_scale_token=ks_strides[1],
        stride_v_scale_block=vs_strides[0],
        stride_v_scale_token=vs_strides[1],
        num_rows=num_rows,
        num_kv_heads=num_kv_heads,
        num_slots=key_cache.shape[0] * key_cache.shape[1],
        block_size=key_cache.shape[1],
        stride_key_token=key.stride(0),
        stride_key_head=key.stride(1),
        stride_value_token=value.stride(0),
        stride_value_head=value.stride(1),
        stride_key_cache_block=key_cache.stride(0),
        stride_key_cache_token=key_cache.stride(1),
        stride_key_cache_head=key_cache.stride(2),
        stride_value_cache_block=value_cache.stride(0),
        stride_value_cache_token=value_cache.stride(1),
        stride_value_cache_head=value_cache.stride(2),
        HEAD_SIZE=head_size,
        HEAD_PAD=triton.next_power_of_2(head_size),
        BLOCK_ROWS=config.block_rows,
        KV_FP8=kv_fp8,
        USE_SCALE_TENSOR=use_scale_tensor,
        FP8_MAX=fp8_max,
        FP8_MANTISSA_BITS=fp8_mantissa_bits,
        FP8_MIN_NORMAL=fp8_min_normal,
        # The interpreter's fp32 -> fp8 cast rounds wrongly (attn_common.jit_helpers.round_to_fp8_grid says how);
        # GPUs round in the cast. Also keeps div_rn per element there (the interpreter's tl.fma may round twice).
        ROUND_IN_SOFTWARE=kv_fp8 and key.device.type == "cpu",
        PER_TOKEN_SCALES=per_token_scales,
        SCALE_FLOOR=min_scale(fp8_max) if per_token_scales else 0.0,
        num_warps=config.num_warps,
    )

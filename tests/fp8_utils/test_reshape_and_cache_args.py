"""reshape_and_cache_flash: bad arguments get errors that name them; the op is registered properly."""

import re

import pytest
import torch

from kvflash.fp8_utils import (
    KV_CACHE_DTYPES,
    compute_kv_scales,
    dequantize_fp8,
    reshape_and_cache_flash,
    scaled_fp8_quant,
)

NUM_TOKENS, NUM_KV_HEADS, HEAD_SIZE, NUM_BLOCKS, BLOCK_SIZE = 5, 2, 32, 3, 4


def _args(device, cache_dtype=torch.float8_e4m3fn, kv_cache_dtype="fp8"):
    key = torch.randn(NUM_TOKENS, NUM_KV_HEADS, HEAD_SIZE, device=device).half()
    cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, device=device).to(cache_dtype)
    return dict(
        key=key,
        value=key.clone(),
        key_cache=cache,
        value_cache=cache.clone(),
        slot_mapping=torch.arange(NUM_TOKENS, device=device),
        kv_cache_dtype=kv_cache_dtype,
        k_scale=0.5,
        v_scale=0.25,
    )


def _fp8_zeros(*shape):
    return torch.zeros(shape, dtype=torch.float8_e4m3fn)


def _call(device, **changes):
    args = _args(device)
    args.update(changes)
    reshape_and_cache_flash(**args)


def test_reshape_and_cache_unknown_kv_cache_dtype_lists_valid_strings(device):
    valid = ", ".join(repr(s) for s in KV_CACHE_DTYPES)
    with pytest.raises(ValueError, match=re.escape(valid)) as info:
        _call(device, kv_cache_dtype="fp8_e4m3fn")
    assert "kv_cache_dtype" in str(info.value) and "'fp8_e4m3fn'" in str(info.value)


@pytest.mark.parametrize(
    "kv_cache_dtype,cache_dtype",
    [
        ("fp8_e5m2", torch.float8_e4m3fn),  # the known bug elsewhere: e4m3 bytes in an e5m2 cache
        ("fp8", torch.float8_e5m2),
        ("fp8_e4m3", torch.float8_e5m2),
        ("fp8", torch.float16),
        ("auto", torch.float8_e4m3fn),
        ("auto", torch.bfloat16),  # "auto" stores key's dtype (float16 here)
    ],
)
def test_reshape_and_cache_cache_dtype_must_match_string(device, kv_cache_dtype, cache_dtype):
    args = _args(device, cache_dtype, kv_cache_dtype)
    if kv_cache_dtype == "auto":
        args["k_scale"] = args["v_scale"] = None
    with pytest.raises(ValueError, match="key_cache.*kv_cache_dtype"):
        reshape_and_cache_flash(**args)


def test_reshape_and_cache_auto_rejects_float_scales(device):
    args = _args(device, torch.float16, "auto")
    with pytest.raises(ValueError, match="k_scale"):
        reshape_and_cache_flash(**args)
    args.update(k_scale=1.0, v_scale=None)
    reshape_and_cache_flash(**args)


@pytest.mark.parametrize(
    "change,error,name",
    [
        (dict(slot_mapping=torch.arange(NUM_TOKENS, dtype=torch.int32)), TypeError, "slot_mapping"),
        (dict(slot_mapping=torch.arange(NUM_TOKENS + 1)), ValueError, "slot_mapping"),
        (dict(slot_mapping=torch.arange(2 * NUM_TOKENS)[::2]), ValueError, "slot_mapping"),
        (dict(value=torch.zeros(NUM_TOKENS + 1, NUM_KV_HEADS, HEAD_SIZE).half()), ValueError, "value"),
        (dict(value=torch.zeros(NUM_TOKENS, NUM_KV_HEADS, HEAD_SIZE).bfloat16()), TypeError, "value"),
        (dict(key=torch.zeros(NUM_TOKENS, NUM_KV_HEADS * HEAD_SIZE).half()), ValueError, "key"),
        (dict(key=torch.zeros(NUM_TOKENS, NUM_KV_HEADS, HEAD_SIZE, dtype=torch.int32)), TypeError, "key"),
        (dict(key=torch.zeros(NUM_TOKENS, NUM_KV_HEADS, 2 * HEAD_SIZE).half()[..., ::2]), ValueError, "key"),
        (dict(key=torch.zeros(NUM_TOKENS, NUM_KV_HEADS, 20).half()), ValueError, "head size"),
        (dict(key_cache=_fp8_zeros(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, 64)), ValueError, "key_cache"),
        (dict(key_cache=_fp8_zeros(NUM_BLOCKS, BLOCK_SIZE, 3, HEAD_SIZE)), ValueError, "key_cache"),
        (dict(key_cache=_fp8_zeros(NUM_BLOCKS, NUM_KV_HEADS, HEAD_SIZE)), ValueError, "key_cache"),
        (dict(value_cache=_fp8_zeros(NUM_BLOCKS + 1, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)), ValueError, "value_cache"),
        (dict(value_cache=torch.zeros(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)), TypeError, "value_cache"),
        (dict(k_scale=torch.ones(NUM_KV_HEADS + 1)), ValueError, "k_scale"),
        (dict(v_scale=torch.ones(NUM_KV_HEADS, 1)), ValueError, "v_scale"),
        (dict(k_scale=torch.ones(NUM_KV_HEADS, dtype=torch.int32)), TypeError, "k_scale"),
        (dict(k_scale=-0.5), ValueError, "k_scale"),
        (dict(v_scale=float("nan")), ValueError, "v_scale"),
        (dict(v_scale="0.5"), TypeError, "v_scale"),
        (dict(key="key"), TypeError, "key"),
    ],
)
def test_reshape_and_cache_bad_arguments_are_named(change, error, name):
    args = _args("cpu")
    args.update(change)
    with pytest.raises(error, match=name):
        reshape_and_cache_flash(**args)


def test_reshape_and_cache_accepts_per_head_and_one_element_scale_tensors(device):
    args = _args(device)
    args.update(k_scale=torch.full((NUM_KV_HEADS,), 0.5, device=device), v_scale=torch.ones((), device=device))
    reshape_and_cache_flash(**args)
    args.update(k_scale=torch.ones(1, 1, device=device).bfloat16(), v_scale=torch.ones(NUM_KV_HEADS, device=device))
    reshape_and_cache_flash(**args)


def test_reshape_and_cache_op_registration():
    """Schema, fake (meta) implementation and mutation declaration pass torch's own op checks.

    uint8 caches: opcheck compares tensors with ops that float8 dtypes lack."""
    args = _args("cpu", torch.uint8)
    op = torch.ops.kvflash.reshape_and_cache_flash.default
    op_args = (args["key"], args["value"], args["key_cache"], args["value_cache"], args["slot_mapping"], "fp8")
    torch.library.opcheck(op, op_args + (torch.tensor([0.5, 0.7]), torch.tensor([0.3]), 1.0, 1.0))
    torch.library.opcheck(op, op_args + (None, None, 0.5, 0.25))


def test_reshape_and_cache_traces_under_torch_compile():
    """fullgraph tracing (aot_eager: no C++ toolchain needed) gives the eager bytes and scales."""
    joint = torch.zeros(8, 2, 16, 4, 64, dtype=torch.float8_e4m3fn)
    key = torch.randn(30, 4, 64).half()
    value = torch.randn_like(key)
    slots = torch.randperm(8 * 16)[:30]

    def step(key, value, joint, slots):
        k_scale = compute_kv_scales(key, per_head=True)
        v_scale = compute_kv_scales(value)
        reshape_and_cache_flash(key, value, joint[:, 0], joint[:, 1], slots, "fp8", k_scale, v_scale)
        x_fp8, scale = scaled_fp8_quant(key)
        return k_scale, v_scale, dequantize_fp8(x_fp8, scale)

    torch._dynamo.reset()
    eager_joint, compiled_joint = joint.clone(), joint.clone()
    eager = step(key, value, eager_joint, slots)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(key, value, compiled_joint, slots)
    assert torch.equal(compiled_joint.view(torch.uint8), eager_joint.view(torch.uint8))
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))

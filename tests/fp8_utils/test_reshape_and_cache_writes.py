"""reshape_and_cache_flash writes exactly what torch's own casts give, where they should, and nowhere else.

Every test compares the WHOLE cache (as bytes) with a copy updated by plain PyTorch indexing, so a write
to a padding slot, to an out-of-range slot, to the other half of a joint cache or with the K scale applied
to V shows up. FP8 expectations are :func:`kvflash.attn_common.saturate_to_fp8` with a tensor divisor.
"""

import pytest
import torch

from kvflash.fp8_utils import dequantize_fp8, reshape_and_cache_flash

from .writer_cases import as_bytes, encode, expected_cache

FP8_STRINGS = {torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}


def _random_cache(shape, dtype, device, gen) -> torch.Tensor:
    if dtype in FP8_STRINGS or dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).view(dtype).to(device)
    return (torch.randn(shape, generator=gen) * 50).to(dtype).to(device)


def _slots(num_tokens, num_slots, gen, device, *, padding=True) -> torch.Tensor:
    """Distinct random slots, with padding (-1) and out-of-range slots sprinkled in."""
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens].clone()
    if padding:
        slots[::7] = -1
        slots[3::11] = num_slots + torch.arange(len(slots[3::11]))  # beyond the cache: must be skipped
        slots[5::13] = -(2**40)
    return slots.to(device)


def _scales(kind: str, num_kv_heads: int, device, gen):
    """(argument passed, float32 tensor for the reference): distinct, non-unit, different for K and V."""
    if kind == "float":
        return (0.037, torch.tensor([0.037])), (0.21, torch.tensor([0.21]))
    if kind == "tensor":
        k, v = torch.tensor([0.05]), torch.tensor([0.3])
    else:  # per head
        k = torch.rand(num_kv_heads, generator=gen) * 0.1 + 0.04  # x / scale stays below both maxima
        v = torch.rand(num_kv_heads, generator=gen) * 0.5 + 0.2
    return (k.to(device), k), (v.to(device), v)


@pytest.mark.parametrize("fp8_dtype", list(FP8_STRINGS))
@pytest.mark.parametrize("scale_kind", ["float", "tensor", "per_head"])
@pytest.mark.parametrize(
    "in_dtype,head_size",
    [(torch.float16, 64), (torch.float32, 80), (torch.float16, 8), (torch.bfloat16, 40), (torch.float32, 120)],
)
def test_reshape_and_cache_fp8_round_trip(device, fp8_dtype, scale_kind, in_dtype, head_size):
    gen = torch.Generator().manual_seed(17 * len(scale_kind) + head_size)
    num_tokens, num_kv_heads, num_blocks, block_size = 37, 3, 9, 8
    key = (torch.randn(num_tokens, num_kv_heads, head_size, generator=gen) * 3).to(in_dtype).to(device)
    value = (torch.randn(num_tokens, num_kv_heads, head_size, generator=gen) * 3).to(in_dtype).to(device)
    key_cache = _random_cache((num_blocks, block_size, num_kv_heads, head_size), fp8_dtype, device, gen)
    value_cache = _random_cache((num_blocks, block_size, num_kv_heads, head_size), fp8_dtype, device, gen)
    slots = _slots(num_tokens, num_blocks * block_size, gen, device)
    (k_arg, k_ref), (v_arg, v_ref) = _scales(scale_kind, num_kv_heads, device, gen)
    k_ref, v_ref = k_ref.to(device), v_ref.to(device)
    expected_k = expected_cache(key_cache, encode(key, k_ref, fp8_dtype), slots)
    expected_v = expected_cache(value_cache, encode(value, v_ref, fp8_dtype), slots)

    reshape_and_cache_flash(key, value, key_cache, value_cache, slots, FP8_STRINGS[fp8_dtype], k_arg, v_arg)

    assert torch.equal(as_bytes(key_cache), expected_k)
    assert torch.equal(as_bytes(value_cache), expected_v)
    # Round trip: gather the written rows and dequantise; within half an FP8 step of the input.
    ok = slots >= 0
    ok &= slots < num_blocks * block_size
    s = slots[ok]
    mant_bits = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}[fp8_dtype]
    spacing = torch.finfo(fp8_dtype).tiny * 2.0**-mant_bits
    for x, cache, scale in ((key, key_cache, k_ref), (value, value_cache, v_ref)):
        scale = scale.reshape(-1, 1)
        back = dequantize_fp8(cache[s // block_size, s % block_size], scale, dtype=torch.float32)
        x = x[ok].float()
        bound = 0.5 * torch.maximum(x.abs() * 2.0**-mant_bits, scale * spacing) * (1 + 1e-6) + 1e-30
        assert ((back - x).abs() <= bound).all()


@pytest.mark.parametrize("fp8_dtype", list(FP8_STRINGS))
def test_reshape_and_cache_fp8_rounds_ties_to_even(device, fp8_dtype):
    """Every finite FP8 value, every midpoint between neighbours (ties) and points just off them."""
    codes = torch.arange(256, dtype=torch.uint8).view(fp8_dtype).float()
    grid = codes[torch.isfinite(codes)].unique()  # sorted; +-0 collapse
    mid = (grid[1:] + grid[:-1]) / 2
    eps = mid.abs() * 2.0**-20 + 2.0**-40
    values = torch.cat([grid, mid, mid + eps, mid - eps])
    head_size = 64
    values = torch.cat([values, values.new_zeros(-len(values) % head_size)]).reshape(-1, 1, head_size)
    num_tokens = values.shape[0]
    key_cache = torch.zeros(num_tokens, 1, 1, head_size, dtype=fp8_dtype, device=device)
    value_cache = torch.zeros_like(key_cache)
    values = values.to(device)
    slots = torch.arange(num_tokens, device=device)
    reshape_and_cache_flash(values, -values, key_cache, value_cache, slots, FP8_STRINGS[fp8_dtype], 1.0, 1.0)
    one = torch.ones(1, device=device)
    assert torch.equal(as_bytes(key_cache[:, 0]), as_bytes(encode(values, one, fp8_dtype)))
    assert torch.equal(as_bytes(value_cache[:, 0]), as_bytes(encode(-values, one, fp8_dtype)))


# Per-head scales for the division test: ordinary, tiny, subnormal, huge. The GPU kernel divides through a
# reciprocal per row (attn_common.jit_helpers.div_rn_by_row_scale); without its powers of two, the subnormal scale
# and the last two (found by tools/check_div_rn_by_row_scale.c) change FP8 codes here.
EDGE_SCALES = [0.037, 1.0 / 3.0, 2.0**-100 / 3.0, 1.7 * 2.0**-140, 1.5 * 2.0**127, 2.0**70 / 3.0]
EDGE_SCALES += [float.fromhex("0x1.c0000ap+127"), float.fromhex("0x1.5c78d4p-120")]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, huge / tiny
@pytest.mark.parametrize("fp8_dtype", list(FP8_STRINGS))
def test_reshape_and_cache_fp8_division_is_ieee_at_every_rounding_edge(device, fp8_dtype):
    """Quotients at and within 3 float32 ulps of every FP8 value and midpoint, zeros of both signs, subnormal and
    huge inputs, for scales from subnormal to 2^127: the bytes of torch's IEEE ``x / scale``."""
    codes = torch.arange(256, dtype=torch.uint8).view(fp8_dtype).float()
    grid = codes[torch.isfinite(codes) & (codes > 0)].unique()
    targets = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, grid[:1] / 2])
    edges = torch.tensor([0.0, -0.0, 2.0**-149, -(2.0**-126), 1e-30, 3.4028235e38, -1e38])
    num_kv_heads, head_size = len(EDGE_SCALES), 64
    scale = torch.tensor(EDGE_SCALES, dtype=torch.float32)
    # x = targets * scale rounded to float32, then moved by -3..3 ulps (as bits), both signs; per head.
    base = (targets.double()[:, None] * scale.double()).float().view(torch.int32)
    near = torch.cat([(base + d).view(torch.float32) for d in range(-3, 4)])
    per_head = torch.cat([near, -near, edges[:, None].expand(-1, num_kv_heads)])  # [n, Hkv]
    per_head = torch.where(torch.isfinite(per_head), per_head, 0.0)
    n = per_head.shape[0]
    num_tokens = -(-n // head_size)
    key = torch.zeros(num_tokens * head_size, num_kv_heads)
    key[:n] = per_head
    key = key.reshape(num_tokens, head_size, num_kv_heads).transpose(1, 2).contiguous().to(device)
    key_cache = torch.zeros(num_tokens, 1, num_kv_heads, head_size, dtype=fp8_dtype, device=device)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.arange(num_tokens, device=device)
    scale = scale.to(device)
    reshape_and_cache_flash(key, -key, key_cache, value_cache, slots, FP8_STRINGS[fp8_dtype], scale, scale)
    assert torch.equal(as_bytes(key_cache[:, 0]), as_bytes(encode(key, scale, fp8_dtype)))
    assert torch.equal(as_bytes(value_cache[:, 0]), as_bytes(encode(-key, scale, fp8_dtype)))


@pytest.mark.parametrize("fp8_dtype", list(FP8_STRINGS))
def test_reshape_and_cache_fp8_saturates(device, fp8_dtype):
    """At and beyond the format's max (and at inf): ±max, never NaN or inf."""
    fmax, scale = torch.finfo(fp8_dtype).max, 0.5
    mags = torch.tensor([1.0, 1.0 + 2**-5, 1.06, 1.5, 10.0, 1e4, 1e30]) * fmax * scale
    row = torch.cat([mags, -mags, torch.tensor([float("inf"), -float("inf")])])
    key = torch.zeros(1, 1, 32)
    key[0, 0, : len(row)] = row
    key = key.to(device)
    key_cache = torch.zeros(1, 1, 1, 32, dtype=fp8_dtype, device=device)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.zeros(1, dtype=torch.int64, device=device)
    reshape_and_cache_flash(key, key, key_cache, value_cache, slots, FP8_STRINGS[fp8_dtype], scale, scale)
    expected = torch.cat([torch.full((7,), fmax), torch.full((7,), -fmax), torch.tensor([fmax, -fmax])])
    for cache in (key_cache, value_cache):
        stored = cache[0, 0, 0].float().cpu()
        assert torch.isfinite(stored).all()
        assert torch.equal(stored[: len(row)], expected)


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reshape_and_cache_auto_copies_exactly(device, in_dtype):
    gen = torch.Generator().manual_seed(3)
    num_tokens, num_kv_heads, head_size, num_blocks, block_size = 21, 2, 48, 5, 6
    key = (torch.randn(num_tokens, num_kv_heads, head_size, generator=gen) * 1e3).to(in_dtype).to(device)
    value = (torch.randn(num_tokens, num_kv_heads, head_size, generator=gen) * 1e-3).to(in_dtype).to(device)
    key_cache = _random_cache((num_blocks, block_size, num_kv_heads, head_size), in_dtype, device, gen)
    value_cache = _random_cache((num_blocks, block_size, num_kv_heads, head_size), in_dtype, device, gen)
    slots = _slots(num_tokens, num_blocks * block_size, gen, device)
    expected_k, expected_v = expected_cache(key_cache, key, slots), expected_cache(value_cache, value, slots)
    # Tensor scales are accepted for "auto" and unused (engines pass them unconditionally).
    k_scale = torch.tensor([0.5], device=device)
    reshape_and_cache_flash(key, value, key_cache, value_cache, slots, "auto", k_scale, None)
    assert torch.equal(as_bytes(key_cache), expected_k)
    assert torch.equal(as_bytes(value_cache), expected_v)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8", "fp8_e5m2"])
def test_reshape_and_cache_joint_cache_and_strided_inputs(device, kv_cache_dtype):
    """Caches are [:, 0] / [:, 1] of one joint tensor; key/value are head slices of a fused QKV tensor."""
    gen = torch.Generator().manual_seed(5)
    num_tokens, num_q_heads, num_kv_heads, head_size, num_blocks, block_size = 19, 4, 2, 32, 6, 4
    qkv = torch.randn(num_tokens, num_q_heads + 2 * num_kv_heads, head_size, generator=gen).half().to(device)
    key, value = qkv[:, num_q_heads : num_q_heads + num_kv_heads], qkv[:, num_q_heads + num_kv_heads :]
    cache_dtype = {"auto": torch.float16, "fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[kv_cache_dtype]
    joint = _random_cache((num_blocks, 2, block_size, num_kv_heads, head_size), cache_dtype, device, gen)
    slots = _slots(num_tokens, num_blocks * block_size, gen, device)
    k_scale = torch.tensor([0.02, 0.07], device=device)
    v_scale = torch.tensor([0.11, 0.013], device=device)
    if kv_cache_dtype == "auto":
        k_rows, v_rows = key, value
    else:
        k_rows, v_rows = encode(key, k_scale, cache_dtype), encode(value, v_scale, cache_dtype)
    expected = as_bytes(joint.clone())
    expected[:, 0] = expected_cache(joint[:, 0], k_rows, slots)
    expected[:, 1] = expected_cache(joint[:, 1], v_rows, slots)

    reshape_and_cache_flash(key, value, joint[:, 0], joint[:, 1], slots, kv_cache_dtype, k_scale, v_scale)

    assert torch.equal(as_bytes(joint), expected)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_reshape_and_cache_uint8_cache_takes_format_from_string(device, kv_cache_dtype):
    gen = torch.Generator().manual_seed(7)
    num_tokens, num_kv_heads, head_size, num_blocks, block_size = 13, 1, 16, 4, 5
    key = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).half().to(device)
    value = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).half().to(device)
    key_cache = _random_cache((num_blocks, block_size, num_kv_heads, head_size), torch.uint8, device, gen)
    value_cache = _random_cache((num_blocks, block_size, num_kv_heads, head_size), torch.uint8, device, gen)
    slots = _slots(num_tokens, num_blocks * block_size, gen, device)
    fp8_dtype = torch.float8_e5m2 if kv_cache_dtype == "fp8_e5m2" else torch.float8_e4m3fn
    k_scale, v_scale = torch.tensor([0.01], device=device), torch.tensor([0.04], device=device)
    expected_k = expected_cache(key_cache, encode(key, k_scale, fp8_dtype), slots)
    expected_v = expected_cache(value_cache, encode(value, v_scale, fp8_dtype), slots)
    reshape_and_cache_flash(key, value, key_cache, value_cache, slots, kv_cache_dtype, k_scale, v_scale)
    assert key_cache.dtype == torch.uint8
    assert torch.equal(as_bytes(key_cache), expected_k)
    assert torch.equal(as_bytes(value_cache), expected_v)


def test_reshape_and_cache_mixed_float_and_tensor_scales(device):
    gen = torch.Generator().manual_seed(11)
    key = torch.randn(9, 2, 16, generator=gen).half().to(device)
    value = torch.randn(9, 2, 16, generator=gen).half().to(device)
    key_cache = torch.zeros(3, 4, 2, 16, dtype=torch.float8_e4m3fn, device=device)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.arange(9, device=device)
    v_scale = torch.tensor([0.3, 0.05], device=device)
    reshape_and_cache_flash(key, value, key_cache, value_cache, slots, "fp8", 0.25, v_scale)
    k_scale = torch.tensor([0.25], device=device)
    expected_k = expected_cache(torch.zeros_like(key_cache), encode(key, k_scale, torch.float8_e4m3fn), slots)
    expected_v = expected_cache(torch.zeros_like(value_cache), encode(value, v_scale, torch.float8_e4m3fn), slots)
    assert torch.equal(as_bytes(key_cache), expected_k)
    assert torch.equal(as_bytes(value_cache), expected_v)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8", "fp8_e5m2"])
def test_reshape_and_cache_torch_fallback_matches_kernel(monkeypatch, device, kv_cache_dtype):
    """CPU tensors with the interpreter off take the plain PyTorch path: same bytes as the kernel."""
    gen = torch.Generator().manual_seed(13)
    key = torch.randn(23, 3, 32, generator=gen).half()
    value = torch.randn(23, 3, 32, generator=gen).half()
    cache_dtype = {"auto": torch.float16, "fp8": torch.uint8, "fp8_e5m2": torch.float8_e5m2}[kv_cache_dtype]
    caches = _random_cache((2, 7, 4, 3, 32), cache_dtype, "cpu", gen)
    slots = _slots(23, 28, gen, "cpu")
    k_scale, v_scale = torch.tensor([0.1, 0.02, 0.3]), (1.0 if kv_cache_dtype == "auto" else 0.07)
    kernel = caches.to(device)
    args = (slots.to(device), kv_cache_dtype, k_scale.to(device), v_scale)
    reshape_and_cache_flash(key.to(device), value.to(device), kernel[0], kernel[1], *args)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reshape_and_cache_flash(key, value, caches[0], caches[1], slots, kv_cache_dtype, k_scale, v_scale)
    assert torch.equal(as_bytes(caches), as_bytes(kernel.cpu()))


def test_reshape_and_cache_no_tokens_is_a_no_op(device):
    key = torch.empty(0, 2, 16, dtype=torch.float16, device=device)
    key_cache = torch.zeros(2, 4, 2, 16, dtype=torch.float8_e4m3fn, device=device)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.empty(0, dtype=torch.int64, device=device)
    reshape_and_cache_flash(key, key, key_cache, value_cache, slots, "fp8", 0.5, 0.5)
    assert not as_bytes(key_cache).any() and not as_bytes(value_cache).any()

"""reshape_and_cache_flash with per-token-head kv_cache_dtype strings: the dynamic scale of each stored (token,
KV head) is written into ``k_scale`` / ``v_scale [num_blocks, block_size, Hkv]`` beside the quantised values.

The expectations are computed here in plain PyTorch from the definition (``scale = max(amax / fp8_max,
1 / (fp8_max * 512))``, ``stored = saturate(x / scale)``) and compared bit for bit; untouched slots keep their
previous contents; the round trip ``stored * scale`` is within the format's rounding of the input.
"""

import pytest
import torch

from kvflash.attn_common import saturate_to_fp8
from kvflash.fp8_utils import KV_CACHE_DTYPES, kv_cache_torch_dtype, reshape_and_cache_flash
from kvflash.fp8_utils.op import _write_with_torch

STRINGS = {"fp8_e4m3_per_token_head": torch.float8_e4m3fn, "fp8_e5m2_per_token_head": torch.float8_e5m2}
NUM_BLOCKS, BLOCK_SIZE, HKV, D = 5, 16, 3, 40


def _inputs(device, dtype=torch.float16, num_tokens=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mag = 10 ** (torch.rand(num_tokens, HKV, 1, generator=gen) * 4 - 2)  # 10^-2 .. 10^2 per token-head
    key = (torch.randn(num_tokens, HKV, D, generator=gen) * mag).to(dtype)
    value = (torch.randn(num_tokens, HKV, D, generator=gen) * mag.flip(0)).to(dtype)
    key[3] = 0  # an all-zero token: finite positive floor scale, zero bytes
    key[4] = key[4] * 50  # an outlier token (still finite in fp16)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:num_tokens].long()
    slots[5] = -1  # padding
    return key.to(device), value.to(device), slots.to(device)


def _expected(x, fp8):
    fmax = torch.finfo(fp8).max
    amax = x.float().abs().amax(-1)
    # A tensor divisor: torch's CUDA division by a Python number multiplies by its reciprocal (not IEEE).
    scale = (amax / amax.new_tensor(fmax)).clamp_min(1.0 / (fmax * 512.0))
    return saturate_to_fp8(x, scale[..., None], fp8), scale


def _write(device, kv_cache_dtype, key, value, slots, fill=-7.0):
    fp8 = STRINGS[kv_cache_dtype]
    kc = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HKV, D, device=device).to(fp8)
    vc = torch.zeros_like(kc)
    ks = torch.full((NUM_BLOCKS, BLOCK_SIZE, HKV), fill, device=device)
    vs = torch.full((NUM_BLOCKS, BLOCK_SIZE, HKV), fill, device=device)
    reshape_and_cache_flash(key, value, kc, vc, slots, kv_cache_dtype, ks, vs)
    return kc, vc, ks, vs


def test_per_token_head_strings_are_listed():
    for s, fp8 in STRINGS.items():
        assert s in KV_CACHE_DTYPES
        assert kv_cache_torch_dtype(s, torch.bfloat16) in (fp8, torch.float8_e4m3fnuz)


@pytest.mark.parametrize("kv_cache_dtype", list(STRINGS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_per_token_head_writes_values_and_scales(device, kv_cache_dtype, dtype):
    fp8 = STRINGS[kv_cache_dtype]
    key, value, slots = _inputs(device, dtype)
    kc, vc, ks, vs = _write(device, kv_cache_dtype, key, value, slots)
    ok = slots >= 0
    blocks, offs = slots[ok] // BLOCK_SIZE, slots[ok] % BLOCK_SIZE
    for src, cache, scale in ((key, kc, ks), (value, vc, vs)):
        exp_q, exp_s = _expected(src[ok], fp8)
        assert torch.equal(scale[blocks, offs], exp_s)
        assert torch.equal(cache[blocks, offs].view(torch.uint8), exp_q.view(torch.uint8))
        # Slots not written keep their scales (and zero bytes).
        written = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, dtype=torch.bool, device=device)
        written[blocks, offs] = True
        assert bool((scale[~written] == -7.0).all())
        assert not cache[~written].view(torch.uint8).any()
        # Round trip: within half an FP8 step of each element's scaled magnitude (relative 2^-m), never NaN.
        back = cache[blocks, offs].float() * scale[blocks, offs][..., None]
        mant = 3 if fp8 == torch.float8_e4m3fn else 2
        amax = src[ok].float().abs().amax(-1, keepdim=True)
        bound = src[ok].float().abs() * 2.0 ** -(mant + 1) + amax * 2.0**-12 + 1e-30
        assert bool(((back - src[ok].float()).abs() <= bound).all())
    zero_row = 3
    assert bool((ks[slots[zero_row] // BLOCK_SIZE, slots[zero_row] % BLOCK_SIZE] > 0).all())


@pytest.mark.parametrize("kv_cache_dtype", list(STRINGS))
def test_per_token_head_torch_path_matches(device, kv_cache_dtype):
    """The PyTorch fallback (CPU without the interpreter) writes the same bytes and scales."""
    key, value, slots = _inputs(device, seed=3)
    kc, vc, ks, vs = _write(device, kv_cache_dtype, key, value, slots)
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    ks2, vs2 = torch.full_like(ks, -7.0), torch.full_like(vs, -7.0)
    _write_with_torch(key, value, kc2, vc2, slots, ks2, vs2, 1.0, 1.0, True)
    assert torch.equal(ks, ks2) and torch.equal(vs, vs2)
    assert torch.equal(kc.view(torch.uint8), kc2.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), vc2.view(torch.uint8))


def test_per_token_head_strided_scales_and_uint8_cache(device):
    """Scales as slices of a joint [num_blocks, 2, block_size, Hkv] tensor, into a uint8 cache."""
    key, value, slots = _inputs(device, seed=4)
    joint = torch.full((NUM_BLOCKS, 2, BLOCK_SIZE, HKV), -7.0, device=device)
    kc = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HKV, D, dtype=torch.uint8, device=device)
    vc = torch.zeros_like(kc)
    reshape_and_cache_flash(key, value, kc, vc, slots, "fp8_e4m3_per_token_head", joint[:, 0], joint[:, 1])
    ok = slots >= 0
    blocks, offs = slots[ok] // BLOCK_SIZE, slots[ok] % BLOCK_SIZE
    exp_q, exp_s = _expected(value[ok], torch.float8_e4m3fn)
    assert torch.equal(joint[:, 1][blocks, offs], exp_s)
    assert torch.equal(vc[blocks, offs], exp_q.view(torch.uint8))


def _bad_args(device):
    key, value, slots = _inputs(device, num_tokens=6)
    kc = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HKV, D, device=device).to(torch.float8_e4m3fn)
    ks = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HKV, device=device)
    return dict(key=key, value=value, key_cache=kc, value_cache=kc.clone(), slot_mapping=slots,
                kv_cache_dtype="fp8_e4m3_per_token_head", k_scale=ks, v_scale=ks.clone())  # fmt: skip


@pytest.mark.parametrize(
    "change,error,names",
    [
        (dict(k_scale=None), TypeError, "k_scale"),
        (dict(v_scale=0.5), TypeError, "v_scale"),
        (dict(k_scale="per_head"), TypeError, "k_scale"),
        (dict(k_scale=torch.zeros(HKV)), ValueError, "k_scale"),  # per-head shape: not a per-token output
        (dict(v_scale=torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HKV + 1)), ValueError, "v_scale"),
        (dict(k_scale=torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HKV, dtype=torch.float16)), TypeError, "k_scale"),
        (dict(kv_cache_dtype="fp8_e5m2_per_token_head"), ValueError, "key_cache"),  # e4m3 cache, e5m2 string
        (dict(kv_cache_dtype="fp8_per_token_head"), ValueError, "kv_cache_dtype"),
    ],
)
def test_per_token_head_bad_calls(device, change, error, names):
    args = _bad_args(device)
    change = {key: val.to(device) if isinstance(val, torch.Tensor) else val for key, val in change.items()}
    args.update(change)
    with pytest.raises(error, match=names):
        reshape_and_cache_flash(**args)


def test_per_token_head_same_tensor_for_both_scales_raises(device):
    args = _bad_args(device)
    args["v_scale"] = args["k_scale"]
    with pytest.raises(ValueError, match="v_scale"):
        reshape_and_cache_flash(**args)


def test_per_token_head_fp16_cache_raises(device):
    """A per-token-head string with a non-FP8 cache: the string names an FP8 format."""
    args = _bad_args(device)
    args["key_cache"] = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HKV, D, dtype=torch.float16, device=device)
    args["value_cache"] = args["key_cache"].clone()
    with pytest.raises(ValueError, match="key_cache"):
        reshape_and_cache_flash(**args)

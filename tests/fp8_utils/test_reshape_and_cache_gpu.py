"""GPU tier: reshape_and_cache_flash at serving size with bf16 input, caches over 4 GiB, CUDA graphs,
torch.compile, and no host synchronisation anywhere in the fp8 utilities."""

import pytest
import torch

from kvflash.fp8_utils import compute_kv_scales, dequantize_fp8, reshape_and_cache_flash, scaled_fp8_quant

from .writer_cases import as_bytes, encode, expected_cache

pytestmark = pytest.mark.gpu

FORMATS = {"auto": torch.bfloat16, "fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _block_slots(num_tokens, num_blocks, block_size, gen):
    """Prefill-like slots: consecutive tokens fill randomly chosen blocks; every 97th token is padding."""
    blocks = torch.randperm(num_blocks, generator=gen)[: -(-num_tokens // block_size)]
    t = torch.arange(num_tokens)
    slots = blocks[t // block_size] * block_size + t % block_size
    slots[::97] = -1
    return slots.cuda()


@pytest.mark.parametrize("kv_cache_dtype", list(FORMATS))
@pytest.mark.parametrize("per_head", [False, True])
def test_reshape_and_cache_gpu_serving_size(kv_cache_dtype, per_head):
    gen = torch.Generator().manual_seed(1)
    num_tokens, num_kv_heads, head_size, num_blocks, block_size = 16384, 8, 128, 2048, 16
    key = (torch.randn(num_tokens, num_kv_heads, head_size, generator=gen) * 2).bfloat16().cuda()
    value = (torch.randn(num_tokens, num_kv_heads, head_size, generator=gen) * 0.5).bfloat16().cuda()
    cache_dtype = FORMATS[kv_cache_dtype]
    shape = (num_blocks, 2, block_size, num_kv_heads, head_size)
    if cache_dtype == torch.bfloat16:
        joint = (torch.randn(shape, generator=gen) * 50).bfloat16().cuda()
    else:  # random bytes, NaN codes included: compared as bytes
        joint = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).cuda().view(cache_dtype)
    slots = _block_slots(num_tokens, num_blocks, block_size, gen)
    if kv_cache_dtype == "auto":
        k_scale = v_scale = None
        k_rows, v_rows = key, value
    else:
        k_scale = compute_kv_scales(key, cache_dtype, per_head=per_head, margin=1.1)
        v_scale = compute_kv_scales(value, cache_dtype, per_head=per_head)
        k_rows, v_rows = encode(key, k_scale, cache_dtype), encode(value, v_scale, cache_dtype)
    expected = as_bytes(joint.clone())
    expected[:, 0] = expected_cache(joint[:, 0], k_rows, slots)
    expected[:, 1] = expected_cache(joint[:, 1], v_rows, slots)
    reshape_and_cache_flash(key, value, joint[:, 0], joint[:, 1], slots, kv_cache_dtype, k_scale, v_scale)
    assert torch.equal(as_bytes(joint), expected)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_reshape_and_cache_gpu_cache_over_4gib(cache_dtype):
    """Element offsets past 2^31 (and bytes past 2^32): the last blocks are written where they should be."""
    num_kv_heads, head_size, block_size = 8, 128, 16
    per_block = block_size * num_kv_heads * head_size
    num_blocks = (2**32 + 2**31) // (per_block * cache_dtype.itemsize) + 1  # > 6 GiB per cache
    key_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_size, dtype=cache_dtype, device="cuda")
    value_cache = torch.zeros_like(key_cache)
    num_tokens = 3 * block_size
    # Strictly nonzero (|x| >= 1) so the count of nonzero cache bytes below is exactly the written elements.
    key = (torch.randn(num_tokens, num_kv_heads, head_size, device="cuda").abs() + 1.0).bfloat16()
    value = -(torch.randn(num_tokens, num_kv_heads, head_size, device="cuda").abs() + 1.0).bfloat16()
    slots = torch.cat(
        [
            torch.arange(block_size),
            (num_blocks // 2) * block_size + torch.arange(block_size),
            (num_blocks - 1) * block_size + torch.arange(block_size),
        ]
    ).cuda()
    slots[-1] = num_blocks * block_size + 2**33  # beyond the cache: skipped
    kv_cache_dtype = "auto" if cache_dtype == torch.bfloat16 else "fp8"
    scale = None if kv_cache_dtype == "auto" else torch.tensor([0.05], device="cuda")
    reshape_and_cache_flash(key, value, key_cache, value_cache, slots, kv_cache_dtype, scale, scale)
    ok = slots[:-1]
    for x, cache in ((key, key_cache), (value, value_cache)):
        rows = x[:-1] if scale is None else encode(x[:-1], scale, cache_dtype)
        assert torch.equal(as_bytes(cache[ok // block_size, ok % block_size]), as_bytes(rows))
        assert int(cache.view(-1).ne(0).sum()) == (num_tokens - 1) * num_kv_heads * head_size
    del key_cache, value_cache
    torch.cuda.empty_cache()


def test_reshape_and_cache_gpu_cuda_graph_replay():
    num_tokens, num_kv_heads, head_size, num_blocks, block_size = 256, 4, 64, 64, 16
    key = torch.randn(num_tokens, num_kv_heads, head_size, device="cuda").bfloat16()
    value = torch.randn_like(key)
    key_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_size, dtype=torch.float8_e4m3fn).cuda()
    value_cache = torch.zeros_like(key_cache)
    slots = torch.arange(num_tokens, device="cuda")
    k_scale = torch.tensor([0.01, 0.02, 0.03, 0.04], device="cuda")
    v_scale = torch.tensor([0.3], device="cuda")
    reshape_and_cache_flash(key, value, key_cache, value_cache, slots, "fp8", k_scale, v_scale)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        reshape_and_cache_flash(key, value, key_cache, value_cache, slots, "fp8", k_scale, v_scale)
    key.copy_(torch.randn_like(key))
    slots.copy_(torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens])
    k_scale.mul_(2)
    before_k, before_v = key_cache.clone(), value_cache.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(as_bytes(key_cache), expected_cache(before_k, encode(key, k_scale, torch.float8_e4m3fn), slots))
    assert torch.equal(
        as_bytes(value_cache), expected_cache(before_v, encode(value, v_scale, torch.float8_e4m3fn), slots)
    )


def test_fp8_utils_gpu_never_sync_with_host():
    key = torch.randn(512, 8, 128, device="cuda").bfloat16()
    key_cache = torch.zeros(64, 16, 8, 128, dtype=torch.float8_e5m2, device="cuda")
    value_cache = torch.zeros_like(key_cache)
    slots = torch.arange(512, device="cuda")

    def everything():
        scale = compute_kv_scales(key, torch.float8_e5m2, per_head=True, margin=1.2)
        reshape_and_cache_flash(key, key, key_cache, value_cache, slots, "fp8_e5m2", scale, 0.5)
        reshape_and_cache_flash(key, key, key_cache, value_cache, slots, "fp8_e5m2", 0.25, 0.5)
        x_fp8, dyn = scaled_fp8_quant(key)
        scaled_fp8_quant(key, 0.1, torch.float8_e5m2)
        dequantize_fp8(x_fp8, dyn)
        dequantize_fp8(key_cache, scale[:, None])

    everything()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        everything()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_reshape_and_cache_gpu_torch_compile_fullgraph():
    joint = torch.zeros(32, 2, 16, 4, 64, dtype=torch.float8_e4m3fn, device="cuda")
    key = torch.randn(100, 4, 64, device="cuda").bfloat16()
    value = torch.randn_like(key)
    slots = torch.randperm(32 * 16, device="cuda")[:100]

    @torch.compile(fullgraph=True)
    def step(key, value, joint, slots):
        k_scale = compute_kv_scales(key, per_head=True)
        v_scale = compute_kv_scales(value)
        reshape_and_cache_flash(key, value, joint[:, 0], joint[:, 1], slots, "fp8", k_scale, v_scale)
        return k_scale, v_scale

    before = joint.clone()
    k_scale, v_scale = step(key, value, joint, slots)
    expected = as_bytes(before.clone())
    expected[:, 0] = expected_cache(before[:, 0], encode(key, k_scale, torch.float8_e4m3fn), slots)
    expected[:, 1] = expected_cache(before[:, 1], encode(value, v_scale, torch.float8_e4m3fn), slots)
    assert torch.equal(as_bytes(joint), expected)

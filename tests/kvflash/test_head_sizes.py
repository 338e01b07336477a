"""Every multiple of 8 from 8 to 512 is a head size (FlashAttention accepts them; engines' tests use 40, 72,
80 and 120). The kernels pad D to a power of two (at least 16, for tl.dot) and mask the padding: both routes
and the cache writer, fp16 and both FP8 formats with distinct non-unit K and V descales."""

import pytest
import torch

from kvflash.attn_common.testing import assert_close_fa_rule, poison
from kvflash.flash_attn_interface import reshape_and_cache_flash

from ..cases import assert_lse_close, check_against_reference, make_case, reference

HEAD_SIZES = [8, 24, 40, 72, 80, 120]
MIXES = {"decode": [(1, 21), (1, 3), (1, 40)], "mixed": [(1, 21), (6, 6), (4, 33)]}


@pytest.mark.parametrize("head_size", HEAD_SIZES)
@pytest.mark.parametrize("route", list(MIXES))
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn, torch.float8_e5m2], ids=["fp16", "e4m3", "e5m2"])
def test_head_sizes_on_both_routes(device, head_size, route, kv_dtype):
    case = make_case(MIXES[route], num_q_heads=6, num_kv_heads=2, head_size=head_size, kv_dtype=kv_dtype, device=device,
                     seed=head_size)  # fmt: skip
    features = dict(causal=True, softcap=6.0, s_aux=torch.randn(6, device=device))
    out = poison(torch.empty_like(case.q))
    _, lse = case.attend(out=out, return_softmax_lse=True, num_splits=2, **features)
    check_against_reference(case, out, lse, **features)


@pytest.mark.gpu
@pytest.mark.parametrize("head_size", [8, 24, 40, 72, 80, 120, 136, 200, 264, 504])
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn], ids=["bf16", "e4m3"])
def test_head_sizes_bf16_on_gpu(head_size, kv_dtype):
    """bf16 tl.dot on the GPU, tiles of 64/128 keys, both routes (a mixed batch, then its decode rows alone)."""
    mixed = [(1, 300), (70, 70), (33, 500), (1, 1)]
    for mix in (mixed, [(1, n) for _, n in mixed]):
        case = make_case(mix, num_q_heads=8, num_kv_heads=2, head_size=head_size, q_dtype=torch.bfloat16,
                         kv_dtype=kv_dtype, device="cuda", seed=head_size)  # fmt: skip
        features = dict(causal=True, window_size=(100, -1))
        out = poison(torch.empty_like(case.q))
        _, lse = case.attend(out=out, return_softmax_lse=True, **features)
        exact, exact_lse = reference(case, **features)
        lowp, _ = reference(case, compute_dtype=torch.bfloat16, **features)
        assert_close_fa_rule(out, exact, lowp, atol=2e-3, what=f"D={head_size} {len(mix)} sequences")
        assert_lse_close(lse, exact_lse)


@pytest.mark.parametrize("head_size", [8, 24, 72, 504])
def test_writer_head_sizes(device, head_size):
    gen = torch.Generator().manual_seed(head_size)
    num_tokens, hkv, num_blocks, block_size = 11, 2, 3, 4
    key = torch.randn(num_tokens, hkv, head_size, generator=gen).half().to(device)
    value = torch.randn(num_tokens, hkv, head_size, generator=gen).half().to(device)
    k_cache = torch.zeros(num_blocks, block_size, hkv, head_size, dtype=torch.float8_e4m3fn, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(device)
    k_scale, v_scale = torch.tensor([0.3, 0.7], device=device), 1.9
    reshape_and_cache_flash(key, value, k_cache, v_cache, slots, "fp8_e4m3", k_scale, v_scale)
    want_k = (key.float() / k_scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    want_v = (value.float() / v_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(k_cache.flatten(0, 1)[slots].view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(v_cache.flatten(0, 1)[slots].view(torch.uint8), want_v.view(torch.uint8))

"""flash_attn_varlen_func end to end: both routes (decode, prefill/mixed), paged and contiguous, FP8 with
distinct per-(sequence, head) descales, LSE, out=, against the float64 reference."""

import math

import pytest
import torch

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import poison

from ..cases import check_against_reference, make_case

DECODE_MIX = [(1, 37), (1, 1), (1, 70), (1, 0)]
MIXED_MIX = [(1, 37), (9, 9), (5, 41), (1, 1), (3, 0)]


@pytest.mark.parametrize("mix", [DECODE_MIX, MIXED_MIX], ids=["decode", "mixed"])
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn, torch.float8_e5m2], ids=["fp16", "e4m3", "e5m2"])
@pytest.mark.parametrize("block_size", [16, None], ids=["paged", "contiguous"])
def test_matches_reference(device, mix, kv_dtype, block_size):
    case = make_case(mix, num_q_heads=6, num_kv_heads=2, kv_dtype=kv_dtype, block_size=block_size, device=device,
                     seed=len(mix))  # fmt: skip
    features = dict(causal=True, softcap=5.0, s_aux=torch.randn(6, device=device))
    out = poison(torch.empty_like(case.q))
    result, lse = case.attend(out=out, return_softmax_lse=True, **features)
    assert result.data_ptr() == out.data_ptr() and lse.shape == (6, case.q.shape[0]) and lse.dtype == torch.float32
    check_against_reference(case, out, lse, **features)


@pytest.mark.gpu
@pytest.mark.parametrize("mix", [DECODE_MIX, MIXED_MIX], ids=["decode", "mixed"])
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn], ids=["bf16", "e4m3"])
def test_bf16_on_gpu(mix, kv_dtype):
    case = make_case(mix, num_q_heads=8, num_kv_heads=2, head_size=128, q_dtype=torch.bfloat16, kv_dtype=kv_dtype,
                     device="cuda", seed=3)  # fmt: skip
    out, lse = case.attend(causal=True, window_size=(20, -1), return_softmax_lse=True)
    check_against_reference(case, out, lse, causal=True, window_size=(20, -1))


def test_features_window_alibi_and_splits(device):
    case = make_case(DECODE_MIX, num_q_heads=4, num_kv_heads=1, device=device, seed=7)
    slopes = torch.rand(4, device=device)
    for num_splits in (1, 3):
        out, lse = case.attend(window_size=(10, 0), alibi_slopes=slopes, num_splits=num_splits, return_softmax_lse=True)
        check_against_reference(case, out, lse, window_size=(10, 0), alibi_slopes=slopes)


@pytest.mark.parametrize("mix", [DECODE_MIX, MIXED_MIX], ids=["decode", "mixed"])
def test_strided_and_expanded_sinks(device, mix):
    """Sinks given as a strided view or a stride-0 expanded tensor are read per head, on both routes."""
    case = make_case(mix, num_q_heads=4, num_kv_heads=2, device=device, seed=9)
    base = torch.randn(8, device=device)
    for sinks in (base[::2], torch.tensor([0.7], device=device).expand(4)):
        out, lse = case.attend(causal=True, s_aux=sinks, return_softmax_lse=True)
        check_against_reference(case, out, lse, causal=True, s_aux=sinks.contiguous())


def test_deterministic_and_fa_version_change_nothing(device):
    case = make_case(MIXED_MIX, device=device, seed=11)
    base = case.attend(causal=True)
    other = case.attend(causal=True, deterministic=True, fa_version=3)
    assert torch.equal(base, other)


def test_float_descales_accepted(device):
    case = make_case(DECODE_MIX, kv_dtype=torch.float8_e4m3fn, device=device, seed=5)
    out = case.attend(k_descale=0.5, v_descale=1.5)
    exact, _ = reference_attention(
        case.q,
        case.k,
        case.v,
        case.cu_seqlens_q,
        k_descale=0.5,
        v_descale=1.5,
        compute_dtype=torch.float64,
        **case.kv_args,
    )
    assert math.isfinite(float(out.float().abs().max()))
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-2)

"""Sliding windows, softcap, ALiBi and sinks, alone and together, with and without splits; LSE checked."""

import pytest
import torch


@pytest.mark.parametrize("window_size", [(0, 0), (10, -1), (33, 5), (-1, 0)])
def test_windows(device, decode_case, check_decode, window_size):
    case = decode_case(device, [70, 4, 0, 25], num_q_heads=4, num_kv_heads=2, seed=31)
    check_decode(case, num_splits=3, window_size=window_size)


def test_causal_is_accepted(device, decode_case, check_decode):
    case = decode_case(device, [70, 4], num_q_heads=4, num_kv_heads=2, seed=32)
    check_decode(case, causal=True)


def test_softcap(device, decode_case, check_decode):
    case = decode_case(device, [55, 90], num_q_heads=8, num_kv_heads=2, seed=33)
    check_decode(case, softcap=2.0, softmax_scale=0.5)


@pytest.mark.parametrize("per_seq", [False, True])
def test_alibi(device, decode_case, check_decode, per_seq):
    case = decode_case(device, [61, 8], num_q_heads=6, num_kv_heads=2, seed=34)
    gen = torch.Generator().manual_seed(35)
    shape = (2, 6) if per_seq else (6,)
    slopes = (torch.rand(shape, generator=gen) * 0.5).to(device)
    check_decode(case, num_splits=2, alibi_slopes=slopes)


def test_all_features_together(device, decode_case, check_decode):
    case = decode_case(device, [90, 0, 17], num_q_heads=10, num_kv_heads=2, block_size=1, seed=36)
    gen = torch.Generator().manual_seed(37)
    check_decode(
        case,
        num_splits=4,
        window_size=(40, 3),
        softcap=5.0,
        alibi_slopes=(torch.rand(10, generator=gen) * 0.2).to(device),
        s_aux=torch.randn(10, generator=gen).to(device),
    )

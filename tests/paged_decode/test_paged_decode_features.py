"""Sliding windows, softcap, ALiBi and sinks, alone and together, with and without splits; LSE checked."""

import pytest
import torch

from ..cases import check_paged_decode, make_case


@pytest.mark.parametrize("window_size", [(0, 0), (10, -1), (33, 5), (-1, 0)])
def test_windows(device, window_size):
    case = make_case([(1, 70), (1, 4), (1, 0), (1, 25)], num_q_heads=4, num_kv_heads=2, device=device, seed=31)
    check_paged_decode(case, num_splits=3, window_size=window_size)


def test_causal_is_accepted(device):
    case = make_case([(1, 70), (1, 4)], num_q_heads=4, num_kv_heads=2, device=device, seed=32)
    check_paged_decode(case, causal=True)


def test_softcap(device):
    case = make_case([(1, 55), (1, 90)], num_q_heads=8, num_kv_heads=2, device=device, seed=33)
    check_paged_decode(case, softcap=2.0, softmax_scale=0.5)


@pytest.mark.parametrize("per_seq", [False, True])
def test_alibi(device, per_seq):
    case = make_case([(1, 61), (1, 8)], num_q_heads=6, num_kv_heads=2, device=device, seed=34)
    gen = torch.Generator().manual_seed(35)
    shape = (2, 6) if per_seq else (6,)
    slopes = (torch.rand(shape, generator=gen) * 0.5).to(device)
    check_paged_decode(case, num_splits=2, alibi_slopes=slopes)


def test_all_features_together(device):
    case = make_case([(1, 90), (1, 0), (1, 17)], num_q_heads=10, num_kv_heads=2, block_size=1, device=device,
                     seed=36)  # fmt: skip
    gen = torch.Generator().manual_seed(37)
    check_paged_decode(
        case,
        num_splits=4,
        window_size=(40, 3),
        softcap=5.0,
        alibi_slopes=(torch.rand(10, generator=gen) * 0.2).to(device),
        s_aux=torch.randn(10, generator=gen).to(device),
    )

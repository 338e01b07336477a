"""FP8 caches with an fp16 query: both formats, distinct non-unit K and V descales per head and per
(sequence, head), Python-float and expanded forms."""

import pytest
import torch

from kvflash.paged_decode import paged_decode_attention

from ..cases import check_paged_decode, make_case

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("per_seq", [False, True])
def test_fp8_distinct_descales(device, kv_dtype, per_seq):
    num_seqs, num_kv_heads = 3, 2
    if per_seq:
        k_descale = torch.tensor([[0.02, 0.05], [0.11, 0.03], [0.07, 0.3]], device=device)
        v_descale = torch.tensor([[0.4, 0.013], [0.06, 0.21], [0.009, 0.15]], device=device)
    else:
        k_descale = torch.tensor([0.03, 0.12], device=device)
        v_descale = torch.tensor([0.25, 0.01], device=device)
    case = make_case([(1, 40), (1, 3), (1, 66)][:num_seqs], num_q_heads=6, num_kv_heads=num_kv_heads,
                     kv_dtype=kv_dtype, k_descale=k_descale, v_descale=v_descale, device=device, seed=11)  # fmt: skip
    check_paged_decode(case, num_splits=2)


@pytest.mark.parametrize("kv_dtype", FP8)
def test_fp8_swapped_descales_differ(device, kv_dtype):
    """The test data is sensitive to K/V descale mix-ups: swapping them changes the answer a lot."""
    k_descale = torch.tensor([0.03, 0.12], device=device)
    v_descale = torch.tensor([0.25, 0.01], device=device)
    case = make_case([(1, 30), (1, 17)], num_q_heads=4, num_kv_heads=2, kv_dtype=kv_dtype, k_descale=k_descale,
                     v_descale=v_descale, device=device, seed=12)  # fmt: skip
    kw = case.kv_args
    right = paged_decode_attention(case.q, case.k, case.v, case.max_seqlen_k, k_descale=k_descale,
                                   v_descale=v_descale, **kw)  # fmt: skip
    wrong = paged_decode_attention(case.q, case.k, case.v, case.max_seqlen_k, k_descale=v_descale,
                                   v_descale=k_descale, **kw)  # fmt: skip
    assert (right.float() - wrong.float()).abs().max() > 0.1


def test_fp8_float_and_expanded_descales(device):
    """A Python float for K and an expanded stride-0 [num_seqs, Hkv] view for V."""
    v_rows = torch.tensor([[0.2, 0.05]], device=device).expand(2, 2)
    case = make_case([(1, 25), (1, 38)], num_q_heads=4, num_kv_heads=2, kv_dtype=torch.float8_e4m3fn,
                     k_descale=torch.tensor([0.04, 0.04], device=device), v_descale=v_rows, device=device,
                     seed=13)  # fmt: skip
    case.k_descale = 0.04
    check_paged_decode(case)


def test_fp8_contiguous_with_features(device):
    k_descale = torch.tensor([0.05], device=device)
    v_descale = torch.tensor([[0.3], [0.02]], device=device)  # [num_seqs, 1]: per sequence, shared by heads
    case = make_case([(1, 44), (1, 12)], num_q_heads=4, num_kv_heads=1, kv_dtype=torch.float8_e5m2,
                     k_descale=k_descale, v_descale=v_descale, block_size=None, device=device, seed=14)  # fmt: skip
    check_paged_decode(case, num_splits=3, softcap=20.0, s_aux=torch.tensor([0.5, -1.0, 2.0, 0.0], device=device))

"""fp16 decode against the float64 reference: GQA ratios, page sizes, head sizes, odd and empty lengths,
joint (strided) caches and the contiguous layout."""

import pytest
import torch

from ..cases import check_paged_decode, make_case


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(8, 2), (5, 1), (12, 2), (4, 4)])
@pytest.mark.parametrize("block_size", [1, 16])
def test_gqa_and_page_sizes(device, num_q_heads, num_kv_heads, block_size):
    case = make_case([(1, 37), (1, 1), (1, 70)], num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                     block_size=block_size, device=device, seed=num_q_heads * 100 + block_size)  # fmt: skip
    check_paged_decode(case)


@pytest.mark.parametrize("head_size", [80, 128])
def test_head_sizes(device, head_size):
    case = make_case([(1, 45), (1, 19)], num_q_heads=6, num_kv_heads=1, head_size=head_size, block_size=32,
                     device=device, seed=head_size)  # fmt: skip
    check_paged_decode(case)


def test_empty_sequences(device):
    case = make_case([(1, 0), (1, 23), (1, 0)], num_q_heads=4, num_kv_heads=2, device=device, seed=3)
    out, lse = check_paged_decode(case)
    assert torch.all(out[0] == 0) and torch.all(out[2] == 0)
    assert torch.all(torch.isneginf(lse[:, [0, 2]]))


def test_joint_layout_cache(device):
    """K and V as strided slices of one [num_blocks, 2, block_size, Hkv, D] cache."""
    case = make_case([(1, 33), (1, 50)], num_q_heads=8, num_kv_heads=2, block_size=16, joint_layout=True,
                     device=device, seed=5)  # fmt: skip
    assert not case.k.is_contiguous()
    check_paged_decode(case)


def test_block_size_not_power_of_two(device):
    case = make_case([(1, 41), (1, 7)], num_q_heads=4, num_kv_heads=1, block_size=48, device=device, seed=6)
    check_paged_decode(case)


@pytest.mark.parametrize("with_seqused", [False, True])
def test_contiguous_kv(device, with_seqused):
    case = make_case([(1, 29), (1, 0), (1, 51)], num_q_heads=8, num_kv_heads=2, block_size=None, device=device,
                     seed=7)  # fmt: skip
    if with_seqused:  # FlashAttention's meaning: seqused_k caps each sequence's length
        case.kv_args["seqused_k"] = torch.tensor([20, 0, 51], dtype=torch.int32, device=device)
    check_paged_decode(case)


def test_large_group_is_chunked(device):
    """A group of 72 query heads per KV head takes more than one program per KV head."""
    case = make_case([(1, 21)], num_q_heads=72, num_kv_heads=1, head_size=32, device=device, seed=8)
    check_paged_decode(case)

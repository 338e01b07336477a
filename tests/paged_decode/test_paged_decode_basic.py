"""fp16 decode against the float64 reference: GQA ratios, page sizes, head sizes, odd and empty lengths,
joint (strided) caches and the contiguous layout."""

import pytest
import torch


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(8, 2), (5, 1), (12, 2), (4, 4)])
@pytest.mark.parametrize("block_size", [1, 16])
def test_gqa_and_page_sizes(device, decode_case, check_decode, num_q_heads, num_kv_heads, block_size):
    case = decode_case(device, [37, 1, 70], num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                       block_size=block_size, seed=num_q_heads * 100 + block_size)  # fmt: skip
    check_decode(case)


@pytest.mark.parametrize("head_size", [80, 128])
def test_head_sizes(device, decode_case, check_decode, head_size):
    case = decode_case(device, [45, 19], num_q_heads=6, num_kv_heads=1, head_size=head_size, block_size=32,
                       seed=head_size)  # fmt: skip
    check_decode(case)


def test_empty_sequences(device, decode_case, check_decode):
    case = decode_case(device, [0, 23, 0], num_q_heads=4, num_kv_heads=2, seed=3)
    out, lse = check_decode(case)
    assert torch.all(out[0] == 0) and torch.all(out[2] == 0)
    assert torch.all(torch.isneginf(lse[:, [0, 2]]))


def test_joint_layout_cache(device, decode_case, check_decode):
    """K and V as strided slices of one [num_blocks, 2, block_size, Hkv, D] cache."""
    case = decode_case(device, [33, 50], num_q_heads=8, num_kv_heads=2, block_size=16, joint_layout=True, seed=5)
    assert not case.k.is_contiguous()
    check_decode(case)


def test_block_size_not_power_of_two(device, decode_case, check_decode):
    case = decode_case(device, [41, 7], num_q_heads=4, num_kv_heads=1, block_size=48, seed=6)
    check_decode(case)


@pytest.mark.parametrize("with_seqused", [False, True])
def test_contiguous_kv(device, decode_case, check_decode, with_seqused):
    case = decode_case(device, [29, 0, 51], num_q_heads=8, num_kv_heads=2, contiguous=True, seed=7)
    if with_seqused:  # FlashAttention's meaning: seqused_k caps each sequence's length
        case.kwargs["seqused_k"] = torch.tensor([20, 0, 51], dtype=torch.int32, device=device)
    check_decode(case)


def test_large_group_is_chunked(device, decode_case, check_decode):
    """A group of 72 query heads per KV head takes more than one program per KV head."""
    case = decode_case(device, [21], num_q_heads=72, num_kv_heads=1, head_size=32, seed=8)
    check_decode(case)

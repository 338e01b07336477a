"""FP8 decode with several KV heads per program (``kv_heads > 1``): each row must meet its own head's K, V and
descales. Distinct, non-unit per-(sequence, head) descales make a head mix-up visible; every feature the kernel
combines with the head blocks is covered, both formats, pages 1 and 16, and the contiguous layout."""

import pytest
import torch

from kvflash.paged_decode.launch_config import choose_decode_config

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _descales(device, num_seqs, num_kv_heads, seed):
    gen = torch.Generator().manual_seed(seed)
    k = torch.rand(num_seqs, num_kv_heads, generator=gen) * 0.2 + 0.01
    v = torch.rand(num_seqs, num_kv_heads, generator=gen) * 0.4 + 0.02
    return k.to(device), v.to(device)


def _kv_heads(num_q_heads, num_kv_heads, head_size, max_seqlen_q=1):
    return choose_decode_config(
        num_seqs=3, num_kv_heads=num_kv_heads, group=num_q_heads // num_kv_heads, head_size=head_size,
        kv_itemsize=1, max_seqlen_k=100, window_left=-1, num_splits=0, multiprocessor_count=4, interpreter=True,
        max_seqlen_q=max_seqlen_q,
    ).kv_heads  # fmt: skip


@pytest.mark.parametrize(
    "heads, expected_kv_heads",
    [((8, 8), 4), ((16, 8), 4), ((32, 8), 4), ((12, 4), 4), ((24, 4), 2), ((12, 6), 2), ((7, 1), 1), ((64, 8), 2)],
)
def test_kv_heads_per_program(heads, expected_kv_heads):
    """Rows left as padding take the next KV heads (a power of two dividing Hkv)."""
    assert _kv_heads(*heads, head_size=128) == expected_kv_heads


def test_one_kv_head_per_program_when_rows_are_full():
    assert _kv_heads(32, 8, 128, max_seqlen_q=4) == 1  # 4 tokens x 4 heads fill 16 rows
    assert _kv_heads(32, 8, 512, max_seqlen_q=1) == 1  # 4 heads of 512 would leave tiles under 16 tokens
    bf16 = choose_decode_config(num_seqs=3, num_kv_heads=8, group=4, head_size=128, kv_itemsize=2, max_seqlen_k=100,
                                window_left=-1, num_splits=0, multiprocessor_count=4, interpreter=True)  # fmt: skip
    assert bf16.kv_heads == 1


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("num_q_heads, num_kv_heads", [(16, 4), (8, 8), (24, 4)])
def test_head_blocks_match_reference(device, decode_case, check_decode, kv_dtype, num_q_heads, num_kv_heads):
    lens = [37, 1, 80]
    k_descale, v_descale = _descales(device, len(lens), num_kv_heads, seed=num_q_heads)
    assert _kv_heads(num_q_heads, num_kv_heads, 64) > 1
    case = decode_case(device, lens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, kv_dtype=kv_dtype,
                       k_descale=k_descale, v_descale=v_descale, seed=31)  # fmt: skip
    for splits in (1, 3):
        check_decode(case, num_splits=splits)


@pytest.mark.parametrize("block_size", [1, 16])
def test_head_blocks_with_every_feature(device, decode_case, check_decode, block_size):
    lens = [50, 0, 23, 71]
    k_descale, v_descale = _descales(device, len(lens), 4, seed=block_size)
    case = decode_case(device, lens, num_q_heads=8, num_kv_heads=4, block_size=block_size,
                       kv_dtype=torch.float8_e4m3fn, k_descale=k_descale, v_descale=v_descale, seed=32)  # fmt: skip
    gen = torch.Generator().manual_seed(33)
    features = dict(
        window_size=(30, 0),
        softcap=15.0,
        s_aux=torch.randn(8, generator=gen).to(device),
        alibi_slopes=(torch.rand(len(lens), 8, generator=gen) * 0.1).to(device),
    )
    check_decode(case, num_splits=2, **features)


def test_head_blocks_contiguous_cache(device, decode_case, check_decode):
    lens = [19, 44]
    k_descale, v_descale = _descales(device, len(lens), 4, seed=5)
    case = decode_case(device, lens, num_q_heads=16, num_kv_heads=4, kv_dtype=torch.float8_e5m2,
                       k_descale=k_descale, v_descale=v_descale, contiguous=True, seed=34)  # fmt: skip
    check_decode(case, num_splits=2)


def test_head_blocks_swapped_heads_differ(device, decode_case, check_decode):
    """The data tells heads apart: the same cache with its KV heads reversed gives another answer."""
    lens = [40, 40]
    k_descale, v_descale = _descales(device, len(lens), 4, seed=6)
    case = decode_case(device, lens, num_q_heads=8, num_kv_heads=4, kv_dtype=torch.float8_e4m3fn,
                       k_descale=k_descale, v_descale=v_descale, seed=35)  # fmt: skip
    right, _ = check_decode(case)
    case.k, case.v = case.k.flip(2).contiguous(), case.v.flip(2).contiguous()
    from kvflash.paged_decode import paged_decode_attention

    wrong = paged_decode_attention(case.q, case.k, case.v, case.max_seqlen_k, **case.kwargs)
    assert (right.float() - wrong.float()).abs().max() > 0.05

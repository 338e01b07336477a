"""FP8 decode with several KV heads per program (``kv_heads > 1``): each row must meet its own head's K, V and
descales. Distinct, non-unit per-(sequence, head) descales make a head mix-up visible. Covered with the head
blocks: both formats, pages 1 and 16, the contiguous layout, splits, windows, softcap, sinks, ALiBi, fp8 output and
draft tokens (``q_tokens > 1``). Per-token-head descales with head blocks: test_paged_decode_per_token.py."""

import pytest
import torch

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import assert_close_fa_rule, poison
from kvflash.paged_decode import paged_decode_attention

from ..cases import check_paged_decode, decode_config, make_case, reference

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _descales(device, num_seqs, num_kv_heads, seed):
    gen = torch.Generator().manual_seed(seed)
    k = torch.rand(num_seqs, num_kv_heads, generator=gen) * 0.2 + 0.01
    v = torch.rand(num_seqs, num_kv_heads, generator=gen) * 0.4 + 0.02
    return k.to(device), v.to(device)


def _kv_heads(num_q_heads, num_kv_heads, head_size, max_seqlen_q=1):
    return decode_config(num_q_heads, num_kv_heads, head_size, max_seqlen_q=max_seqlen_q).kv_heads


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
    assert decode_config(32, 8, 128, kv_itemsize=2).kv_heads == 1


def test_runtime_query_count_only_for_four_head_blocks_at_head_pad_128():
    """The kernel's two builds of plain decode's query count (a ptxas scheduling choice, measured per config): the
    4-KV-head FP8 config at D 128 takes the runtime count, GQA 8's 2-head blocks, D 64 and bf16 the constant. The
    reference tests in this file run both builds (test_each_row_reads_its_own_heads_values and
    test_two_head_blocks_at_head_pad_128)."""
    assert decode_config(16, 8, 128).runtime_query_count and decode_config(32, 8, 128).runtime_query_count
    assert not decode_config(64, 8, 128).runtime_query_count  # 2 KV heads per program
    assert not decode_config(32, 8, 64).runtime_query_count  # two warps at D 64
    assert not decode_config(32, 8, 128, kv_itemsize=2).runtime_query_count


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("num_q_heads, num_kv_heads", [(16, 4), (8, 8), (24, 4)])
def test_head_blocks_match_reference(device, kv_dtype, num_q_heads, num_kv_heads):
    seqs = [(1, 37), (1, 1), (1, 80)]
    k_descale, v_descale = _descales(device, len(seqs), num_kv_heads, seed=num_q_heads)
    assert _kv_heads(num_q_heads, num_kv_heads, 64) > 1
    case = make_case(seqs, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, kv_dtype=kv_dtype,
                     k_descale=k_descale, v_descale=v_descale, device=device, seed=31)  # fmt: skip
    for splits in (1, 3):
        check_paged_decode(case, num_splits=splits)


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_size", [(64, 8, 128), (16, 2, 96)])
def test_two_head_blocks_at_head_pad_128(device, kv_dtype, num_q_heads, num_kv_heads, head_size):
    """GQA 8 at a padded head size of 128: two KV heads per program, V in halves (one warp on the GPU); several
    tiles per sequence, splits off, forced and automatic."""
    seqs = [(1, 300), (1, 1), (1, 517)]
    k_descale, v_descale = _descales(device, len(seqs), num_kv_heads, seed=head_size)
    assert _kv_heads(num_q_heads, num_kv_heads, head_size) == 2
    case = make_case(seqs, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                     kv_dtype=kv_dtype, k_descale=k_descale, v_descale=v_descale, device=device, seed=40)  # fmt: skip
    for splits in (1, 3, 0):
        check_paged_decode(case, num_splits=splits)


@pytest.mark.parametrize("block_size", [1, 16])
def test_head_blocks_with_every_feature(device, block_size):
    seqs = [(1, 50), (1, 0), (1, 23), (1, 71)]
    k_descale, v_descale = _descales(device, len(seqs), 4, seed=block_size)
    case = make_case(seqs, num_q_heads=8, num_kv_heads=4, block_size=block_size, kv_dtype=torch.float8_e4m3fn,
                     k_descale=k_descale, v_descale=v_descale, device=device, seed=32)  # fmt: skip
    gen = torch.Generator().manual_seed(33)
    features = dict(
        window_size=(30, 0),
        softcap=15.0,
        s_aux=torch.randn(8, generator=gen).to(device),
        alibi_slopes=(torch.rand(len(seqs), 8, generator=gen) * 0.1).to(device),
    )
    check_paged_decode(case, num_splits=2, **features)


def test_head_blocks_contiguous_cache(device):
    seqs = [(1, 19), (1, 44)]
    k_descale, v_descale = _descales(device, len(seqs), 4, seed=5)
    case = make_case(seqs, num_q_heads=16, num_kv_heads=4, kv_dtype=torch.float8_e5m2, k_descale=k_descale,
                     v_descale=v_descale, block_size=None, device=device, seed=34)  # fmt: skip
    check_paged_decode(case, num_splits=2)


def test_each_row_reads_its_own_heads_values(device):
    """V of KV head h holds h + 1 everywhere (exact in FP8): whatever the softmax, a query head of KV head h must
    give (h + 1) * v_descale[seq, h], so a row reading another head's V or V descale shows at once."""
    seqs = [(1, 40), (1, 7)]
    k_descale, v_descale = _descales(device, len(seqs), 8, seed=7)
    case = make_case(seqs, num_q_heads=16, num_kv_heads=8, head_size=128, kv_dtype=torch.float8_e4m3fn,
                     k_descale=k_descale, v_descale=v_descale, device=device, seed=36)  # fmt: skip
    assert _kv_heads(16, 8, 128) == 4  # two blocks of four KV heads per sequence
    head_values = torch.arange(1, 9, dtype=torch.float32, device=device)[None, None, :, None]
    case.v.copy_(head_values.expand_as(case.v).to(case.v.dtype))
    out = paged_decode_attention(case.q, case.k, case.v, case.max_seqlen_k, num_splits=2, **case.kwargs)
    expected = (head_values.flatten()[None, :] * v_descale).repeat_interleave(2, dim=1)  # [num_seqs, Hq]
    # P in fp16 sums to the denominator within its rounding; another head's value is >= 11 % off.
    torch.testing.assert_close(out.float(), expected[:, :, None].expand_as(out).float(), rtol=2e-3, atol=0)


def test_head_blocks_with_fp8_output(device):
    seqs = [(1, 33), (1, 70)]
    k_descale, v_descale = _descales(device, len(seqs), 4, seed=8)
    case = make_case(seqs, num_q_heads=16, num_kv_heads=4, kv_dtype=torch.float8_e5m2, k_descale=k_descale,
                     v_descale=v_descale, device=device, seed=37)  # fmt: skip
    output_scale = torch.tensor([0.02], device=device)
    out = torch.full(case.q.shape, float("nan")).to(torch.float8_e4m3fn).to(device)  # poisoned
    paged_decode_attention(case.q, case.k, case.v, case.max_seqlen_k, out=out, output_scale=output_scale,
                           num_splits=1, **case.kwargs)  # fmt: skip
    ref, _ = reference(case)
    want = (ref / 0.02).clamp(-448, 448)
    got = out.double()
    assert not bool(torch.isnan(got).any())  # every element written
    # Half an fp8 step of rounding (2^-4 relative) plus the fp16 dots' error on the attention (2e-3, as the
    # bf16-output tests allow), scaled like the output: near-zero outputs with cancelling terms need the second.
    assert bool(((got - want).abs() <= want.abs() * 2.0**-4 + 2e-3 / 0.02).all())


def test_head_blocks_with_draft_tokens(device):
    """Two query tokens per sequence with ``defer_longer_sequences`` (rows = token x KV head x query head): a
    program holds 2 tokens of 4 KV heads of GQA 2; causal order within the draft."""
    seqs = [(1, 30), (1, 9), (1, 51)]
    q_lens = [2, 1, 2]
    k_descale, v_descale = _descales(device, len(seqs), 4, seed=9)
    case = make_case(seqs, num_q_heads=8, num_kv_heads=4, kv_dtype=torch.float8_e4m3fn, k_descale=k_descale,
                     v_descale=v_descale, device=device, seed=38)  # fmt: skip
    cfg = decode_config(8, 4, 64, max_seqlen_q=2, fill_rows=False)
    assert (cfg.q_tokens, cfg.kv_heads) == (2, 4)
    gen = torch.Generator().manual_seed(39)
    q = torch.randn(sum(q_lens), 8, 64, generator=gen).half().to(device)
    cu_q = torch.tensor([0, 2, 3, 5], dtype=torch.int32, device=device)
    out = poison(torch.empty_like(q))
    paged_decode_attention(q, case.k, case.v, case.max_seqlen_k, cu_seqlens_q=cu_q, max_seqlen_q=2, causal=True,
                           defer_longer_sequences=True, out=out, **case.kwargs)  # fmt: skip
    ref_kw = dict(case.kwargs, window_size=(-1, 0))
    ref, _ = reference_attention(q, case.k, case.v, cu_q, compute_dtype=torch.float64, **ref_kw)
    ref_lp, _ = reference_attention(q, case.k, case.v, cu_q, compute_dtype=q.dtype, **ref_kw)
    assert_close_fa_rule(out, ref, ref_lp, atol=2e-3)

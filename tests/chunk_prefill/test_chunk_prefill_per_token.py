"""Per-token-head descales in the chunked-prefill kernel (``[num_blocks, block_size, Hkv]`` paged,
``[total_k, Hkv]`` contiguous with ``kv_descale_per_token=True``).

Sequence mixes are ``(q_len, kv_len)`` tuples (decode rows, chunked prefill, an empty query, q_len == kv_len in
one batch). Keys and values have per-token and per-head magnitudes spread over two decades; unused cache scale
slots are NaN; outputs are poisoned; float64 and fp16 references give FlashAttention's tolerance rule.
"""

import pytest
import torch

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import assert_close_fa_rule, make_fp8_per_token_kv, poison
from kvflash.chunk_prefill import chunk_prefill_attention

from ..cases import cumulative

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
MIX = [(1, 37), (19, 19), (5, 44), (0, 7), (26, 61), (3, 3)]


def _draw(n, num_kv_heads, head_size, gen):
    mag = 10 ** (torch.rand(n, num_kv_heads, 1, generator=gen) * 2 - 1)
    return torch.randn(n, num_kv_heads, head_size, generator=gen) * mag


def _case(device, seqs, kv_dtype, *, block_size=16, num_q_heads=4, num_kv_heads=2, head_size=32, seed=0,
          q_dtype=torch.float16):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    k_seqs = [_draw(kv, num_kv_heads, head_size, gen) for _, kv in seqs]
    v_seqs = [_draw(kv, num_kv_heads, head_size, gen) for _, kv in seqs]
    kv = make_fp8_per_token_kv(k_seqs, v_seqs, kv_dtype, block_size, generator=gen, device=device)
    q = torch.randn(sum(s[0] for s in seqs), num_q_heads, head_size, generator=gen).to(q_dtype).to(device)
    cu_q = cumulative([s[0] for s in seqs], device)
    return q, cu_q, kv


def _check(seqs, q, cu_q, kv, *, per_token_kw=None, atol=2e-3, **features):
    out = poison(torch.empty_like(q))
    extra = {} if per_token_kw is None else {"kv_descale_per_token": per_token_kw}
    max_q, max_k = max(s[0] for s in seqs), max(s[1] for s in seqs)
    got, lse = chunk_prefill_attention(
        q, kv.k, kv.v, cu_q, max_q, max_k, k_descale=kv.k_descale, v_descale=kv.v_descale, out=out,
        return_lse=True, **kv.kv_args, **extra, **features,
    )  # fmt: skip
    assert got is out
    ref_kw = dict(k_descale=kv.k_descale, v_descale=kv.v_descale, kv_descale_per_token=True, **kv.kv_args,
                  **features)  # fmt: skip
    ref, ref_lse = reference_attention(q, kv.k, kv.v, cu_q, compute_dtype=torch.float64, **ref_kw)
    ref_lp, _ = reference_attention(q, kv.k, kv.v, cu_q, compute_dtype=q.dtype, **ref_kw)
    assert_close_fa_rule(got, ref, ref_lp, atol=atol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse.to(lse.device)))
    finite = torch.isfinite(ref_lse)
    assert float((lse.double() - ref_lse.to(lse.device))[finite].abs().max()) < 2e-3
    return got


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_per_token_paged_causal(device, kv_dtype, block_size):
    q, cu_q, kv = _case(device, MIX, kv_dtype, block_size=block_size, seed=block_size)
    _check(MIX, q, cu_q, kv, causal=True)


@pytest.mark.parametrize("kv_dtype", FP8)
def test_per_token_window_softcap_sinks(device, kv_dtype):
    """Window (left edge masked tiles, full tiles, diagonal tiles), softcap, sinks, GQA 6/2."""
    seqs = [(40, 90), (1, 50), (12, 12)]
    q, cu_q, kv = _case(device, seqs, kv_dtype, num_q_heads=6, seed=21)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -0.5], device=device)
    _check(seqs, q, cu_q, kv, causal=True, window_size=(33, 0), softcap=12.0, s_aux=sinks)


@pytest.mark.parametrize("kv_dtype", FP8)
def test_per_token_non_causal_window(device, kv_dtype):
    seqs = [(9, 70), (30, 30)]
    q, cu_q, kv = _case(device, seqs, kv_dtype, seed=22)
    _check(seqs, q, cu_q, kv, window_size=(10, 5))


@pytest.mark.parametrize("kv_dtype", FP8)
def test_per_token_contiguous(device, kv_dtype):
    seqs = [(7, 30), (16, 45), (1, 9)]
    q, cu_q, kv = _case(device, seqs, kv_dtype, block_size=None, seed=23)
    _check(seqs, q, cu_q, kv, per_token_kw=True, causal=True)


def test_per_token_scales_matter(device):
    """Swapping K's and V's per-token scales changes the answer: each is read where it belongs."""
    seqs = [(10, 40), (5, 33)]
    q, cu_q, kv = _case(device, seqs, torch.float8_e4m3fn, seed=24)
    right = _check(seqs, q, cu_q, kv, causal=True)
    swapped = chunk_prefill_attention(q, kv.k, kv.v, cu_q, 10, 40, k_descale=kv.v_descale, v_descale=kv.k_descale,
                                      causal=True, **kv.kv_args)  # fmt: skip
    assert (right.float() - swapped.float()).abs().max() > 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", FP8)
def test_per_token_bf16_long(device, kv_dtype):
    seqs = [(300, 1200), (1, 700), (64, 64)]
    q, cu_q, kv = _case(device, seqs, kv_dtype, num_q_heads=8, head_size=128, q_dtype=torch.bfloat16, seed=25)
    _check(seqs, q, cu_q, kv, causal=True, atol=1e-2)

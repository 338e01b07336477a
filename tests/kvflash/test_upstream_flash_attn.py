"""kvflash.flash_attn (FlashAttention's upstream order): flash_attn_varlen_func and flash_attn_with_kvcache
against the float64 reference, paged and contiguous, FP8 with distinct non-unit K and V descales."""

import pytest
import torch

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import assert_close_fa_rule, encode_fp8, make_paged_kv
from kvflash.flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
from kvflash.fp8_utils import quantize_query

from ..cases import assert_lse_close, check_against_reference, cumulative, make_case

MIX = [(1, 37), (6, 6), (4, 29), (1, 1)]


def _reference(q, k, v, cu_q, **kwargs):
    exact, lse = reference_attention(q, k, v, cu_q, compute_dtype=torch.float64, **kwargs)
    # An fp8 query's output is bf16: that is the low precision of its computation.
    low_dtype = torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype
    lowp, _ = reference_attention(q, k, v, cu_q, compute_dtype=low_dtype, **kwargs)
    return exact, lowp, lse


@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn], ids=["fp16", "e4m3"])
@pytest.mark.parametrize("block_size", [16, None], ids=["paged", "contiguous"])
def test_varlen_upstream_order(device, kv_dtype, block_size):
    case = make_case(MIX, num_q_heads=4, num_kv_heads=2, head_size=32, kv_dtype=kv_dtype, block_size=block_size,
                     device=device, seed=11)  # fmt: skip
    kv_lens = [m[1] for m in MIX]
    # Upstream passes cumulative key lengths even for a paged cache; positional, in upstream order.
    cu_k = case.kv_args.get("cu_seqlens_k", cumulative(kv_lens, device))
    block_table = case.kv_args.get("block_table")
    out, lse, s_dmask = flash_attn_varlen_func(
        case.q, case.k, case.v, case.cu_seqlens_q, cu_k, case.max_seqlen_q, case.max_seqlen_k,
        0.0, 0.3, True, (20, -1), 0.0, None, False, True, block_table,
        k_descale=case.k_descale, v_descale=case.v_descale,
    )  # fmt: skip
    assert s_dmask is None and lse.shape == (4, case.q.shape[0])
    check_against_reference(case, out, lse, softmax_scale=0.3, causal=True, window_size=(20, -1))
    plain = flash_attn_varlen_func(
        case.q, case.k, case.v, case.cu_seqlens_q, cu_k, case.max_seqlen_q, case.max_seqlen_k,
        softmax_scale=0.3, causal=True, window_size=(20, -1), block_table=block_table,
        k_descale=case.k_descale, v_descale=case.v_descale,
    )  # fmt: skip
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out)


def test_varlen_seqused_k_overrides_cumulative_lengths(device):
    case = make_case(MIX, num_q_heads=4, num_kv_heads=2, head_size=32, block_size=16, device=device, seed=12)
    wrong_cu_k = cumulative([1] * len(MIX), device)  # ignored: seqused_k gives the lengths
    out = flash_attn_varlen_func(
        case.q, case.k, case.v, case.cu_seqlens_q, wrong_cu_k, case.max_seqlen_q, case.max_seqlen_k,
        causal=True, block_table=case.kv_args["block_table"], seqused_k=case.kv_args["seqused_k"],
    )  # fmt: skip
    check_against_reference(case, out, causal=True)


def _expected_cache_after_append(k_seqs, new, descale, dtype):
    """Per sequence: the old tokens followed by the new ones, stored as the cache stores them."""
    fp8 = dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    return [torch.cat([old, encode_fp8(n, descale, dtype) if fp8 else n.to(dtype)]) for old, n in zip(k_seqs, new)]


@pytest.mark.parametrize(
    "q_dtype, kv_dtype, fp8_query",
    [(torch.float16, torch.float16, False), (torch.float16, torch.float8_e4m3fn, False),
     (torch.float16, torch.float8_e5m2, False), (torch.float16, torch.float8_e5m2, True),
     pytest.param(torch.bfloat16, torch.float8_e4m3fn, False, marks=pytest.mark.gpu)],
    ids=["fp16", "fp16-e4m3", "fp16-e5m2", "fp16-e5m2-fp8-query", "bf16-e4m3"],
)  # fmt: skip
def test_kvcache_paged_append(device, q_dtype, kv_dtype, fp8_query):
    """``fp8_query``: the model's fp16 keys and values are appended while the query comes in e4m3 with q_descale."""
    g = torch.Generator().manual_seed(21)
    batch, hq, hkv, d, seqlen_new, block_size = 3, 6, 2, 32, 2, 16
    old_lens = [15, 0, 40]  # 15 + 2 crosses a page boundary
    fp8 = kv_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    k_scale = torch.rand(hkv, generator=g) * 0.5 + 0.2 if fp8 else None
    v_scale = torch.rand(hkv, generator=g) * 2.0 + 1.5 if fp8 else None
    enc = lambda x, s: encode_fp8(x, s, kv_dtype) if fp8 else x.to(kv_dtype)
    k_old = [enc(torch.randn(n, hkv, d, generator=g), k_scale) for n in old_lens]
    v_old = [enc(torch.randn(n, hkv, d, generator=g), v_scale) for n in old_lens]
    # Room for the new tokens: pages are allocated as if every sequence were already 2 tokens longer.
    pad = [torch.zeros(seqlen_new, hkv, d, dtype=kv_dtype)] * batch
    paged = make_paged_kv([torch.cat(p) for p in zip(k_old, pad)], [torch.cat(p) for p in zip(v_old, pad)],
                          block_size, generator=g)  # fmt: skip
    k_new = torch.randn(batch, seqlen_new, hkv, d, generator=g).to(q_dtype)
    v_new = torch.randn(batch, seqlen_new, hkv, d, generator=g).to(q_dtype)
    q = torch.randn(batch, seqlen_new, hq, d, generator=g).to(q_dtype)
    k_cache, v_cache = paged.k_cache.to(device), paged.v_cache.to(device)
    table = paged.block_table.to(device)
    cache_seqlens = torch.tensor(old_lens, dtype=torch.int32, device=device)
    descales = dict(k_descale=k_scale.to(device), v_descale=v_scale.to(device)) if fp8 else {}
    q_scales = {}
    if fp8_query:
        q8, q_descale = quantize_query(q.reshape(-1, hq, d), hkv)
        q, q_scales = q8.reshape(q.shape), dict(q_descale=q_descale)
    out, lse = flash_attn_with_kvcache(
        q.to(device), k_cache, v_cache, k_new.to(device), v_new.to(device), cache_seqlens=cache_seqlens,
        block_table=table, causal=True, softcap=4.0, return_softmax_lse=True, **descales,
        **{k: x.to(device) for k, x in q_scales.items()},
    )  # fmt: skip
    assert out.shape == (batch, seqlen_new, hq, d) and lse.shape == (batch, hq, seqlen_new)
    assert out.dtype == (torch.bfloat16 if fp8_query else q_dtype)
    # The cache now holds old + new tokens exactly where upstream writes them.
    k_exp = _expected_cache_after_append(k_old, k_new.unbind(0), k_scale, kv_dtype)
    v_exp = _expected_cache_after_append(v_old, v_new.unbind(0), v_scale, kv_dtype)
    for s in range(batch):
        pos = torch.arange(old_lens[s] + seqlen_new)
        rows = table.cpu()[s].long()[pos // block_size], pos % block_size
        assert torch.equal(k_cache.cpu()[rows].view(torch.uint8), k_exp[s].view(torch.uint8)), f"k of sequence {s}"
        assert torch.equal(v_cache.cpu()[rows].view(torch.uint8), v_exp[s].view(torch.uint8)), f"v of sequence {s}"
    # Attention over the expected contents, as an independent contiguous cache.
    cu_q = cumulative([seqlen_new] * batch, "cpu")
    cu_k = cumulative([n + seqlen_new for n in old_lens], "cpu")
    scales = dict(k_descale=k_scale, v_descale=v_scale) if fp8 else {}
    exact, lowp, exact_lse = _reference(q.reshape(-1, hq, d), torch.cat(k_exp), torch.cat(v_exp), cu_q,
                                        cu_seqlens_k=cu_k, causal=True, softcap=4.0, **scales, **q_scales)  # fmt: skip
    assert_close_fa_rule(out.cpu().reshape(-1, hq, d), exact, lowp, atol=2e-3)
    lse_flat = lse.cpu().permute(1, 0, 2).reshape(hq, -1)
    assert_lse_close(lse_flat, exact_lse)


def test_kvcache_contiguous_batch_idx_and_int_seqlens(device):
    g = torch.Generator().manual_seed(22)
    batch_cache, seqlen_cache, hq, hkv, d = 4, 24, 4, 1, 16
    k_cache = torch.randn(batch_cache, seqlen_cache, hkv, d, generator=g).half().to(device)
    v_cache = torch.randn(batch_cache, seqlen_cache, hkv, d, generator=g).half().to(device)
    k_before = k_cache.clone()
    idx = torch.tensor([2, 0], dtype=torch.int32, device=device)
    q = torch.randn(2, 1, hq, d, generator=g).half().to(device)
    k_new = torch.randn(2, 1, hkv, d, generator=g).half().to(device)
    v_new = torch.randn(2, 1, hkv, d, generator=g).half().to(device)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=9, cache_batch_idx=idx,
                                  window_size=(5, 0), num_splits=2)  # fmt: skip
    written = torch.zeros(batch_cache, seqlen_cache, dtype=torch.bool)
    written[[2, 0], 9] = True
    assert torch.equal(k_cache.cpu()[~written], k_before.cpu()[~written]), "only the new slots change"
    assert torch.equal(k_cache[2, 9].cpu(), k_new[0, 0].cpu()) and torch.equal(k_cache[0, 9].cpu(), k_new[1, 0].cpu())
    keys = torch.cat([k_cache[2, :10], k_cache[0, :10]]).cpu()
    values = torch.cat([v_cache[2, :10], v_cache[0, :10]]).cpu()
    exact, lowp, _ = _reference(q.cpu().reshape(2, hq, d), keys, values, cumulative([1, 1], "cpu"),
                                cu_seqlens_k=cumulative([10, 10], "cpu"), window_size=(5, 0))  # fmt: skip
    assert_close_fa_rule(out.cpu().reshape(2, hq, d), exact, lowp, atol=2e-3)


def test_kvcache_read_only_decode(device):
    case = make_case([(1, 33), (1, 2), (1, 17)], num_q_heads=4, num_kv_heads=2, head_size=32, block_size=16,
                     device=device, seed=23)  # fmt: skip
    slopes = torch.rand(4, generator=torch.Generator().manual_seed(24)).to(device)
    out, lse = flash_attn_with_kvcache(case.q.reshape(3, 1, 4, 32), case.k, case.v,
                                       cache_seqlens=case.kv_args["seqused_k"], block_table=case.kv_args["block_table"],
                                       alibi_slopes=slopes, return_softmax_lse=True)  # fmt: skip
    check_against_reference(case, out.reshape(3, 4, 32), lse[:, :, 0].T, alibi_slopes=slopes)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(rotary_cos=torch.ones(4, 8), rotary_sin=torch.ones(4, 8)), "rotary_cos"),
        (dict(cache_leftpad=torch.zeros(2, dtype=torch.int32)), "cache_leftpad"),
        (dict(k=torch.zeros(2, 1, 1, 16, dtype=torch.float16)), "k, v"),
        (dict(k=torch.zeros(2, 1, 1, 16, dtype=torch.float16), v=torch.zeros(2, 1, 1, 16, dtype=torch.float16)),
         "cache_seqlens"),
        (dict(cache_seqlens=torch.zeros(2, dtype=torch.int64)), "cache_seqlens"),
        (dict(cache_seqlens=True), "cache_seqlens"),
        (dict(cache_batch_idx=torch.zeros(2, dtype=torch.int32), block_table=torch.zeros(2, 1, dtype=torch.int32)),
         "cache_batch_idx"),
        (dict(cache_batch_idx=torch.zeros(3, dtype=torch.int32)), "cache_batch_idx"),
        (dict(rotary_interleaved=1), "rotary_interleaved"),
    ],
)  # fmt: skip
def test_kvcache_rejects_naming_the_argument(kwargs, name):
    cache = torch.zeros(2, 16, 1, 16, dtype=torch.float16)
    with pytest.raises((NotImplementedError, ValueError, TypeError), match=name):
        flash_attn_with_kvcache(torch.zeros(2, 1, 2, 16, dtype=torch.float16), cache, cache.clone(), **kwargs)


def test_varlen_rejects_dropout():
    q = torch.zeros(4, 2, 16, dtype=torch.float16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, 0.1)


def test_kvcache_rejects_per_sequence_descale_when_appending():
    cache = torch.zeros(2, 16, 2, 16, dtype=torch.float8_e4m3fn)
    new = torch.zeros(2, 1, 2, 16, dtype=torch.float16)
    with pytest.raises(NotImplementedError, match="k_descale"):
        flash_attn_with_kvcache(torch.zeros(2, 1, 2, 16, dtype=torch.float16), cache, cache.clone(), new, new,
                                cache_seqlens=3, k_descale=torch.ones(2, 2), v_descale=0.5)  # fmt: skip

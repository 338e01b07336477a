"""The reference attention against an independent, deliberately naive loop (one query row, one head,
one key at a time, float64), on random inputs with every feature, paged and contiguous, FP8 included."""

import math
import zlib

import pytest
import torch

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import encode_fp8, make_paged_kv


def naive_attention(q, k_seqs, v_seqs, q_lens, *, scale, causal, window, softcap, slopes, sinks, k_scale, v_scale):
    """q [total_q, Hq, D] float64; k_seqs/v_seqs per-sequence [kv_len, Hkv, D] real values (float64)."""
    total_q, hq, d = q.shape
    group = hq // k_seqs[0].shape[1]
    out = torch.zeros(total_q, hq, d, dtype=torch.float64)
    lse = torch.full((hq, total_q), -math.inf, dtype=torch.float64)
    row = 0
    for s, q_len in enumerate(q_lens):
        kv_len = k_seqs[s].shape[0]
        for i in range(q_len):
            p = kv_len - q_len + i
            for h in range(hq):
                kvh = h // group
                logits, values = [], []
                for j in range(kv_len):
                    if causal and j > p:
                        continue
                    if window[0] >= 0 and j < p - window[0]:
                        continue
                    if window[1] >= 0 and j > p + window[1]:
                        continue
                    kj = k_seqs[s][j, kvh] * k_scale[s][kvh]
                    x = float(q[row, h] @ kj) * scale
                    if softcap > 0:
                        x = softcap * math.tanh(x / softcap)
                    if slopes is not None:
                        x -= float(slopes[s][h]) * abs(p - j)
                    logits.append(x)
                    values.append(v_seqs[s][j, kvh] * v_scale[s][kvh])
                all_logits = logits + ([float(sinks[h])] if sinks is not None else [])
                if all_logits:
                    m = max(all_logits)
                    denom = sum(math.exp(x - m) for x in all_logits)
                    lse[h, row] = m + math.log(denom)
                    for x, val in zip(logits, values):
                        out[row, h] += math.exp(x - m) / denom * val
            row += 1
    return out, lse


SEQ_MIX = [(1, 9), (4, 4), (3, 11), (0, 5), (2, 0)]  # (q_len, kv_len): decode, prefill, chunked, empty q, empty kv


@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize(
    "features",
    [
        dict(causal=False),
        dict(causal=True),
        dict(causal=True, window=(3, -1), softcap=2.0),
        dict(causal=False, window=(2, 1), alibi=True),
        dict(causal=True, sinks=True, alibi=True),
    ],
    ids=["plain", "causal", "window_softcap", "window_lr_alibi", "sinks_alibi"],
)
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_reference_matches_naive_loop(paged, features, kv_dtype):
    g = torch.Generator().manual_seed(zlib.crc32(f"{paged}{features}{kv_dtype}".encode()) % 2**31)
    hq, hkv, d, block = 6, 2, 16, 4
    q_lens = [m[0] for m in SEQ_MIX]
    kv_lens = [m[1] for m in SEQ_MIX]
    num_seqs = len(SEQ_MIX)
    q = torch.randn(sum(q_lens), hq, d, generator=g).half()
    fp8 = kv_dtype != torch.float16
    # Distinct per-(sequence, head) descales for K and V (1.0 for fp16).
    k_scale = torch.rand(num_seqs, hkv, generator=g) * 0.5 + 0.25 if fp8 else torch.ones(num_seqs, hkv)
    v_scale = torch.rand(num_seqs, hkv, generator=g) * 2.0 + 1.5 if fp8 else torch.ones(num_seqs, hkv)
    real_k = [torch.randn(n, hkv, d, generator=g) for n in kv_lens]
    real_v = [torch.randn(n, hkv, d, generator=g) for n in kv_lens]
    stored_k = [encode_fp8(x, k_scale[s], kv_dtype) if fp8 else x.half() for s, x in enumerate(real_k)]
    stored_v = [encode_fp8(x, v_scale[s], kv_dtype) if fp8 else x.half() for s, x in enumerate(real_v)]
    slopes = torch.rand(num_seqs, hq, generator=g) if features.get("alibi") else None
    sinks = torch.randn(hq, generator=g) if features.get("sinks") else None
    window = features.get("window", (-1, -1))
    softcap = features.get("softcap", 0.0)
    cu_q = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    kwargs = dict(
        causal=features["causal"],
        window_size=window,
        softcap=softcap,
        alibi_slopes=slopes,
        s_aux=sinks,
        k_descale=k_scale,
        v_descale=v_scale,
        compute_dtype=torch.float64,
    )
    if paged:
        cache = make_paged_kv(stored_k, stored_v, block, generator=g)
        out, lse = reference_attention(
            q, cache.k_cache, cache.v_cache, cu_q, block_table=cache.block_table, seqused_k=cache.seqused_k, **kwargs
        )
    else:
        cu_k = torch.tensor([0] + list(torch.tensor(kv_lens).cumsum(0)), dtype=torch.int32)
        out, lse = reference_attention(q, torch.cat(stored_k), torch.cat(stored_v), cu_q, cu_seqlens_k=cu_k, **kwargs)
    want_out, want_lse = naive_attention(
        q.double(),
        [x.double() for x in stored_k],
        [x.double() for x in stored_v],
        q_lens,
        scale=1 / math.sqrt(d),
        causal=features["causal"],
        window=window,
        softcap=softcap,
        slopes=slopes,
        sinks=sinks,
        k_scale=k_scale.double(),
        v_scale=v_scale.double(),
    )
    torch.testing.assert_close(out, want_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse, want_lse, rtol=1e-9, atol=1e-9)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_descales_really_indexed_per_sequence_and_head():
    """Swapping K and V descales (or using one for both) must change the answer."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 16, generator=g).half()
    k = torch.randn(6, 2, 16, generator=g).to(torch.float8_e4m3fn)
    v = torch.randn(6, 2, 16, generator=g).to(torch.float8_e4m3fn)
    cu_q = torch.tensor([0, 1, 3], dtype=torch.int32)
    cu_k = torch.tensor([0, 2, 6], dtype=torch.int32)
    ks = torch.tensor([[0.5, 1.5], [2.0, 0.25]])
    vs = torch.tensor([[3.0, 0.75], [1.25, 2.5]])
    base, _ = reference_attention(q, k, v, cu_q, cu_seqlens_k=cu_k, k_descale=ks, v_descale=vs)
    swapped, _ = reference_attention(q, k, v, cu_q, cu_seqlens_k=cu_k, k_descale=vs, v_descale=ks)
    per_head_only, _ = reference_attention(q, k, v, cu_q, cu_seqlens_k=cu_k, k_descale=ks[0], v_descale=vs[0])
    assert not torch.allclose(base, swapped)
    assert torch.allclose(base[:1], per_head_only[:1]) and not torch.allclose(base[1:], per_head_only[1:])


def test_empty_rows_are_zero_with_minus_inf_lse_and_sink_lse():
    q = torch.randn(2, 2, 16).half()
    k = torch.randn(4, 2, 16).half()
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
    cu_k = torch.tensor([0, 0, 4], dtype=torch.int32)  # sequence 0 has no keys
    out, lse = reference_attention(q, k, k, cu_q, cu_seqlens_k=cu_k)
    assert torch.all(out[0] == 0) and torch.all(lse[:, 0] == -math.inf) and torch.isfinite(lse[:, 1]).all()
    sinks = torch.tensor([0.5, -1.0])
    out, lse = reference_attention(q, k, k, cu_q, cu_seqlens_k=cu_k, s_aux=sinks)
    assert torch.all(out[0] == 0) and torch.allclose(lse[:, 0], sinks)


def test_low_precision_reference_runs_in_input_dtype():
    q = torch.randn(4, 2, 16).half()
    k = torch.randn(4, 2, 16).half()
    cu = torch.tensor([0, 4], dtype=torch.int32)
    lowp, _ = reference_attention(q, k, k, cu, cu_seqlens_k=cu, causal=True, compute_dtype=torch.float16)
    exact, _ = reference_attention(q, k, k, cu, cu_seqlens_k=cu, causal=True, compute_dtype=torch.float64)
    assert lowp.dtype == torch.float16
    assert 0 < (lowp.double() - exact).abs().max() < 1e-2

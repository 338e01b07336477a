"""The ``"kvflash"`` transformers attention function on its own (no transformers needed): a left-padded batch
with GQA, sliding window, softcap and sinks against the float64 reference over each row's real keys."""

import types

import pytest
import torch

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import assert_close_fa_rule
from kvflash.integrations.transformers import attention_forward

from ..cases import cumulative


@pytest.mark.parametrize("seqlen_q", [6, 1], ids=["prefill", "decode"])
def test_left_padded_batch_matches_reference(device, seqlen_q):
    g = torch.Generator().manual_seed(41)
    batch, hq, hkv, d, seqlen_k = 3, 6, 2, 16, 6
    pads = [0, 2, 5]  # row 2 has a single real key
    q = torch.randn(batch, hq, seqlen_q, d, generator=g).half()
    k = torch.randn(batch, hkv, seqlen_k, d, generator=g).half()
    v = torch.randn(batch, hkv, seqlen_k, d, generator=g).half()
    mask = torch.tensor([[0] * p + [1] * (seqlen_k - p) for p in pads], dtype=torch.bool)
    sinks = torch.randn(hq, generator=g)
    module = types.SimpleNamespace(is_causal=True, config=types.SimpleNamespace())
    out, weights = attention_forward(module, q.to(device), k.to(device), v.to(device), mask.to(device), scaling=0.4,
                                     sliding_window=4, softcap=3.0, s_aux=sinks.to(device))  # fmt: skip
    assert weights is None and out.shape == (batch, seqlen_q, hq, d)
    # Reference: row b keeps its real keys only; its queries are the last seqlen_q positions.
    q_packed = q.transpose(1, 2).reshape(-1, hq, d)
    k_real = torch.cat([k[b, :, p:].transpose(0, 1) for b, p in enumerate(pads)])
    v_real = torch.cat([v[b, :, p:].transpose(0, 1) for b, p in enumerate(pads)])
    args = dict(cu_seqlens_k=cumulative([seqlen_k - p for p in pads], "cpu"), softmax_scale=0.4, causal=True,
                window_size=(3, 0), softcap=3.0, s_aux=sinks)  # fmt: skip
    cu_q = cumulative([seqlen_q] * batch, "cpu")
    exact, _ = reference_attention(q_packed, k_real, v_real, cu_q, compute_dtype=torch.float64, **args)
    lowp, _ = reference_attention(q_packed, k_real, v_real, cu_q, compute_dtype=torch.float16, **args)
    assert_close_fa_rule(out.cpu().reshape(-1, hq, d), exact, lowp, atol=2e-3)


def test_right_padding_is_refused():
    # CPU only: on a GPU the same check is a device-side assertion, which would end the test process's CUDA context.
    q = torch.zeros(1, 2, 3, 16, dtype=torch.float16)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    module = types.SimpleNamespace(is_causal=True, config=types.SimpleNamespace())
    with pytest.raises(RuntimeError, match="left padding"):
        attention_forward(module, q, q, q, mask)


def test_chunked_attention_is_refused():
    q = torch.zeros(1, 2, 3, 16, dtype=torch.float16)
    module = types.SimpleNamespace(is_causal=True, config=types.SimpleNamespace(attention_chunk_size=8))
    with pytest.raises(NotImplementedError, match="attention_chunk_size"):
        attention_forward(module, q, q, q, None)

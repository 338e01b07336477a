"""attn_common's shared jit helpers, run through small kernels (interpreter on the CPU, or the GPU)."""

import math

import pytest
import torch

from kvflash.attn_common import UNBOUNDED_WINDOW

from .attn_common_probe_kernels import merge_pair_kernel, streaming_softmax_kernel


def torch_softmax_attention(scores, values, kv_len, left, right, softcap, slope, sinks):
    m, n = scores.shape
    s = scores.double()
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    q_pos = torch.arange(m)[:, None] + (kv_len - m)
    k_pos = torch.arange(n)[None, :]
    s = s - slope * (q_pos - k_pos).abs()
    visible = (k_pos < kv_len) & (k_pos >= q_pos - left) & (k_pos <= q_pos + right)
    s = s.masked_fill(~visible, -math.inf)
    full = torch.cat([s, sinks.double()[:, None]], 1) if sinks is not None else s
    lse = torch.logsumexp(full, 1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(s - safe[:, None]) @ values.double(), lse


@pytest.mark.parametrize(
    "kv_len, left, right, softcap, slope, use_sink",
    [
        (32, UNBOUNDED_WINDOW, UNBOUNDED_WINDOW, 0.0, 0.0, False),
        (27, UNBOUNDED_WINDOW, 0, 0.0, 0.0, False),  # causal, odd length
        (32, 5, 0, 3.0, 0.1, False),  # window + softcap + alibi
        (30, 4, 2, 0.0, 0.0, True),  # window left/right + sinks
        (3, 0, 0, 0.0, 0.0, False),  # only the diagonal key visible
        (0, UNBOUNDED_WINDOW, 0, 0.0, 0.0, False),  # nothing visible: out 0, lse -inf
        (0, UNBOUNDED_WINDOW, 0, 0.0, 0.0, True),  # nothing visible but a sink: out 0, lse = sink
    ],
)
def test_streaming_softmax_helpers_match_torch(device, kv_len, left, right, softcap, slope, use_sink):
    m, n, d = 16, 32, 16
    scores = (torch.randn(m, n) * 4).to(device)
    values = torch.randn(n, d).to(device)
    sinks = torch.randn(m).to(device)
    out = torch.full((m, d), float("nan"), device=device)
    lse = torch.full((m,), float("nan"), device=device)
    streaming_softmax_kernel[(1,)](
        scores,
        values,
        sinks,
        out,
        lse,
        kv_len,
        left,
        right,
        softcap,
        slope,
        M=m,
        N=n,
        D=d,
        BLOCK_N=16,
        USE_SOFTCAP=softcap > 0,
        USE_SINK=use_sink,
    )
    want_out, want_lse = torch_softmax_attention(
        scores.cpu(), values.cpu(), kv_len, left, right, softcap, slope, sinks.cpu() if use_sink else None
    )
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.cpu().double(), want_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), want_lse, rtol=1e-5, atol=1e-5)


def test_merge_lse_pair_matches_formula_including_empty_parts(device):
    m, d = 16, 16
    out_a, out_b = torch.randn(m, d, device=device), torch.randn(m, d, device=device)
    lse_a, lse_b = torch.randn(m, device=device), torch.randn(m, device=device)
    lse_a[:4] = -math.inf  # first part empty
    lse_b[2:6] = -math.inf  # second part empty; rows 2-3 both empty
    out = torch.full((m, d), float("nan"), device=device)
    lse = torch.full((m,), float("nan"), device=device)
    merge_pair_kernel[(1,)](out_a, lse_a, out_b, lse_b, out, lse, M=m, D=d)
    want_lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - want_lse).nan_to_num(0.0)
    w_b = torch.exp(lse_b - want_lse).nan_to_num(0.0)
    want_out = out_a * w_a[:, None] + out_b * w_b[:, None]
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, want_lse)
    assert torch.all(out[2:4] == 0) and torch.all(lse[2:4] == -math.inf)

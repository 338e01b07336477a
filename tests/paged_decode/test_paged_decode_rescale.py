"""The running softmax across tiles when every row's maximum keeps growing along the keys, slowly (a few nats over
the sequence) and fast (several nats per tile), over 16-bit and FP8 caches, with and without splits, against float64.
A kernel that skips or misapplies the rescaling of its running output or denominator fails here."""

import pytest
import torch

from kvflash.attn_common.dtypes import FP8_TORCH_DTYPES, saturate_to_fp8

from ..cases import check_paged_decode, make_case


def ramp_keys(case, top: float) -> None:
    """Scale each sequence's key ``t`` by ``1 + top * t / kv_len`` in place (FP8: re-stored, saturated), so each
    row's largest score keeps growing along the keys: by about ``top / 20`` nats per 16-key tile here."""
    start = 0
    for _, kv_len in case.seqs:
        ramp = 1 + top * torch.arange(kv_len, device=case.k.device) / max(kv_len, 1)
        rows = case.k[start : start + kv_len].float() * ramp[:, None, None]
        if case.k.dtype in FP8_TORCH_DTYPES:
            case.k[start : start + kv_len] = saturate_to_fp8(rows, 1.0, case.k.dtype)
        else:
            case.k[start : start + kv_len] = rows.to(case.k.dtype)
        start += kv_len


@pytest.mark.parametrize("top", [4.0, 60.0], ids=["slow-growth", "fast-growth"])
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float8_e4m3fn], ids=["fp16", "e4m3"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_growing_row_maxima(device, top, kv_dtype, num_splits):
    case = make_case([(1, 300), (1, 77), (1, 16)], num_q_heads=8, num_kv_heads=2, head_size=64, kv_dtype=kv_dtype,
                     block_size=None, device=device, seed=31)  # fmt: skip
    ramp_keys(case, top)
    check_paged_decode(case, num_splits=num_splits)

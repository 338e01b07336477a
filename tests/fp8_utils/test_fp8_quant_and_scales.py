"""scaled_fp8_quant, dequantize_fp8, compute_kv_scales and the kv_cache_dtype strings against plain torch."""

import re

import pytest
import torch

from kvflash.attn_common import saturate_to_fp8
from kvflash.fp8_utils import (
    KV_CACHE_DTYPES,
    compute_kv_scales,
    dequantize_fp8,
    kv_cache_torch_dtype,
    scaled_fp8_quant,
)

FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]


def _bytes(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", FP8_DTYPES)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fp8_scaled_quant_static(device, dtype, x_dtype):
    x = (torch.randn(7, 3, 33) * 4).to(x_dtype).to(device)
    for scale in (0.0123, torch.tensor([0.0123], device=device), torch.tensor(0.0123, device=device)):
        x_fp8, used = scaled_fp8_quant(x, scale, dtype)
        assert x_fp8.dtype == dtype and x_fp8.shape == x.shape
        assert used.dtype == torch.float32 and used.shape == (1,)
        ref_scale = torch.tensor([0.0123], device=device)
        assert torch.equal(used, ref_scale)
        assert torch.equal(_bytes(x_fp8), _bytes(saturate_to_fp8(x, ref_scale, dtype)))
    assert torch.isfinite(x_fp8.float()).all()  # 4-sigma / 0.0123 > 448: saturates, never NaN


@pytest.mark.parametrize("dtype", FP8_DTYPES)
def test_fp8_scaled_quant_dynamic(device, dtype):
    x = (torch.randn(64, 48) * 3).half().to(device)
    x_fp8, scale = scaled_fp8_quant(x, dtype=dtype)
    fmax = torch.finfo(dtype).max
    expected_scale = x.abs().amax().float().reshape(1) / fmax
    assert torch.equal(scale, expected_scale)
    assert torch.equal(_bytes(x_fp8), _bytes(saturate_to_fp8(x, expected_scale, dtype)))
    assert x_fp8.float().abs().max() == fmax  # the largest element lands on the format max
    zeros_fp8, zero_scale = scaled_fp8_quant(torch.zeros(4, 4, device=device), dtype=dtype)
    assert (zero_scale > 0).all() and torch.isfinite(zero_scale).all()
    assert not _bytes(zeros_fp8).any()


def test_fp8_scaled_quant_errors():
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="scale"):
        scaled_fp8_quant(x, torch.ones(2))
    with pytest.raises(ValueError, match="scale"):
        scaled_fp8_quant(x, 0.0)
    with pytest.raises(TypeError, match="scale"):
        scaled_fp8_quant(x, torch.ones(1, dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype"):
        scaled_fp8_quant(x, 1.0, torch.float16)
    with pytest.raises(TypeError, match="x"):
        scaled_fp8_quant(x.to(torch.float8_e4m3fn))


def test_fp8_scaled_quant_op_registration():
    op = torch.ops.kvflash.scaled_fp8_quant.default
    torch.library.opcheck(op, (torch.randn(3, 8), None, torch.float8_e4m3fn))
    torch.library.opcheck(op, (torch.randn(3, 8).half(), torch.tensor([0.1]), torch.float8_e5m2))


@pytest.mark.parametrize("dtype", FP8_DTYPES)
def test_fp8_dequantize(device, dtype):
    x = torch.randn(6, 4, 32, device=device)
    per_head = torch.tensor([0.01, 0.2, 3.0, 0.05], device=device)
    x_fp8 = saturate_to_fp8(x, per_head[:, None], dtype)
    for scale, ref in ((0.3, torch.tensor(0.3)), (torch.tensor([0.3]), torch.tensor(0.3)), (per_head[:, None], None)):
        scale = scale.to(device) if isinstance(scale, torch.Tensor) else scale
        ref = per_head[:, None] if ref is None else ref.to(device)
        for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
            out = dequantize_fp8(x_fp8, scale, out_dtype)
            assert out.dtype == out_dtype and out.shape == x.shape
            assert torch.equal(out, (x_fp8.float() * ref).to(out_dtype))
    back = dequantize_fp8(x_fp8, per_head[:, None], torch.float32)
    assert torch.allclose(back, x, rtol=2**-2, atol=0.01)  # atol: subnormals of the scale-3.0 head


def test_fp8_dequantize_errors():
    x_fp8 = torch.zeros(6, 4, 32).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="scale"):
        dequantize_fp8(x_fp8, torch.ones(5, 1))
    with pytest.raises(ValueError, match="scale"):
        dequantize_fp8(x_fp8, torch.ones(2, 6, 4, 32))  # would enlarge the output
    with pytest.raises(TypeError, match="x_fp8"):
        dequantize_fp8(torch.zeros(3), 1.0)
    with pytest.raises(TypeError, match="dtype"):
        dequantize_fp8(x_fp8, 1.0, torch.int8)


@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES + [torch.float8_e4m3fnuz])
@pytest.mark.parametrize("margin", [1.0, 1.25])
def test_fp8_compute_kv_scales(device, fp8_dtype, margin):
    x = (
        torch.randn(40, 4, 64, device=device).bfloat16()
        * torch.tensor([0.5, 4.0, 30.0, 0.01], device=device)[:, None].bfloat16()
    )
    fmax = torch.finfo(fp8_dtype).max
    per_tensor = compute_kv_scales(x, fp8_dtype, margin=margin)
    assert per_tensor.dtype == torch.float32 and per_tensor.shape == (1,) and per_tensor.device == x.device
    assert torch.equal(per_tensor, x.abs().amax().float().reshape(1) / fmax * margin)
    per_head = compute_kv_scales(x, fp8_dtype, per_head=True, margin=margin)
    assert per_head.shape == (4,)
    assert torch.equal(per_head, x.abs().amax(dim=(0, 2)).float() / fmax * margin)
    assert len(set(per_head.tolist())) == 4


def test_fp8_compute_kv_scales_zero_input_is_safe(device):
    for per_head in (False, True):
        for x in (torch.zeros(8, 2, 16, device=device), torch.zeros(0, 2, 16, device=device)):
            scale = compute_kv_scales(x, per_head=per_head)
            assert scale.shape == ((2,) if per_head else (1,))
            assert (scale > 0).all() and torch.isfinite(scale).all()
            assert not _bytes(saturate_to_fp8(x, scale.reshape(-1, 1), torch.float8_e4m3fn)).any()


def test_fp8_compute_kv_scales_errors():
    x = torch.randn(8, 2, 16)
    for margin in (0.5, float("inf"), True):
        with pytest.raises(ValueError, match="margin"):
            compute_kv_scales(x, margin=margin)
    with pytest.raises(TypeError, match="fp8_dtype"):
        compute_kv_scales(x, torch.float16)
    with pytest.raises(ValueError, match="x"):
        compute_kv_scales(x[0])
    with pytest.raises(TypeError, match="x"):
        compute_kv_scales(x.to(torch.float8_e4m3fn))


def test_fp8_kv_cache_torch_dtype():
    assert KV_CACHE_DTYPES == (
        "auto", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_e4m3_per_token_head", "fp8_e5m2_per_token_head"
    )  # fmt: skip
    for model_dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert kv_cache_torch_dtype("auto", model_dtype) == model_dtype
        assert kv_cache_torch_dtype("fp8", model_dtype) == torch.float8_e4m3fn
        assert kv_cache_torch_dtype("fp8_e4m3", model_dtype) == torch.float8_e4m3fn
        assert kv_cache_torch_dtype("fp8_e5m2", model_dtype) == torch.float8_e5m2
        assert kv_cache_torch_dtype("fp8_e4m3_per_token_head", model_dtype) == torch.float8_e4m3fn
        assert kv_cache_torch_dtype("fp8_e5m2_per_token_head", model_dtype) == torch.float8_e5m2
    with pytest.raises(ValueError, match=re.escape("'auto', 'fp8', 'fp8_e4m3', 'fp8_e5m2'")):
        kv_cache_torch_dtype("int8", torch.float16)
    with pytest.raises(TypeError, match="model_dtype"):
        kv_cache_torch_dtype("auto", torch.int8)

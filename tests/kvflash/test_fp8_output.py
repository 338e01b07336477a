"""``output_scale``: fp8 e4m3 output ``saturate(attention / output_scale)`` on every route (prefill, decode with
and without split-KV, mixed), with and without an ``out`` buffer; the LSE stays fp32 and unscaled."""

import pytest
import torch

from ..cases import assert_lse_close, make_case, reference

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max

ROUTES = {
    "decode": ([(1, 300), (1, 40), (1, 0)], 0),
    "decode-split": ([(1, 700), (1, 90)], 4),
    "speculative": ([(3, 50), (1, 33)], 1),
    "mixed": ([(20, 40), (1, 33), (2, 17)], 0),
    "prefill": ([(30, 60), (25, 25)], 0),
}


def _nan_fp8(shape) -> torch.Tensor:
    return torch.full(shape, float("nan")).to(torch.float8_e4m3fn)


def _expected(case, scale: float, **features):
    ref, ref_lse = reference(case, **features)
    return ref / scale, ref_lse


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("with_out", [False, True], ids=["alloc", "out"])
def test_fp8_output_every_route(device, route, kv_dtype, with_out):
    mix, splits = ROUTES[route]
    case = make_case(mix, kv_dtype=kv_dtype, device=device, seed=len(route) + with_out)
    want, want_lse = _expected(case, 1.0, causal=True)
    # The largest attention values saturate (above 448 * scale), the others spread over e4m3's range.
    scale = float(want.abs().max()) / 600 * (1 + 0.1 * torch.rand(1, device=device))
    out = _nan_fp8(case.q.shape).to(device) if with_out else None
    got, lse = case.attend(causal=True, output_scale=scale, return_softmax_lse=True, num_splits=splits, out=out)
    assert got.dtype == torch.float8_e4m3fn
    if with_out:
        assert got is out
    want = want / float(scale)
    got = got.double()
    assert not torch.isnan(got).any()
    # One rounding to e4m3 (3 mantissa bits: at most 2^-4 relative) of a value accurate to ~2e-3 before scaling.
    clipped = want.clamp(-E4M3_MAX, E4M3_MAX)
    assert ((got - clipped).abs() <= clipped.abs() * 2**-4 + 2e-3 / float(scale)).all()
    assert (want.abs() > E4M3_MAX).any(), "the case must exercise saturation"
    assert got.abs().max() == E4M3_MAX
    assert_lse_close(lse, want_lse)


def test_fp8_output_is_the_scaled_16bit_output(device):
    """Same call with and without ``output_scale``: the fp8 one is the 16-bit one divided and rounded once."""
    case = make_case([(9, 70), (1, 20)], kv_dtype=torch.float8_e4m3fn, device=device, seed=5)
    scale = torch.tensor([0.5], device=device)
    plain = case.attend(causal=True).double()
    fp8 = case.attend(causal=True, output_scale=scale).double() * 0.5
    assert ((fp8 - plain).abs() <= plain.abs() * 2**-4 + 1e-3).all()
    assert (fp8 - plain).abs().max() > 0  # it really is rounded to fp8


@pytest.mark.gpu
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("block_size", [16, 64])
def test_fp8_output_bf16_queries_gpu(route, kv_dtype, block_size):
    """bf16 queries (compiled dots), both page sizes, every route; against the float64 reference."""
    mix, splits = ROUTES[route]
    mix = [(q, kv * 8) for q, kv in mix]  # longer contexts: several tiles and splits per sequence
    case = make_case(mix, num_q_heads=8, num_kv_heads=2, head_size=128, q_dtype=torch.bfloat16, kv_dtype=kv_dtype,
                     block_size=block_size, device="cuda", seed=block_size + len(route))  # fmt: skip
    want, _ = _expected(case, 1.0, causal=True)
    scale = float(want.abs().max()) / 600
    out = _nan_fp8(case.q.shape).cuda()
    got = case.attend(causal=True, output_scale=torch.tensor([scale], device="cuda"), num_splits=splits, out=out)
    clipped = (want / scale).clamp(-E4M3_MAX, E4M3_MAX)
    got = got.double()
    assert not torch.isnan(got).any()
    assert ((got - clipped).abs() <= clipped.abs() * 2**-4 + 2e-2 / scale).all()

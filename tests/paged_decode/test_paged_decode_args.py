"""Argument handling: out= buffers, bad arguments with named errors, the CPU reference fallback and the
custom op's registration (fake implementation, schema)."""

import pytest
import torch

from kvflash.attn_common.testing import poison
from kvflash.paged_decode import paged_decode_attention

from ..cases import assert_lse_close, make_case


@pytest.fixture
def small(device):
    return make_case([(1, 20), (1, 9)], num_q_heads=4, num_kv_heads=2, device=device, seed=41)


def call(case, **overrides):
    kwargs = {**case.kwargs, **overrides}
    q = kwargs.pop("q", case.q)
    return paged_decode_attention(q, case.k, case.v, kwargs.pop("max_seqlen_k", case.max_seqlen_k), **kwargs)


def test_out_buffer_strided_view(small):
    """``out`` may be a view with strides (here every other head of a wider buffer)."""
    q = small.q
    wide = poison(torch.empty(q.shape[0], 2 * q.shape[1], q.shape[2], dtype=q.dtype, device=q.device))
    view = wide[:, ::2]
    got = call(small, out=view)
    assert got is view
    assert torch.isnan(wide[:, 1::2]).all(), "wrote outside the out view"
    torch.testing.assert_close(view, call(small), atol=0, rtol=0)


def test_strided_query(small):
    """q may be a view (e.g. a slice of a fused qkv tensor) as long as stride(-1) == 1."""
    fused = torch.randn(2, 12, 64, device=small.q.device).half()
    q = fused[:, :4]
    torch.testing.assert_close(call(small, q=q), call(small, q=q.contiguous()), atol=0, rtol=0)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"num_splits": -1}, ValueError, "num_splits"),
        ({"num_splits": 1.5}, TypeError, "num_splits"),
        ({"max_seqlen_k": -3}, ValueError, "max_seqlen_k"),
        ({"q": "first"}, TypeError, "q"),
        ({"softcap": -1.0}, ValueError, "softcap"),
        ({"softmax_scale": 0.0}, ValueError, "softmax_scale"),
        ({"window_size": (-2, 0)}, ValueError, "window_size"),
        ({"s_aux": torch.zeros(3)}, ValueError, "s_aux"),
        ({"alibi_slopes": torch.zeros(5)}, ValueError, "alibi_slopes"),
        ({"k_descale": torch.ones(3)}, ValueError, "k_descale"),
        ({"v_descale": "x"}, TypeError, "v_descale"),
        ({"block_table": None}, ValueError, "cu_seqlens_k"),
        ({"seqused_k": None}, ValueError, "seqused_k"),
    ],
)
def test_bad_arguments(small, overrides, error, match):
    overrides = {
        key: val.to(small.q.device) if isinstance(val, torch.Tensor) else val for key, val in overrides.items()
    }
    with pytest.raises(error, match=match):
        call(small, **overrides)


def test_wrong_query_shape(small):
    with pytest.raises(ValueError, match="q: expected shape"):
        call(small, q=small.q[:1])
    with pytest.raises(ValueError, match="q"):
        call(small, q=small.q[0])
    with pytest.raises(TypeError, match="q"):
        call(small, q=small.q.float())


def test_wrong_out(small):
    with pytest.raises(TypeError, match="out"):
        call(small, out=torch.empty_like(small.q, dtype=torch.bfloat16))  # float32 is accepted (unrounded)
    with pytest.raises(ValueError, match="out"):
        call(small, out=torch.empty_like(small.q)[:, :2])


def test_kv_dtype_mismatch(small):
    with pytest.raises(TypeError, match="k"):
        paged_decode_attention(small.q, small.k.float(), small.v.float(), 20, **small.kwargs)


def test_cpu_reference_fallback(small, monkeypatch):
    """CPU tensors with the interpreter off take the PyTorch reference; it agrees with the kernel."""
    if small.q.device.type != "cpu":
        pytest.skip("the fallback is for CPU tensors")
    sinks = torch.tensor([0.1, 0.2, 0.3, 0.4])
    kernel_out, kernel_lse = call(small, s_aux=sinks, window_size=(6, 0), return_lse=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ref_out, ref_lse = call(small, s_aux=sinks, window_size=(6, 0), return_lse=True)
    torch.testing.assert_close(kernel_out, ref_out, atol=2e-3, rtol=0)
    assert_lse_close(kernel_lse, ref_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("fp8_out", [False, True], ids=["q-dtype-out", "fp8-out"])
def test_custom_op_opcheck(small, fp8_out):
    """Schema, fake implementation and mutation declarations of the registered op."""
    num_seqs, num_q_heads, _ = small.q.shape
    device = small.q.device
    scale = torch.full((num_seqs, 2), 0.5, device=device)
    out = torch.empty(small.q.shape, dtype=torch.float8_e4m3fn if fp8_out else small.q.dtype, device=device)
    output_scale = torch.full((1,), 0.25, device=device) if fp8_out else None
    args = (
        small.q, small.k, small.v, small.kwargs["block_table"], small.kwargs["seqused_k"], None,
        torch.arange(num_seqs + 1, dtype=torch.int32, device=device), scale, scale, None, None,
        out, torch.empty(num_q_heads, num_seqs, device=device), 1, 20, 0.125, -1, 0, 0.0, 2,
        False, output_scale, None,
    )  # fmt: skip
    # test_schema compares the outputs with CPU ops that fp8 lacks: the fp8 output checks fake and AOT dispatch.
    utils = ("test_faketensor", "test_aot_dispatch_static") if fp8_out else ("test_schema", "test_faketensor",
                                                                             "test_aot_dispatch_static")  # fmt: skip
    torch.library.opcheck(torch.ops.kvflash.paged_decode_attention.default, args, test_utils=utils)

"""chunk_prefill_attention's argument errors, its custom op (schema, fake, opcheck) and the CPU fallback."""

import pytest
import torch

from kvflash.attn_common import reference_attention
from kvflash.chunk_prefill import chunk_prefill_attention

from ..cases import make_case


@pytest.fixture
def case():
    return make_case([(3, 5), (1, 20)], num_q_heads=8, nan_unused=True, seed=23)


def _call(case, **overrides):
    args = dict(
        q=case.q, k=case.k, v=case.v, cu_seqlens_q=case.cu_seqlens_q, max_seqlen_q=case.max_seqlen_q,
        max_seqlen_k=case.max_seqlen_k, **case.kv_args,
    )  # fmt: skip
    args.update(overrides)
    return chunk_prefill_attention(**args)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (lambda c: dict(q=c.q.float()), TypeError, "q: expected dtype"),
        (lambda c: dict(q=c.q[..., :36]), ValueError, "head size"),
        (lambda c: dict(k=c.k.to(torch.bfloat16), v=c.v.to(torch.bfloat16)), TypeError, "k/v dtype"),
        (lambda c: dict(v=c.v.to(torch.float8_e4m3fn)), TypeError, "k and v must share"),
        (lambda c: dict(cu_seqlens_q=c.cu_seqlens_q.long()), TypeError, "cu_seqlens_q"),
        (lambda c: dict(cu_seqlens_q=c.cu_seqlens_q[:1]), ValueError, "cu_seqlens_q"),
        (lambda c: dict(seqused_k=None), ValueError, "seqused_k"),
        (lambda c: dict(block_table=None), ValueError, "cu_seqlens_k"),
        (lambda c: dict(block_table=c.kv_args["block_table"][:1]), ValueError, "block_table"),
        (lambda c: dict(max_seqlen_q=3.0), TypeError, "max_seqlen_q"),
        (lambda c: dict(max_seqlen_k=-1), ValueError, "max_seqlen_k"),
        (lambda c: dict(causal=1), TypeError, "causal"),
        (lambda c: dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
        (lambda c: dict(window_size=(-2, 0)), ValueError, "window_size"),
        (lambda c: dict(window_size=3), TypeError, "window_size"),
        (lambda c: dict(softcap=-1.0), ValueError, "softcap"),
        (lambda c: dict(alibi_slopes=torch.ones(7)), ValueError, "alibi_slopes"),
        (lambda c: dict(alibi_slopes=torch.ones(8, dtype=torch.float16)), TypeError, "alibi_slopes"),
        (lambda c: dict(s_aux=torch.ones(4)), ValueError, "s_aux"),
        (lambda c: dict(k_descale=torch.ones(3)), ValueError, "k_descale"),
        (lambda c: dict(v_descale="1.0"), TypeError, "v_descale"),
        (lambda c: dict(out=torch.empty(c.q.shape[0], 8, 32, dtype=torch.float16)), ValueError, "out"),
        (lambda c: dict(out=torch.empty(c.q.shape, dtype=torch.bfloat16)), TypeError, "out"),
        (lambda c: dict(q=c.q[:, :5]), ValueError, "multiple of the number of KV heads"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(case, overrides, error, match):
    with pytest.raises(error, match=match):
        _call(case, **overrides(case))


def test_contiguous_layout_rejects_a_block_table_shape_mismatch():
    case = make_case([(3, 5), (1, 20)], num_q_heads=8, block_size=None, seed=29)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        _call(case, cu_seqlens_k=case.kv_args["cu_seqlens_k"][:2])


@pytest.mark.parametrize("kind", ["q-dtype-out", "fp8-out", "fp8-query"])
def test_custom_op_passes_opcheck(kind):
    fp8_out, fp8_query = kind == "fp8-out", kind == "fp8-query"
    case = make_case([(2, 3), (1, 17)], num_q_heads=4, num_kv_heads=2, head_size=32, nan_unused=True, seed=31,
                     kv_dtype=torch.float8_e4m3fn if fp8_query else None)  # fmt: skip
    descale = torch.ones(2, 2)
    q = case.q.to(torch.float8_e4m3fn) if fp8_query else case.q
    out_dtype = torch.float8_e4m3fn if fp8_out else (torch.bfloat16 if fp8_query else case.q.dtype)
    out = torch.empty(case.q.shape, dtype=out_dtype)
    args = (
        q, case.k, case.v, out, case.cu_seqlens_q, case.max_seqlen_q,
        case.kv_args["block_table"], case.kv_args["seqused_k"], None, 0.3, -1, 0, 0.0, None, None, descale,
        descale, True, 0, torch.full((1,), 0.25) if fp8_out else None, torch.full((2, 2), 0.5) if fp8_query else None,
    )  # fmt: skip
    # test_schema compares the tensors with CPU ops that fp8 lacks: fp8 tensors check fake and AOT dispatch.
    utils = ("test_faketensor", "test_aot_dispatch_static") if fp8_out or fp8_query else None
    torch.library.opcheck(torch.ops.kvflash.chunk_prefill.default, args, **({"test_utils": utils} if utils else {}))


def test_cpu_tensors_without_the_interpreter_use_the_reference(monkeypatch, case):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out, lse = _call(case, causal=True, return_lse=True)
    want_out, want_lse = reference_attention(case.q, case.k, case.v, case.cu_seqlens_q, **case.kv_args, causal=True)
    torch.testing.assert_close(out, want_out.to(out.dtype))
    torch.testing.assert_close(lse, want_lse)


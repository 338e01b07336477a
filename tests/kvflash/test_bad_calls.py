"""A table of bad calls to flash_attn_varlen_func: each must raise the right exception type with a message
that names the argument. Shapes only: nothing here needs a kernel to run."""

import pytest
import torch

from kvflash.flash_attn_interface import flash_attn_varlen_func

from ..cases import make_case

MIX = [(1, 20), (4, 9)]


def _good_paged():
    case = make_case(MIX, num_q_heads=4, num_kv_heads=2, head_size=64, kv_dtype=torch.float8_e4m3fn, seed=1)
    return dict(
        q=case.q,
        k=case.k,
        v=case.v,
        max_seqlen_q=case.max_seqlen_q,
        cu_seqlens_q=case.cu_seqlens_q,
        max_seqlen_k=case.max_seqlen_k,
        k_descale=case.k_descale,
        v_descale=case.v_descale,
        **case.kv_args,
    )


def _to_contiguous(args: dict, **changes) -> None:
    """Turn a good paged call into a contiguous-KV one (29 keys over 2 sequences), then apply ``changes``."""
    args.update(
        block_table=None, seqused_k=None, k=torch.randn(29, 2, 64).half(), v=torch.randn(29, 2, 64).half(),
        k_descale=None, v_descale=None, cu_seqlens_k=torch.tensor([0, 20, 29], dtype=torch.int32),
    )  # fmt: skip
    args.update(changes)


BAD_CALLS = [
    # (id, change to a good paged call, exception, message pattern)
    ("dropout", dict(dropout_p=0.1), NotImplementedError, r"dropout_p"),
    ("attn_probs", dict(return_attn_probs=True), NotImplementedError, r"return_attn_probs"),
    ("q_v", dict(q_v=torch.zeros(5, 4, 64).half()), NotImplementedError, r"q_v"),
    (
        "scheduler_metadata",
        dict(scheduler_metadata=torch.zeros(4, dtype=torch.int32)),
        NotImplementedError,
        r"scheduler_metadata",
    ),
    ("q_descale", dict(q_descale=torch.ones(1)), ValueError, r"q_descale: descales an fp8 \(float8_e4m3fn\) query"),
    ("fa_version", dict(fa_version=7), ValueError, r"fa_version: expected 2 or 3"),
    (
        "q_fp32",
        dict(q=torch.randn(5, 4, 64)),
        TypeError,
        r"q: expected dtype float16 or bfloat16 or float8_e4m3fn, got float32",
    ),
    ("q_rank", dict(q=torch.randn(5, 256).half()), ValueError, r"q: expected a 3-D tensor"),
    (
        "q_stride",
        dict(q=torch.randn(5, 4, 128).half()[..., ::2]),
        ValueError,
        r"q: the last dimension must be contiguous",
    ),
    (
        "cu_q_int64",
        dict(cu_seqlens_q=torch.tensor([0, 1, 5])),
        TypeError,
        r"cu_seqlens_q: expected dtype int32, got int64",
    ),
    (
        "cu_q_short",
        dict(cu_seqlens_q=torch.tensor([0], dtype=torch.int32)),
        ValueError,
        r"cu_seqlens_q: expected at least 2",
    ),
    ("max_seqlen_q_type", dict(max_seqlen_q=4.0), TypeError, r"max_seqlen_q: expected a Python int, got float"),
    ("max_seqlen_k_neg", dict(max_seqlen_k=-1), ValueError, r"max_seqlen_k: expected an int >= 0, got -1"),
    ("num_splits_neg", dict(num_splits=-2), ValueError, r"num_splits: expected an int >= 0, got -2"),
    (
        "kv_dtype_mismatch",
        lambda a: a.update(v=a["v"].view(torch.float8_e5m2)),
        TypeError,
        r"k and v must share one dtype",
    ),
    (
        "kv_dtype_vs_q",
        lambda a: a.update(k=a["k"].to(torch.bfloat16), v=a["v"].to(torch.bfloat16)),
        TypeError,
        r"k/v dtype torch.bfloat16 does not pair with q dtype torch.float16",
    ),
    ("gqa", lambda a: a.update(q=torch.randn(5, 3, 64).half()), ValueError, r"query heads \(3\) must be a multiple"),
    ("head_size", lambda a: a.update(q=torch.randn(5, 4, 32).half()), ValueError, r"k: expected shape"),
    ("k_rank", lambda a: a.update(k=a["k"][0], v=a["v"][0]), ValueError, r"k: expected a 4-D tensor"),
    (
        "block_table_int64",
        lambda a: a.update(block_table=a["block_table"].long()),
        TypeError,
        r"block_table: expected dtype int32",
    ),
    ("seqused_missing", dict(seqused_k=None), ValueError, r"seqused_k: required with block_table"),
    (
        "seqused_int64",
        lambda a: a.update(seqused_k=a["seqused_k"].long()),
        TypeError,
        r"seqused_k: expected dtype int32",
    ),
    (
        "both_cu_and_table",
        dict(cu_seqlens_k=torch.tensor([0, 20, 29], dtype=torch.int32)),
        ValueError,
        r"cu_seqlens_k: must be None when block_table",
    ),
    ("neither_cu_nor_table", dict(block_table=None, seqused_k=None), ValueError, r"cu_seqlens_k: required"),
    (
        "cu_k_int64",
        lambda a: _to_contiguous(a, cu_seqlens_k=torch.tensor([0, 20, 29])),
        TypeError,
        r"cu_seqlens_k: expected dtype int32, got int64",
    ),
    ("k_descale_shape", dict(k_descale=torch.ones(3)), ValueError, r"k_descale: expected 1 element"),
    (
        "v_descale_dtype",
        dict(v_descale=torch.ones(2, dtype=torch.int32)),
        TypeError,
        r"v_descale: expected dtype float32",
    ),
    ("window_type", dict(window_size=4), TypeError, r"window_size: expected None or a pair"),
    ("window_value", dict(window_size=(-3, 0)), ValueError, r"window_size: entries must be >= -1"),
    ("softcap_negative", dict(softcap=-1.0), ValueError, r"softcap: expected 0 \(off\) or a finite positive float"),
    ("alibi_shape", dict(alibi_slopes=torch.rand(3)), ValueError, r"alibi_slopes: expected shape \[Hq\]"),
    ("sinks_shape", dict(s_aux=torch.rand(2)), ValueError, r"s_aux: expected shape \(4,\)"),
    ("out_dtype", dict(out=torch.empty(5, 4, 64)), TypeError, r"out: expected dtype float16"),
    ("out_shape", dict(out=torch.empty(5, 4, 32).half()), ValueError, r"out: expected shape"),
    ("softmax_scale", dict(softmax_scale=0.0), ValueError, r"softmax_scale: expected a finite positive float"),
    ("softcap_tensor", dict(softcap=torch.tensor(5.0)), TypeError, r"softcap: expected a Python float, got Tensor"),
    ("scale_tensor", dict(softmax_scale=torch.tensor(0.1)), TypeError, r"softmax_scale: expected a Python float"),
    ("window_float", dict(window_size=(4.5, 0)), TypeError, r"window_size: expected None or a pair"),
    ("causal_int", dict(causal=1), TypeError, r"causal: expected a bool, got int"),
    ("deterministic_str", dict(deterministic="yes"), TypeError, r"deterministic: expected a bool"),
    (
        "max_seqlen_k_past_table",
        dict(max_seqlen_k=10_000),
        ValueError,
        r"max_seqlen_k: 10000 keys do not fit: block_table addresses \d+ pages x 16 \d+ tokens",
    ),
    (
        "max_seqlen_k_past_k",
        lambda a: _to_contiguous(a, max_seqlen_k=30),
        ValueError,
        r"max_seqlen_k: 30 keys do not fit: k holds 29 tokens",
    ),
    ("k_descale_zero", dict(k_descale=0.0), ValueError, r"k_descale: expected a finite positive float.*got 0.0"),
    ("v_descale_negative", dict(v_descale=-1.0), ValueError, r"v_descale: expected a finite positive float.*-1.0"),
    ("k_descale_nan", dict(k_descale=float("nan")), ValueError, r"k_descale: expected a finite positive float.*nan"),
    ("v_descale_inf", dict(v_descale=float("inf")), ValueError, r"v_descale: expected a finite positive float.*inf"),
    ("k_descale_int_zero", dict(k_descale=0), ValueError, r"k_descale: expected a finite positive float"),
    (
        "output_scale_dtype",
        dict(output_scale=torch.ones(1, dtype=torch.float16)),
        TypeError,
        r"output_scale: expected dtype float32",
    ),
    ("output_scale_shape", dict(output_scale=torch.ones(4)), ValueError, r"output_scale: expected one element"),
    ("output_scale_float", dict(output_scale=0.5), TypeError, r"output_scale: expected a torch.Tensor, got float"),
    (
        "output_scale_out_fp16",
        dict(output_scale=torch.ones(1), out=torch.empty(5, 4, 64).half()),
        TypeError,
        r"out: expected dtype float8_e4m3fn, got float16",
    ),
    (
        "output_scale_out_e5m2",
        dict(output_scale=torch.ones(1), out=torch.empty(5, 4, 64).to(torch.float8_e5m2)),
        TypeError,
        r"out: expected dtype float8_e4m3fn, got float8_e5m2",
    ),
    (
        "out_fp8_without_output_scale",
        dict(out=torch.empty(5, 4, 64).to(torch.float8_e4m3fn)),
        ValueError,
        r"output_scale: an fp8 out .* needs output_scale",
    ),
    (
        "q_meta",
        lambda a: a.update(q=a["q"].to("meta")),
        ValueError,
        r"^q: expected a tensor on a CPU or GPU \(cuda, xpu\) device, got one on meta",
    ),
    (
        "device",
        lambda a: a.update(block_table=a["block_table"].to("meta")),
        ValueError,
        r"block_table: expected a tensor on cpu",
    ),
]


@pytest.mark.parametrize("change, error, match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_call_raises_naming_the_argument(change, error, match):
    args = _good_paged()
    if callable(change):
        change(args)
    else:
        args.update(change)
    with pytest.raises(error, match=match):
        flash_attn_varlen_func(**args)


@pytest.mark.parametrize("max_seqlen_q", [1, 9])
def test_causal_must_be_bool_on_both_routes(max_seqlen_q):
    args = _good_paged()
    case = make_case([(1, 20), (1, 9)] if max_seqlen_q == 1 else [(9, 20), (1, 9)], num_q_heads=4, num_kv_heads=2,
                     head_size=64, seed=2)  # fmt: skip
    args.update(q=case.q, cu_seqlens_q=case.cu_seqlens_q, max_seqlen_q=max_seqlen_q, causal=1)
    with pytest.raises(TypeError, match=r"causal: expected a bool, got int"):
        flash_attn_varlen_func(**args)


def test_decode_route_rejects_bad_calls_too():
    args = _good_paged()
    case = make_case([(1, 20), (1, 9)], num_q_heads=4, num_kv_heads=2, head_size=64, seed=2)
    args.update(q=case.q, cu_seqlens_q=case.cu_seqlens_q, max_seqlen_q=1, k_descale=torch.ones(5))
    with pytest.raises(ValueError, match=r"k_descale: expected 1 element"):
        flash_attn_varlen_func(**args)


@pytest.mark.parametrize("max_seqlen_q", [1, 9], ids=["decode", "prefill"])
@pytest.mark.parametrize(
    "change, match",
    [
        (dict(k_descale=0.0), r"k_descale: expected a finite positive float"),
        (dict(v_descale=-2.0), r"v_descale: expected a finite positive float"),
        (dict(q="meta"), r"^q: expected a tensor on a CPU or GPU"),
        (dict(output_scale=torch.ones(3)), r"output_scale: expected one element"),
        (dict(output_scale=torch.ones(1), out=torch.float32), r"out: expected dtype float8_e4m3fn"),
        (dict(out=torch.float8_e4m3fn), r"output_scale: an fp8 out"),
    ],
    ids=["k_descale_zero", "v_descale_negative", "q_meta", "output_scale_shape", "out_not_fp8", "out_fp8_no_scale"],
)
def test_float_descales_meta_q_and_fp8_out_on_both_routes(max_seqlen_q, change, match):
    """Python-float descales <= 0 raise (as reshape_and_cache_flash does) and a meta q is named as q, on the
    decode route and on the prefill route."""
    args = _good_paged()
    case = make_case([(1, 20), (1, 9)] if max_seqlen_q == 1 else [(9, 20), (1, 9)], num_q_heads=4, num_kv_heads=2,
                     head_size=64, seed=2)  # fmt: skip
    args.update(q=case.q, cu_seqlens_q=case.cu_seqlens_q, max_seqlen_q=max_seqlen_q)
    if "out" in change:  # an out of this case's shape, in the dtype given
        change = dict(change, out=torch.empty(case.q.shape, dtype=change["out"]))
    if change.get("q") == "meta":
        args["q"] = args["q"].to("meta")
    else:
        args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attn_varlen_func(**args)

"""fp8 queries: ``q`` in float8_e4m3fn with ``q_descale`` over an FP8 cache, on every route.

The query comes from :func:`kvflash.fp8_utils.quantize_query` (one descale per sequence and KV head, different from
K's and V's, which differ from each other). The reference is the float64 attention of the dequantised query
``q * q_descale`` (exact), so what is measured is the kernels' own error:

- decode rows (``max_seqlen_q <= 16``) convert the query to fp16 exactly and run the exact FP8-cache dots:
  FlashAttention's rule against the same computation in bf16 (the output dtype);
- prefill rows run the QK dot on fp8 tensor cores, and PV in fp16 or (launch config ``pv_fp8``, tested here
  through ``launch_chunk_prefill``) in fp8 with P rounded to e4m3 (3 mantissa bits, a relative error of at most
  2^-4 per probability). One bound covers both: ``|out - ref| <= 2^-4 * max |v|`` (the largest real value of the
  sequence's V; the bound of an error of 2^-4 in every weight of a convex combination) plus the bf16 rounding of
  the output, and the relative RMS error over the whole output below 2^-5 (a kernel that descales with a wrong
  scale is off by tens of per cent).
"""

from __future__ import annotations

import math

import pytest
import torch

from kvflash.attn_common import reference_attention, saturate_to_fp8
from kvflash.attn_common.testing import assert_close_fa_rule, poison
from kvflash.flash_attn_interface import flash_attn_varlen_func
from kvflash.fp8_utils import quantize_query

from ..cases import (
    assert_fp8_dot_error,
    assert_lse_close,
    launch_chunk_prefill_with,
    make_case,
    reference,
    v_max_per_row,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Where launch_chunk_prefill itself runs the kernel: the GPU, else the interpreter (CPU tensors on a GPU machine would
# take the public function's PyTorch reference instead).
LAUNCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KV_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
PREFILL_MIX = [(40, 70), (33, 33), (1, 17), (64, 100)]  # prefill rows (and one decode row: the mixed route)
DECODE_MIX = [(1, 70), (3, 33), (1, 1), (4, 300)]  # every sequence at most 16 queries: the decode route


def fp8_query_case(seqs, kv_dtype, device, *, seed=0, granularity="per_sequence_kv_head", **case_args):
    """A :func:`make_case` case whose 16-bit query is replaced by ``quantize_query``'s fp8 one (times 4 first, so
    scores spread); returns ``(case, q_descale)``."""
    case = make_case(seqs, kv_dtype=kv_dtype, device=device, seed=seed, **case_args)
    q16 = case.q.float().mul(4.0).to(case.q.dtype)
    case.q, q_descale = quantize_query(q16, case.k.shape[-2], granularity=granularity, cu_seqlens_q=case.cu_seqlens_q)
    return case, q_descale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("block_size", [16, None], ids=["paged", "contiguous"])
def test_prefill_and_mixed_rows_with_fp8_query(device, kv_dtype, block_size):
    case, q_descale = fp8_query_case(PREFILL_MIX, kv_dtype, device, block_size=block_size, seed=3)
    out = poison(torch.empty(case.q.shape, dtype=torch.bfloat16, device=device))
    got, lse = case.attend(q_descale=q_descale, causal=True, out=out, return_softmax_lse=True)
    assert got is out
    exact, exact_lse = reference(case, q_descale=q_descale, causal=True)
    assert_fp8_dot_error(out, exact, v_max_per_row(case))
    assert_lse_close(lse, exact_lse, atol=5e-3, rtol=1e-3)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("pv_fp8", [False, True], ids=["pv-fp16", "pv-fp8"])
def test_both_pv_paths_of_the_prefill_kernel(kv_dtype, pv_fp8):
    """The default launch (PV in fp16) and the fp8 PV dot (P in e4m3, two-level accumulation) of an fp8 query."""
    case, q_descale = fp8_query_case(PREFILL_MIX, kv_dtype, LAUNCH_DEVICE, seed=13)
    out = poison(torch.empty(case.q.shape, dtype=torch.bfloat16, device=LAUNCH_DEVICE))
    chosen = launch_chunk_prefill_with(case, out, dict(pv_fp8=pv_fp8), q_descale=q_descale)
    assert not chosen.pv_fp8
    exact, _ = reference(case, q_descale=q_descale, causal=True)
    assert_fp8_dot_error(out, exact, v_max_per_row(case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_size", [8, 40, 256])
@pytest.mark.parametrize("mix", [[(20, 40), (1, 9)], [(1, 40), (3, 9)]], ids=["prefill", "decode"])
def test_fp8_query_head_sizes(device, head_size, mix):
    """Head sizes off the power-of-two path: D 8 pads to the fp8 dot's K of 32, D 40 to 64; D 256 takes other tiles."""
    case, q_descale = fp8_query_case(mix, torch.float8_e5m2, device, seed=17, head_size=head_size)
    got = case.attend(q_descale=q_descale, causal=True)
    exact, _ = reference(case, q_descale=q_descale, causal=True)
    assert_fp8_dot_error(got, exact, v_max_per_row(case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("num_splits", [1, 0])
def test_decode_rows_with_fp8_query_are_exact(device, kv_dtype, num_splits):
    case, q_descale = fp8_query_case(DECODE_MIX, kv_dtype, device, seed=5, num_q_heads=8, num_kv_heads=2)
    got, lse = case.attend(q_descale=q_descale, causal=True, num_splits=num_splits, return_softmax_lse=True)
    assert got.dtype == torch.bfloat16  # FlashAttention-3's output dtype for an fp8 query
    exact, exact_lse = reference(case, q_descale=q_descale, causal=True)
    low, _ = reference(case, q_descale=q_descale, causal=True, compute_dtype=torch.bfloat16)
    assert_close_fa_rule(got, exact, low, atol=2e-3)
    assert_lse_close(lse, exact_lse, atol=2e-3, rtol=1e-3)


FEATURES = {
    "window": dict(window_size=(20, 0)),
    "softcap": dict(softcap=8.0),
    "sinks": dict(s_aux=torch.tensor([0.5, -1.0, 2.0, 0.0])),
    "alibi": dict(alibi_slopes=torch.tensor([0.3, 0.1, 0.05, 0.02])),
    "non-causal": dict(causal=False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("mix", [PREFILL_MIX, DECODE_MIX], ids=["prefill", "decode"])
def test_features_with_fp8_query(device, feature, mix):
    case, q_descale = fp8_query_case(mix, torch.float8_e4m3fn, device, seed=7, granularity="per_kv_head")
    features = dict(causal=True)
    features.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in FEATURES[feature].items()})
    got, lse = case.attend(q_descale=q_descale, return_softmax_lse=True, **features)
    exact, exact_lse = reference(case, q_descale=q_descale, **features)
    assert_fp8_dot_error(got, exact, v_max_per_row(case))
    assert_lse_close(lse, exact_lse, atol=5e-3, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", [PREFILL_MIX, DECODE_MIX], ids=["prefill", "decode"])
def test_fp8_query_with_fp8_output_and_per_tensor_descale(device, mix):
    case, q_descale = fp8_query_case(mix, torch.float8_e5m2, device, seed=9, granularity="per_tensor")
    output_scale = torch.tensor([0.01], device=device)
    out = poison(torch.empty(case.q.shape, dtype=torch.float16, device=device)).to(torch.float8_e4m3fn)
    got = case.attend(q_descale=q_descale, causal=True, out=out, output_scale=output_scale)
    assert got is out
    exact, _ = reference(case, q_descale=q_descale, causal=True)
    # e4m3 output rounding (2^-4 relative at most, about 2^-5.5 RMS) on top of the attention's error.
    assert_fp8_dot_error(got.double() * 0.01, exact, v_max_per_row(case), out_rounding=2.0**-4, rms=2.0**-4)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_query_out_buffers_take_fp16_and_bf16(device):
    case, q_descale = fp8_query_case(PREFILL_MIX, torch.float8_e4m3fn, device, seed=11)
    exact, _ = reference(case, q_descale=q_descale, causal=True)
    for dtype in (torch.float16, torch.bfloat16):
        out = poison(torch.empty(case.q.shape, dtype=dtype, device=device))
        assert case.attend(q_descale=q_descale, causal=True, out=out) is out
        assert_fp8_dot_error(out, exact, v_max_per_row(case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", [PREFILL_MIX, DECODE_MIX], ids=["prefill", "decode"])
def test_per_token_head_query_descales(device, mix):
    """``q_descale [total_q, Hq]`` with ``q_descale_per_token=True``: one factor per row of the kernels' tiles."""
    case, q_descale = fp8_query_case(mix, torch.float8_e4m3fn, device, seed=19, granularity="per_token_head")
    assert tuple(q_descale.shape) == (case.q.shape[0], case.q.shape[1])
    got, lse = case.attend(q_descale=q_descale, q_descale_per_token=True, causal=True, return_softmax_lse=True)
    exact, exact_lse = reference(case, q_descale=q_descale, q_descale_per_token=True, causal=True)
    assert_fp8_dot_error(got, exact, v_max_per_row(case))
    assert_lse_close(lse, exact_lse, atol=5e-3, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_per_token_head_query_scales_keep_quiet_tokens_with_loud_ones(device):
    """A few loud query tokens (100x): one descale per KV head sizes every token by them and pushes the quiet ones
    into e4m3's subnormals; per-(token, head) descales keep each token's own range. Error against the float64
    attention of the original 16-bit query."""
    case = make_case(PREFILL_MIX, kv_dtype=torch.float8_e5m2, device=device, seed=21)
    q16 = case.q.float()
    q16[::17] *= 100.0
    q16 = q16.to(torch.float16)
    exact, _ = reference_attention(q16, case.k, case.v, case.cu_seqlens_q, causal=True, compute_dtype=torch.float64,
                                   **case.kwargs)  # fmt: skip
    errors = {}
    for granularity, per_token in (("per_kv_head", False), ("per_token_head", True)):
        q8, q_descale = quantize_query(q16, 2, granularity=granularity)
        case.q = q8
        got = case.attend(q_descale=q_descale, q_descale_per_token=per_token, causal=True)
        errors[granularity] = float((got.double() - exact).norm() / exact.norm())
    assert errors["per_token_head"] < errors["per_kv_head"] / 2, errors


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_query_round_trips_and_covers_each_group(device):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(30, 8, 64, generator=gen).to(device, torch.bfloat16)
    q[10:, 4:6] *= 50  # sequence 1, KV head 1 (query heads 4..7) holds outliers
    cu = torch.tensor([0, 10, 30], dtype=torch.int32, device=device)
    expected_shapes = {"per_tensor": (1,), "per_kv_head": (2,), "per_sequence_kv_head": (2, 2)}
    for granularity, shape in expected_shapes.items():
        q8, descale = quantize_query(q, 2, granularity=granularity, cu_seqlens_q=cu)
        assert q8.dtype == torch.float8_e4m3fn and tuple(descale.shape) == shape and descale.dtype == torch.float32
        row_scale = descale.reshape(-1, 2) if descale.dim() == 2 else descale.reshape(1, -1).expand(2, -1)
        row_scale = torch.cat([row_scale[0].expand(10, 2), row_scale[-1].expand(20, 2)])  # [30, Hkv]
        back = q8.double() * row_scale.repeat_interleave(4, dim=1)[:, :, None].double()
        # Saturation never happens (the amax maps to 448) and e4m3 rounds to 2^-4 relative.
        assert float(q8.float().abs().max()) == 448.0
        assert bool(((back - q.double()).abs() <= 2.0**-4 * q.double().abs() + 2.0**-9 * row_scale.max()).all())
    _, per_seq = quantize_query(q, 2, granularity="per_sequence_kv_head", cu_seqlens_q=cu)
    assert float(per_seq[0, 1]) < float(per_seq[1, 1]) / 10  # sequence 0 keeps its own range
    q8, static = quantize_query(q, 2, scale=0.5)
    assert torch.equal(static.cpu(), torch.tensor([0.5, 0.5]))
    assert torch.equal(q8.view(torch.uint8), saturate_to_fp8(q, 0.5, torch.float8_e4m3fn).view(torch.uint8))


BAD_FP8_QUERY_CALLS = [
    ("q_fp8_over_fp16_cache", dict(kv=torch.float16), TypeError, r"q: a float8_e4m3fn query needs an FP8 KV cache"),
    (
        "q_e5m2",
        dict(q_dtype=torch.float8_e5m2),
        TypeError,
        r"q: expected dtype float16 or bfloat16 or float8_e4m3fn, got float8_e5m2",
    ),
    ("q_descale_16bit_q", dict(q_dtype=torch.float16), ValueError, r"q_descale: descales an fp8"),
    ("q_descale_shape", dict(q_descale=torch.ones(3, 3)), ValueError, r"q_descale: expected 1 element, \[Hkv\]"),
    ("q_descale_dtype", dict(q_descale=torch.ones(2, dtype=torch.int32)), TypeError, r"q_descale: expected dtype"),
    ("q_descale_zero", dict(q_descale=0.0), ValueError, r"q_descale: expected a finite positive float"),
    ("out_fp8_no_scale", dict(out=torch.float8_e4m3fn), ValueError, r"output_scale: an fp8 out"),
    ("out_fp32", dict(out=torch.float32), TypeError, r"out: expected dtype float16 or bfloat16, got float32"),
    (
        "per_token_shape",
        dict(q_descale=torch.ones(2, 2), q_descale_per_token=True),
        ValueError,
        r"q_descale: per-token-head descales must have shape \[total_q, Hq\]",
    ),
    ("per_token_float", dict(q_descale=0.5, q_descale_per_token=True), TypeError, r"q_descale: q_descale_per_token"),
    ("per_token_flag", dict(q_descale_per_token="yes"), TypeError, r"q_descale_per_token: expected None, True"),
    (
        "per_token_16bit_q",
        dict(q_dtype=torch.float16, q_descale=None, q_descale_per_token=True),
        ValueError,
        r"q_descale_per_token: applies to an fp8",
    ),
]


@pytest.mark.parametrize(
    "change, error, match", [c[1:] for c in BAD_FP8_QUERY_CALLS], ids=[c[0] for c in BAD_FP8_QUERY_CALLS]
)
@pytest.mark.parametrize("mix", [PREFILL_MIX, DECODE_MIX], ids=["prefill", "decode"])
def test_bad_fp8_query_calls_name_the_argument(change, error, match, mix):
    kv_dtype = change.get("kv", torch.float8_e4m3fn)
    case = make_case(mix, kv_dtype=kv_dtype if kv_dtype.itemsize == 1 else torch.float16)
    if kv_dtype.itemsize == 1:
        q8, q_descale = quantize_query(case.q, 2, granularity="per_kv_head")
    else:
        q8, q_descale = case.q.to(torch.float8_e4m3fn), torch.ones(2)
    q = case.q.to(change["q_dtype"]) if "q_dtype" in change else q8
    args = dict(q_descale=change.get("q_descale", q_descale), causal=True)
    if "q_descale_per_token" in change:
        args["q_descale_per_token"] = change["q_descale_per_token"]
    if "out" in change:
        args["out"] = torch.empty(case.q.shape, dtype=change["out"])
    with pytest.raises(error, match=match):
        flash_attn_varlen_func(q, case.k, case.v, case.max_seqlen_q, case.cu_seqlens_q, case.max_seqlen_k,
                               **{**case.kwargs, **args})  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(granularity="per_token"), ValueError, r"granularity: expected one of"),
        (dict(granularity="per_sequence_kv_head"), ValueError, r"cu_seqlens_q: granularity 'per_sequence_kv_head'"),
        (dict(margin=0.5), ValueError, r"margin: expected a float >= 1"),
        (dict(num_kv_heads=3), ValueError, r"num_kv_heads|multiple"),
        (dict(q=torch.zeros(4, 8, 64)), TypeError, r"q: expected dtype float16 or bfloat16"),
    ],
)
def test_bad_quantize_query_arguments(kwargs, error, match):
    args = dict(q=torch.zeros(4, 8, 64, dtype=torch.float16), num_kv_heads=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        quantize_query(args.pop("q"), args.pop("num_kv_heads"), **args)


# --- long context (GPU): error at 1 x 131072 and a retrieval check, beside the exact FP8-cache path ----------------


def needle_case(kv_len: int, device, *, kv_dtype=torch.float8_e4m3fn, num_q_heads=8, num_kv_heads=2, d=128, seed=0):
    """One sequence of ``kv_len`` random keys (scores ~ N(0, 1)) and 64 new queries; key ``needle`` (far back) is
    the last query's direction scaled to a logit of about 17, so that it holds most of the last row's softmax mass; its
    value is a fixed unit-scale vector. Returns ``(q16 [64, Hq, D], k, v, cu_q, seqused, table, needle, v_needle)``
    with a paged FP8 cache (page 16) and unit descales."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q_len, page = 64, 16
    q = torch.randn(q_len, num_q_heads, d, generator=gen, device=device)
    k = torch.randn(kv_len, num_kv_heads, d, generator=gen, device=device)
    v = torch.randn(kv_len, num_kv_heads, d, generator=gen, device=device)
    needle = kv_len // 7
    group = num_q_heads // num_kv_heads
    last = q[-1].reshape(num_kv_heads, group, d).mean(1)  # [Hkv, D]: the group's mean direction
    k[needle] = last / last.norm(dim=-1, keepdim=True) * 17.0 * math.sqrt(d) / last.norm(dim=-1, keepdim=True)
    v_needle = torch.sign(torch.randn(num_kv_heads, d, generator=gen, device=device))
    v[needle] = v_needle
    pages = kv_len // page
    table = torch.randperm(pages, generator=gen, device=device).to(torch.int32)[None]
    k_cache = torch.empty(pages, page, num_kv_heads, d, device=device)
    v_cache = torch.empty_like(k_cache)
    k_cache[table[0].long()] = k.reshape(pages, page, num_kv_heads, d)
    v_cache[table[0].long()] = v.reshape(pages, page, num_kv_heads, d)
    cu_q = torch.tensor([0, q_len], dtype=torch.int32, device=device)
    seqused = torch.tensor([kv_len], dtype=torch.int32, device=device)
    return (q.to(torch.bfloat16), k_cache.to(kv_dtype), v_cache.to(kv_dtype), cu_q, seqused, table, needle, v_needle)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["e4m3", "e5m2"])
def test_fp8_query_at_131072_keys_finds_the_needle(kv_dtype):
    kv_len = 131072
    q16, k, v, cu_q, seqused, table, needle, v_needle = needle_case(kv_len, "cuda", kv_dtype=kv_dtype)
    q8, q_descale = quantize_query(q16, k.shape[-2], granularity="per_kv_head")
    args = dict(seqused_k=seqused, block_table=table, causal=True)
    exact, _ = reference_one(q8, k, v, cu_q, q_descale, **args)
    fp8_out = flash_attn_varlen_func(q8, k, v, 64, cu_q, kv_len, q_descale=q_descale, **args)
    exact_path = flash_attn_varlen_func(q8.to(torch.bfloat16) * q_descale.repeat_interleave(4)[:, None].to(
        torch.bfloat16), k, v, 64, cu_q, kv_len, **args)  # fmt: skip
    v_max = float(v.float().abs().max())
    # Outputs that average 131072 random values: each probability's e4m3 rounding (RMS about 2^-5.5 relative) no
    # longer averages out against a few dominant keys, so the RMS bound is looser here.
    assert_fp8_dot_error(fp8_out, exact, torch.full((64, 1, 1), v_max, dtype=torch.float64, device="cuda"), rms=0.05)
    # The last query's output is mostly the needle's value (weight ~0.9 in the reference), on both paths.
    for out in (exact, fp8_out, exact_path):
        last = out[-1].double().reshape(k.shape[-2], -1, out.shape[-1])  # [Hkv, group, D]
        weight = (last * v_needle.double()[:, None, :]).sum(-1) / v_needle.shape[-1]
        assert bool((weight > 0.5).all()), f"the needle's weight in the last row: {weight.flatten().tolist()}"


def reference_one(q8, k, v, cu_q, q_descale, **args):
    from kvflash.attn_common import reference_attention

    return reference_attention(q8, k, v, cu_q, q_descale=q_descale, compute_dtype=torch.float64, **args)

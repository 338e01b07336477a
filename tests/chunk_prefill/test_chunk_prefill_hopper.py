"""The Hopper (sm_90, Gluon) chunked-prefill path (the default there; ``KVFLASH_GLUON=1`` is set here anyway so a
caller's ``KVFLASH_GLUON=0`` does not skip these tests): which calls take it, and its results against the float64
reference (poisoned outputs, NaN in unused cache slots, non-unit and negative descales, LSE, every page size it
takes, 16-bit and FP8 caches) and against the portable kernel (the mixed-batch case is in
tests/kvflash/test_mixed_and_speculative.py)."""

import dataclasses

import pytest
import torch

from kvflash.attn_common import check_attention_call
from kvflash.attn_common.platform import hopper_gluon_available
from kvflash.attn_common.testing import assert_close_fa_rule, poison
from kvflash.chunk_prefill import chunk_prefill_attention, hopper_op
from kvflash.chunk_prefill.launch_config import choose_chunk_prefill_config
from kvflash.chunk_prefill.op import launch_chunk_prefill

from ..cases import (
    assert_fp8_dot_error,
    assert_lse_close,
    check_against_reference,
    check_chunk_prefill,
    launch_chunk_prefill_with,
    make_case,
    reference,
    v_max_per_row,
)
from .test_chunk_prefill_hopper_routing import MIX, applies, fp8_query

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def gluon_on(monkeypatch):
    monkeypatch.setenv("KVFLASH_GLUON", "1")

def _hopper():
    if not hopper_gluon_available(torch.device("cuda")):
        pytest.skip("not an sm_90 GPU with the Gluon API the Hopper kernels are written for")


@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("block_size", [8, 16, 64, 256])
def test_hopper_path_against_the_reference(head_size, block_size):
    case = make_case(MIX, num_q_heads=8, num_kv_heads=2, head_size=head_size, q_dtype=torch.bfloat16,
                     block_size=block_size, nan_unused=True, device="cuda", seed=head_size + block_size)  # fmt: skip
    check_chunk_prefill(case, causal=True)


@pytest.mark.parametrize("heads", [(5, 1), (32, 8), (6, 6)])
def test_hopper_path_fp16_gqa_and_descales(heads):
    # Distinct per-(sequence, KV head) descales, one of K's negative (the row minimum then gives the softmax maximum,
    # and hidden scores must not scale to +inf) and one zero (every visible key equally likely, no NaN).
    seqs = MIX[:6]
    k_descale = torch.rand(len(seqs), heads[1], device="cuda") + 0.5
    k_descale[1, 0] = -0.75
    k_descale[4, -1] = 0.0
    v_descale = torch.rand(len(seqs), heads[1], device="cuda") + 1.0
    case = make_case(seqs, num_q_heads=heads[0], num_kv_heads=heads[1], head_size=128, q_dtype=torch.float16,
                     k_descale=k_descale, v_descale=v_descale, nan_unused=True, device="cuda",
                     seed=sum(heads))  # fmt: skip
    check_chunk_prefill(case, causal=True)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize(
    "q_dtype, head_size, block_size",
    [(torch.bfloat16, 128, 16), (torch.bfloat16, 64, 8), (torch.float16, 128, 64), (torch.bfloat16, 128, 256),
     (torch.bfloat16, 64, 64), (torch.float16, 64, 16), (torch.bfloat16, 256, 16), (torch.float16, 256, 64)],
    ids=["bf16-d128-p16", "bf16-d64-p8", "fp16-d128-p64", "bf16-d128-p256", "bf16-d64-p64", "fp16-d64-p16",
         "bf16-d256-p16", "fp16-d256-p64"],
)
def test_hopper_path_fp8_cache(kv_dtype, q_dtype, head_size, block_size):
    # V (and an fp16 query's K) widened to fp16 by the producer, or at D 64 / 128 loaded by the TMA loader and
    # widened by its widener (V rows past the end zeroed: NaN in unused slots; pages of 8 to 256: 16 boxes
    # to one per tile); a bf16 query split per row in two e4m3 terms against K as stored; distinct per-(sequence, KV
    # head) descales, one of K's negative and one zero (uniform attention over the visible keys).
    k_descale = torch.rand(len(MIX), 2, device="cuda") * 0.5 + 0.1
    k_descale[4, 1] = -0.3
    k_descale[2, 0] = 0.0
    v_descale = torch.rand(len(MIX), 2, device="cuda") * 2.0 + 1.2
    case = make_case(MIX, num_q_heads=8, num_kv_heads=2, head_size=head_size, q_dtype=q_dtype, kv_dtype=kv_dtype,
                     k_descale=k_descale, v_descale=v_descale, block_size=block_size, nan_unused=True, device="cuda",
                     seed=head_size + block_size)  # fmt: skip
    assert applies(case, causal=True)
    check_chunk_prefill(case, causal=True)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize(
    "head_size, block_size", [(128, 16), (64, 8), (128, 64), (256, 16), (256, 64)],
    ids=["d128-p16", "d64-p8", "d128-p64", "d256-p16", "d256-p64"],
)
def test_hopper_path_fp8_query(monkeypatch, kv_dtype, head_size, block_size):
    """An e4m3 query with per-(sequence, KV head) descales over an FP8 cache: QK^T on the fp8 tensor cores with K as
    stored; PV on fp8 operands at D 64 / 128 (V transposed in fp8, P rounded to e4m3, a fresh accumulator per tile),
    in fp16 at D 256 (V widened). The output against the float64 reference: FlashAttention's rule (at most twice the
    error plus 1e-3) with the portable kernel's same arithmetic as the low-precision computation (its fp8 PV dot,
    launch config ``pv_fp8``, where P is rounded), and with fp8 PV the P-rounding bound as well. The LSE (P's
    rounding does not enter it) against the portable kernel's default. Distinct K and V descales, one of K's negative
    and one zero; NaN in unused cache slots; poisoned outputs."""
    _hopper()
    k_descale = torch.rand(len(MIX), 2, device="cuda") * 0.5 + 0.1
    k_descale[4, 1] = -0.3
    k_descale[2, 0] = 0.0
    v_descale = torch.rand(len(MIX), 2, device="cuda") * 2.0 + 1.2
    case = make_case(MIX, num_q_heads=8, num_kv_heads=2, head_size=head_size, q_dtype=torch.bfloat16,
                     kv_dtype=kv_dtype, k_descale=k_descale, v_descale=v_descale, block_size=block_size,
                     nan_unused=True, device="cuda", seed=head_size + block_size + 1)  # fmt: skip
    q_descale = fp8_query(case)
    assert applies(case, q_descale=q_descale, causal=True)
    results = {}
    for path in ("hopper", "portable"):
        monkeypatch.setenv("KVFLASH_GLUON", "1" if path == "hopper" else "0")
        out = poison(torch.empty(case.q.shape, dtype=torch.bfloat16, device="cuda"))
        results[path] = chunk_prefill_attention(
            case.q, case.k, case.v, case.cu_seqlens_q, case.max_seqlen_q, case.max_seqlen_k, causal=True, out=out,
            return_lse=True, q_descale=q_descale, **case.kwargs,
        )  # fmt: skip
    exact, exact_lse = reference(case, q_descale=q_descale, causal=True)
    hopper_out = results["hopper"][0]
    if head_size in hopper_op.PV_FP8_HEAD_SIZES:
        portable_fp8_pv = poison(torch.empty(case.q.shape, dtype=torch.bfloat16, device="cuda"))
        launch_chunk_prefill_with(case, portable_fp8_pv, dict(pv_fp8=True), q_descale=q_descale)
        assert_close_fa_rule(hopper_out, exact, portable_fp8_pv, atol=1e-3)
        assert_fp8_dot_error(hopper_out, exact, v_max_per_row(case))
    else:
        assert_close_fa_rule(hopper_out, exact, results["portable"][0], atol=1e-3)
    assert_lse_close(results["hopper"][1], exact_lse, results["portable"][1])


def test_hopper_path_fp8_query_of_tiny_and_zero_rows():
    """A bf16 query tile whose rows span 2^-20 .. 2^6 and a tile of zeros: the split in e4m3 terms (one power of two
    per row) keeps them."""
    case = make_case([(300, 700), (128, 128)], num_q_heads=4, num_kv_heads=2, head_size=128, q_dtype=torch.bfloat16,
                     kv_dtype=torch.float8_e4m3fn, nan_unused=True, device="cuda", seed=3)  # fmt: skip
    with torch.no_grad():
        case.q[:300] *= torch.logspace(-20, 6, 300, base=2.0, device="cuda")[:, None, None].to(torch.bfloat16)
        case.q[300:] = 0
    check_chunk_prefill(case, causal=True)


@pytest.mark.parametrize("path", ["hopper", "portable"])
@pytest.mark.parametrize(
    "seqs, huge_row",
    [([(30, 200), (40, 300)], 5), ([(30, 200), (40, 300)], 40), ([(30, 200), (140, 300)], 130)],
    ids=["in-its-tile", "past-the-first-sequence", "second-warpgroup"],
)
def test_fp8_cache_a_huge_query_row_leaves_the_other_rows_alone(monkeypatch, path, seqs, huge_row):
    """A bf16 query row of huge magnitude (2^40 x, still finite) over an FP8 cache: the split in e4m3 terms takes one
    power of two per row, so the rows beside it keep their precision. Row 5: in the first sequence's tile (its first
    warpgroup's rows). Row 40: in the second sequence, and also in the first sequence's tile past its end. Row 130:
    row 100 of the second sequence's tile, the second warpgroup's rows. The portable kernel runs the same check.

    The huge row itself is not compared: both kernels compute ``exp2(score * scale - max)`` as one FFMA against a
    rounded ``max`` (FlashAttention's form), so the argument carries the max's rounding error, ``|max| * 2^-24``,
    which overflows exp2 once it passes 128 (scaled scores beyond 2^31; this row's are near 2^41)."""
    monkeypatch.setenv("KVFLASH_GLUON", "1" if path == "hopper" else "0")
    case = make_case(seqs, num_q_heads=4, num_kv_heads=2, head_size=128, q_dtype=torch.bfloat16,
                     kv_dtype=torch.float8_e4m3fn, nan_unused=True, device="cuda", seed=11)  # fmt: skip
    with torch.no_grad():
        case.q[huge_row] *= 2.0**40
    if path == "hopper":
        _hopper()
        assert applies(case, causal=True)
    out, lse = chunk_prefill_attention(
        case.q, case.k, case.v, case.cu_seqlens_q, case.max_seqlen_q, case.max_seqlen_k, causal=True,
        out=poison(torch.empty_like(case.q)), return_lse=True, **case.kwargs,
    )  # fmt: skip
    exact, exact_lse = reference(case, causal=True)
    low, low_lse = reference(case, compute_dtype=torch.bfloat16, causal=True)
    others = torch.arange(case.q.shape[0], device="cuda") != huge_row
    assert_close_fa_rule(out[others], exact[others], low[others], atol=1e-3)
    assert_lse_close(lse[:, others], exact_lse[:, others], low_lse[:, others])


def test_hopper_path_equals_the_portable_kernel():
    """The same call through the Hopper kernel (no launch config) and the portable one (an explicit config)."""
    case = make_case(MIX, num_q_heads=16, num_kv_heads=4, head_size=128, q_dtype=torch.bfloat16, device="cuda", seed=5)
    f = check_attention_call(
        case.q, case.k, case.v, case.num_seqs, cu_seqlens_q=case.cu_seqlens_q, max_seqlen_q=case.max_seqlen_q,
        max_seqlen_k=case.max_seqlen_k, cu_seqlens_k=None, softmax_scale=None, causal=True, window_size=None,
        softcap=0.0, alibi_slopes=None, s_aux=None, k_descale=None, v_descale=None, output_scale=None,
        kv_descale_per_token=None, out=None, **case.kv_args,
    )  # fmt: skip
    portable = choose_chunk_prefill_config(128, False, 4, case.max_seqlen_q, interpreter=False)
    outs, lses = [], []
    for config in (None, dataclasses.replace(portable)):
        out, lse = poison(torch.empty_like(case.q)), torch.full((16, case.q.shape[0]), float("nan"), device="cuda")
        launch_chunk_prefill(
            case.q, case.k, case.v, out, lse, case.cu_seqlens_q, case.max_seqlen_q, **case.kv_args, cu_seqlens_k=None,
            softmax_scale=f.softmax_scale, window_left=f.window_left, window_right=f.window_right, softcap=0.0,
            alibi_slopes=None, s_aux=None, k_descale=f.k_descale, v_descale=f.v_descale, config=config,
        )  # fmt: skip
        outs.append(out.float())
        lses.append(lse)
    assert (outs[0] - outs[1]).abs().max().item() < 2e-2
    # rows no key is visible to ((40, 20), (3, 0)) have lse = -inf on both paths; -inf - -inf would be NaN
    assert torch.equal(lses[0].isneginf(), lses[1].isneginf())
    finite = lses[0].isfinite()
    assert finite.any() and (lses[0][finite] - lses[1][finite]).abs().max().item() < 2e-3


def test_without_the_switch_calls_keep_the_portable_kernel(monkeypatch):
    _hopper()
    monkeypatch.setenv("KVFLASH_GLUON", "0")
    case = make_case(MIX[:3], num_q_heads=8, head_size=128, q_dtype=torch.bfloat16, device="cuda")
    assert not applies(case, causal=True)
    out = chunk_prefill_attention(
        case.q, case.k, case.v, case.cu_seqlens_q, case.max_seqlen_q, case.max_seqlen_k, causal=True, **case.kwargs
    )
    check_against_reference(case, out, atol=1e-3, causal=True)

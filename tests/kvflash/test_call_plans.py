"""Call plans (attn_common.call_plan) on the GPU: a call whose facts were seen replays the first call's launches.

Each case runs twice on fresh tensors with the same facts (shapes, dtypes, strides, Python arguments): the
second call must be a plan hit, and its result must equal, bit for bit, the full path on the same tensors (the
full path is forced by a launch-recording block, where plans are off) and the float64 reference. Bad calls after
a plan exists still raise; dispatch modes still see the custom op; calls that cannot be planned stay correct.
"""

from __future__ import annotations

import pytest
import torch

from kvflash.attn_common.call_plan import clear_plans, plan_stats
from kvflash.attn_common.launch import record_launches
from kvflash.attn_common.testing import poison
from kvflash.flash_attn_interface import flash_attn_varlen_func, merge_attn_states, reshape_and_cache_flash
from kvflash.paged_decode import paged_decode_attention

from ..cases import LONG_DECODE, MIXED, PREFILL, SPECULATIVE, check_against_reference, make_case

pytestmark = pytest.mark.gpu

E4M3, E5M2, BF16 = torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16
DECODE = [(1, 37), (1, 200), (1, 5), (1, 64)]
SHAPES = dict(num_q_heads=8, num_kv_heads=2, head_size=128, q_dtype=BF16)  # of every case here

# (id, sequence mix, make_case arguments, call features)
VARLEN_CASES = [
    ("decode-bf16", DECODE, dict(), dict(causal=True)),
    ("decode-e4m3-tensor-descales", DECODE, dict(kv_dtype=E4M3), dict(causal=True)),
    ("decode-e5m2-float-descales", DECODE, dict(kv_dtype=E5M2), dict(causal=True, k_descale=0.5, v_descale=1.5)),
    ("decode-split-lse", LONG_DECODE, dict(kv_dtype=E4M3), dict(causal=True, return_softmax_lse=True)),
    ("decode-window-softcap-alibi-sinks", DECODE, dict(), dict(causal=True, window_size=(20, 0), softcap=5.0)),
    ("speculative-e4m3", SPECULATIVE, dict(kv_dtype=E4M3), dict(causal=True, return_softmax_lse=True)),
    ("mixed-bf16-lse", MIXED, dict(), dict(causal=True, return_softmax_lse=True)),
    ("mixed-e5m2", MIXED, dict(kv_dtype=E5M2), dict(causal=True)),
    ("prefill-bf16", PREFILL, dict(), dict(causal=True)),
    ("prefill-e4m3-lse", PREFILL, dict(kv_dtype=E4M3), dict(causal=True, return_softmax_lse=True)),
    ("prefill-contiguous", PREFILL, dict(block_size=None), dict(causal=True, window_size=(30, 0))),
    ("prefill-page1-noncausal", PREFILL, dict(block_size=1), dict()),
]


def _extras(case, features: dict, name: str) -> dict:
    """Tensors a case's features need, drawn fresh for each call (ALiBi slopes, sinks)."""
    extra = dict(features)
    if "alibi" in name:
        extra["alibi_slopes"] = torch.rand(case.q.shape[1], device=case.q.device)
        extra["s_aux"] = torch.randn(case.q.shape[1], device=case.q.device)
    return extra


def _full_path(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` through the full path (plans are off inside a launch-recording block)."""
    with record_launches():
        return fn(*args, **kwargs)


def _assert_same(got, want):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), "a replay differs from the full path"


@pytest.mark.parametrize("name, mix, build, features", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_varlen_replay_equals_the_full_path(name, mix, build, features):
    clear_plans()
    results = []
    for seed in (0, 1, 2):
        case = make_case(mix, **SHAPES, device="cuda", seed=seed, **build)
        extra = _extras(case, features, name)
        hits = plan_stats().hits
        got = case.attend(**extra)
        assert plan_stats().hits == hits + (1 if seed > 0 else 0), plan_stats().as_dict()
        want = _full_path(case.attend, **extra)
        _assert_same(got, want)
        out, lse = got if isinstance(got, tuple) else (got, None)
        if lse is not None:
            # lse by FlashAttention's rule, as in the kernels' own tests: on Hopper a bf16 query over an FP8 cache
            # runs QK^T on the fp8 tensor cores (split query), which accumulate below fp32 precision
            check_against_reference(case, out, lse, lse_low_precision=True,
                                    **{k: v for k, v in extra.items() if k != "return_softmax_lse"})
        results.append(out)
    assert not torch.equal(results[1], results[2])  # fresh inputs really reached the replayed launches


def test_replay_into_a_callers_out_and_fp8_output():
    clear_plans()
    for seed in (0, 1):
        case = make_case(MIXED, **SHAPES, kv_dtype=E4M3, device="cuda", seed=seed)
        out = poison(torch.empty_like(case.q))
        result, lse = case.attend(causal=True, out=out, return_softmax_lse=True)
        assert result is out
        check_against_reference(case, out, lse, lse_low_precision=True, causal=True)  # as above
        scale = torch.tensor([0.05], device="cuda")
        fp8_out = torch.empty(case.q.shape, dtype=E4M3, device="cuda")
        got = case.attend(causal=True, out=fp8_out, output_scale=scale)
        _assert_same(got, _full_path(case.attend, causal=True, output_scale=scale))
    assert plan_stats().hits >= 2


def test_paged_decode_and_merge_replays():
    clear_plans()
    for seed in (0, 1):
        case = make_case(LONG_DECODE, **SHAPES, kv_dtype=E5M2, device="cuda", seed=seed)

        args = (case.q, case.k, case.v, case.max_seqlen_k)
        kwargs = dict(k_descale=case.k_descale, v_descale=case.v_descale, return_lse=True, **case.kv_args)
        got = paged_decode_attention(*args, **kwargs)
        _assert_same(got, _full_path(paged_decode_attention, *args, **kwargs))
        out, lse = got
        half = out.shape[0] // 2 or 1
        parts = (out[:half].float(), lse[:, :half].contiguous(), out[:half].float() * 0.5, lse[:, :half] - 1.0)
        merged = merge_attn_states(*parts)
        _assert_same(merged, _full_path(merge_attn_states, *parts))
    assert plan_stats().hits >= 2


@pytest.mark.parametrize("kv_cache_dtype, cache_dtype", [("auto", BF16), ("fp8_e4m3", E4M3), ("fp8_e5m2", E5M2)])
def test_cache_writer_replay(kv_cache_dtype, cache_dtype):
    clear_plans()
    tokens, hkv, d, blocks, block_size = 300, 2, 128, 40, 16
    for seed in (0, 1):
        g = torch.Generator(device="cuda").manual_seed(seed)
        key = torch.randn(tokens, hkv, d, device="cuda", generator=g).to(BF16)
        value = torch.randn(tokens, hkv, d, device="cuda", generator=g).to(BF16)
        slots = torch.randperm(blocks * block_size, device="cuda", generator=g)[:tokens]
        slots[::7] = -1  # padding
        scales = (torch.tensor([0.02], device="cuda"), torch.rand(hkv, device="cuda") * 0.05 + 0.01)
        if kv_cache_dtype == "auto":
            scales = (None, None)
        caches = [torch.zeros(blocks, block_size, hkv, d, dtype=cache_dtype, device="cuda") for _ in range(4)]
        hits = plan_stats().hits
        reshape_and_cache_flash(key, value, caches[0], caches[1], slots, kv_cache_dtype, *scales)
        assert plan_stats().hits == hits + seed
        _full_path(reshape_and_cache_flash, key, value, caches[2], caches[3], slots, kv_cache_dtype, *scales)
        _assert_same(tuple(caches[:2]), tuple(caches[2:]))


def test_bad_calls_raise_after_a_plan_exists():
    clear_plans()
    case = make_case(DECODE, **SHAPES, device="cuda")
    case.attend(causal=True)
    case.attend(causal=True)
    assert plan_stats().hits == 1
    with pytest.raises(TypeError, match="causal"):
        case.attend(causal=1)
    with pytest.raises(ValueError, match="softmax_scale"):
        case.attend(causal=True, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="window_size"):
        case.attend(causal=True, window_size=(-2, 0))
    with pytest.raises(TypeError, match="q"):
        case.q = case.q.float()
        case.attend(causal=True)


def test_repeated_tensor_objects_are_not_planned():
    """k is v: a plan built from it could not tell the two apart, so those facts always take the full path."""
    clear_plans()
    case = make_case(DECODE, **SHAPES, device="cuda")

    def same_kv():
        return flash_attn_varlen_func(case.q, case.k, case.k, 1, case.cu_seqlens_q, case.max_seqlen_k,
                                      causal=True, **case.kv_args)  # fmt: skip

    first = same_kv()
    second = same_kv()
    assert plan_stats().hits == 0 and plan_stats().unplanned == 1
    _assert_same(second, first)


def test_converted_sinks_are_not_planned_and_stay_correct():
    """bf16 sinks are converted to float32 by a torch op in every call: a plan would skip it, so no plan."""
    clear_plans()
    for seed in (0, 1):
        case = make_case(DECODE, **SHAPES, device="cuda", seed=seed)
        sinks = torch.randn(8, device="cuda").to(BF16)
        out, lse = case.attend(causal=True, s_aux=sinks, return_softmax_lse=True)
        check_against_reference(case, out, lse, causal=True, s_aux=sinks)
    assert plan_stats().hits == 0


def test_dispatch_modes_see_the_custom_op_after_a_plan_exists():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    clear_plans()
    case = make_case(DECODE, **SHAPES, device="cuda")
    case.attend(causal=True)
    case.attend(causal=True)
    mode = Ops()
    with mode:
        case.attend(causal=True)
    assert any("kvflash" in n for n in mode.names), mode.names


def test_cuda_graph_capture_of_a_planned_call():
    clear_plans()
    case = make_case(DECODE, **SHAPES, kv_dtype=E4M3, device="cuda")
    out = torch.empty_like(case.q)
    case.attend(causal=True, out=out)  # builds the plan
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        case.attend(causal=True, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        case.attend(causal=True, out=out)  # a replay inside the capture
    want = _full_path(case.attend, causal=True).clone()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    _assert_same(out, want)

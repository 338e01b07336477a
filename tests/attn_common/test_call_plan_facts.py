"""Call facts (attn_common.call_plan) on the CPU: what makes two calls the same for a plan, and when plans are off.
The replays themselves need compiled kernels: tests/kvflash/test_call_plans.py runs them on the GPU."""

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvflash.attn_common.call_plan import call_facts, call_key, plan_stats, planned, plans_allowed
from kvflash.attn_common.launch import dry_run, record_launches


def _facts(*args, **kwargs):
    return call_facts(args, kwargs)[0]


def test_same_metadata_new_values_same_facts():
    a, b = torch.randn(4, 8, 16), torch.randn(4, 8, 16)
    assert _facts(a, 3, causal=True) == _facts(b, 3, causal=True)
    assert call_facts((a, 3), {"x": b})[1] == [a, b]


def test_types_values_and_keywords_are_facts():
    t = torch.randn(4, 8)
    assert _facts(t, True) != _facts(t, 1)  # a check on bool must not be skipped for an int
    assert _facts(t, 1) != _facts(t, 1.0)
    assert _facts(t, (1, 2)) != _facts(t, [1, 2])
    assert _facts(t, window=(5, 0)) != _facts(t, window=(6, 0))
    assert _facts(t, causal=True) != _facts(t, softcap=True)
    assert _facts(t, a=1, b=2) != _facts(t, b=2, a=1)  # keyword order: a different call, planned apart
    assert _facts(t, None) != _facts(t, 0)


def test_tensor_layout_dtype_and_alignment_are_facts():
    base = torch.randn(8, 16)
    assert _facts(base) != _facts(base.t())  # strides
    assert _facts(base) != _facts(base.to(torch.float16))  # dtype
    assert _facts(base) != _facts(base.reshape(16, 8))  # shape
    # A view starting 4 bytes in: Triton specialises on 16-byte alignment, so the facts must differ.
    flat = torch.randn(8 * 16 + 1)
    assert _facts(flat[:128].view(8, 16)) != _facts(flat[1:].view(8, 16))


def test_unkeyable_arguments_and_cpu_tensors_are_never_planned():
    t = torch.randn(4)
    assert _facts(t, [t]) is None  # a tensor inside a list
    assert _facts(t, np.float32(1.0)) is None
    assert _facts(t, {"a": 1}) is None
    assert call_key((t,), {})[0] is None  # CPU tensors: the reference path, never planned


def test_plans_are_off_inside_launch_bookkeeping_and_dispatch_modes():
    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with record_launches():
        assert not plans_allowed()
    with dry_run():
        assert not plans_allowed()
    with Passthrough():
        assert not plans_allowed()


def test_a_planned_function_on_cpu_tensors_runs_in_full_every_time():
    calls = []

    @planned
    def add_one(x, *, scale=1.0):
        """Doc kept."""
        calls.append(scale)
        return x + scale

    hits = plan_stats().hits
    x = torch.zeros(3)
    for _ in range(3):
        assert torch.equal(add_one(x, scale=2.0), torch.full((3,), 2.0))
    assert calls == [2.0, 2.0, 2.0] and plan_stats().hits == hits
    assert add_one.__doc__ == "Doc kept."

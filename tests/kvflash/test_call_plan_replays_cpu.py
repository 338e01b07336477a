"""Call plans on the CPU with a stand-in GPU: a replay hands Triton's launcher exactly what the full path hands it.

``test_call_plans.py`` checks replays on a GPU by their outputs. Here no kernel runs: the CPU poses as a GPU
(tensors report device 0, the interpreter is off, Triton's driver and every kvflash kernel are stand-ins whose
launcher records its arguments), so the replay machinery itself is checked on every machine. For each call, on
the same tensors: the replay's launches must equal the full path's in grid, stream, launcher and every
non-pointer argument; each pointer into an argument or a kept constant must be the same address; each pointer
into memory the call allocated must sit, at the full path's offsets, inside memory the replay allocated, one
replay region per full-path allocation, the regions apart (returned buffers included).
"""

from __future__ import annotations

import sys
import zlib

import pytest
import torch
from triton.runtime.jit import KernelInterface

from kvflash.attn_common import call_plan, platform
from kvflash.attn_common import launch as launch_module
from kvflash.attn_common.call_plan import clear_plans, plan_stats
from kvflash.attn_common.launch import record_launches
from kvflash.flash_attn_interface import flash_attn_varlen_func, merge_attn_states, reshape_and_cache_flash
from kvflash.paged_decode import paged_decode_attention

from ..cases import LONG_DECODE, MIXED, PREFILL, SPECULATIVE, make_case

BF16, E4M3, E5M2 = torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2
STREAM = 0x5EED
SHAPES = dict(num_q_heads=8, num_kv_heads=2, head_size=128, q_dtype=BF16)  # of every case here


class _Run:
    """Stands for ``CompiledKernel.run``: Triton's Python launcher (``__call__``) and, as on Triton 3.6, the C
    function under it (``launch``); both record ``(launcher, grid, stream, kernel arguments)``."""

    global_scratch_size = 0
    profile_scratch_size = 0
    launch_cooperative_grid = False
    launch_pdl = False

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __call__(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit_, *values):
        self.log.append((self.name, (gx, gy, gz), stream, values))

    def launch(self, gx, gy, gz, stream, function, cooperative, pdl, scratch, profile, metadata, *rest):
        self.log.append((self.name, (gx, gy, gz), stream, rest[3:]))  # after launch metadata and the hooks


class _Compiled:
    def __init__(self, name: str, log: list):
        self.run = _Run(name, log)
        self.function = zlib.crc32(name.encode())  # a CUfunction handle stands here
        self.packed_metadata = (4, 1, 1, 1)


class _Kernel:
    """Stands for a ``@triton.jit`` kernel: its signature is the real one's, a launch returns a compiled stand-in."""

    def __init__(self, kernel, log: list):
        self.kernel = kernel
        self.compiled = _Compiled(kernel.fn.__name__, log)

    def __getitem__(self, grid):
        return lambda **kwargs: self.compiled

    def __getattr__(self, name):
        return getattr(self.kernel, name)


_LOG: list = []
_ALLOCATED: list[torch.Tensor] = []  # every torch.empty* and Tensor.new_empty result inside a test


def _recording(allocate):
    def call(*args, **kwargs):
        tensor = allocate(*args, **kwargs)
        _ALLOCATED.append(tensor)
        return tensor

    return call


# id of a real kernel -> its stand-in, made once per process: launch keys are kept by the kernel object's id, so a
# stand-in must never be freed and its id reused.
_STAND_INS: dict[int, _Kernel] = {}


@pytest.fixture
def log(monkeypatch) -> list:
    """The CPU as a GPU for this test; yields the launcher log."""
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(platform, "runs_triton", lambda device, interpreter=None: True)
    monkeypatch.setattr("kvflash.chunk_prefill.op.runs_triton", lambda device, interpreter=None: True)
    monkeypatch.setattr(platform, "_driver_queries", lambda: (lambda: 0, lambda index: STREAM))
    monkeypatch.setitem(platform._MP_BY_DEVICE, torch.device("cpu"), 132)  # an H200: the GPU's split decisions
    monkeypatch.setattr(launch_module, "_COMPILED", {})
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _recording(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", _recording(torch.Tensor.new_empty))
    for name, module in list(sys.modules.items()):
        if name.startswith("kvflash."):
            for attr, value in list(vars(module).items()):
                if isinstance(value, KernelInterface):
                    stand_in = _STAND_INS.setdefault(id(value), _Kernel(value, _LOG))
                    monkeypatch.setattr(module, attr, stand_in)
    clear_plans()
    _LOG.clear()
    yield _LOG
    clear_plans()


@pytest.fixture(params=["3.6.0", "3.9.0"], ids=["c-launcher", "python-launcher"])
def triton_version(request, monkeypatch):
    """Triton 3.6 replays through the C launcher, other versions through the Python one."""
    monkeypatch.setattr(call_plan, "_TRITON_VERSION", request.param)


def _as_tuple(result) -> tuple:
    return () if result is None else result if isinstance(result, tuple) else (result,)


def _assert_replay_matches_full_path(log: list, fn, make_args) -> None:
    """``fn(*args, **kwargs)`` for ``make_args(seed)`` of seeds 0 (builds the plan) and 1 (replays it), then the
    full path on seed 1's tensors: the two launch logs and results must agree (module docstring)."""
    args, kwargs = make_args(0)
    fn(*args, **kwargs)
    assert plan_stats().built == 1, plan_stats().as_dict()
    args, kwargs = make_args(1)
    log.clear()
    _ALLOCATED.clear()
    got = fn(*args, **kwargs)
    assert plan_stats().hits == 1, plan_stats().as_dict()
    replayed, allocated = list(log), [_span(t) for t in _ALLOCATED]
    log.clear()
    with record_launches():  # plans are off inside
        want = fn(*args, **kwargs)
    full = list(log)
    assert replayed and len(replayed) == len(full)
    arguments = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    # Arguments and the kept constants (call_plan.keep_constant): their addresses are passed as they are.
    fixed = {t.untyped_storage().data_ptr() for t in (*arguments, *call_plan._CONSTANTS.values())}
    moved: dict[int, int] = {}  # full path's allocation (storage address) -> replay address - full path address
    regions: dict[int, tuple[int, int]] = {}  # full path's allocation -> the replay's bytes it covers (start, end)
    for (name, grid, stream, values), (want_name, want_grid, want_stream, want_values) in zip(replayed, full):
        assert (name, grid, stream, len(values)) == (want_name, want_grid, want_stream, len(want_values))
        for position, (value, expected) in enumerate(zip(values, want_values)):
            where = f"{name} argument {position}"
            if not isinstance(expected, torch.Tensor):
                assert type(value) is type(expected) and value == expected, where
                continue
            assert type(value) is int, where
            storage = expected.untyped_storage().data_ptr()
            if storage in fixed:
                assert value == expected.data_ptr(), where
            else:
                assert moved.setdefault(storage, value - expected.data_ptr()) == value - expected.data_ptr(), where
                start, end = _span(expected)
                start, end = start + moved[storage], end + moved[storage]
                assert any(a <= start and end <= b for a, b in allocated), f"{where}: outside the replay's memory"
                low, high = regions.get(storage, (start, end))
                regions[storage] = (min(low, start), max(high, end))
    ordered = sorted(r for r in regions.values() if r[0] < r[1])
    assert all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:])), "two full-path allocations overlap in the replay"
    got, want = _as_tuple(got), _as_tuple(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.shape, g.stride(), g.dtype, g.device) == (w.shape, w.stride(), w.dtype, w.device)
        if any(w is t for t in arguments):
            assert g is w
        else:
            storage = w.untyped_storage().data_ptr()
            assert moved.get(storage, g.data_ptr() - w.data_ptr()) == g.data_ptr() - w.data_ptr()


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` a tensor's elements occupy."""
    size = t.element_size() * (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) if t.numel() else 0
    return t.data_ptr(), t.data_ptr() + size


DECODE = [(1, 1024)] * 8  # split over the KV length on 132 multiprocessors: two launches

VARLEN_CASES = [
    ("decode-bf16", DECODE, dict(), dict(causal=True)),
    ("decode-e4m3", DECODE, dict(kv_dtype=E4M3), dict(causal=True)),
    ("decode-e5m2-float-descales-lse", LONG_DECODE, dict(kv_dtype=E5M2),
     dict(causal=True, k_descale=0.5, v_descale=1.5, return_softmax_lse=True)),
    ("decode-window-softcap", DECODE, dict(), dict(causal=True, window_size=(20, 0), softcap=5.0)),
    ("speculative-e4m3-lse", SPECULATIVE, dict(kv_dtype=E4M3), dict(causal=True, return_softmax_lse=True)),
    ("mixed-bf16", MIXED, dict(), dict(causal=True)),
    ("mixed-e5m2-lse", MIXED, dict(kv_dtype=E5M2), dict(causal=True, return_softmax_lse=True)),
    ("prefill-bf16", PREFILL, dict(), dict(causal=True)),
    ("prefill-e4m3-lse", PREFILL, dict(kv_dtype=E4M3), dict(causal=True, return_softmax_lse=True)),
    ("prefill-contiguous", PREFILL, dict(block_size=None), dict(causal=True, window_size=(30, 0))),
]  # fmt: skip


@pytest.mark.parametrize("name, mix, build, features", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_varlen_replays_launch_what_the_full_path_launches(log, triton_version, name, mix, build, features):
    def make_args(seed):
        case = make_case(mix, **SHAPES, seed=seed, **build)
        kwargs = dict(case.kwargs)
        kwargs.update(features)
        return (case.q, case.k, case.v, case.max_seqlen_q, case.cu_seqlens_q, case.max_seqlen_k), kwargs

    _assert_replay_matches_full_path(log, flash_attn_varlen_func, make_args)


@pytest.mark.parametrize("fp8_out", [False, True], ids=["callers-out", "fp8-out"])
def test_replay_into_a_callers_out(log, triton_version, fp8_out):
    def make_args(seed):
        case = make_case(MIXED, **SHAPES, kv_dtype=E4M3, seed=seed)
        out = torch.empty(case.q.shape, dtype=E4M3 if fp8_out else BF16)
        extra = dict(output_scale=torch.tensor([0.05])) if fp8_out else dict(return_softmax_lse=True)
        kwargs = dict(case.kwargs, causal=True, out=out, **extra)
        return (case.q, case.k, case.v, case.max_seqlen_q, case.cu_seqlens_q, case.max_seqlen_k), kwargs

    _assert_replay_matches_full_path(log, flash_attn_varlen_func, make_args)


def test_paged_decode_and_merge_replays(log, triton_version):
    def decode_args(seed):
        case = make_case(LONG_DECODE, **SHAPES, kv_dtype=E5M2, seed=seed)
        kwargs = dict(k_descale=case.k_descale, v_descale=case.v_descale, return_lse=True, **case.kv_args)
        return (case.q, case.k, case.v, case.max_seqlen_k), kwargs

    _assert_replay_matches_full_path(log, paged_decode_attention, decode_args)
    for with_out in (False, True):

        def merge_args(seed, with_out=with_out):
            g = torch.Generator().manual_seed(seed)
            parts = (torch.randn(6, 8, 128, generator=g), torch.randn(8, 6, generator=g))
            parts += (torch.randn(6, 8, 128, generator=g), torch.randn(8, 6, generator=g))
            kwargs = dict(out=torch.empty(6, 8, 128), out_lse=torch.empty(8, 6)) if with_out else {}
            return parts, kwargs

        clear_plans()
        _assert_replay_matches_full_path(log, merge_attn_states, merge_args)


@pytest.mark.parametrize("kv_cache_dtype, cache_dtype", [("auto", BF16), ("fp8_e4m3", E4M3)])
def test_cache_writer_replays(log, triton_version, kv_cache_dtype, cache_dtype):
    def make_args(seed):
        g = torch.Generator().manual_seed(seed)
        key, value = (torch.randn(300, 2, 128, generator=g).to(BF16) for _ in range(2))
        slots = torch.randperm(640, generator=g)[:300]
        caches = [torch.zeros(40, 16, 2, 128, dtype=cache_dtype) for _ in range(2)]
        scales = (None, None) if kv_cache_dtype == "auto" else (torch.tensor([0.02]), torch.rand(2) + 0.01)
        return (key, value, *caches, slots, kv_cache_dtype, *scales), {}

    _assert_replay_matches_full_path(log, reshape_and_cache_flash, make_args)


def test_alternating_facts_replay_their_own_plans(log, triton_version):
    """Two facts taking turns (the last replayed facts are compared before the table is asked): each call replays
    its own facts' plan."""

    def make_args(mix, seed):
        case = make_case(mix, **SHAPES, seed=seed)
        kwargs = dict(case.kv_args, causal=True)
        return (case.q, case.k, case.v, case.max_seqlen_q, case.cu_seqlens_q, case.max_seqlen_k), kwargs

    def launches(args, kwargs, full: bool):
        log.clear()
        if full:
            with record_launches():
                flash_attn_varlen_func(*args, **kwargs)
        else:
            flash_attn_varlen_func(*args, **kwargs)
        return [(name, grid, len(values)) for name, grid, _, values in log]

    for seed in range(3):
        for mix in (DECODE, PREFILL, DECODE, PREFILL):
            args, kwargs = make_args(mix, seed)
            replayed = launches(args, kwargs, full=False)
            if seed > 0:  # a kernel's first launch reaches its stand-in, not the launcher
                assert replayed == launches(args, kwargs, full=True)
    assert plan_stats().built == 2 and plan_stats().hits == 10, plan_stats().as_dict()

"""Where the host time of one eager kvflash call goes, measured on the CPU (no GPU needed).

Each case builds CPU tensors of a bench ``host`` row and calls the public function many times with the Triton
kernels replaced by no-op stubs *in this process only*: under the interpreter a real launch would run the
kernel on the CPU (seconds), which says nothing about the GPU host path. What remains is everything kvflash does
in Python before the launch — argument checks, normalisation, launch-config choice, allocations, the custom-op
dispatch and the launch-key bookkeeping — which is the part this repository controls. Triton's own launch
(``CompiledKernel`` run on the GPU) comes on top and is measured by ``python -m tools.bench --only host`` on the device.

    PYTHONPATH=packages/attn-common/src:packages/chunk-prefill/src:packages/paged-decode/src:\\
    packages/fp8-utils/src:packages/kvflash/src python3 -m tools.bench.host_profile [--profile CASE] [--calls N]

prints a median microseconds-per-call table per case and per layer, and with ``--profile`` the top functions
of a cProfile run of that case.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors take the Triton launch path (not the reference)

import torch

from .cases_host import HOST_CASES, build_host_call

# Module attributes that hold a @triton.jit kernel launched by kvflash: replaced by _NoLaunch here.
KERNEL_SITES = (
    ("kvflash.paged_decode.op", "paged_decode_kernel"),
    ("kvflash.paged_decode.merge_states_op", "split_merge_kernel"),
    ("kvflash.chunk_prefill.op", "chunk_prefill_kernel"),
    ("kvflash.fp8_utils.op", "reshape_and_cache_kernel"),
    ("kvflash.paged_decode.merge_states_op", "merge_states_kernel"),
)


class _NoLaunch:
    """Stands for a JIT kernel: ``stub[grid](**kwargs)`` binds the arguments and returns ``result`` (the last
    arguments are kept, so the launch-key cost of the GPU path can be timed on them; ``host_replay.py`` sets
    ``result`` to a stand-in compiled kernel)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0
        self.last_kwargs = None
        self.result = None

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.launches += 1
        self.last_kwargs = kwargs
        return self.result

    def __getattr__(self, name):  # arg_names, fn, ... for whoever inspects the kernel
        return getattr(self.kernel, name)


def stub_kernels() -> list[_NoLaunch]:
    import importlib

    stubs = []
    for module_name, attr in KERNEL_SITES:
        module = importlib.import_module(module_name)
        stub = _NoLaunch(getattr(module, attr))
        setattr(module, attr, stub)
        stubs.append(stub)
    return stubs


def time_call(call, calls: int) -> float:
    """Median microseconds of ``call()`` over ``calls`` back-to-back calls (after 20 warm-up calls)."""
    for _ in range(20):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def layer_breakdown(name: str, calls: int, stubs: list[_NoLaunch]) -> dict[str, float]:
    """Median µs of the whole call and of its layers (each layer timed on its own, same arguments), and of the
    launch keys the GPU path computes on top (``key``: the generated key function, per launch of the call)."""
    try:
        from kvflash.attn_common.launch import _key_and_args
    except ImportError:  # a kvflash before launch keys (profiling an older commit)
        _key_and_args = None
    call, layers = build_host_call(name, torch.device("cpu"), small=True)
    for stub in stubs:
        stub.last_kwargs = None
    row = {"total": time_call(call, calls)}
    for layer, fn in layers.items():
        row[layer] = time_call(fn, calls)
    for stub in stubs if _key_and_args is not None else ():
        if stub.last_kwargs is not None:
            kernel, kwargs = stub.kernel, stub.last_kwargs
            row[f"key {kernel.fn.__name__}"] = time_call(lambda k=kernel, kw=kwargs: _key_and_args(k, kw), calls)
    return row


def dispatch_cost(calls: int) -> dict[str, float]:
    """µs of one eager op call through ``torch.library.custom_op`` and through ``Library`` define/impl (the way
    kvflash registers its ops), on the same no-op body with decode-like arguments."""
    try:
        from kvflash.attn_common.ops import _LIB
    except ImportError:  # a kvflash before attn_common.ops
        _LIB = torch.library.Library("kvflash_profile", "FRAGMENT")

    def body(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, a: int, b: int, scale: float, flag: bool) -> None:
        return None

    wrapped = torch.library.custom_op("kvflash_profile::custom_op_noop", mutates_args=("out", "lse"))(body)
    wrapped.register_fake(body)
    schema = torch.library.infer_schema(body, mutates_args=("out", "lse"))
    _LIB.define("profile_noop" + schema)
    _LIB.impl("profile_noop", body, "CompositeExplicitAutograd")
    direct = getattr(torch.ops, _LIB.ns).profile_noop.default
    q, out, lse = torch.zeros(8, 4, 8), torch.zeros(8, 4, 8), torch.zeros(4, 8)
    return {
        "python body": time_call(lambda: body(q, out, lse, 1, 2, 0.5, False), calls),
        "custom_op": time_call(lambda: wrapped(q, out, lse, 1, 2, 0.5, False), calls),
        "Library define/impl": time_call(lambda: direct(q, out, lse, 1, 2, 0.5, False), calls),
    }


def profile_case(name: str, calls: int, top: int) -> None:
    """cProfile ``calls`` calls of host case ``name`` after 50 untimed ones; print the ``top`` functions by own time."""
    call, _ = build_host_call(name, torch.device("cpu"), small=True)
    for _ in range(50):
        call()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        call()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.host_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per case (default 2000)")
    parser.add_argument("--profile", default=None, help="cProfile this case (a name from the table)")
    parser.add_argument("--top", type=int, default=25, help="functions shown with --profile")
    args = parser.parse_args(argv)
    stubs = stub_kernels()
    print(f"torch {torch.__version__}, CPU, kernels stubbed ({len(stubs)} launch sites); median µs per call")
    names = list(HOST_CASES)
    if args.profile:
        if args.profile not in HOST_CASES:
            parser.error(f"--profile: expected one of {names}, got {args.profile!r}")
        profile_case(args.profile, args.calls, args.top)
        return 0
    for name in names:
        row = layer_breakdown(name, args.calls, stubs)
        parts = ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k != "total")
        print(f"{name:<46} {row['total']:6.1f} µs   ({parts})")
    costs = dispatch_cost(args.calls)
    print("op dispatch, no-op body: " + ", ".join(f"{k} {v:.1f} µs" for k, v in costs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

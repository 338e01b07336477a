"""The host time of a *replayed* eager kvflash call (a call-plan hit), measured on the CPU (no GPU needed).

On the GPU every layer of a step after the first replays a call plan (``kvflash.attn_common.call_plan``): call
facts, a dict lookup, allocations, pointer slots, Triton's C launcher. ``host_profile.py`` cannot show that path
(plans are never used for CPU tensors, and interpreted launches return no compiled kernel), so this tool makes
the CPU look like a GPU to kvflash *in this process only*:

- ``torch.Tensor.get_device`` answers with another C method of the same cost (``is_contiguous``: never negative),
  so CPU tensors get call facts;
- the Triton interpreter is off, CPU tensors "run Triton", the CPU has an H200's 132 multiprocessors (so the
  launch settings and split decisions are the GPU's), and the stubbed kernels of ``host_profile.py`` return a
  stand-in compiled kernel whose C launcher is ``itertools.chain`` (a C callable taking any arguments: the real
  launcher's own cost, a few µs on the GPU host, is not in these numbers);
- Triton's driver queries (current device, current stream) are C builtins (``int``, ``abs``).

What remains is kvflash's own replay path. Allocations are CPU ``torch.empty`` calls: a large CPU output (the
prefill rows' 64 MiB) costs a fresh ``mmap`` where the GPU's caching allocator answers in about a microsecond;
the ``alloc`` column times the row's allocations alone so they can be told apart.

    PYTHONPATH=packages/attn-common/src:packages/chunk-prefill/src:packages/paged-decode/src:\\
    packages/fp8-utils/src:packages/kvflash/src python3 -m tools.bench.host_replay [--profile CASE] [--repeats N]

prints, per case, the median µs per replayed call (the best of ``--repeats`` medians: this measures code, and
the CPU's noise only ever adds), and with ``--profile`` the top functions of a cProfile run of that case.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # before host_profile, which would turn it on

import torch

from .cases_host import HOST_CASES, build_host_call
from .host_profile import profile_case, stub_kernels, time_call

H200_MULTIPROCESSORS = 132


class _Run:
    """Stands for Triton 3.6's ``CompiledKernel.run`` (the attributes call_plan reads to call the C launcher);
    ``calls`` counts the full path's launches through it."""

    global_scratch_size = 0
    profile_scratch_size = 0
    launch_cooperative_grid = False
    launch_pdl = False
    launch = itertools.chain  # any number of positional arguments, C, lazy: the cheapest stand-in
    calls = 0

    def __call__(self, *args):
        _Run.calls += 1


class _Compiled:
    """Stands for a ``CompiledKernel``: what :func:`kvflash.attn_common.launch.launch` keeps and a plan records."""

    function = 0
    packed_metadata = (4, 1, 1, 1)

    def __init__(self):
        self.run = _Run()


def fake_gpu() -> list:
    """Make CPU tensors take kvflash's GPU host path in this process (module docstring); returns the kernel stubs."""
    import kvflash.chunk_prefill.op
    from kvflash.attn_common import call_plan, platform

    torch.Tensor.get_device = torch._C.TensorBase.is_contiguous
    platform._driver_queries = functools.cache(lambda: (int, abs))
    platform.runs_triton = kvflash.chunk_prefill.op.runs_triton = lambda device, interpreter=None: True
    platform._MP_BY_DEVICE[torch.device("cpu")] = H200_MULTIPROCESSORS
    call_plan._TRITON_VERSION = "3.6.0"
    compiled = _Compiled()
    stubs = stub_kernels()
    for stub in stubs:
        stub.result = compiled
    return stubs


def allocation_cost(call, calls: int) -> tuple[float, int]:
    """µs of the allocations one replay of ``call`` makes, and how many: a plan built while torch's
    allocation functions record (a replay binds them when its plan is built) is replayed once, then the recorded
    allocations are timed alone and the plan is built again with the real functions."""
    from kvflash.attn_common.call_plan import clear_plans

    made = []
    real = [(torch, name, getattr(torch, name)) for name in ("empty", "empty_like", "empty_strided")]
    real.append((torch.Tensor, "new_empty", torch.Tensor.new_empty))

    def recording(fn):
        def allocate(*args, **kwargs):
            made.append((fn, args, kwargs))
            return fn(*args, **kwargs)

        return allocate

    for owner, name, fn in real:
        setattr(owner, name, recording(fn))
    try:
        clear_plans()
        call()  # builds the plan
        made.clear()
        call()  # replays it
    finally:
        for owner, name, fn in real:
            setattr(owner, name, fn)
        clear_plans()
        call()
    replayed = list(made)

    def allocate():
        for fn, args, kwargs in replayed:
            fn(*args, **kwargs)

    return time_call(allocate, calls), len(replayed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.host_replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per repeat (default 2000)")
    parser.add_argument("--repeats", type=int, default=5, help="medians taken; the best is shown (default 5)")
    parser.add_argument("--profile", default=None, help="cProfile this case (a name from the table)")
    parser.add_argument("--top", type=int, default=30, help="functions shown with --profile")
    args = parser.parse_args(argv)
    stubs = fake_gpu()
    from kvflash.attn_common.call_plan import clear_plans, plan_stats

    names = [n for n, case in HOST_CASES.items() if not case.fresh_facts]
    if args.profile:
        if args.profile not in names:
            parser.error(f"--profile: expected one of {names}, got {args.profile!r}")
        profile_case(args.profile, args.calls, args.top)
        return 0
    print(f"torch {torch.__version__}, CPU standing in for a GPU; best of {args.repeats} medians, µs per call")
    for name in names:
        call, _ = build_host_call(name, torch.device("cpu"), small=True)
        clear_plans()
        before = sum(stub.launches for stub in stubs) + _Run.calls
        call()  # builds the plan (a kernel's first launch reaches its stub, later ones the kept compiled kernel)
        launches = sum(stub.launches for stub in stubs) + _Run.calls - before
        total = min(time_call(call, args.calls) for _ in range(args.repeats))
        replayed = plan_stats().hits
        alloc, count = min(allocation_cost(call, args.calls) for _ in range(args.repeats))
        note = "" if replayed == args.repeats * (args.calls + 20) else f"  (only {replayed} replays!)"
        print(
            f"{name:<46} {total:6.1f} µs   (alloc {alloc:.1f} in {count}, {launches} launch(es), "
            f"without alloc {total - alloc:.1f}){note}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

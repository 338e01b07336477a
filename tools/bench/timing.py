"""GPU timing: CUDA events around each call, median over many calls, inputs rotated past the L2 cache.

Why not plain ``triton.testing.do_bench``: a launcher's Python work (argument checks, custom-op dispatch)
can take longer than a 30 µs kernel, and then back-to-back events measure the host, not the GPU. Here each
batch of calls is queued behind a GPU sleep long enough for the host to enqueue the whole batch, so the
kernels run back to back and each event pair brackets GPU time only. The first call of every input set
runs before timing (Triton compilation, cuDNN plans), then a warm-up of ``warmup_ms``.

Input sets: a case passes one call per input set; ``rotation_sets`` says how many sets make the bytes of
all sets exceed a few L2 caches, so the data a call reads was evicted since that set's last use.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["Timing", "time_calls", "rotation_sets", "l2_bytes"]

# Total bytes of all rotated sets, in L2 sizes: the set a call reads was last used >= 3 L2s of traffic ago.
ROTATION_L2_MULTIPLE = 4
MAX_SETS = 16
# Events and kernels a batch may queue behind one sleep (the driver's launch queue holds ~1000 entries).
BATCH_CALLS = 48


@dataclasses.dataclass
class Timing:
    """Median and spread (10th / 90th percentile) of per-call GPU time in ms, over ``reps`` calls."""

    ms: float
    p10: float
    p90: float
    reps: int
    sets: int


def l2_bytes() -> int:
    """L2 cache size of the current GPU in bytes (50 MB on an H100 if the property is missing)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def rotation_sets(bytes_per_set: int) -> int:
    """How many input sets to rotate so that all of them together exceed ``ROTATION_L2_MULTIPLE`` L2s."""
    want = ROTATION_L2_MULTIPLE * l2_bytes()
    return max(1, min(MAX_SETS, math.ceil(want / max(1, bytes_per_set))))


@functools.lru_cache(maxsize=1)
def _sleep_cycles_per_ms() -> float:
    """Calibrate ``torch.cuda._sleep`` (it spins for a number of GPU clock cycles)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 20_000_000
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / max(start.elapsed_time(end), 1e-3)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def time_calls(
    calls: Sequence[Callable[[], object]],
    *,
    warmup_ms: float = 30.0,
    rep_ms: float = 150.0,
    min_reps: int = 10,
    max_reps: int = 400,
) -> Timing:
    """Time ``calls`` (one per input set, used in rotation) and return the median per-call GPU time.

    The number of timed calls is chosen so they take about ``rep_ms`` (at least ``min_reps``).
    """
    for call in calls:  # compile, plan, allocate
        call()
    torch.cuda.synchronize()

    # Rough per-call GPU time and host enqueue time.
    probe = max(3, len(calls))
    t0 = time.perf_counter()
    for i in range(probe):
        calls[i % len(calls)]()
    host_ms = (time.perf_counter() - t0) * 1e3 / probe
    torch.cuda.synchronize()
    est_ms = max((time.perf_counter() - t0) * 1e3 / probe, 1e-3)

    for i in range(max(1, min(1000, int(warmup_ms / est_ms)))):
        calls[i % len(calls)]()
    reps = max(min_reps, min(max_reps, int(rep_ms / est_ms)))

    times: list[float] = []
    index = 0
    cycles_per_ms = _sleep_cycles_per_ms()
    while len(times) < reps:
        batch = min(BATCH_CALLS, reps - len(times))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(batch)]
        hold_ms = min(200.0, 1.0 + 2.0 * batch * host_ms)
        torch.cuda._sleep(int(hold_ms * cycles_per_ms))
        for start, end in events:
            start.record()
            calls[index % len(calls)]()
            end.record()
            index += 1
        torch.cuda.synchronize()
        times.extend(start.elapsed_time(end) for start, end in events)
    return Timing(
        ms=statistics.median(times),
        p10=_percentile(times, 0.1),
        p90=_percentile(times, 0.9),
        reps=reps,
        sets=len(calls),
    )

"""One benchmark case: what it measures (its labels) and how (a ``run`` callable), and its result row.

A case's ``run`` imports the kernel, builds inputs on the GPU, checks one slice of the output against the
reference, times it (:func:`measure`), and returns a :class:`Measurement`. :func:`run_case` turns any exception into an
error row, so one broken kernel never stops the run. Labels are plain data so that ``--dry-run`` can list
cases without a GPU and ``report.py`` can derive ratios and targets from the JSON alone.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from .timing import Timing, time_calls

__all__ = ["Case", "Measurement", "binder", "measure", "run_case"]


@dataclasses.dataclass
class Measurement(Timing):
    """What a case's ``run`` returns: its :class:`Timing` and what the time did.

    ``work`` is bytes (``metric == "bytes"``) or FLOPs (``"flops"``), counted honestly: decode
    bytes = KV read once (tokens used) + q + out; prefill FLOPs = 4 * Hq * D * visible (query, key) pairs.
    ``rel_err`` is ||out - ref|| / ||ref|| on a checked slice (None if not checked). ``kernels``: the kvflash
    kernels the call launched (comma-separated names; which path the row took), empty for other implementations.
    """

    work: float
    rel_err: float | None = None
    note: str = ""
    kernels: str = ""

    @classmethod
    def of(
        cls, t: Timing, work: float, rel_err: float | None = None, note: str = "", kernels: str = ""
    ) -> Measurement:
        return cls(**dataclasses.asdict(t), work=work, rel_err=rel_err, note=note, kernels=kernels)


def binder(fn: Callable) -> Callable[..., Callable[[], object]]:
    """``binder(fn)(*args)`` is ``fn`` bound to ``args``: a ``measure_*`` function's default way of turning one
    input set into the call it times."""
    return functools.partial(functools.partial, fn)


def measure(
    calls: Sequence[Callable[[], object]],
    work: float,
    check: Callable[[], tuple[float | None, str]] | None = None,
) -> Measurement:
    """Run ``calls[0]`` once, recording the kvflash kernels it launches, check its output (``check() -> (rel_err,
    note)``), then time ``calls`` (one per input set, in rotation)."""
    from kvflash.attn_common.launch import record_launches

    with record_launches() as keys:
        calls[0]()
    rel_err, note = check() if check is not None else (None, "")
    kernels = ",".join(sorted({key[0] for key in keys}))
    return Measurement.of(time_calls(calls), work, rel_err, note, kernels)


@dataclasses.dataclass
class Case:
    """A row of the benchmark. ``labels`` holds: group ("decode" / "prefill" / "cache"), impl ("kvflash",
    "sdpa-cudnn", "sdpa-cudnn-mask", "sdpa-flash", "torch"), shape (a string), kv_dtype, hq, hkv, d, block,
    primary (the configuration the targets use), metric ("bytes" / "flops")."""

    name: str
    labels: dict[str, Any]
    run: Callable[[], Measurement]


def run_case(case: Case) -> dict[str, Any]:
    """Run ``case`` and return its JSON row; an exception becomes ``error`` (its first line), not a crash."""
    row: dict[str, Any] = {"name": case.name, **case.labels}
    start = time.perf_counter()
    try:
        row.update(dataclasses.asdict(case.run()))
        row["error"] = None
    except Exception as exc:  # a broken kernel must become a row, whatever it raises
        lines = str(exc).strip().splitlines()
        row["error"] = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
        row["traceback"] = traceback.format_exc(limit=6)
    row["wall_s"] = round(time.perf_counter() - start, 2)
    _free_gpu_memory()
    return row


def _free_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

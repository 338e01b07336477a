"""The device's own ceilings, measured in the same run as the cases they scale.

- copy: a 1 GiB device-to-device ``copy_``, counting bytes read + bytes written (GB/s = 1e9 B/s), the
  ceiling of every byte-bound case (decode, cache writer) and of the sweeps (:func:`copy_bandwidth`);
- bf16 matmul 8192^3 (TFLOP/s = 2 * 8192^3 / time);
- fp8 matmul 8192^3: ``torch._scaled_mm`` with e4m3 operands, per-tensor float32 scales, bf16 output and
  ``use_fast_accum=True`` (the setting serving engines use). Informational: no target is scaled by it,
  since FP8-KV attention computes in bf16.
"""

from __future__ import annotations

import torch

from .timing import rotation_sets, time_calls

__all__ = ["CEILINGS", "copy_bandwidth", "matmul_rate", "measure_ceilings"]

COPY_BYTES = 1 << 30
# Long enough for clocks and power to settle under sustained load (the cases that follow run sustained too).
WARMUP_MS, REP_MS = 300.0, 300.0
MATMUL_N = 8192
# name -> (unit, what), in the order they run.
CEILINGS = {
    "copy": ("GB/s", "device-to-device copy, 1 GiB, read + write bytes"),
    "bf16_matmul": ("TFLOP/s", "bf16 matmul 8192^3 (torch.matmul)"),
    "fp8_matmul": ("TFLOP/s", "fp8 e4m3 matmul 8192^3 (torch._scaled_mm, per-tensor scales, fast accum)"),
}


def copy_bandwidth() -> dict:
    """The copy ceiling: ``value`` in GB/s (bytes read + written), the median ``ms`` of one copy, ``reps``."""
    src = torch.randn(COPY_BYTES // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    t = time_calls([lambda: dst.copy_(src)], warmup_ms=WARMUP_MS, rep_ms=REP_MS)
    return {"value": 2 * COPY_BYTES / (t.ms * 1e-3) / 1e9, "ms": t.ms, "reps": t.reps}


def matmul_rate(fp8: bool) -> dict:
    """The bf16 (or fp8 e4m3) matmul ceiling: ``value`` in TFLOP/s, the median ``ms`` of one matmul, ``reps``."""
    n = MATMUL_N
    gen = torch.Generator(device="cuda").manual_seed(0)
    sets = []
    for _ in range(rotation_sets(2 * n * n * 2)):
        a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda", generator=gen)
        b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda", generator=gen)
        out = torch.empty(n, n, dtype=torch.bfloat16, device="cuda")
        if fp8:
            # _scaled_mm wants the second operand column-major.
            b = b.t().contiguous().to(torch.float8_e4m3fn).t()
            a = a.to(torch.float8_e4m3fn)
        sets.append((a, b, out))
    one = torch.ones((), dtype=torch.float32, device="cuda")
    if fp8:
        calls = [
            lambda a=a, b=b, o=o: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16, use_fast_accum=True)
            for a, b, o in sets
        ]
    else:
        calls = [lambda a=a, b=b, o=o: torch.matmul(a, b, out=o) for a, b, o in sets]
    t = time_calls(calls, warmup_ms=WARMUP_MS, rep_ms=REP_MS)
    return {"value": 2 * n**3 / (t.ms * 1e-3) / 1e12, "ms": t.ms, "reps": t.reps}


def measure_ceilings(log) -> dict:
    """Run every ceiling; one that fails is recorded with its error (value None), not raised."""
    results = {}
    for name, (unit, what) in CEILINGS.items():
        try:
            results[name] = {"unit": unit, "what": what, "error": None} | (
                copy_bandwidth() if name == "copy" else matmul_rate(fp8=name == "fp8_matmul")
            )
        except Exception as exc:  # a missing fp8 matmul must not lose the other ceilings
            results[name] = {"unit": unit, "what": what, "value": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
        r = results[name]
        log(f"ceiling {name}: " + (f"{r['value']:.1f} {unit}" if r["value"] is not None else r["error"]))
    return results

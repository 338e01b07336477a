"""Host-cost cases: CPU microseconds of one eager call, per public function (target: <= 40 µs each,
docs/design.md).

Engines run attention eagerly (vLLM's piecewise CUDA graphs leave it outside the graph; prefill steps are
eager), so the Python time of a call is paid per layer per step. Each row times ``HOST_CALLS`` back-to-back
calls with ``time.perf_counter_ns`` around each one, without a synchronisation between them. Calls are issued in
batches of ``BATCH_CALLS`` with a synchronisation (untimed) between batches, so a long kernel (prefill, 1+ ms)
never fills the GPU's launch queue: a launch that waits for a free queue slot would time the GPU, not the host.
A row reports the lowest of the batches' medians (the note gives the median of all calls too): the device
machine's CPU is shared, and the same code's rows moved by up to 2x between full runs (decode 8 x 1024 bf16:
10.8 to 30.5 µs), while the quietest batch tracks what the code costs.

Rows: ``flash_attn_varlen_func`` on the decode route (8 x 1024 bf16 and FP8 e4m3, 64 x 4096 bf16), the prefill
route (4 x (2048 + 2048) bf16 and e4m3), a mixed batch (120 decode rows over 2048 keys + 8 x (1024 + 512):
prefill launch + decode launch), ``reshape_and_cache_flash`` (16384 x 8 x 128 into an e4m3 cache) and
``merge_attn_states``. Hq/Hkv 32/8, D 128, page 16, bf16 queries, causal.

:func:`build_host_call` is shared with ``host_profile.py``, which runs the same calls on CPU tensors with the
kernels stubbed (``small=True`` keeps the cache pools tiny: the host path depends on shapes and ints only,
and a block table may point every entry at page 0).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import statistics
import time
from collections.abc import Callable

import torch

from .case import Case, Measurement
from .inputs import cu_seqlens

__all__ = ["HOST_CASES", "HostCase", "build_host_call", "host_cases", "HOST_CALLS", "BATCH_CALLS"]

HQ, HKV, D, BLOCK = 32, 8, 128, 16
HOST_CALLS = 400
BATCH_CALLS = 100
WARMUP_CALLS = 20


@dataclasses.dataclass(frozen=True)
class HostCase:
    """``fn``: "varlen", "cache" or "merge"; ``seqs``: (q_len, kv_len) per sequence (varlen); ``kv``: the
    cache's dtype label ("bf16" or "e4m3")."""

    fn: str
    shape: str
    kv: str
    seqs: tuple[tuple[int, int], ...] = ()
    # Every call with new call facts (softmax_scale differs in each call): no call plan is ever reused, so the row
    # times the full path plus the plan's capture, what the first layer of a step with new shapes pays.
    fresh_facts: bool = False


def _seqs(n: int, q_len: int, kv_len: int) -> tuple[tuple[int, int], ...]:
    return ((q_len, kv_len),) * n


HOST_CASES = {
    "host decode 8x1024 bf16": HostCase("varlen", "decode 8x1024", "bf16", _seqs(8, 1, 1024)),
    "host decode 8x1024 e4m3": HostCase("varlen", "decode 8x1024", "e4m3", _seqs(8, 1, 1024)),
    "host decode 8x1024 bf16, new facts each call": HostCase(
        "varlen", "decode 8x1024 (plan miss)", "bf16", _seqs(8, 1, 1024), fresh_facts=True
    ),
    "host decode 64x4096 bf16": HostCase("varlen", "decode 64x4096", "bf16", _seqs(64, 1, 4096)),
    "host prefill 4x(2048+2048) bf16": HostCase("varlen", "prefill 4x(2048+2048)", "bf16", _seqs(4, 2048, 4096)),
    "host prefill 4x(2048+2048) e4m3": HostCase("varlen", "prefill 4x(2048+2048)", "e4m3", _seqs(4, 2048, 4096)),
    "host mixed 120x2048+8x(1024+512) bf16": HostCase(
        "varlen", "mixed 120x2048+8x(1024+512)", "bf16", _seqs(120, 1, 2048) + _seqs(8, 1024, 1536)
    ),
    "host reshape_and_cache_flash 16384x8x128 e4m3": HostCase("cache", "cache 16384x8x128", "e4m3"),
    "host merge_attn_states 8x32x128 bf16": HostCase("merge", "merge 8x32x128", "bf16"),
}

_KV_DTYPES = {"bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn}


def _varlen_call(case: HostCase, device: torch.device, small: bool) -> tuple[Callable, dict[str, Callable]]:
    from kvflash.attn_common import check_kv_cache, normalize_attention_features
    from kvflash.flash_attn_interface import flash_attn_varlen_func

    q_lens = [s[0] for s in case.seqs]
    kv_lens = [s[1] for s in case.seqs]
    num_seqs, max_q, max_k = len(q_lens), max(q_lens), max(kv_lens)
    max_blocks = -(-max_k // BLOCK)
    num_blocks = 4 if small else num_seqs * max_blocks + 1
    kv_dtype = _KV_DTYPES[case.kv]
    gen = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(num_blocks, BLOCK, HKV, D, device=device, generator=gen).to(kv_dtype)
    v = torch.randn(num_blocks, BLOCK, HKV, D, device=device, generator=gen).to(kv_dtype)
    if small:
        block_table = torch.zeros(num_seqs, max_blocks, dtype=torch.int32, device=device)
    else:
        pool = torch.randperm(num_blocks, device=device, generator=gen)
        block_table = pool[: num_seqs * max_blocks].view(num_seqs, max_blocks).to(torch.int32)
    seqused_k = torch.tensor(kv_lens, dtype=torch.int32, device=device)
    cu_q = cu_seqlens(q_lens, device)
    q = torch.randn(sum(q_lens), HQ, D, device=device, generator=gen).to(torch.bfloat16)
    descales = {}
    if case.kv != "bf16":
        descales = dict(
            k_descale=0.5 + torch.rand(num_seqs, HKV, device=device, generator=gen),
            v_descale=0.25 + torch.rand(num_seqs, HKV, device=device, generator=gen),
        )
    call = functools.partial(
        flash_attn_varlen_func, q, k, v, max_q, cu_q, max_k, block_table=block_table, seqused_k=seqused_k,
        causal=True, **descales,
    )  # fmt: skip
    if case.fresh_facts:
        # softmax_scale moves by a relative 1e-9 per call: the same work, and call facts never seen before.
        scales = (D**-0.5 * (1 + 1e-9 * i) for i in itertools.count())

        def call():
            return flash_attn_varlen_func(
                q, k, v, max_q, cu_q, max_k, block_table=block_table, seqused_k=seqused_k, causal=True,
                softmax_scale=next(scales), **descales,
            )  # fmt: skip

    kv_args = dict(block_table=block_table, seqused_k=seqused_k, cu_seqlens_k=None, max_seqlen_k=max_k)
    layout = check_kv_cache(q, k, v, num_seqs, **kv_args)
    feature_args = dict(
        softmax_scale=None, causal=True, window_size=None, softcap=0.0, alibi_slopes=None, s_aux=None,
        k_descale=descales.get("k_descale"), v_descale=descales.get("v_descale"), k=k,
    )  # fmt: skip
    layers = {
        "check_kv_cache": functools.partial(check_kv_cache, q, k, v, num_seqs, **kv_args),
        "features": functools.partial(normalize_attention_features, q, layout, **feature_args),
        # On the CPU a large output is a fresh allocation (~15 µs at 64 MiB); the GPU's caching allocator serves it
        # in about a microsecond: subtract this from a CPU total to compare with the GPU host path.
        "alloc out": functools.partial(torch.empty_like, q, memory_format=torch.contiguous_format),
    }
    return call, layers


def _cache_call(case: HostCase, device: torch.device, small: bool) -> tuple[Callable, dict[str, Callable]]:
    from kvflash.fp8_utils import reshape_and_cache_flash

    tokens = 16384
    num_blocks = 8 if small else tokens // BLOCK + 64
    gen = torch.Generator(device=device).manual_seed(0)
    key = torch.randn(tokens, HKV, D, device=device, generator=gen).to(torch.bfloat16)
    value = torch.randn(tokens, HKV, D, device=device, generator=gen).to(torch.bfloat16)
    key_cache = torch.zeros(num_blocks, BLOCK, HKV, D, dtype=_KV_DTYPES[case.kv], device=device)
    value_cache = torch.zeros_like(key_cache)
    if small:
        slots = torch.arange(tokens, dtype=torch.int64, device=device) % (num_blocks * BLOCK)
    else:
        pages = torch.randperm(num_blocks, device=device, generator=gen)[: tokens // BLOCK]
        slots = (pages[:, None] * BLOCK + torch.arange(BLOCK, device=device)).reshape(-1).to(torch.int64)
    k_scale = torch.tensor([0.02], dtype=torch.float32, device=device)
    v_scale = torch.tensor([0.03], dtype=torch.float32, device=device)
    kv_cache_dtype = "auto" if case.kv == "bf16" else "fp8_e4m3"
    call = functools.partial(
        reshape_and_cache_flash, key, value, key_cache, value_cache, slots, kv_cache_dtype, k_scale, v_scale
    )
    return call, {}


def _merge_call(case: HostCase, device: torch.device, small: bool) -> tuple[Callable, dict[str, Callable]]:
    from kvflash.flash_attn_interface import merge_attn_states

    tokens = 8
    gen = torch.Generator(device=device).manual_seed(0)
    parts = [torch.randn(tokens, HQ, D, device=device, generator=gen).to(torch.bfloat16) for _ in range(2)]
    lses = [torch.randn(HQ, tokens, device=device, generator=gen) for _ in range(2)]
    out = torch.empty_like(parts[0])
    out_lse = torch.empty_like(lses[0])
    call = functools.partial(merge_attn_states, parts[0], lses[0], parts[1], lses[1], out=out, out_lse=out_lse)
    return call, {}


def build_host_call(name: str, device: torch.device, small: bool = False) -> tuple[Callable, dict[str, Callable]]:
    """The call a row times (a no-argument callable) and, for ``host_profile.py``, named parts of it that can be
    timed alone (same arguments)."""
    case = HOST_CASES[name]
    maker = {"varlen": _varlen_call, "cache": _cache_call, "merge": _merge_call}[case.fn]
    return maker(case, device, small)


def time_host(call: Callable, calls: int = HOST_CALLS, batch: int = BATCH_CALLS) -> list[float]:
    """Microseconds of each of ``calls`` eager calls (perf_counter around the Python call only)."""
    for _ in range(WARMUP_CALLS):  # compilation, caches, allocator pools
        call()
    torch.cuda.synchronize()
    times = []
    while len(times) < calls:
        for _ in range(min(batch, calls - len(times))):
            start = time.perf_counter_ns()
            call()
            times.append((time.perf_counter_ns() - start) / 1e3)
        torch.cuda.synchronize()  # untimed: the next batch starts with an empty launch queue
    return times


def _run(name: str) -> Measurement:
    from kvflash.attn_common.call_plan import plan_stats

    call, _ = build_host_call(name, torch.device("cuda"))
    hits_before, full_before = plan_stats().hits, plan_stats().full
    in_order = time_host(call)
    times = sorted(in_order)
    hits, full = plan_stats().hits - hits_before, plan_stats().full - full_before
    batches = [in_order[i : i + BATCH_CALLS] for i in range(0, len(in_order), BATCH_CALLS)]
    quietest = min(statistics.median(b) for b in batches)
    p10, p90 = times[len(times) // 10], times[(9 * len(times)) // 10]
    # ms holds the host time in ms, like the GPU rows; host_us is the same number in µs.
    note = (f"host {quietest:.1f} µs/call (quietest batch median; all {len(times)} calls: median "
            f"{statistics.median(times):.1f}); call plans: {hits} replays, {full} full-path calls")
    return Measurement(quietest / 1e3, p10 / 1e3, p90 / 1e3, len(times), 1, 0.0, note=note)


def host_cases(quick: bool) -> list[Case]:
    """One row per function and route (the same rows in quick and full mode: they take seconds)."""
    cases = []
    for name, case in HOST_CASES.items():
        labels = {
            "group": "host",
            "impl": "kvflash",
            "shape": case.shape,
            "kv_dtype": case.kv,
            "hq": HQ,
            "hkv": HKV,
            "d": D,
            "block": BLOCK,
            "primary": not case.fresh_facts,
            "metric": "host_us",
        }
        cases.append(Case(name, labels, functools.partial(_run, name)))
    return cases

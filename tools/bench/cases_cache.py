"""Cache-writer cases: ``reshape_and_cache_flash`` of 16384 tokens x 8 KV heads x 128 (bf16 keys and
values) into a paged cache with block 16, as bf16 ("auto") and as FP8 e4m3 with per-tensor scales.

Work = key + value read + the cache entries written + the int64 slot mapping; the ceiling is the copy.
The comparison is the same write done by eager torch (quantise, then ``index_copy_`` into the pages).
"""

from __future__ import annotations

import functools

import torch
from case import Case, Measurement
from timing import rotation_sets, time_calls

__all__ = ["cache_cases"]

TOKENS, HKV, D, BLOCK = 16384, 8, 128, 16
# kv_cache_dtype string -> (label, stored dtype)
MODES = {"auto": ("bf16", torch.bfloat16), "fp8_e4m3": ("e4m3", torch.float8_e4m3fn)}
K_SCALE, V_SCALE = 0.02, 0.03


def _work_bytes(cache_dtype: torch.dtype) -> int:
    elements = TOKENS * HKV * D
    return 2 * elements * 2 + 2 * elements * cache_dtype.itemsize + TOKENS * 8


def _torch_write(key, value, key_cache, value_cache, slots, kv_cache_dtype, k_scale, v_scale):
    """The eager-torch equivalent: per-tensor quantisation, then one ``index_copy_`` per cache."""
    for x, cache, scale in ((key, key_cache, k_scale), (value, value_cache, v_scale)):
        flat = cache.view(-1, HKV, D)
        if kv_cache_dtype == "auto":
            flat.index_copy_(0, slots, x)
        else:
            fmax = torch.finfo(cache.dtype).max
            stored = (x.float() / scale).clamp(-fmax, fmax).to(cache.dtype)
            flat.view(torch.uint8).index_copy_(0, slots, stored.view(torch.uint8))


def _run(impl: str, kv_cache_dtype: str) -> Measurement:
    if impl == "kvflash":
        from kvflash.fp8_utils import reshape_and_cache_flash as write
    else:
        write = _torch_write
    _, cache_dtype = MODES[kv_cache_dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    num_blocks = TOKENS // BLOCK + 64
    k_scale = torch.tensor(K_SCALE, dtype=torch.float32, device="cuda")
    v_scale = torch.tensor(V_SCALE, dtype=torch.float32, device="cuda")
    sets = []
    for _ in range(rotation_sets(_work_bytes(cache_dtype))):
        key = torch.randn(TOKENS, HKV, D, dtype=torch.bfloat16, device="cuda", generator=gen)
        value = torch.randn(TOKENS, HKV, D, dtype=torch.bfloat16, device="cuda", generator=gen)
        key_cache = torch.zeros(num_blocks, BLOCK, HKV, D, dtype=cache_dtype, device="cuda")
        value_cache = torch.zeros_like(key_cache)
        # Token t goes to a random page (a fragmented pool), consecutive tokens fill a page in order.
        pages = torch.randperm(num_blocks, device="cuda", generator=gen)[: TOKENS // BLOCK]
        slots = (pages[:, None] * BLOCK + torch.arange(BLOCK, device="cuda")).reshape(-1).to(torch.int64)
        sets.append((key, value, key_cache, value_cache, slots))
    calls = [functools.partial(write, *s, kv_cache_dtype, k_scale, v_scale) for s in sets]
    calls[0]()
    key, value, key_cache, _, slots = sets[0]
    # Gather as bytes: indexing is not implemented for FP8 dtypes on every torch build.
    stored = key_cache.view(torch.uint8).view(-1, HKV, D * cache_dtype.itemsize)[slots].view(cache_dtype).float()
    expect = key.float() if kv_cache_dtype == "auto" else (key.float() / K_SCALE).to(cache_dtype).float()
    err = float((stored - expect).norm() / expect.norm())
    t = time_calls(calls)
    return Measurement(t.ms, t.p10, t.p90, t.reps, t.sets, _work_bytes(cache_dtype), rel_err=err)


def cache_cases(quick: bool) -> list[Case]:
    cases = []
    for impl in ["kvflash", "torch"]:
        for mode, (label, _) in MODES.items():
            labels = {
                "group": "cache",
                "impl": impl,
                "shape": f"{TOKENS}x{HKV}x{D}",
                "kv_dtype": label,
                "hq": None,
                "hkv": HKV,
                "d": D,
                "block": BLOCK,
                "primary": True,
                "metric": "bytes",
            }
            cases.append(Case(f"cache {mode} {impl}", labels, functools.partial(_run, impl, mode)))
    return cases

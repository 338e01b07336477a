"""Cache-writer cases: ``reshape_and_cache_flash`` of 16384 tokens x 8 KV heads x 128 (bf16 keys and
values) into a paged cache with block 16, as bf16 ("auto") and as FP8 e4m3 with per-tensor scales.

Work = key + value read + the cache entries written + the int64 slot mapping (+ the float32 scales written
under a ``*_per_token_head`` string); the ceiling is the copy. The comparisons: the same write done by eager
torch (quantise, then ``index_copy_`` into the pages), and a plain copy of as many bytes (impl ``copy``: the copy
ceiling at this size, where launch and ramp weigh more than in the 1 GiB ceiling copy). :func:`measure_cache`
also serves the writer's launch sweep (``python -m tools.bench sweep cache``), with any ``kv_cache_dtype``
string and scale form.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

from .case import Case, Measurement, binder, measure
from .timing import rotation_sets

__all__ = ["CacheSpec", "cache_cases", "measure_cache"]

TOKENS, HKV, D, BLOCK = 16384, 8, 128, 16
# The bench's rows: kv_cache_dtype string -> the row's kv_dtype label.
MODES = {"auto": "bf16", "fp8_e4m3": "e4m3"}
K_SCALE, V_SCALE = 0.02, 0.03


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """One write: ``tokens`` bf16 keys and values of ``hkv`` heads x ``d`` into pages of ``block`` tokens, stored
    as ``kv_cache_dtype``. FP8 scales (``scales``): ``"tensor"`` (one-element tensors), ``"head"`` (``[Hkv]``
    tensors) or ``"float"`` (Python floats); under a ``*_per_token_head`` string the writer computes them."""

    kv_cache_dtype: str
    tokens: int = TOKENS
    hkv: int = HKV
    d: int = D
    block: int = BLOCK
    scales: str = "tensor"

    @property
    def per_token(self) -> bool:
        return self.kv_cache_dtype.endswith("_per_token_head")

    @property
    def cache_dtype(self) -> torch.dtype:
        from kvflash.fp8_utils import kv_cache_torch_dtype

        return kv_cache_torch_dtype(self.kv_cache_dtype, torch.bfloat16)

    def work_bytes(self) -> int:
        elements = self.tokens * self.hkv * self.d
        scales = 2 * self.tokens * self.hkv * 4 if self.per_token else 0
        return 2 * elements * 2 + 2 * elements * self.cache_dtype.itemsize + self.tokens * 8 + scales


def _torch_write(key, value, key_cache, value_cache, slots, kv_cache_dtype, k_scale, v_scale):
    """The eager-torch equivalent: quantisation (a per-tensor or ``[Hkv]`` scale), then one ``index_copy_`` per
    cache."""
    from kvflash.attn_common import saturate_to_fp8

    for x, cache, scale in ((key, key_cache, k_scale), (value, value_cache, v_scale)):
        flat = cache.view(-1, *cache.shape[2:])
        if kv_cache_dtype == "auto":
            flat.index_copy_(0, slots, x)
        else:
            per_head = isinstance(scale, torch.Tensor) and scale.dim() == 1
            stored = saturate_to_fp8(x, scale[:, None] if per_head else scale, cache.dtype)
            flat.view(torch.uint8).index_copy_(0, slots, stored.view(torch.uint8))


def _scales(spec: CacheSpec, num_blocks: int) -> tuple[torch.Tensor | float | None, torch.Tensor | float | None]:
    """K and V scales: None for "auto", the writer's outputs under ``*_per_token_head``, else inputs."""
    if spec.kv_cache_dtype == "auto":
        return None, None
    if spec.per_token:
        k_scale = torch.zeros(num_blocks, spec.block, spec.hkv, dtype=torch.float32, device="cuda")
        return k_scale, torch.zeros_like(k_scale)
    if spec.scales == "float":
        return K_SCALE, V_SCALE
    if spec.scales == "tensor":
        return (torch.tensor(K_SCALE, dtype=torch.float32, device="cuda"),
                torch.tensor(V_SCALE, dtype=torch.float32, device="cuda"))  # fmt: skip
    if spec.scales != "head":
        raise ValueError(f"scales: expected 'tensor', 'head' or 'float', got {spec.scales!r}")
    # Different per head, around the per-tensor values.
    k_scale = K_SCALE * torch.linspace(0.75, 1.25, spec.hkv, device="cuda")
    v_scale = V_SCALE * torch.linspace(1.25, 0.75, spec.hkv, device="cuda")
    return k_scale, v_scale


def _check(spec: CacheSpec, key, key_cache, slots, k_scale) -> float:
    """||stored - expected|| / ||expected|| of the keys, as stored codes: the writer's saturating quantisation
    (``kvflash.attn_common.saturate_to_fp8``) with the scale each token was written with."""
    from kvflash.attn_common import saturate_to_fp8

    dtype = spec.cache_dtype
    # Gather as bytes: indexing is not implemented for FP8 dtypes on every torch build.
    rows = key_cache.view(torch.uint8).view(-1, spec.hkv, spec.d * dtype.itemsize)[slots]
    stored = rows.view(dtype).float()
    if spec.kv_cache_dtype == "auto":
        expect = key.float()
    else:
        if spec.per_token:
            scale = k_scale.view(-1, spec.hkv)[slots][..., None]  # [tokens, Hkv, 1]: what the writer computed
        elif spec.scales == "head":
            scale = k_scale[:, None]  # [Hkv, 1]
        else:
            scale = k_scale  # [] or a float
        expect = saturate_to_fp8(key, scale, dtype).float()
    return float((stored - expect).norm() / expect.norm())


def measure_cache(spec: CacheSpec, bind: Callable | None = None) -> Measurement:
    """Time the calls ``bind(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)``
    returns, one per rotated input set (default: ``reshape_and_cache_flash`` on them), after checking the keys
    the first stored. The launch sweep binds ``launch_reshape_and_cache`` with its own config."""
    if bind is None:
        from kvflash.fp8_utils import reshape_and_cache_flash

        bind = binder(reshape_and_cache_flash)
    gen = torch.Generator(device="cuda").manual_seed(0)
    num_blocks = spec.tokens // spec.block + 64
    sets = []
    for _ in range(rotation_sets(spec.work_bytes())):
        key = torch.randn(spec.tokens, spec.hkv, spec.d, dtype=torch.bfloat16, device="cuda", generator=gen)
        value = torch.randn(spec.tokens, spec.hkv, spec.d, dtype=torch.bfloat16, device="cuda", generator=gen)
        key_cache = torch.zeros(num_blocks, spec.block, spec.hkv, spec.d, dtype=spec.cache_dtype, device="cuda")
        value_cache = torch.zeros_like(key_cache)
        # Token t goes to a random page (a fragmented pool), consecutive tokens fill a page in order.
        pages = torch.randperm(num_blocks, device="cuda", generator=gen)[: -(-spec.tokens // spec.block)]
        slots = (pages[:, None] * spec.block + torch.arange(spec.block, device="cuda")).reshape(-1)[: spec.tokens]
        sets.append((key, value, key_cache, value_cache, slots.to(torch.int64), *_scales(spec, num_blocks)))
    calls = [bind(*s[:5], spec.kv_cache_dtype, *s[5:]) for s in sets]
    key, _, key_cache, _, slots, k_scale, _ = sets[0]
    return measure(calls, spec.work_bytes(), lambda: (_check(spec, key, key_cache, slots, k_scale), ""))


def measure_copy_of(spec: CacheSpec) -> Measurement:
    """A device-to-device copy (``Tensor.copy_``) that reads and writes as many bytes in all as the write of
    ``spec`` moves: the copy ceiling at the writer's size (launch and ramp take a larger share of a small call
    than of the 1 GiB ceiling copy)."""
    elements = spec.work_bytes() // 4  # bf16 elements read (and as many written)
    sets = []
    for _ in range(rotation_sets(4 * elements)):
        src = torch.randn(elements, dtype=torch.bfloat16, device="cuda")
        sets.append((src, torch.empty_like(src)))
    return measure([lambda s=s, d=d: d.copy_(s) for s, d in sets], 4 * elements)


def cache_cases(quick: bool) -> list[Case]:
    cases = []
    for impl in ["kvflash", "torch", "copy"]:
        for mode, label in MODES.items():
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
            if impl == "copy":
                labels["primary"] = False
                run = functools.partial(measure_copy_of, CacheSpec(mode))
            else:
                bind = None if impl == "kvflash" else binder(_torch_write)
                run = functools.partial(measure_cache, CacheSpec(mode), bind)
            cases.append(Case(f"cache {mode} {impl}", labels, run))
    return cases

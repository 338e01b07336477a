"""What a cache write must leave behind, in plain PyTorch: the tests of ``reshape_and_cache_flash`` compare the
whole cache, as bytes, with :func:`expected_cache`."""

from __future__ import annotations

import torch

from kvflash.attn_common import saturate_to_fp8


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as uint8 (contiguous): byte-exact comparisons of fp8 / fp16 / bf16 caches."""
    return t.contiguous().view(torch.uint8)


def encode(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """The saturating cast, per row of ``x [..., Hkv, D]``; ``scale`` is a float32 tensor of 1 element or ``[Hkv]``."""
    return saturate_to_fp8(x, scale.reshape(-1, 1), fp8_dtype)


def expected_cache(cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``cache [num_blocks, block_size, ...]`` (a copy, as bytes) with ``rows[t]`` at ``slots[t]`` for every slot
    inside the cache (negative and out-of-range slots are skipped)."""
    num_blocks, block_size = cache.shape[:2]
    out = as_bytes(cache.clone())
    ok = (slots >= 0) & (slots < num_blocks * block_size)
    s = slots[ok]
    out[s // block_size, s % block_size] = as_bytes(rows[ok])
    return out

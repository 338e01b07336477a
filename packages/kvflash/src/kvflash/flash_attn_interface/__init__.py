"""kvflash.flash_attn_interface: the FlashAttention-style entry point an engine imports.

- :func:`flash_attn_varlen_func` — varlen attention over a paged or contiguous, possibly FP8, KV cache.
- :func:`merge_attn_states` — re-exported from :mod:`kvflash.paged_decode`.
- :func:`reshape_and_cache_flash` — re-exported from :mod:`kvflash.fp8_utils`.
- :func:`warmup` — compile at start-up every kernel variant an engine configuration reaches
  (:mod:`kvflash.flash_attn_interface.warmup`).
"""

from kvflash.flash_attn_interface.varlen import flash_attn_varlen_func
from kvflash.flash_attn_interface.warmup import WarmupReport, warmup
from kvflash.fp8_utils import reshape_and_cache_flash
from kvflash.paged_decode import merge_attn_states

__version__ = "0.1.0"

__all__ = ["WarmupReport", "flash_attn_varlen_func", "merge_attn_states", "reshape_and_cache_flash", "warmup"]

"""kvflash.fp8_utils: write the paged KV cache (optionally FP8) and quantise tensors to FP8.

- :func:`reshape_and_cache_flash`: new keys/values into ``[num_blocks, block_size, Hkv, D]`` caches at
  ``slot_mapping``, saturating FP8 with per-tensor or per-KV-head scales (Triton kernel; op
  ``torch.ops.kvflash.reshape_and_cache_flash``).
- :func:`compute_kv_scales`: dynamic scales ``amax / fp8_max * margin``, per tensor or per KV head.
- :func:`scaled_fp8_quant` / :func:`dequantize_fp8`: per-tensor FP8 quantise (static or dynamic) and back.
- :func:`quantize_query`: a 16-bit query to fp8 e4m3 with its ``q_descale`` (per tensor, per KV head, per
  (sequence, KV head) or per (token, query head)), for the fp8-query attention path.
- :data:`KV_CACHE_DTYPES` and :func:`kv_cache_torch_dtype`: the engines' ``kv_cache_dtype`` strings.
"""

from kvflash.fp8_utils.cache_dtype import KV_CACHE_DTYPES, kv_cache_torch_dtype
from kvflash.fp8_utils.op import reshape_and_cache_flash
from kvflash.fp8_utils.quant import dequantize_fp8, scaled_fp8_quant
from kvflash.fp8_utils.query import QUERY_SCALE_GRANULARITIES, quantize_query
from kvflash.fp8_utils.scales import compute_kv_scales

__version__ = "0.1.0"

__all__ = [
    "KV_CACHE_DTYPES",
    "QUERY_SCALE_GRANULARITIES",
    "compute_kv_scales",
    "dequantize_fp8",
    "kv_cache_torch_dtype",
    "quantize_query",
    "reshape_and_cache_flash",
    "scaled_fp8_quant",
]

"""kvflash.flash_attn: FlashAttention's upstream Python surface over kvflash's kernels.

Code written against upstream ``flash_attn`` (transformers, SGLang, research code) switches by changing the
import: the argument order is upstream's, not that of vLLM's fork (which :mod:`kvflash.flash_attn_interface`
follows).

- :func:`flash_attn_varlen_func` — ``(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)``.
- :func:`flash_attn_with_kvcache` — attention over a (paged) KV cache, appending new keys/values in place.
"""

from kvflash.flash_attn.kvcache import flash_attn_with_kvcache
from kvflash.flash_attn.varlen import flash_attn_varlen_func

__all__ = ["flash_attn_varlen_func", "flash_attn_with_kvcache"]

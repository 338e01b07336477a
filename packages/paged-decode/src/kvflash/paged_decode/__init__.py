"""kvflash.paged_decode: split-KV (flash-decoding) attention over a paged, possibly FP8, KV cache.

- :func:`paged_decode_attention`: one query token per sequence; the query heads of a KV head share one
  program so each cached element is read once; long contexts are split over the keys and merged.
- :func:`merge_attn_states`: combine two partial attentions over disjoint key sets by their LSE.

Both are ``torch.library`` custom ops (``torch.ops.kvflash.paged_decode_attention`` and
``torch.ops.kvflash.merge_attn_states``) with fake implementations, and launch without host
synchronisation (CUDA-graph capturable).
"""

from kvflash.paged_decode.decode import paged_decode_attention
from kvflash.paged_decode.merge_states import merge_attn_states

__version__ = "0.1.0"

__all__ = ["merge_attn_states", "paged_decode_attention"]

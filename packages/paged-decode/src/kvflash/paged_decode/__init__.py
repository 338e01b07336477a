"""kvflash.paged_decode: split-KV (flash-decoding) attention over a paged, possibly FP8, KV cache.

- :func:`paged_decode_attention`: the few query tokens of each sequence; the query heads of a KV head share one
  program so each cached element is read once; long contexts are split over the keys and merged.
- :func:`merge_attn_states`: combine two partial attentions over disjoint key sets by their LSE.
- :func:`merge_partial_attentions`: combine ``W`` float32 partial attentions by their LSE in one launch (the
  kernel that merges decode's splits).

All three are ``torch.library`` custom ops (``torch.ops.kvflash.paged_decode_attention``,
``torch.ops.kvflash.merge_attn_states``, ``torch.ops.kvflash.merge_partial_attentions``) with fake
implementations, and launch without host synchronisation (CUDA-graph capturable).

Layout (docs/house_style.md): ``kernel.py``, ``launch_config.py`` and ``op.py`` for decode;
``merge_states_kernel.py``, ``split_merge_kernel.py`` (the n-way merge) and ``merge_states_op.py`` for the merges.
"""

from kvflash.paged_decode.merge_states_op import merge_attn_states, merge_partial_attentions
from kvflash.paged_decode.op import paged_decode_attention

__version__ = "0.1.0"

__all__ = ["merge_attn_states", "merge_partial_attentions", "paged_decode_attention"]

"""kvflash.chunk_prefill: varlen chunked-prefill attention over a paged or contiguous, possibly FP8, KV cache.

:func:`chunk_prefill_attention` is the entry point; it runs as the custom op
``torch.ops.kvflash.chunk_prefill`` (``torch.compile`` and CUDA-graph friendly, no host synchronisation).
"""

from kvflash.chunk_prefill.op import chunk_prefill_attention

__version__ = "0.1.0"

__all__ = ["chunk_prefill_attention"]

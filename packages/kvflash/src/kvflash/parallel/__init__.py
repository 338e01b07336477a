"""kvflash.parallel: attention across several GPUs over torch.distributed.

- :func:`context_parallel_decode` — each rank holds a shard of every sequence's KV cache; partial
  attentions are gathered in one collective and merged by their LSE.
"""

from kvflash.parallel.context_parallel import context_parallel_decode, merge_partial_attention

__all__ = ["context_parallel_decode", "merge_partial_attention"]

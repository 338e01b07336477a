"""Which kernels a ``flash_attn_varlen_func`` call runs, decided from shapes and Python ints alone.

The query lengths live in ``cu_seqlens_q`` on the device and are never read on the host, so the route comes
from ``total_q``, ``num_seqs``, the caller's bound ``max_seqlen_q`` and the GQA group; each kernel's programs
then read their own sequence's length and serve (or leave) it. Every route is exact for any query lengths,
``max_seqlen_q`` only chooses the speed:

- **decode only** (``max_seqlen_q <= MAX_DECODE_QUERIES``): decode, speculative-decode verification. The
  decode kernel reads the K/V of a sequence once for all its queries and heads (up to 64 rows per program)
  and splits long contexts over the keys; a sequence with more queries than the bound takes more passes.
- **mixed** (some sequence may have at most ``decode_queries`` queries while others are longer): the
  chunked-prefill kernel skips the short sequences and the decode kernel serves only them, so decode rows
  run at decode speed beside prefill chunks in one call. ``decode_queries`` rows fill one 16-row tile with
  the group's heads (4 queries at GQA 4), so plain decode rows waste no tensor-core rows.
- **prefill only**: otherwise (no sequence can be short: ``total_q`` leaves every sequence longer).
"""

from __future__ import annotations

import dataclasses
import functools

__all__ = ["Route", "choose_route", "MAX_DECODE_QUERIES", "MIXED_DECODE_ROWS"]

# Queries per sequence the decode route takes alone (speculative decoding brings 2..8, some engines 16).
MAX_DECODE_QUERIES = 16
# Rows (queries x query heads of a KV head) of the decode programs in a mixed batch: one 16-row dot tile.
MIXED_DECODE_ROWS = 16


@dataclasses.dataclass(frozen=True)
class Route:
    """``decode_only``: the decode kernel alone. ``decode_queries > 0`` (mixed): sequences with at most that
    many queries go to the decode kernel and the rest to the chunked-prefill kernel. Neither: prefill alone."""

    decode_only: bool
    decode_queries: int


# Cached: every layer of a model step routes the same shapes.
@functools.lru_cache(maxsize=4096)
def choose_route(total_q: int, num_seqs: int, max_seqlen_q: int, group: int) -> Route:
    """The route of one call.

    Parameters
    ----------
    total_q : int
        Query rows (``q.shape[0]``).
    num_seqs : int
        Sequences (``cu_seqlens_q.shape[0] - 1``).
    max_seqlen_q : int
        The caller's bound on any sequence's queries.
    group : int
        ``Hq // Hkv``; 0 when the cache is malformed (the prefill route then reports it).
    """
    if group <= 0 or total_q == 0:
        return Route(False, 0)
    if max_seqlen_q <= MAX_DECODE_QUERIES:
        return Route(True, 0)
    decode_queries = max(1, MIXED_DECODE_ROWS // group)
    # With every sequence holding at most max_seqlen_q queries, one of them can hold decode_queries or fewer
    # only if the others leave room: total_q <= (num_seqs - 1) * max_seqlen_q + decode_queries.
    if num_seqs > 1 and total_q <= (num_seqs - 1) * max_seqlen_q + decode_queries:
        return Route(False, decode_queries)
    return Route(False, 0)

"""Launch settings of the cache writer: a deterministic function of sizes alone.

Nothing here reads a tensor value, so the same call always launches the same grid (CUDA-graph capturable, no host
synchronisation).
"""

from __future__ import annotations

import dataclasses

import triton

__all__ = ["ReshapeAndCacheLaunchConfig", "choose_reshape_and_cache_config"]

# Elements of key (and as many of value) one program moves: 32 rows of D=128, 32 per thread with 4 warps.
# Measured on H100 (16k tokens x 8 x 128): 84-85 % of copy bandwidth for FP8, 90 % for bf16; 8 to 32 rows with 2
# to 8 warps are within 2 % of each other, 64+ rows lose 5-15 %. The H200 sweep (docs/cache_writer_perf.md) found
# the settings within 2-3 % of each other as well.
_ELEMENTS_PER_PROGRAM = 4096
_NUM_WARPS = 4


@dataclasses.dataclass(frozen=True)
class ReshapeAndCacheLaunchConfig:
    """Rows (``(token, head)`` pairs) per program and warps per program."""

    block_rows: int
    num_warps: int


def choose_reshape_and_cache_config(num_rows: int, head_size: int) -> ReshapeAndCacheLaunchConfig:
    """The launch shape for ``num_rows = num_tokens * Hkv`` rows of ``head_size`` elements."""
    block_rows = max(1, _ELEMENTS_PER_PROGRAM // triton.next_power_of_2(head_size))
    # max(1, ...): triton.next_power_of_2(0) is 0 (no rows: one row per program, as for one row).
    return ReshapeAndCacheLaunchConfig(min(block_rows, triton.next_power_of_2(max(1, num_rows))), _NUM_WARPS)

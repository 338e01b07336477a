"""Launch settings of the cache writer: a deterministic function of sizes alone.

Nothing here reads a tensor value, so the same call always launches the same grid (CUDA-graph capturable, no host
synchronisation).
"""

from __future__ import annotations

import dataclasses

import triton

__all__ = ["ReshapeAndCacheLaunchConfig", "choose_reshape_and_cache_config"]

# Elements of key (and as many of value) one program moves: 16 rows of D=128, 16 per thread with 4 warps.
# H200 sweep (16384 tokens x 8 x 128, wave 2 session 13, `python -m tools.bench sweep cache`): 16 rows x 4 warps
# 83.3 % of copy for bf16 and 78.9 % for e4m3, against 81.7 % and 76.7 % with the former 32 rows; 8 rows x 2 warps
# within 0.3 %, 64 rows 3-8 % slower. (H100: 32 rows 84-85 % FP8, 90 % bf16; 8 to 32 rows within 2 %.)
_ELEMENTS_PER_PROGRAM = 2048
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

"""Integer helpers for launch settings, in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions in recent Triton releases: calling one
from the host goes through a wrapper that costs about a microsecond, several times per launch. These give the
same results for the non-negative ints launchers pass.
"""

from __future__ import annotations

__all__ = ["cdiv", "next_power_of_2"]


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``), like ``triton.next_power_of_2``."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()

"""Launch settings for the chunked-prefill kernel: a deterministic function of shapes and Python ints.

Nothing here reads tensor values, so the choice is the same at every call with the same shapes (CUDA-graph
capturable, no host synchronisation). The table was tuned on an H100 with the tuning sweeps of ``tools/bench``
(which pass ``config`` to :func:`kvflash.chunk_prefill.op.launch_chunk_prefill`); under the Triton interpreter one
small configuration keeps CPU tests fast and still crosses tile edges.
"""

from __future__ import annotations

import dataclasses
import functools

import triton

__all__ = ["ChunkPrefillLaunchConfig", "choose_chunk_prefill_config", "pack_heads"]


@dataclasses.dataclass(frozen=True)
class ChunkPrefillLaunchConfig:
    """Tile shape and compiler settings of one launch.

    Attributes
    ----------
    block_m : int
        Rows per program: ``block_m // g_pack`` query tokens times ``g_pack`` query heads.
    block_n : int
        Keys per inner-loop step.
    num_warps, num_stages : int
        Triton's warps per program and software-pipelining depth.
    pv_fp8 : bool
        An fp8 query only: the PV dot on fp8 tensor cores too (P rounded to e4m3), else (the default) P and V in
        fp16. Measured on the H200 (4 x (2048 + 2048) / 1 x 16384, e4m3 KV, 128 x 128 tiles, 8 warps, 3 stages):
        467 / 496 TFLOP/s with PV in fp16 against 227 / 225 with PV in fp8, where Triton builds the K-major fp8 V
        operand the fp8 dot needs by transposing each V tile through registers and shared memory (V is stored
        with D contiguous). bf16 KV: 383 / 427.
    split_query : bool
        A bf16 query over an FP8 cache only (elsewhere it changes nothing): the QK dot as two fp8 dots of the
        query's two e4m3 terms against K as stored, PV in fp16 (the kernel module's ``Q_SPLIT``). Off by default.
        H200, D 128, page 16: 4 x (2048 + 2048) e4m3 323 -> 385 TFLOP/s, 1 x 16384 334 -> 427 (bf16 KV 419), but the
        fp8 tensor cores' accumulation inside the QK dot is coarser than fp16's: the GPU tier's LSE bound (2e-3)
        failed at head sizes 200-504 and on long sequences (per-token-head descales: 0.049 max error at 2e-3).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pv_fp8: bool = False
    split_query: bool = False


# (padded head size, fp8 KV) -> (block_m, block_n, num_warps, num_stages) for prefill-sized tiles: the fastest
# settings measured on an H100 among those that compile without (or, for 128 x 128 bf16, with few) register
# spills, re-measured on the H200 for D = 128 FP8: with the page ids carried one tile ahead the loads pipeline,
# and a third stage took 4 x (2048 + 2048) from 300 to 323 TFLOP/s and 1 x 16384 from 302 to 333 (BLOCK_N 64
# or 4 warps were slower: 257-300). Head size 512 spills whatever the tile.
_PREFILL_TABLE = {
    (64, False): (128, 128, 8, 3),
    (64, True): (128, 128, 8, 2),
    (128, False): (128, 128, 8, 3),
    (128, True): (128, 128, 8, 3),
    (256, False): (64, 64, 8, 2),
    (256, True): (64, 64, 8, 2),
    (512, False): (64, 32, 8, 2),
    (512, True): (64, 32, 8, 2),
}

_INTERPRETER_CONFIG = ChunkPrefillLaunchConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
# fp8 dots take K >= 32: the PV dot's K is block_n.
_INTERPRETER_CONFIG_Q_FP8 = ChunkPrefillLaunchConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)


def pack_heads(group: int, block_m: int) -> tuple[int, int]:
    """How many query heads of a KV group share one program's rows, and how many head groups that makes.

    All of a group when it fits (``g_pack = group``), else ``block_m`` heads per program, one token each.
    """
    g_pack = min(group, block_m)
    return g_pack, triton.cdiv(group, g_pack)


# Cached: a pure function of Python ints, and every layer of a model step asks it the same question (one miss
# per step and shape, then hits: a dict lookup instead of the arithmetic below).
@functools.lru_cache(maxsize=4096)
def choose_chunk_prefill_config(
    head_size: int, kv_is_fp8: bool, group: int, max_seqlen_q: int, *, interpreter: bool, q_is_fp8: bool = False
) -> ChunkPrefillLaunchConfig:
    """Pick the launch settings.

    Parameters
    ----------
    head_size : int
        ``D`` (8..512, a multiple of 8); tiles use the next power of two.
    kv_is_fp8 : bool
        The cache is FP8 (tiles are converted in registers).
    group : int
        ``Hq // Hkv``: query heads packed per KV head.
    max_seqlen_q : int
        The caller's bound on query tokens per sequence; small values (decode-heavy batches) get a
        smaller ``block_m`` so that one query token's packed heads do not leave most rows empty.
    interpreter : bool
        Running under ``TRITON_INTERPRET=1``.
    q_is_fp8 : bool
        An fp8 query (fp8 dots: ``block_n >= 32``). The FP8-cache row of the table serves it (on the H200, D 128:
        128 x 128 tiles, 8 warps and 3 stages were the fastest of 8 settings swept, 2 stages 5-11 % slower,
        BLOCK_N 64 2-6 % slower).
    """
    if interpreter:
        return _INTERPRETER_CONFIG_Q_FP8 if q_is_fp8 else _INTERPRETER_CONFIG
    head_pad = max(triton.next_power_of_2(head_size), 64)
    block_m, block_n, num_warps, num_stages = _PREFILL_TABLE[(head_pad, kv_is_fp8)]
    rows_needed = max(1, max_seqlen_q) * min(group, block_m)
    if rows_needed < block_m:
        block_m = max(16, triton.next_power_of_2(rows_needed))
        num_warps = 4
    return ChunkPrefillLaunchConfig(block_m, block_n, num_warps, num_stages)

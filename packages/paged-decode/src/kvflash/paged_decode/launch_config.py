"""Launch settings of the decode kernel: a deterministic function of shapes and Python ints.

Nothing here reads a tensor value, so the same call always launches the same grid with the same
buffers: the decode is CUDA-graph capturable and its split buffers are sized from shapes alone.
"""

from __future__ import annotations

import dataclasses
import functools

import triton

__all__ = [
    "PagedDecodeLaunchConfig",
    "choose_paged_decode_config",
    "one_query_rows_apart",
    "resolve_num_splits",
    "MAX_SPLITS",
]

# Rows per program ((query token, KV head, query head) triples): tl.dot needs at least 16; above 64 a KV head's
# group is cut into chunks (and the tokens of a sequence into passes) so that the accumulator stays in registers.
MIN_BLOCK_H = 16
MAX_BLOCK_H = 64
# Tokens per tile: the program's [BLOCK_N, HEAD_PAD] K tiles (one per KV head of the program) hold
# TILE_ELEMENTS values together, 16 KiB as 16-bit values (FP8 tiles are converted to fp16 in registers): 64 tokens
# at D = 128 with one KV head, 16 with four. Larger tiles cost registers, hence programs per SM.
TILE_ELEMENTS = 8192
# 16-bit KV at head sizes up to 64: half that (64 tokens at D 64), with 3 stages: 36 KiB of shared memory and 80
# registers let all 512 programs of 64 x 4096 reside at once. H200, bf16 D 64, 64 x 4096: 128-token tiles with 4
# stages (102 KiB, 2 programs per SM) 75 % of copy, 64-token tiles with 3 stages 99.6 %, with 4 stages 97.9 %.
SMALL_HEAD_TILE_ELEMENTS = 4096
SMALL_HEAD_PAD = 64
MIN_BLOCK_N = 16  # tl.dot's smallest N
PER_TOKEN_MAX_KV_HEADS = 2  # KV heads per program with per-token-head descales (choose_paged_decode_config)
MAX_BLOCK_N = 128
# Automatic split-KV: no split when the (sequence, KV-head block) programs alone give NO_SPLIT_PROGRAMS_PER_SM per
# SM (64 x 4096 at Hkv 8 measured faster unsplit); otherwise as many splits as fit in one wave of the
# config's resident programs per SM, rounded down: a few programs past a full wave leave a tail (FP8
# 4 x 32768 on 132 SMs: 512 programs 80 % of copy bandwidth, 544 62 %, 640-768 56-64 %), and at least
# MIN_KEYS_PER_SPLIT keys per split (below that the merge costs more than the parallelism gains).
# Resident programs per SM at D = 128 (registers and shared memory of the sm_90 build, 228 KiB per SM):
# 16-bit KV, 4 warps, 4 stages: 160 registers, 102 KiB -> 2; FP8 KV, 2 warps, 3 stages: 194 registers,
# 54 KiB -> 4. H200: bf16 1 x 131072 with 33 splits (one wave of 2) 93 % of copy, with 66 (two waves) 89 %.
NO_SPLIT_PROGRAMS_PER_SM = 2
# FP8 with several KV heads per program (2 warps, 3 stages, 16-token tiles of 4 heads at D = 128): 188 registers
# and 41 KiB of shared memory would let 5 reside, but the H200 times behave as if 4 did, as with one head: 64 x 4096
# at 4 splits (512 programs) 78.7 % of copy, 5 splits 57 %, 6 splits 63 %, 8 splits (two waves of 4) 78 %;
# 128 x 8192 at 2 splits (512 programs) 81 %, 3 splits 68 %.
RESIDENT_PROGRAMS_PER_SM = {2: 2, 1: 4}  # KV itemsize -> programs per SM
MIN_KEYS_PER_SPLIT = 512
MAX_SPLITS = 256
# Columns of each V half with v_halves: 64 fp16 values are one 128-byte shared-memory row.
V_HALF_COLUMNS = 64
# The interpreter runs programs one after another: small tiles keep the CPU tests short.
INTERPRETER_BLOCK_N = 16


@dataclasses.dataclass(frozen=True)
class PagedDecodeLaunchConfig:
    """Launch settings of one decode call.

    Attributes
    ----------
    block_h : int
        Rows per program (power of two, >= 16): ``q_tokens`` tokens x ``kv_heads`` KV heads x ``h_rows`` query
        heads, padded.
    head_chunks : int
        Programs per KV head (``triton.cdiv(group, block_h)``; more than 1 only for groups over 64 heads).
    h_rows : int
        Query heads per token in a program's rows (the group, or ``block_h`` when it is chunked).
    q_tokens : int
        Query tokens of a sequence per program pass (1 when the group is chunked).
    kv_heads : int
        KV heads per program (a power of two dividing Hkv): the rows of several KV heads share one program when
        one head's rows leave ``block_h`` padded (FP8 caches: GQA <= 8 with an even Hkv and tiles of at least 16
        tokens, D <= 256; at most ``PER_TOKEN_MAX_KV_HEADS`` with per-token-head descales), so a tile's softmax and
        page walk serve all of them.
    head_pad : int
        Head size rounded up to a power of two.
    block_n : int
        Tokens per K/V tile.
    num_splits : int
        Splits per (sequence, KV-head block); 1 means no split buffers and no merge kernel.
    num_warps, num_stages : int
        Triton launch settings.
    v_halves : bool
        The PV product as two dots over V's column halves (FP8 caches at ``head_pad`` 128: their V tile, converted
        to fp16, is stored to shared memory for the dot without bank conflicts in 64-column halves).
    runtime_query_count : bool
        Plain decode (no ``cu_seqlens_q``): the kernel takes its one query per sequence as a runtime value instead
        of the constant 1. The result is the same; the compiled tile loop is scheduled differently, which is measured
        per config (the FP8 config of 4 KV heads per program at D 128 gains 4-7 %, others lose).
    """

    block_h: int
    head_chunks: int
    h_rows: int
    q_tokens: int
    kv_heads: int
    head_pad: int
    block_n: int
    num_splits: int
    num_warps: int
    num_stages: int
    v_halves: bool = False
    runtime_query_count: bool = False


def resolve_num_splits(
    num_splits: int,
    *,
    num_programs: int,
    max_keys: int,
    block_n: int,
    multiprocessor_count: int,
    programs_per_sm: int,
) -> int:
    """The split count: ``num_splits`` 1 = none, ``n > 1`` = at most ``n``, 0 = automatic.

    A split always gets at least one tile of keys, so ``n`` is capped by the tiles of the longest
    sequence. Automatic: split only when ``num_programs`` (sequences x KV-head programs) give fewer than
    ``NO_SPLIT_PROGRAMS_PER_SM`` per SM, then into as many splits as fill one wave of ``programs_per_sm``
    resident programs per SM without passing it, never below ``MIN_KEYS_PER_SPLIT`` keys per split.
    """
    max_tiles = max(1, triton.cdiv(max_keys, block_n))
    if num_splits == 1:
        return 1
    if num_splits > 1:
        return min(num_splits, max_tiles, MAX_SPLITS)
    if num_programs >= multiprocessor_count * NO_SPLIT_PROGRAMS_PER_SM:
        return 1
    wanted = (multiprocessor_count * programs_per_sm) // max(num_programs, 1)
    return max(1, min(wanted, triton.cdiv(max_keys, MIN_KEYS_PER_SPLIT), max_tiles, MAX_SPLITS))


# Cached: a pure function of Python ints, and every layer of a model step asks it the same question (one miss
# per step and shape, then hits: a dict lookup instead of the arithmetic below).
@functools.lru_cache(maxsize=4096)
def choose_paged_decode_config(
    *,
    num_seqs: int,
    num_kv_heads: int,
    group: int,
    head_size: int,
    kv_itemsize: int,
    max_seqlen_k: int,
    window_left: int,
    num_splits: int,
    multiprocessor_count: int,
    interpreter: bool,
    max_seqlen_q: int = 1,
    fill_rows: bool = True,
    per_token_scales: bool = False,
) -> PagedDecodeLaunchConfig:
    """Pick the decode launch settings from shapes and Python ints.

    Parameters
    ----------
    num_seqs, num_kv_heads, group, head_size : int
        Batch and head shapes (``group = Hq // Hkv``).
    kv_itemsize : int
        Bytes per cached element (2 for fp16/bf16, 1 for FP8).
    max_seqlen_k : int
        The caller's bound on the KV length of any sequence.
    window_left : int
        Normalised left window edge, ``-1`` = unbounded (a window caps the keys a query sees).
    num_splits : int
        The caller's ``num_splits`` (0 automatic, 1 none, ``n > 1`` at most ``n``).
    multiprocessor_count : int
        SMs of the device (a fixed small number under the interpreter).
    interpreter : bool
        Running under ``TRITON_INTERPRET=1``.
    max_seqlen_q : int
        Query tokens per sequence the program rows should hold (speculative decoding: the draft length);
        as many as fit in ``MAX_BLOCK_H`` rows with their group's heads. Longer sequences take more passes.
    fill_rows : bool
        With ``max_seqlen_q > 1``, give a pass as many tokens as the padded ``block_h`` rows hold (the tile is
        the same; the spare rows are masked for shorter sequences). ``max_seqlen_q`` 2..16 then compiles 3
        ``Q_TOKENS`` variants (one per ``block_h``) instead of one per value, so a warm-up has fewer kernels to
        build. False keeps ``q_tokens = max_seqlen_q`` exactly (``defer_longer_sequences`` needs it: the kernel
        leaves sequences longer than ``Q_TOKENS`` to the prefill kernel).
    per_token_scales : bool
        Per-token-head K/V descales: at most ``PER_TOKEN_MAX_KV_HEADS`` KV heads per program, on the tiles and
        split count of the wider head block (see the measurements where it is applied).
    """
    if group > MAX_BLOCK_H:
        q_tokens, block_h = 1, MAX_BLOCK_H
        head_chunks, h_rows = triton.cdiv(group, block_h), block_h
    else:
        q_tokens = max(1, min(max_seqlen_q, MAX_BLOCK_H // group))
        block_h = max(MIN_BLOCK_H, triton.next_power_of_2(q_tokens * group))
        if fill_rows and q_tokens > 1:
            q_tokens = min(block_h, MAX_BLOCK_H) // group
        head_chunks, h_rows = 1, group
    head_pad = max(16, triton.next_power_of_2(head_size))  # tl.dot needs K >= 16 (D = 8); padding is masked
    kv_heads = 1
    if kv_itemsize == 1 and head_chunks == 1:
        # FP8 is instruction-bound: rows left as padding take the next KV heads, a power of two dividing Hkv
        # with tiles of at least MIN_BLOCK_N tokens.
        while (
            2 * kv_heads * q_tokens * group <= block_h
            and num_kv_heads % (2 * kv_heads) == 0
            and TILE_ELEMENTS // (2 * kv_heads * head_pad) >= MIN_BLOCK_N
        ):
            kv_heads *= 2
    if interpreter:
        block_n = INTERPRETER_BLOCK_N
    else:
        tile = SMALL_HEAD_TILE_ELEMENTS if kv_itemsize == 2 and head_pad <= SMALL_HEAD_PAD else TILE_ELEMENTS
        block_n = max(MIN_BLOCK_N, min(MAX_BLOCK_N, tile // (kv_heads * head_pad)))
    max_keys = max_seqlen_k if window_left < 0 else min(max_seqlen_k, window_left + 1)
    splits = resolve_num_splits(
        num_splits,
        num_programs=num_seqs * (num_kv_heads // kv_heads) * head_chunks,
        max_keys=max_keys,
        block_n=block_n,
        multiprocessor_count=multiprocessor_count,
        programs_per_sm=RESIDENT_PROGRAMS_PER_SM[1 if kv_itemsize == 1 else 2],
    )
    num_warps = 4 if block_h * head_pad <= 32 * 128 else 8
    if kv_itemsize == 1 and (block_h * head_pad <= 16 * 128 or (block_h == MIN_BLOCK_H and head_pad <= 256)):
        # FP8 measured fastest with two warps (same programs per SM, fewer instructions). H200, e4m3,
        # 64 x 4096, D 256 (2 KV heads per program, 16-token tiles, 2 splits): 4 warps 58 % of copy (154 registers:
        # 3 programs per SM, so 512 programs take 1.3 waves), 2 warps 84 % (242 registers, 4 per SM: one wave).
        num_warps = 2
    # FP8 V at head_pad 128: two 64-column dots (see PagedDecodeLaunchConfig.v_halves). H200, e4m3, same run:
    # 64 x 4096 78.3 -> 80.9 % of copy, 128 x 8192 86.3 -> 88.8 %, 1 x 131072 75.0 -> 76.5 %, q_len 8 57.8 -> 59.2 %.
    v_halves = kv_itemsize == 1 and head_pad == 2 * V_HALF_COLUMNS
    if v_halves and kv_heads > 1 and block_h == MIN_BLOCK_H:
        # The FP8 decode configs of GQA <= 8 at D 128 (16 rows, tiles of 16 tokens x 4 KV heads or 32 x 2), with V
        # in halves: one warp holds all 16 rows, so P reaches the PV dot without a trip through shared memory and Q
        # is read once per tile, not once per warp. H200, e4m3, same run, GQA 4: 64 x 4096 79.8 -> 81.2 % of copy,
        # 128 x 8192 88.1 -> 88.6 %, 1 x 131072 75.6 -> 77.1 % (4 stages: 80.4 / 90.7 / 74.8 %); GQA 8 (64/8): 64 x 4096
        # 81.2 -> 91.2 %, 128 x 8192 90.9 -> 98.6 %, 1 x 131072 76.4 -> 77.4 %. One KV head with 64-token tiles (q_len 4
        # at GQA 4) lost with one warp: 83.6 -> 69.6 %; so did D 256 (81.6 -> 69.2 %).
        num_warps = 1
    # The FP8 config of 4 KV heads at D 128 with one warp compiles to a faster tile loop when plain decode's one
    # query is a runtime value (1213 SASS instructions against 1267, scheduled differently). H200, op time, same
    # run: e4m3 64 x 4096 0.157 -> 0.148 ms, 128 x 8192 0.567 -> 0.525 ms, 1 x 131072 0.082 -> 0.079 ms. The other
    # configs lost that way: bf16 64 x 4096 0.255 -> 0.260 ms; full bench of a4cd7d3, e4m3 64 x 4096: GQA 8 (2 KV
    # heads, one warp) 0.140 (sweep) -> 0.153 ms, D 64 (2 warps) 0.081 -> 0.083 ms, D 256 0.306 -> 0.312 ms.
    runtime_query_count = num_warps == 1 and kv_heads == 4
    # With the page ids carried one tile ahead (see the kernel), s stages keep s - 2 K/V tiles in flight.
    # H200, 64 x 4096 and 128 x 8192: FP8 (2 warps) 2 stages 67-69 % of copy, 3 stages 76-78 %, 4 stages 57-67 %
    # (3 programs per SM instead of 4); bf16 (4 warps) 3 stages 83-97 %, 4 stages 98-101 %.
    num_stages = 1 if interpreter else (3 if kv_itemsize == 1 or head_pad <= SMALL_HEAD_PAD else 4)
    if kv_itemsize == 1 and q_tokens > 1 and 16 * 128 < block_h * head_pad <= 32 * 128 and not interpreter:
        # Draft tokens filling 32 rows at D 128 (speculative decode, q_len 8 at GQA 4). H200, 64 x 4096 e4m3, time
        # against one query: 4 warps / 3 stages 2.05x (3 programs per SM: 512 programs take two waves), 2 warps /
        # 2 stages 1.57x, 2 warps / 3 stages 1.93x, 4 warps with 128-token tiles 1.68x, 2 splits 1.85x. With V in
        # halves (less shared memory per stage), 3 stages: 64 x 4096 58.7 -> 61.4 % of copy.
        num_warps, num_stages = 2, (3 if v_halves else 2)
    if per_token_scales and kv_heads > PER_TOKEN_MAX_KV_HEADS:
        # Per-token-head descales gather each tile's scales to the program's rows (two layout conversions per tile,
        # wider with more heads): two KV heads per program, every other setting the wider block's (its tiles, splits,
        # warps and runtime query count: twice the programs, as measured). H200, e4m3, same call (`sweep decode
        # --per-token`, 4 heads -> 2): 64 x 4096 0.1577 -> 0.1545 ms, 128 x 8192 0.5909 -> 0.5799 ms, 1 x 131072
        # 0.0864 -> 0.0853 ms, 4 x 32768 0.0860 -> 0.0848 ms; two heads with their own 32-token tiles or half the
        # splits: 4-17 % slower.
        kv_heads = PER_TOKEN_MAX_KV_HEADS
    return PagedDecodeLaunchConfig(
        block_h, head_chunks, h_rows, q_tokens, kv_heads, head_pad, block_n, splits, num_warps, num_stages, v_halves,
        runtime_query_count,
    )


def one_query_rows_apart(one_query: PagedDecodeLaunchConfig, several: PagedDecodeLaunchConfig) -> bool:
    """Whether a mixed batch's decode side runs as two launches: its 1-query rows with ``one_query`` (the config
    for ``max_seqlen_q = 1``) and its rows of 2..``max_seqlen_q`` queries with ``several``, instead of all of them with
    ``several``. True when one query per sequence packs more KV heads into a program (FP8 caches, whose 16-row tiles
    then hold several heads), so the usual decode rows of a serving step run at decode speed."""
    return one_query.kv_heads > several.kv_heads

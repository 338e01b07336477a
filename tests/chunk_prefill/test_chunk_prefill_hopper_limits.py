"""The Hopper prefill kernel's launch settings against the limits the kernel asserts or the chip sets, checked on
the host (no GPU): every head size the path accepts, 16-bit and FP8 caches. A change to the tile sizes, the ring
depth or the widening step that breaks one of them fails here, not only at compile time on an sm_90 GPU."""

import pytest

from kvflash.chunk_prefill import hopper_op

# (q bytes, kv_fp8, K kept as stored): a 16-bit cache; FP8 with an fp16 query (K widened), with a bf16 one (split in
# two e4m3 terms) and with an fp8 one (both K as stored)
MODES = [(2, False, False), (2, True, False), (2, True, True), (1, True, True)]
MODE_IDS = ["16-bit", "fp8-cache-fp16-query", "fp8-cache-bf16-query", "fp8-query"]


@pytest.mark.parametrize("q_bytes, kv_fp8, k_as_stored", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("head_size", hopper_op.HEAD_SIZES)
def test_one_program_fits_in_shared_memory(head_size, q_bytes, kv_fp8, k_as_stored):
    assert hopper_op._shared_bytes(1, head_size, q_bytes, kv_fp8, k_as_stored, False) <= hopper_op.SHARED_MEMORY_LIMIT


@pytest.mark.parametrize("q_fp8", [False, True], ids=["16-bit-query", "fp8-query"])
@pytest.mark.parametrize("head_size", hopper_op.HEAD_SIZES)
def test_the_fp8_widening_steps_cover_each_tile(head_size, q_fp8):
    block_n = hopper_op._block_n(head_size, True, q_fp8)
    rows = min(hopper_op.WIDEN_ROWS, block_n)  # what the launcher passes as WIDEN_ROWS
    threads_per_row = head_size // 8  # hopper_producer._widen_tile: 8 elements per thread, 4 warps
    rows_per_pass = 32 // threads_per_row * 4
    assert block_n % rows == 0 and rows % rows_per_pass == 0


def test_the_ring_holds_the_fp8_prefetch():
    assert hopper_op.STAGES >= 2  # the kernel's static_assert: tile g + 1 is staged while tile g is widened


@pytest.mark.parametrize("head_size", hopper_op.HEAD_SIZES)
def test_an_fp8_query_keeps_two_query_buffers(head_size):
    # Q in fp8 and the K ring kept fp8 leave room for the second Q buffer at every head size (compiled for sm_90:
    # 164 KB at D 128, 197 KB at D 256 with 64-key tiles; with PV on fp8 operands 129 KB at D 128).
    pv_fp8 = head_size in hopper_op.PV_FP8_HEAD_SIZES
    assert hopper_op._shared_bytes(2, head_size, 1, True, True, pv_fp8) <= hopper_op.SHARED_MEMORY_LIMIT


def _covers_once(bases: list[list[int]], shape: tuple[int, int]) -> bool:
    """Whether the XOR span of a linear layout's bases (one ``[row, col]`` per index bit) is every coordinate of
    ``shape`` exactly once."""
    span = {(0, 0)}
    for r, c in bases:
        span |= {(x ^ r, y ^ c) for x, y in span}
    return len(bases) == (shape[0] * shape[1]).bit_length() - 1 and span == {
        (x, y) for x in range(shape[0]) for y in range(shape[1])}


@pytest.mark.parametrize("head_size", hopper_op.PV_FP8_HEAD_SIZES)
def test_the_fp8_transpose_layouts_fit_the_tile(head_size):
    # hopper_pv_fp8's layouts as the kernel builds them (4 producer warps): the staging tile, the transposing read and
    # the V^T store each cover the tile once, and each thread reads 16 keys (one 16-key group, relabelled in place) x
    # at least 4 bytes of d (the 32-bit words prmt transposes).
    from kvflash.chunk_prefill import hopper_pv_fp8

    block_n = hopper_op._block_n(head_size, True, True)
    staging = hopper_pv_fp8.vt_staging_layout(block_n, head_size)
    load = hopper_pv_fp8._vt_load_layout(block_n, head_size, 4)
    store = hopper_pv_fp8._vt_store_layout(block_n, head_size, 4)
    assert _covers_once(staging.offset_bases, (block_n, head_size))
    assert _covers_once(load.reg_bases + load.lane_bases + load.warp_bases, (block_n, head_size))
    assert _covers_once(store.reg_bases + store.lane_bases + store.warp_bases, (head_size, block_n))
    assert all([1 << b, 0] in load.reg_bases for b in range(4))  # 16 keys
    assert [0, 1] in load.reg_bases and [0, 2] in load.reg_bases  # 4 bytes of d


def test_the_register_splits_fit_the_three_warpgroups():
    # every PV_FP8 head size has a split; each split re-divides the 3 x 168 registers ptxas gives the warpgroups
    splits = [*hopper_op.REGISTER_SPLIT.values()]
    splits += [hopper_op.REGISTER_SPLIT_PV_FP8[head_size] for head_size in hopper_op.PV_FP8_HEAD_SIZES]
    for consumer, producer in splits:
        assert 2 * consumer + producer <= 3 * hopper_op.MAX_REGISTERS and consumer % 8 == 0 and producer % 8 == 0

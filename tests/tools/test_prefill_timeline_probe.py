"""The prefill timeline probe (tools/prefill_timeline_probe.py) off the GPU: its stamped copy of the consumer steps is
built from the package's current source (every anchor found once, the copy valid Python), and its table reads
synthetic stamps."""

import ast

import pytest
import torch

from tools import prefill_timeline_probe as probe
from tools.source_edits import apply_anchor_edits


def test_the_stamped_copy_builds_from_the_current_source(tmp_path):
    folder = probe.build_stamped_package(tmp_path, 0x7F0000001000)
    text = (folder / "kvflash" / "chunk_prefill" / "hopper_key_tiles.py").read_text()
    ast.parse(text)
    assert "PROBE_ADDRESS = gl.constexpr(139637976731648)" in text
    # six stamps in each of the two consumer steps, and the helper's definition
    assert text.count("_probe_stamp(") == 13


def test_a_missing_anchor_is_an_error():
    with pytest.raises(RuntimeError, match="occurs 0 times"):
        apply_anchor_edits("def f():\n    pass\n", probe._edits(0)[:1], "hopper_key_tiles.py")


def test_the_interval_table_from_synthetic_stamps():
    # One program, five tiles a warpgroup, a step every 1000 cycles; warpgroup 1 runs 500 cycles behind warpgroup 0.
    # fp8 PV points: step start, S landed (+100), softmax done (+600), V/K ready and turn (+650), PV landed (+850),
    # step end (+900, the next S issued).
    stamps = torch.zeros(probe.PROGRAMS, 2, probe.TILES, 6, dtype=torch.float64)
    points = torch.tensor([0.0, 100, 600, 650, 850, 900])
    for wg in range(2):
        for i in range(5):
            stamps[0, wg, i] = 1e6 + 500 * wg + 1000 * i + points
    lines = probe.describe(stamps, "pv_fp8")
    rows = {line.split("  ")[1].strip(): line for line in lines[1:7]}
    assert "100 /    100 /    100" in rows["loop back to step start"]
    assert "500 /    500 /    500" in rows["softmax done"]
    assert "200 /    200 /    200" in rows["PV landed"]
    text = "\n".join(lines)
    # the softmax intervals [100, 600] + 1000 i and [600, 1100] + 1000 i only touch
    assert "overlapping warpgroup 1's: 0 %" in text
    # in flight: each warpgroup's PV (200 cycles, 5 tiles) and its S from the previous step's end (200, 4 tiles),
    # disjoint, over the span 0 .. 5400
    assert "a wgmma group in flight (either warpgroup): 67 %" in text


def test_gaps_at_peeled_tiles_are_left_out():
    # The 16-bit path stamps no step for each item's first (peeled) tile: tiles 0 and 4 are missing here.
    stamps = torch.zeros(probe.PROGRAMS, 2, probe.TILES, 6, dtype=torch.float64)
    points = torch.tensor([0.0, 100, 600, 650, 850, 900])
    for wg in range(2):
        for i in (1, 2, 3, 5, 6, 7):
            stamps[0, wg, i] = 1e6 + 500 * wg + 1000 * i + points
    lines = probe.describe(stamps, "pv16")
    assert "100 /    100 /    100" in lines[1]  # loop back to step start: only between consecutive stamped tiles
    # in flight: points 1 .. 4 of each tile, [100, 850] + 1000 i and [600, 1350] + 1000 i for the two warpgroups,
    # whose union over tiles 1-3 and 5-7 is 2 x 3250 cycles of the span 1000 .. 8400
    assert "a wgmma group in flight (either warpgroup): 88 %" in "\n".join(lines)


def test_no_stamps_say_so():
    stamps = torch.zeros(probe.PROGRAMS, 2, probe.TILES, 6, dtype=torch.float64)
    assert "no stamps" in probe.describe(stamps, "pv_fp8")[-1]

"""The decode phase probe (tools/decode_phase_probe.py) off the GPU: its stamped copy of the kernel is built from the
package's current source (every anchor found once, the copy valid Python), and its table reads synthetic stamps."""

import ast

import pytest
import torch

from tools import decode_phase_probe as probe
from tools.source_edits import apply_anchor_edits


def test_the_stamped_copy_builds_from_the_current_kernel(tmp_path):
    folder = probe.build_stamped_package(tmp_path)
    kernel = (folder / "kvflash" / "paged_decode" / "kernel.py").read_text()
    op = (folder / "kvflash" / "paged_decode" / "op.py").read_text()
    ast.parse(kernel)
    ast.parse(op)
    # six time stamps, one store of the SM id and one of the tile count, all into the probe's row
    assert kernel.count("_probe_now(") == 7  # six calls and the helper's definition
    assert kernel.count("tl.store(probe + ") == 8
    assert "probe_stamps_ptr=PROBE_STAMPS" in op


def test_a_missing_anchor_is_an_error():
    with pytest.raises(RuntimeError, match="occurs 0 times"):
        apply_anchor_edits("def f():\n    pass\n", probe.KERNEL_EDITS[:1], "kernel.py")


def test_the_phase_table_from_synthetic_stamps():
    # Two SMs; three programs of 10 tiles: start, +1 us prologue, +3 us tile 0, +2 us tile 1, 8 later tiles of 2.5 us,
    # +0.5 us epilogue. Programs 0 and 1 overlap on SM 0, program 2 runs alone on SM 1, starting 1 us later.
    rows = []
    for start, sm in ((0.0, 0), (0.0, 0), (1.0, 1)):
        t = [start, start + 1, start + 4, start + 6, start + 26, start + 26.5]
        rows.append([5e9 + x * 1000.0 for x in t] + [sm, 10])  # %globaltimer ns, far from 0
    lines = probe.describe(torch.tensor(rows, dtype=torch.float64))
    text = "\n".join(lines)
    assert "3 programs, 10 tiles each at most, kernel span 27.5 µs" in text
    assert "at most 2 programs at once on one SM (fewest 1)" in text
    later = next(line for line in lines if "each later tile" in line)
    assert "2.50 /    2.50 /    2.50" in later
    prologue = next(line for line in lines if "prologue" in line)
    assert "1.00 /    1.00 /    1.00" in prologue

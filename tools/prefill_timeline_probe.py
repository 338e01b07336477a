"""Where the Hopper prefill kernel's consumer time goes: per-tile ``%clock64`` timelines of both warpgroups (GPU).

    python3 -m tools.prefill_timeline_probe [--shapes "4x(2048+2048)"] [--kv bf16,e4m3-q] [--page 16]

The probe copies the ``kvflash.chunk_prefill`` package into a temporary folder and rewrites the copy's consumer
steps (``hopper_key_tiles``) so that, in the first ``PROGRAMS`` programs, each consumer warpgroup stores
``%clock64`` (SM cycles) at six points of every key tile into a ``[PROGRAMS, 2, TILES, 6]`` int64 buffer whose
address is baked into the copy. The points differ by path (16-bit PV: ``_consumer_step``; fp8 PV, an fp8 query:
``_consumer_step_pv_fp8``) and are named in ``EVENTS``. Each stamp reads the clock after the step's previous
synchronising instruction (the clock read is volatile, as the mbarrier and wgmma waits are); the softmax's end is
ordered by a data dependency on the row sums. The copy is imported in place of the package, so the op, its
launch settings and the bench's inputs are the real ones (``tools/prefill_case.py``).

Printed per case (the last of a few calls): p10 / p50 / p90 cycles of each interval between consecutive points,
per warpgroup, over consecutive stamped tiles (steps over twice the median, at item boundaries, left out); how
often the two warpgroups' softmax intervals overlap; and the share of the time in which at least one wgmma group was
in flight (an upper bound on the tensor cores' busy time). The stamps add about 50 instructions per tile (the fp8
step, sm_90): compare intervals with each other. ``docs/chunk_prefill_perf.md`` (session 19) reads these tables.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

from tools.prefill_case import copy_package, prefill_case, use_copy

PROGRAMS = 8  # programs stamped (the first ones of the persistent grid)
TILES = 1024  # key tiles stamped per program and warpgroup (its ring counter g; later tiles are not stamped)
# Six points per tile and path; an interval is named by its end point.
EVENTS = {
    "pv16": ("step start", "K/V ready, turn", "S landed", "softmax done", "PV landed", "step end"),
    "pv_fp8": ("step start", "S landed", "softmax done", "V/K ready, turn", "PV landed", "step end"),
}
# Intervals in which the warpgroup has a wgmma group in flight, as (start point, end point) within a step; the
# fp8 path's S is issued at the previous step's end and lands at point 1.
MMA_INTERVALS = {"pv16": ((1, 4),), "pv_fp8": ((-1, 1), (3, 4))}
SOFTMAX = {"pv16": (2, 3), "pv_fp8": (1, 2)}

_HELPER = '''

@gluon.jit
def _probe_stamp(g, WG: gl.constexpr, EVENT: gl.constexpr, dep):
    """Store ``%clock64`` read after ``dep`` ([M] fp32) at point EVENT of tile g (program pid < PROGRAMS only)."""
    rows = gl.arange(0, dep.shape[0], layout=dep.type.layout)
    now = gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [dep.to(gl.int32, bitcast=True)],
                                    dtype=gl.int64, is_pure=False, pack=1)
    pid = gl.program_id(0)
    base = gl.full([], PROBE_ADDRESS, gl.int64).to(gl.pointer_type(gl.int64), bitcast=True)
    slot = ((pid * 2 + WG) * PROBE_TILES + g) * 6 + EVENT
    gl.store(base + slot + rows * 0, now, mask=(rows == 0) & (pid < PROBE_PROGRAMS) & (g < PROBE_TILES))


@gluon.jit
def _consumer_step('''


def _stamp(event: int, dep: str = "m_i") -> str:
    return f"    _probe_stamp(g, WG, {event}, {dep})\n"


def _edits(address: int) -> tuple:
    """(anchor, replacement) pairs for ``hopper_key_tiles.py``; each anchor must occur exactly once."""
    constants = (f"PROBE_ADDRESS = gl.constexpr({address})\nPROBE_PROGRAMS = gl.constexpr({PROGRAMS})\n"
                 f"PROBE_TILES = gl.constexpr({TILES})\n")
    return (
        ("from kvflash.chunk_prefill.hopper_pv_fp8 import P_LOG2, p_to_e4m3\n",
         "from kvflash.chunk_prefill.hopper_pv_fp8 import P_LOG2, p_to_e4m3\n\n" + constants),
        ("\n\n@gluon.jit\ndef _consumer_step(", _HELPER),
        # 16-bit PV (_consumer_step)
        ("    sv = (g - 1) % STAGES\n    phv = ((g - 1) // STAGES) & 1\n",
         "    sv = (g - 1) % STAGES\n    phv = ((g - 1) // STAGES) & 1\n" + _stamp(0)),
        ("        mbarrier.wait(turn.index(WG), t & 1)\n    s_acc = _qk(q_view, q_lo,",
         "        mbarrier.wait(turn.index(WG), t & 1)\n" + _stamp(1) + "    s_acc = _qk(q_view, q_lo,"),
        ("    mbarrier.arrive(k_empty.index(sk))\n",
         "    mbarrier.arrive(k_empty.index(sk))\n" + _stamp(2)),
        ("MASKED, Q_SPLIT)\n    o = warpgroup_mma_wait(0, deps=(o, ))\n",
         "MASKED, Q_SPLIT)\n" + _stamp(3, "l_i") + "    o = warpgroup_mma_wait(0, deps=(o, ))\n" + _stamp(4)),
        ("    mbarrier.arrive(v_empty.index(sv))\n    return s_acc, o, p, m_i, l_i\n",
         "    mbarrier.arrive(v_empty.index(sv))\n" + _stamp(5) + "    return s_acc, o, p, m_i, l_i\n"),
        # fp8 PV (_consumer_step_pv_fp8)
        ("    s = g % STAGES\n    ph = (g // STAGES) & 1\n    s_acc = warpgroup_mma_wait(0, deps=(s_acc, ))\n"
         "    mbarrier.arrive(k_empty.index(s))\n",
         "    s = g % STAGES\n    ph = (g // STAGES) & 1\n" + _stamp(0)
         + "    s_acc = warpgroup_mma_wait(0, deps=(s_acc, ))\n    mbarrier.arrive(k_empty.index(s))\n" + _stamp(1)),
        ("    p = p_to_e4m3(p32, p_layout, BLOCK_N)\n    s1 = (g + 1) % STAGES\n",
         "    p = p_to_e4m3(p32, p_layout, BLOCK_N)\n" + _stamp(2, "l_i") + "    s1 = (g + 1) % STAGES\n"),
        ("    fresh = gl.zeros([p.shape[0], HEAD_D], gl.float32, o_layout)\n    t_acc = warpgroup_mma(",
         _stamp(3) + "    fresh = gl.zeros([p.shape[0], HEAD_D], gl.float32, o_layout)\n    t_acc = warpgroup_mma("),
        ("    t_acc = warpgroup_mma_wait(0, deps=(t_acc, ))\n",
         "    t_acc = warpgroup_mma_wait(0, deps=(t_acc, ))\n" + _stamp(4)),
        ("use_acc=False, is_async=True)\n    return s_acc, o, m_i, l_i\n",
         "use_acc=False, is_async=True)\n" + _stamp(5) + "    return s_acc, o, m_i, l_i\n"),
    )


def build_stamped_package(dest: pathlib.Path, address: int) -> pathlib.Path:
    """Copy ``kvflash.chunk_prefill`` to ``dest/kvflash/chunk_prefill`` with the stamps written into the consumer
    steps, storing into the int64 buffer at ``address``; returns ``dest`` (the folder to put first on
    ``sys.path``). Raises if the source no longer has the anchors the stamps go to."""
    return copy_package(dest, {"hopper_key_tiles.py": lambda text: _edits(address)})


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``intervals``."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def describe(stamps, path: str) -> list[str]:
    """Lines of the interval table for one call's stamps: ``stamps [programs, 2, tiles, 6]`` (float64 cycles, 0 where
    nothing was stamped) of the path ``"pv16"`` or ``"pv_fp8"``."""
    import torch

    names = EVENTS[path]
    per_wg: list[list[list[float]]] = [[[] for _ in names] for _ in range(2)]
    overlap = softmax_total = mma = span = 0.0
    for prog in range(stamps.shape[0]):
        # the stamped tiles of each warpgroup (the 16-bit path's steps skip each item's peeled first tile)
        done = (stamps[prog, :, :, 0] > 0) & (stamps[prog, :, :, 5] > 0)  # [2, TILES]
        tiles = [torch.nonzero(done[wg]).flatten() for wg in range(2)]
        if min(len(t) for t in tiles) < 3:
            continue
        rows = [stamps[prog, wg, tiles[wg]] for wg in range(2)]
        for wg in range(2):
            r = rows[wg]
            step = r[1:, 0] - r[:-1, 0]
            # consecutive tiles of one item: a step much longer than the median is an item boundary (epilogue, the
            # next item's prologue), left out with the gaps at peeled tiles
            regular = (tiles[wg][1:] == tiles[wg][:-1] + 1) & (step < 2 * step.median())
            for e in range(6):
                values = (r[1:, 0] - r[:-1, 5]) if e == 0 else (r[:-1, e] - r[:-1, e - 1])
                per_wg[wg][e].extend(values[regular].tolist())
        a, b = SOFTMAX[path]
        soft = [[(float(x[a]), float(x[b])) for x in rows[wg]] for wg in range(2)]
        softmax_total += sum(e - s for s, e in soft[0])
        overlap += sum(max(0.0, min(e0, e1) - max(s0, s1)) for s0, e0 in soft[0] for s1, e1 in soft[1]
                       if s1 < e0 and s0 < e1)
        busy = []
        for wg in range(2):
            r, g = rows[wg], tiles[wg]
            for first, last in MMA_INTERVALS[path]:
                for i in range(len(g)):
                    if first >= 0:
                        busy.append((float(r[i, first]), float(r[i, last])))
                    elif i > 0 and g[i] == g[i - 1] + 1:  # issued at the previous step's end
                        busy.append((float(r[i - 1, 5]), float(r[i, last])))
        mma += _covered(busy)
        span += float(max(rows[0][-1, 5], rows[1][-1, 5]) - min(rows[0][0, 0], rows[1][0, 0]))

    def q(values):
        if not values:
            return "      -"
        t = torch.tensor(values, dtype=torch.float64)
        return " / ".join(f"{v:6.0f}" for v in torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=t.dtype)))

    lines = ["  interval (cycles, ending at)      warpgroup 0: p10 /   p50 /   p90   warpgroup 1: p10 /   p50 /   p90"]
    for e, name in enumerate(names):
        label = "loop back to step start" if e == 0 else name
        lines.append(f"  {label:32s}  {q(per_wg[0][e])}   {q(per_wg[1][e])}")
    if span == 0:
        lines.append("  no stamps: the Hopper kernel's consumer steps did not run (another GPU, KVFLASH_GLUON=0)")
    else:
        shared = 100 * overlap / max(softmax_total, 1)
        lines.append(f"  softmax of warpgroup 0 overlapping warpgroup 1's: {shared:.0f} %")
        lines.append(f"  a wgmma group in flight (either warpgroup): {100 * mma / span:.0f} % of the stamped span")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4x(2048+2048)", help="prefill shapes of tools.bench (comma-separated)")
    parser.add_argument("--kv", default="bf16,e4m3-q", help="bf16, e4m3 (bf16 query) or e4m3-q (fp8 query)")
    parser.add_argument("--page", type=int, default=16, help="page size (default 16)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("the probe reads %clock64 on an NVIDIA GPU; none is visible")
    stamps = torch.zeros(PROGRAMS, 2, TILES, 6, dtype=torch.int64, device="cuda")
    folder = build_stamped_package(pathlib.Path(tempfile.mkdtemp(prefix="kvflash_probe_")), stamps.data_ptr())
    use_copy(folder)  # before kvflash.chunk_prefill is imported: the stamped copy is the package
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()} | {PROGRAMS} programs stamped, {TILES} tiles each at most")
    for shape in filter(None, args.shapes.split(",")):
        for kv in filter(None, args.kv.split(",")):
            call, _ = prefill_case(shape, kv, args.page, gen)
            for _ in range(4):  # compile and warm up, then keep the last call's stamps
                stamps.zero_()
                call()
            torch.cuda.synchronize()
            path = "pv_fp8" if kv.endswith("-q") else "pv16"
            print(f"\nprefill {shape} p{args.page} {kv} ({path} consumer step)")
            print("\n".join(describe(stamps.cpu().double(), path)))


if __name__ == "__main__":
    main()

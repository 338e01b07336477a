"""Where a decode program's time goes: per-program phase timestamps of the split-KV decode kernel (GPU).

    python3 -m tools.decode_phase_probe [--shapes 64x4096,1x131072] [--kv e4m3] [--config "num_warps=2,num_stages=4"]

The probe copies the ``kvflash.paged_decode`` package into a temporary folder and rewrites the copy's kernel so
that every program stores ``%globaltimer`` (ns) at six points into a ``[programs, 8]`` int64 buffer: its start;
before the tile loop (after the first tile's page ids arrived); after tile 0's and tile 1's softmax; after the loop
(data-dependent on the accumulator); at the end; plus its SM id and its tile count. The copy is imported in place of
the package, so the op, its launch settings and the bench's caches (``tools.bench.inputs.make_paged_cache``) are the
real ones; ``--config`` replaces fields of the chosen launch config (as ``python -m tools.bench sweep`` does).

Printed per case (the last of a few calls): the kernel's span, the most programs seen running at once on one SM,
and p10 / p50 / p90 of each phase. The stamps and their branches add a few instructions per tile: compare phases
with each other, and kernel times with the bench. ``docs/paged_decode_perf.md`` (sessions 13-14) reads these tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import sys
import tempfile

from tools.source_edits import apply_anchor_edits

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "packages" / "paged-decode" / "src" / "kvflash" / "paged_decode"
for _pkg in ("attn-common", "chunk-prefill", "fp8-utils", "kvflash"):
    sys.path.insert(0, str(ROOT / "packages" / _pkg / "src"))

# Stamp columns of the buffer (the last two hold the SM id and the program's tile count).
PHASES = ("start", "before loop", "after tile 0", "after tile 1", "after loop", "end")
SMID, TILES = 6, 7

_TIMER_HELPERS = '''

@triton.jit
def _probe_now(dep):
    """``%globaltimer`` (ns), read after ``dep`` is available (an input register orders the read after it)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _probe_smid(dep):
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [dep], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def paged_decode_kernel('''

# (anchor in the package's source, replacement): each anchor must occur exactly once.
KERNEL_EDITS = (
    ("\n\n@triton.jit\ndef paged_decode_kernel(", _TIMER_HELPERS),
    ("    LAUNCH_DEPENDENTS: tl.constexpr,\n):", "    LAUNCH_DEPENDENTS: tl.constexpr,\n    probe_stamps_ptr,\n):"),
    (
        "    allow_dependent_launch(LAUNCH_DEPENDENTS)\n    pid = tl.program_id(0)\n    split = tl.program_id(1)\n",
        "    pid = tl.program_id(0)\n    split = tl.program_id(1)\n    probe_start = _probe_now(pid)\n"
        "    allow_dependent_launch(LAUNCH_DEPENDENTS)\n"
        "    probe = probe_stamps_ptr + (pid * num_splits + split).to(tl.int64) * 8\n"
        "    tl.store(probe + 0, probe_start)\n"
        f"    tl.store(probe + {SMID}, _probe_smid(pid).to(tl.int64))\n",
    ),
    (
        "        for tile_start in range(split_start, split_end, BLOCK_N):\n",
        "        tl.store(probe + 1, _probe_now(next_page.to(tl.int32).sum()))\n"
        f"        tl.store(probe + {TILES}, tl.cdiv(split_end - split_start, BLOCK_N).to(tl.int64))\n"
        "        for tile_start in range(split_start, split_end, BLOCK_N):\n",
    ),
    (
        "            m_i, l_i, p, alpha = online_softmax_step(m_i, l_i, scores)\n",
        "            m_i, l_i, p, alpha = online_softmax_step(m_i, l_i, scores)\n"
        "            if tile_start == split_start:\n"
        "                tl.store(probe + 2, _probe_now(tl.max(m_i, 0).to(tl.int32, bitcast=True)))\n"
        "            if tile_start == split_start + BLOCK_N:\n"
        "                tl.store(probe + 3, _probe_now(tl.max(m_i, 0).to(tl.int32, bitcast=True)))\n",
    ),
    (
        "        if V_HALVES:  # [BLOCK_H, HEAD_PAD]: the halves side by side\n",
        "        tl.store(probe + 4, _probe_now(tl.sum(tl.sum(acc, 1), 0).to(tl.int32, bitcast=True)))\n"
        "        if V_HALVES:  # [BLOCK_H, HEAD_PAD]: the halves side by side\n",
    ),
    ("        tl.store(lse_ptr + lse_offs, lse, mask=row_mask)\n",
     "        tl.store(lse_ptr + lse_offs, lse, mask=row_mask)\n        tl.store(probe + 5, _probe_now(pid))\n"),
)
OP_EDITS = (
    ("            num_warps=cfg.num_warps,\n            num_stages=cfg.num_stages,\n        )",
     "            probe_stamps_ptr=PROBE_STAMPS,\n            num_warps=cfg.num_warps,\n"
     "            num_stages=cfg.num_stages,\n        )"),
    ('__all__ = ["paged_decode_attention"', 'PROBE_STAMPS = None  # [programs, 8] int64, set by the probe\n'
     '__all__ = ["paged_decode_attention"'),
)


def build_stamped_package(dest: pathlib.Path) -> pathlib.Path:
    """Copy ``kvflash.paged_decode`` to ``dest/kvflash/paged_decode`` with the stamps written into the kernel;
    returns ``dest`` (the folder to put first on ``sys.path``). Raises if the kernel's source no longer has the
    anchors the stamps go to."""
    target = dest / "kvflash" / "paged_decode"
    shutil.copytree(PACKAGE, target)
    for name, edits in (("kernel.py", KERNEL_EDITS), ("op.py", OP_EDITS)):
        path = target / name
        path.write_text(apply_anchor_edits(path.read_text(), edits, name))
    return dest


def _quantiles(x) -> str:
    import torch

    q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9], dtype=x.dtype))
    return " / ".join(f"{v:7.2f}" for v in q.tolist())


def describe(stamps) -> list[str]:
    """Lines of the phase table for one call's stamps (``[programs, 8]`` float64, ns; rows of programs that ran)."""
    import torch

    t0 = stamps[:, 0].min()
    rel = (stamps[:, :6] - t0) / 1000.0  # µs from the kernel's first start
    tiles = stamps[:, TILES]
    per_sm = []
    for sm in stamps[:, SMID].unique().tolist():
        spans = rel[stamps[:, SMID] == sm][:, [0, 5]]
        per_sm.append(max(int(((spans[:, 0] <= t) & (spans[:, 1] > t)).sum()) for t in spans[:, 0].tolist()))
    later = (rel[:, 4] - rel[:, 3]) / (tiles - 2).clamp(min=1)
    return [
        f"  {stamps.shape[0]} programs, {int(tiles.max())} tiles each at most, kernel span {rel[:, 5].max():.1f} µs, "
        f"at most {max(per_sm)} programs at once on one SM (fewest {min(per_sm)})",
        "  phase (µs)                 p10 /     p50 /     p90",
        f"  start                  {_quantiles(rel[:, 0])}",
        f"  prologue               {_quantiles(rel[:, 1] - rel[:, 0])}",
        f"  tile 0                 {_quantiles(rel[:, 2] - rel[:, 1])}",
        f"  tile 1                 {_quantiles(rel[:, 3] - rel[:, 2])}",
        f"  each later tile        {_quantiles(later)}",
        f"  epilogue               {_quantiles(rel[:, 5] - rel[:, 4])}",
        f"  end                    {_quantiles(rel[:, 5])}",
    ] + ([] if torch.all(tiles >= 3) else ["  (programs with fewer than 3 tiles make the tile columns partial)"])


def _parse_config(text: str) -> dict[str, int]:
    fields = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise SystemExit(f"--config: expected 'field=INT,...', got {part!r}")
        fields[name.strip()] = int(value)
    return fields


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="64x4096,1x131072", help="NUM_SEQSxKV_LEN, comma-separated")
    parser.add_argument("--kv", default="e4m3", help="KV dtypes among bf16,e4m3,e5m2, comma-separated")
    parser.add_argument("--heads", default="32/8", help="query heads / KV heads (default 32/8)")
    parser.add_argument("--head-size", type=int, default=128, help="D (default 128)")
    parser.add_argument("--page", type=int, default=16, help="page size (default 16)")
    parser.add_argument("--config", default="", help="launch-config fields to replace, 'num_warps=2,num_stages=4'")
    args = parser.parse_args(argv)
    overrides = _parse_config(args.config)
    hq, hkv = (int(x) for x in args.heads.split("/"))

    folder = build_stamped_package(pathlib.Path(tempfile.mkdtemp(prefix="kvflash_probe_")))
    sys.path.insert(0, str(folder))  # before kvflash.paged_decode is imported: the stamped copy is the package
    import torch

    import kvflash.paged_decode.op as op
    from tools.bench.inputs import make_paged_cache

    if not pathlib.Path(op.__file__).is_relative_to(folder):
        raise SystemExit(f"kvflash.paged_decode was imported from {op.__file__}, not from the probe's copy")
    if not torch.cuda.is_available():
        raise SystemExit("the probe reads %globaltimer on an NVIDIA GPU; none is visible")
    chosen = op._choose_config
    op._choose_config = lambda *a, **k: dataclasses.replace(chosen(*a, **k), **overrides)
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()} | config fields replaced: {overrides or 'none'}")
    for shape in filter(None, args.shapes.split(",")):
        num_seqs, ctx = (int(x) for x in shape.split("x"))
        for kv in filter(None, args.kv.split(",")):
            caches = [make_paged_cache([ctx] * num_seqs, hkv, args.head_size, args.page, kv, gen) for _ in range(3)]
            q = torch.randn(num_seqs, hq, args.head_size, dtype=torch.bfloat16, device="cuda", generator=gen)
            op.PROBE_STAMPS = torch.zeros(1 << 16, 8, dtype=torch.int64, device="cuda")
            for call in range(6):  # compile and warm up, then keep the last call's stamps
                c = caches[call % 3]
                op.PROBE_STAMPS.zero_()
                op.paged_decode_attention(q, c.k, c.v, ctx, block_table=c.block_table, seqused_k=c.seqused_k,
                                          causal=True, k_descale=c.k_descale, v_descale=c.v_descale)  # fmt: skip
            torch.cuda.synchronize()
            stamps = op.PROBE_STAMPS[op.PROBE_STAMPS[:, 0] > 0].cpu().double()
            print(f"\ndecode {shape} {hq}/{hkv} D{args.head_size} p{args.page} {kv}")
            print("\n".join(describe(stamps)))


if __name__ == "__main__":
    main()

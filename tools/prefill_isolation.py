"""How fast the Hopper prefill kernel's producer and its consumers run, each without the other (GPU; fp8 query).

    python3 -m tools.prefill_isolation [--shapes "4x(2048+2048),1x16384"] [--page 16]

On the fp8-query path (an e4m3 query over an e4m3 cache, PV on fp8 operands) one producer warpgroup gathers the
K/V tiles by cp.async and transposes V, and two consumer warpgroups run the wgmma and the softmax, on the same SMs
and through a two-slot ring. To tell which side holds the pair, the tool times three builds of
``kvflash.chunk_prefill`` on the bench's inputs (``tools/prefill_case.py``):

* ``landed``: the package as it is;
* ``producer alone``: a copy whose consumer step (``_consumer_step_pv_fp8``) only waits for each K and V slot and
  hands it back (no MMA, no softmax; each item's first S is not issued either);
* ``consumers alone``: a copy whose producer (``_load_item_k_as_stored``) hands the slots out without loading them
  (no gathers, no V transpose; the consumers compute on whatever the ring holds).

The last two compute wrong outputs by design: only their times mean something. Each build runs in a subprocess of
its own (one process imports one ``kvflash.chunk_prefill``) and is timed like the bench (``time_calls``, median of
CUDA-event times); rates are TFLOP/s over the causal (query, key) pairs, ``4 * Hq * D`` each. The copies are written
by anchored rewrites (``tools/source_edits.py``): a kernel change that moves an anchor fails loudly, and
``tests/tools/test_prefill_isolation.py`` builds both copies from the current source. ``docs/chunk_prefill_perf.md``
(session 20) reads these numbers.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

from tools.source_edits import apply_anchor_edits

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "packages" / "chunk-prefill" / "src" / "kvflash" / "chunk_prefill"
for _pkg in ("attn-common", "paged-decode", "fp8-utils", "kvflash"):
    sys.path.insert(0, str(ROOT / "packages" / _pkg / "src"))

VARIANTS = ("landed", "producer alone", "consumers alone")

_STEP = "def _consumer_step_pv_fp8("
# The producer-alone step: the landed step's signature, a body that only hands the slots of tile g back.
_HANDS_BACK = '''    """Producer alone (tools/prefill_isolation.py): hand tile g's K and V slots back."""
    s = g % STAGES
    ph = (g // STAGES) & 1
    mbarrier.wait(k_ready.index(s), ph)
    mbarrier.arrive(k_empty.index(s))
    mbarrier.wait(v_ready.index(s), ph)
    mbarrier.arrive(v_empty.index(s))
    return s_acc, o, m_i, l_i


'''
_FIRST_GATHER = ("    _gather_kv(k_ptr, v_ptr, pages, 0, kv_len, col, stride_block, stride_token, k_smem.index(s0), "
                 "v8_smem.index(s0),\n               BLOCK_N, HEAD_D, PAGE, PRODUCER_WARPS)\n")
_NEXT_GATHER = ("            _gather_kv(k_ptr, v_ptr, pages, start_n + BLOCK_N, kv_len, col, stride_block, "
                "stride_token,\n                       k_smem.index(s1), v8_smem.index(s1), BLOCK_N, HEAD_D, PAGE, "
                "PRODUCER_WARPS)\n")
_TRANSPOSE = """            transpose_v_tile(v8_smem.index(s), v_smem.index(s), BLOCK_N, HEAD_D, PRODUCER_WARPS)
"""


def _indented(block: str, prefix: str = "    ") -> str:
    return "".join(prefix + line if line.strip() else line for line in block.splitlines(keepends=True))


def producer_alone_edits(key_tiles_source: str) -> tuple:
    """(anchor, replacement) pairs for ``hopper_key_tiles.py``, read from ``key_tiles_source``: the fp8 consumer step
    keeps its signature and gets :data:`_HANDS_BACK` as its body (the landed body stays, renamed, unused); the item
    walk (``item_tiles_pv_fp8``) loses what comes before its steps, the first S's issue and turn."""
    start = key_tiles_source.find(_STEP)
    walk = key_tiles_source.find("def item_tiles_pv_fp8(")
    if start < 0 or walk < 0:
        raise RuntimeError(f"hopper_key_tiles.py: no {_STEP!r} or item_tiles_pv_fp8 to rewrite")
    signature = key_tiles_source[start:key_tiles_source.index("):\n", start) + 3]
    landed = signature.replace(_STEP, "def _consumer_step_pv_fp8_landed(", 1)
    first = key_tiles_source.index("    s0 = it % STAGES\n", walk)
    first_s = key_tiles_source[first:key_tiles_source.index("    if n_tiles > 1:\n", first)]
    if "warpgroup_mma(" not in first_s:
        raise RuntimeError("hopper_key_tiles.py: item_tiles_pv_fp8 no longer starts by issuing the first S")
    return (
        (signature, signature + _HANDS_BACK + "@gluon.jit\n" + landed),
        (first_s, ""),
    )


def consumers_alone_edits() -> tuple:
    """(anchor, replacement) pairs for ``hopper_producer.py``: with ``PV_FP8`` the producer issues no gathers and
    no V transpose (it still waits for each free slot and publishes it)."""
    return (
        (_FIRST_GATHER, "    if not PV_FP8:\n" + _indented(_FIRST_GATHER)),
        (_NEXT_GATHER, "            if not PV_FP8:\n" + _indented(_NEXT_GATHER)),
        (_TRANSPOSE, "            pass  # consumers alone: no transpose\n"),
    )


def build_variant(dest: pathlib.Path, variant: str) -> pathlib.Path:
    """Copy ``kvflash.chunk_prefill`` to ``dest/kvflash/chunk_prefill``, rewritten for ``variant`` (one of
    :data:`VARIANTS`); returns ``dest`` (the folder to put first on ``sys.path``). Raises if an anchor moved."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    target = dest / "kvflash" / "chunk_prefill"
    shutil.copytree(PACKAGE, target)
    if variant == "producer alone":
        path = target / "hopper_key_tiles.py"
        text = path.read_text()
        path.write_text(apply_anchor_edits(text, producer_alone_edits(text), path.name))
    elif variant == "consumers alone":
        path = target / "hopper_producer.py"
        path.write_text(apply_anchor_edits(path.read_text(), consumers_alone_edits(), path.name))
    return dest


def _run_variant(variant: str, shapes: list[str], page: int) -> None:
    """In this process: build ``variant``, import it, time each shape; print one JSON line per shape."""
    import torch

    folder = build_variant(pathlib.Path(tempfile.mkdtemp(prefix="kvflash_isolation_")), variant)
    sys.path.insert(0, str(folder))  # before kvflash.chunk_prefill is imported: the copy is the package
    from tools.bench.timing import time_calls
    from tools.prefill_case import imported_from, prefill_case

    imported_from(folder)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in shapes:
        call, flops = prefill_case(shape, "e4m3-q", page, gen)
        ms = time_calls([call]).ms
        print(json.dumps({"variant": variant, "shape": shape, "ms": ms, "tflops": flops / ms / 1e9}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4x(2048+2048),1x16384", help="prefill shapes of tools.bench")
    parser.add_argument("--page", type=int, default=16, help="page size (default 16)")
    parser.add_argument("--variant", choices=VARIANTS, help="time one build in this process (used by the tool)")
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    if args.variant:
        _run_variant(args.variant, shapes, args.page)
        return

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("the tool times the Hopper kernel on an NVIDIA GPU; none is visible")
    print(f"{torch.cuda.get_device_name()} | fp8 query over an e4m3 cache, page {args.page}, TFLOP/s")
    rates: dict[tuple[str, str], float] = {}
    for variant in VARIANTS:
        print(f"  timing {variant} ...", flush=True)
        done = subprocess.run([sys.executable, "-m", "tools.prefill_isolation", "--variant", variant, "--shapes",
                               args.shapes, "--page", str(args.page)], cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{variant}: the timing run failed\n{done.stdout}{done.stderr}")
        for line in done.stdout.splitlines():
            if re.match(r"^\{.*\}$", line):
                row = json.loads(line)
                rates[(row["variant"], row["shape"])] = row["tflops"]
    print(f"  {'shape':16s}" + "".join(f"{v:>17s}" for v in VARIANTS))
    for shape in shapes:
        print(f"  {shape:16s}" + "".join(f"{rates[(v, shape)]:17.1f}" for v in VARIANTS))


if __name__ == "__main__":
    main()

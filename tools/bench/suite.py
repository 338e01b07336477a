"""kvflash benchmark suite: ceilings, then decode, chunked-prefill, cache-writer, serving-batch and host-cost
cases, in one process.

On the GPU machine, from the repository root::

    PYTHONPATH=packages/attn-common/src:packages/chunk-prefill/src:packages/paged-decode/src:\\
    packages/fp8-utils/src:packages/kvflash/src python -m tools.bench [--quick] [--out DIR]

writes DIR/results.json, DIR/BENCHMARKS.md and DIR/kvflash_bench.png, and prints a table.
``python -m tools.bench report --from DIR/results.json`` then regenerates the repository's BENCHMARKS.md.
``--dry-run`` lists the cases without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from .case import Case, run_case

GROUPS = ("decode", "prefill", "cache", "serving", "host")


def log(msg: str) -> None:
    print(msg, flush=True)


def build_cases(quick: bool, only: tuple[str, ...]) -> list[Case]:
    """The case list (no GPU touched: kernels are imported when a case runs)."""
    from .cases_cache import cache_cases
    from .cases_decode import decode_cases
    from .cases_host import host_cases
    from .cases_prefill import prefill_cases
    from .cases_serving import serving_cases

    makers = {
        "decode": decode_cases,
        "prefill": prefill_cases,
        "cache": cache_cases,
        "serving": serving_cases,
        "host": host_cases,
    }
    return [c for g in GROUPS if g in only for c in makers[g](quick)]


def git_commit() -> str:
    """``KVFLASH_COMMIT`` if set, else ``git rev-parse HEAD``, else "unknown"."""
    if os.environ.get("KVFLASH_COMMIT"):
        return os.environ["KVFLASH_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(mode: str) -> dict:
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "l2_mb": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": mode,
        "argv": sys.argv[1:],
        "synthetic": False,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description=__doc__.split("\n\n")[0],
        epilog="Other commands: 'python -m tools.bench report --help' (BENCHMARKS.md from a results JSON), "
        "'python -m tools.bench sweep --help' (launch-config sweeps of one kernel).",
    )
    parser.add_argument("--quick", action="store_true", help="a small subset (fits one device call with the GPU tests)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (default ./bench-out)")
    parser.add_argument(
        "--only", default=",".join(GROUPS), help=f"groups to run, among {','.join(GROUPS)} (ceilings always run)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the case list and exit (no GPU needed)")
    args = parser.parse_args(argv)
    args.only = tuple(g.strip() for g in args.only.split(",") if g.strip())
    unknown = set(args.only) - set(GROUPS)
    if unknown:
        parser.error(f"--only: unknown group(s) {sorted(unknown)}; expected some of {list(GROUPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    cases = build_cases(args.quick, args.only)
    if args.dry_run:
        from .ceilings import CEILINGS

        log(f"mode {mode}: {len(CEILINGS)} ceilings, {len(cases)} cases")
        for name, (_, what) in CEILINGS.items():
            log(f"  ceiling  {name:<12} {what}")
        for c in cases:
            log(f"  {c.labels['group']:<8} {c.name}")
        return 0

    import torch

    if not torch.cuda.is_available():
        log("no GPU: the bench times CUDA kernels; use --dry-run to list the cases")
        return 2
    from .analysis import derive, evaluate_targets
    from .ceilings import measure_ceilings
    from .report import text_table, write_report

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"meta": environment(mode), "ceilings": {}, "results": []}
    log(f"{data['meta']['device']} | torch {data['meta']['torch']} | Triton {data['meta']['triton']} | {mode} mode")
    data["ceilings"] = measure_ceilings(log)
    results_path = args.out / "results.json"
    for i, case in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}] {case.name} ...")
        row = run_case(case)
        data["results"].append(row)
        check = "-" if row.get("rel_err") is None else f"{row['rel_err']:.1e}"
        status = row["error"] or f"{row['ms']:.4f} ms, check {check} {row.get('note') or ''}".rstrip()
        if not row["error"] and row.get("metric") == "host_us":
            status = f"{row['ms'] * 1e3:.1f} µs per eager call (host)"
        log(f"[{i}/{len(cases)}] {case.name}: {status} ({row['wall_s']} s, {time.perf_counter() - start:.0f} s total)")
        results_path.write_text(json.dumps(data, indent=1))  # a timed-out run keeps what it measured
    data["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
    results_path.write_text(json.dumps(data, indent=1))
    try:
        write_report(data, args.out / "BENCHMARKS.md", args.out / "kvflash_bench.png", source=results_path)
    except Exception as exc:  # the JSON is written; the report command can retry the markdown and plot
        log(f"report failed ({type(exc).__name__}: {exc}); results are in {results_path}")
    log("")
    log(text_table(derive(data)))
    log("")
    for t in evaluate_targets(derive(data)):
        log(f"target {t.key:<24} {t.status:<13} {t.threshold:<32} {t.measured}")
    log(
        f"\nwrote {results_path}, {args.out / 'BENCHMARKS.md'}, {args.out / 'kvflash_bench.png'} "
        f"in {data['meta']['wall_s']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

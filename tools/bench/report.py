"""Report of a benchmark run: the stdout table, BENCHMARKS.md, and the PNG plot, all from the results JSON.

Regenerate the repository's report from a run's JSON (no GPU needed)::

    python -m tools.bench report --from bench-out/results.json
    # writes BENCHMARKS.md and docs/bench/kvflash_bench.png at the repository root
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .analysis import CHECK_TOL, derive, evaluate_targets
from .plot import plot

__all__ = ["text_table", "markdown", "write_report", "main"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MD = REPO / "BENCHMARKS.md"
DEFAULT_PNG = REPO / "docs" / "bench" / "kvflash_bench.png"
GROUP_TITLES = {
    "decode": "Paged decode",
    "prefill": "Chunked prefill",
    "cache": "Cache writer",
    "serving": "Serving batches: speculative decode and mixed steps",
    "host": "Host cost of one eager call (CPU)",
}


def _f(x, fmt: str, empty: str = "-") -> str:
    return empty if x is None else format(x, fmt)


def _rate(r: dict) -> str:
    unit = "GB/s" if r["metric"] == "bytes" else "TFLOP/s"
    return f"{r['rate']:.0f} {unit}" if r["rate"] is not None else "-"


def _speedup(r: dict) -> str:
    return f"{r['speedup']:.2f}x vs {r['ref']}" if r["speedup"] is not None else ""


def _check(r: dict) -> str:
    if r.get("rel_err") is None:
        return ""
    flag = "" if r["rel_err"] <= r.get("check_tol", CHECK_TOL) else " WRONG"
    return f"{r['rel_err']:.1e}{flag}"


def text_table(rows: list[dict]) -> str:
    """Fixed-width table for stdout: case, time, rate, fraction of ceiling, speedup vs comparison."""
    head = f"{'case':<52} {'ms':>9} {'rate':>14} {'ceil':>7}  {'check':<12} speedup / note"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['name']:<52} ERROR {r['error']}")
            continue
        note = " ".join(x for x in (_speedup(r), r.get("note") or "") if x)
        if r.get("host_us") is not None:
            lines.append(f"{r['name']:<52} {'host':>9} {r['host_us']:>9.1f} µs/call  {r.get('note') or ''}")
            continue
        lines.append(
            f"{r['name']:<52} {r['ms']:>9.4f} {_rate(r):>14} {_f(r['frac'], '.1%'):>7}  {_check(r):<12} {note}"
        )
    return "\n".join(lines)


def _md_host_rows(rows: list[dict]) -> list[str]:
    out = ["| case | impl | host µs per call (p10-p90) | calls | note |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['name']} | {r['impl']} | error `{r['error']}` | | |")
            continue
        spread = f"{r['p10'] * 1e3:.1f}-{r['p90'] * 1e3:.1f}"
        note = r.get("note") or ""
        out.append(f"| {r['name']} | {r['impl']} | {r['host_us']:.1f} ({spread}) | {r['reps']} | {note} |")
    return out


def _md_rows(rows: list[dict]) -> list[str]:
    if rows and rows[0].get("metric") == "host_us":
        return _md_host_rows(rows)
    out = [
        "| case | impl | ms (p10-p90) | rate | of ceiling | speedup | check | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['name']} | {r['impl']} | error | | | | | `{r['error']}` |")
            continue
        ms = f"{r['ms']:.4f} ({r['p10']:.4f}-{r['p90']:.4f})"
        out.append(
            f"| {r['name']} | {r['impl']} | {ms} | {_rate(r)} | {_f(r['frac'], '.1%')} | {_speedup(r)} "
            f"| {_check(r)} | {_note(r)} |"
        )
    return out


def _note(r: dict) -> str:
    """A row's note, and which prefill path it took: the Hopper (Gluon) kernel or the portable Triton one."""
    kernels = r.get("kernels") or ""
    path = "Hopper Gluon kernel" if "hopper_prefill_kernel" in kernels else ""
    return "; ".join(x for x in (path, r.get("note") or "") if x)


def _later_section(later: list[tuple[dict, str]]) -> list[str]:
    """Rows of partial runs made after the main one (a ``--quick`` or ``--only`` run of a later commit), each
    under its own device, commit, date and command; they do not enter the targets table."""
    if not later:
        return []
    lines = [
        "",
        "## Later partial runs",
        "",
        "Rows measured after the run above, by a partial run of a later commit (its own ceilings and cuDNN rows,",
        "same method). They show where the code moved since; the targets table above stays the main run's.",
    ]
    for data, source in later:
        meta = data["meta"]
        argv = " ".join(meta.get("argv") or [])
        lines += [
            "",
            f"### {meta.get('device')}, commit `{str(meta.get('commit'))[:12]}`, {meta.get('date')} (`{source}`)",
            "",
            f"`python -m tools.bench {argv}`; torch {meta.get('torch')}, Triton {meta.get('triton')}."
            + (f" {meta['note']}." if meta.get("note") else ""),
            "",
            *_md_rows(derive(data)),
        ]
    return lines


def markdown(data: dict, png_rel: str | None, source: str = "results.json",
             later: list[tuple[dict, str]] = ()) -> str:  # fmt: skip
    """BENCHMARKS.md text for one results JSON (``source``: its path as the regeneration command names it), and
    the rows of ``later`` partial runs (``(results, path)`` pairs) in a section of their own."""
    meta, ceilings = data["meta"], data["ceilings"]
    rows = derive(data)
    lines = ["# kvflash benchmarks", ""]
    if meta.get("synthetic"):
        lines += ["> **SYNTHETIC DATA** (report-logic test): these numbers were not measured.", ""]
    quick = " --quick" if meta.get("mode") == "quick" else ""
    lines += [
        f"Generated by `tools/bench/report.py` from the results of `python -m tools.bench{quick}`;"
        f" regenerate with `python -m tools.bench report --from {source}"
        + "".join(f" --later {path}" for _, path in later)
        + "`. Do not edit by hand.",
        "",
        f"- device: **{meta.get('device')}** ({meta.get('sm_count')} SMs, L2 {meta.get('l2_mb')} MB)",
        f"- torch {meta.get('torch')}, Triton {meta.get('triton')}, CUDA {meta.get('cuda')}, "
        f"cuDNN {meta.get('cudnn')}, Python {meta.get('python')}",
        f"- commit `{meta.get('commit')}`, {meta.get('date')}, mode `{meta.get('mode')}`, "
        f"{meta.get('wall_s', '?')} s for the whole run (compilation included)",
        "",
        "## Ceilings (measured in this run, before the cases)",
        "",
        "| ceiling | value | what |",
        "|---|---|---|",
    ]
    for name, c in ceilings.items():
        value = f"{c['value']:.1f} {c['unit']}" if c.get("value") is not None else f"error: `{c.get('error')}`"
        lines.append(f"| {name} | {value} | {c['what']} |")
    lines += [
        "",
        "## Performance targets (H200, docs/design.md)",
        "",
        "The deciding value is the worst row a target covers; a covered row that failed or whose output",
        f"spot check exceeded {CHECK_TOL:g} relative error (fp8-query rows: their own, larger tolerance) makes the "
        "target not met.",
        "",
        "| target | what | threshold | measured | status |",
        "|---|---|---|---|---|",
    ]
    for t in evaluate_targets(rows):
        lines.append(f"| {t.key} | {t.what} | {t.threshold} | {t.measured} | {t.status} |")
    if png_rel:
        lines += ["", f"![decode and prefill]({png_rel})"]
    for group, title in GROUP_TITLES.items():
        chosen = [r for r in rows if r["group"] == group]
        if chosen:
            lines += ["", f"## {title}", "", *_md_rows(chosen)]
    lines += _later_section(list(later))
    lines += ["", "## Method", "", *METHOD]
    return "\n".join(lines) + "\n"


METHOD = [
    "- Time: median of per-call CUDA-event times; each batch of calls is queued behind a GPU sleep so host",
    "  overhead is not timed; compilation and a warm-up run first; input sets are rotated until they exceed",
    "  4 L2 caches. ms (p10-p90) shows the spread.",
    "- Decode bytes = K and V of the tokens used, read once, + q + out; fraction of the measured copy",
    "  bandwidth (read + write bytes). A read-only stream can run a little faster than a copy (no",
    "  read/write turnaround), so a decode fraction slightly above 100 % is possible.",
    "  Cache writer bytes = key + value read + cache written + slot mapping.",
    "- Prefill FLOPs = 4 * Hq * D * visible (query, key) pairs (bottom-right causal); fraction of the",
    "  measured bf16 matmul rate. SDPA rows count the pairs they compute: `sdpa-cudnn` runs a square",
    "  causal problem over all keys (its `is_causal` is top-left), `sdpa-cudnn-mask` an explicit bottom-right",
    "  boolean mask (exact pairs; may take another cuDNN path), `sdpa-flash` FlashAttention-2 with bottom-right",
    "  causal (exact). kvflash bf16 prefill is compared with the faster cuDNN row, by TFLOP/s.",
    "- FP8 rows: bf16 q, FP8 cache with different per-(sequence, KV head) K and V descales; speedup is the",
    "  time of the same kvflash case with bf16 KV over this time.",
    "- check: ||out - ref|| / ||ref|| of the last queries of the first and last sequences against the",
    "  float32 reference (`kvflash.attn_common.reference_attention`).",
    "- Path: each kvflash row's first call records the kernels it launches (`kernels` in the results JSON);",
    "  rows served by the Hopper (sm_90) Gluon prefill kernel say so in their note, the others took the",
    "  portable Triton kernels.",
    "- Host rows: `time.perf_counter_ns` around each eager call, no synchronisation between calls, batches of",
    "  100 calls (synchronised in between, untimed, so a long kernel never fills the launch queue); median and",
    "  p10-p90 over 400 calls after 20 warm-up calls. Hq/Hkv 32/8, D 128, page 16, bf16 queries, causal.",
]


def _shown(path: Path) -> str:
    """``path`` as the markdown names it: relative to the repository root when it lies inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(resolved)


def write_report(
    data: dict, md_path: Path, png_path: Path | None, source: Path | None = None, later: list[Path] = ()
) -> None:
    """Write the markdown (and the plot, unless ``png_path`` is None), the image linked relatively.

    ``source`` is the results JSON, named in the markdown's regeneration command relative to the
    repository root when it lies inside it; ``later`` are results JSONs of later partial runs.
    """
    md_path.parent.mkdir(parents=True, exist_ok=True)
    png_rel = None
    if png_path is not None:
        plot(data, png_path)
        png_rel = Path(os.path.relpath(png_path, md_path.parent)).as_posix()
    shown = _shown(source) if source is not None else "results.json"
    later_data = [(json.loads(path.read_text()), _shown(path)) for path in later]
    md_path.write_text(markdown(data, png_rel, shown, later_data))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench report",
        description="Regenerate BENCHMARKS.md (and its plot) from a results JSON.",
    )
    parser.add_argument(
        "--from", dest="src", required=True, type=Path, help="results.json written by python -m tools.bench"
    )
    parser.add_argument("--md", type=Path, default=DEFAULT_MD, help=f"markdown to write (default {DEFAULT_MD})")
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG, help=f"plot to write (default {DEFAULT_PNG})")
    parser.add_argument("--no-png", action="store_true", help="write the markdown only")
    parser.add_argument(
        "--later",
        type=Path,
        action="append",
        default=[],
        help="results.json of a later partial run (--quick / --only) whose rows get a section of their own; repeatable",
    )
    args = parser.parse_args(argv)
    data = json.loads(args.src.read_text())
    write_report(data, args.md, None if args.no_png else args.png, source=args.src, later=args.later)
    print(text_table(derive(data)))
    print(f"wrote {args.md}" + ("" if args.no_png else f" and {args.png}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

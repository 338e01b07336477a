"""Run kvflash's GPU test tier (and optionally the benchmark) on the device machine, in one call.

The device machine has torch and Triton but no network and no pip, so nothing is installed: the packages'
``src/`` folders go on ``PYTHONPATH``. Prints a short summary table last (the device tool returns the tail).

    python3 tools/gpu_check.py                     # every test (GPU tier included), then a summary
    python3 tools/gpu_check.py --bench quick       # ... then python -m tools.bench --quick
    python3 tools/gpu_check.py -k decode --bench none

Logs and result files go to ``$OUT`` when it is set (the device tool brings that folder back).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC_DIRS = [
    ROOT / "packages" / p / "src" for p in ("attn-common", "chunk-prefill", "paged-decode", "fp8-utils", "kvflash")
]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ) | (extra or {})
    paths = [str(p) for p in SRC_DIRS] + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TRITON_INTERPRET", None)  # real kernels on the GPU
    return env


def _run(
    cmd: list[str], log: pathlib.Path, timeout: float, quiet: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> tuple[int, float]:
    """Run ``cmd``, every line into ``log`` as it comes (flushed: a run killed at its timeout keeps what it
    printed), and to stdout unless it contains one of ``quiet``. Killed after ``timeout`` seconds: rc 124. ``env``:
    variables set for the child only."""
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    with log.open("w") as fh:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        timer = threading.Timer(timeout, proc.kill)  # reading stdout blocks: the deadline needs its own thread
        timer.start()
        try:
            for line in proc.stdout:
                if not any(word in line for word in quiet):
                    sys.stdout.write(line)
                fh.write(line)
                fh.flush()
            rc = proc.wait()
        finally:
            timer.cancel()
    if rc < 0 and time.time() - start >= timeout:
        rc = 124
    return rc, time.time() - start


def _junit_counts(path: pathlib.Path) -> dict[str, int]:
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", choices=["none", "quick", "full"], default="none")
    parser.add_argument("-k", default=None, help="pytest -k expression")
    parser.add_argument("--tests", nargs="*", default=["tests"], help="test paths (default: tests)")
    parser.add_argument(
        "--workers", type=int, default=8, help="pytest-xdist workers (0: none); Triton compiles in each"
    )
    # The whole tier took 389 s with 8 workers on a fresh H200 machine (f7415f3); the device allows 600 s a command.
    parser.add_argument("--test-timeout", type=float, default=540.0, help="seconds for the whole pytest run")
    parser.add_argument(
        "--portable",
        action="store_true",
        help="KVFLASH_GLUON=0: the portable Triton kernels serve every call, also where a Hopper kernel would "
        "(the Hopper kernels' own tests switch them back on)",
    )
    args = parser.parse_args()
    child_env = {"KVFLASH_GLUON": "0"} if args.portable else {}  # for the pytest and bench children only
    out = pathlib.Path(os.environ.get("OUT", ROOT / "bench-out"))
    out.mkdir(parents=True, exist_ok=True)

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    import triton

    kernels = "portable Triton only" if args.portable else "Hopper kernels where they apply"
    print(f"device: {device}; torch {torch.__version__}; triton {triton.__version__}; {kernels}", flush=True)
    rows = []
    junit = out / "junit.xml"
    # -v: every test's outcome is a line of the log as it finishes, so a run stopped by its timeout still names its
    # failures (the -rfE summary and the junit file come only at the end); stdout shows all but the passes and skips.
    cmd = [sys.executable, "-m", "pytest", *args.tests, "-v", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    if args.k:
        cmd += ["-k", args.k]
    if args.workers > 0:
        import importlib.util

        if importlib.util.find_spec("xdist") is not None:
            cmd += ["-n", str(args.workers)]
    rc, secs = _run(cmd, out / "pytest.log", args.test_timeout, quiet=(" PASSED", " SKIPPED"), env=child_env)
    counts = _junit_counts(junit)
    rows.append(("tests", rc, secs, ", ".join(f"{k} {v}" for k, v in counts.items()) or "no junit"))
    if args.bench != "none":
        bench = [sys.executable, "-m", "tools.bench", "--out", str(out)]  # cwd: the repository root
        if args.bench == "quick":
            bench.append("--quick")
        rc, secs = _run(bench, out / "bench.log", 540.0, env=child_env)
        rows.append((f"bench --{args.bench}", rc, secs, f"results in {out}"))
    print(f"\n=== gpu_check summary on {device} ===")
    for name, rc, secs, what in rows:
        print(f"{name:<14} {'ok' if rc == 0 else f'FAILED rc={rc}':<14} {secs:7.1f} s  {what}")
    return 0 if all(r[1] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

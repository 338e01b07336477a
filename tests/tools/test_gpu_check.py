"""tools/gpu_check.py's runner: a command that outlives its timeout is stopped (rc 124) and the lines it printed
before are in the log; lines holding a quiet word reach the log but not stdout; ``--portable`` runs the tests with
``KVFLASH_GLUON=0``."""

from __future__ import annotations

import os
import sys

from tools import gpu_check


def test_timeout_stops_the_run_and_keeps_its_lines(tmp_path, capsys):
    script = (
        "import time\nfor i in range(200):\n    print('PASSED' if i % 2 else 'FAILED', i, flush=True)\n"
        "    time.sleep(0.05)"
    )
    log = tmp_path / "run.log"
    rc, seconds = gpu_check._run([sys.executable, "-c", script], log, timeout=1.5, quiet=("PASSED",))
    assert rc == 124
    assert seconds < 10  # stopped, not run to its end (10 s)
    lines = log.read_text().splitlines()
    assert 4 <= len(lines) < 200 and lines[0] == "FAILED 0"
    shown = capsys.readouterr().out
    assert "FAILED 0" in shown and "PASSED 1" not in shown


def test_a_run_that_ends_keeps_its_return_code(tmp_path):
    rc, _ = gpu_check._run([sys.executable, "-c", "print('x'); raise SystemExit(3)"], tmp_path / "log", 30.0)
    assert rc == 3
    assert (tmp_path / "log").read_text() == "x\n"


def test_portable_runs_the_tests_with_the_hopper_kernels_off(tmp_path, monkeypatch, capsys):
    probe = tmp_path / "test_probe.py"
    probe.write_text("import os\n\ndef test_switch():\n    assert os.environ.get('KVFLASH_GLUON') == '0'\n")
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.delenv("KVFLASH_GLUON", raising=False)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--portable", "--workers", "0", "--tests", str(probe)])
    assert gpu_check.main() == 0
    assert "portable Triton only" in capsys.readouterr().out
    assert "KVFLASH_GLUON" not in os.environ  # set for the children only, never in this process
    # without the flag the child sees no switch (the default: Hopper kernels where they apply), and the probe fails
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--workers", "0", "--tests", str(probe)])
    assert gpu_check.main() == 1

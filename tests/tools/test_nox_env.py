"""The nox sessions' environment tools (tools/nox_env) and the repository's install facts, on fake
distributions in temporary folders: kvflash's requirement check ignores unrelated broken packages (where
``pip check`` fails on a distribution's Python) but not a missing kvflash requirement; the start-up hook hides
kvflash copies outside the session's environment; numpy (the interpreter's) is declared; no test seeds from
``hash()``."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOX_ENV = ROOT / "tools" / "nox_env"


def _fake_dist(site: pathlib.Path, name: str, version: str, requires: list[str]) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")


def _run(args: list[str], site: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_requirement_check_ignores_unrelated_packages(tmp_path):
    # A distro package whose requirement is missing (like pygobject without pycairo): not kvflash's business.
    _fake_dist(tmp_path, "pygobject-lookalike", "3.0", ["pycairo-not-installed>=1.0"])
    _fake_dist(tmp_path, "kvflash-fake-common", "9.9", ["packaging"])
    run = _run([str(NOX_ENV / "check_requirements.py")], tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "kvflash-fake-common" in run.stdout


def test_requirement_check_fails_on_a_missing_kvflash_requirement(tmp_path):
    _fake_dist(tmp_path, "kvflash-fake-decode", "9.9", ["kvflash-fake-common==9.9", "packaging"])
    run = _run([str(NOX_ENV / "check_requirements.py")], tmp_path)
    assert run.returncode == 1
    assert "kvflash-fake-decode 9.9 requires kvflash-fake-common==9.9, which is not installed" in run.stdout


def test_requirement_check_here_counts_only_this_environment(tmp_path):
    # --here: a kvflash distribution outside sys.prefix (a shared site's copy) is ignored, not checked.
    _fake_dist(tmp_path, "kvflash-fake-decode", "9.9", ["kvflash-fake-common==9.9"])
    run = _run([str(NOX_ENV / "check_requirements.py"), "--here"], tmp_path)
    assert "ignored outside this environment: kvflash-fake-decode" in run.stdout
    assert "kvflash-fake-decode 9.9 requires" not in run.stdout


def test_start_up_hook_hides_kvflash_outside_the_environment(tmp_path):
    package = tmp_path / "kvflash" / "fake_kernel_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VALUE = 1\n")
    importer = "import kvflash.fake_kernel_pkg as m; print('found', m.VALUE)"
    # -S: no site-packages and no .pth files, so a hook already installed in this environment (inside a nox
    # session) does not run in the control child; PYTHONPATH still puts tmp_path on the path.
    plain = _run(["-S", "-c", importer], tmp_path)
    assert plain.returncode == 0 and "found 1" in plain.stdout, plain.stderr
    hooked = _run(["-S", "-c", f"import sys; sys.path.insert(0, {str(NOX_ENV)!r}); import kvflash_from_this_env; "
                   f"{importer}"], tmp_path)  # fmt: skip
    assert hooked.returncode != 0 and "ModuleNotFoundError" in hooked.stderr, hooked.stdout + hooked.stderr


def test_numpy_is_declared_by_attn_common():
    """The Triton interpreter (the CPU path) imports numpy; attn-common, which every package needs, says so."""
    text = (ROOT / "packages" / "attn-common" / "pyproject.toml").read_text()
    dependencies = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert re.search(r'^\s*"numpy[^"]*",', dependencies, re.M), dependencies


@pytest.mark.parametrize("folder", ["tests", "tools"])
def test_no_seed_comes_from_hash(folder):
    """hash() of a str is randomised per process (PYTHONHASHSEED): a seed drawn from it cannot be replayed."""
    offenders = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if path.resolve() == pathlib.Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"(?<![\w.])hash\(", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("package", ["attn-common", "chunk-prefill", "paged-decode", "fp8-utils", "kvflash"])
def test_every_wheel_carries_the_license_and_a_typed_marker(package):
    """Each package ships the repository's LICENSE (hatchling's license-files: License-File in METADATA) and a
    py.typed marker in each of its import packages (not in the kvflash namespace itself)."""
    project = ROOT / "packages" / package
    assert (project / "LICENSE").read_text() == (ROOT / "LICENSE").read_text(), "a stale copy of LICENSE"
    text = (project / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in text and 'license-files = ["LICENSE"]' in text
    markers = sorted(p.parent.name for p in (project / "src" / "kvflash").glob("*/py.typed"))
    modules = sorted(p.name for p in (project / "src" / "kvflash").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert markers == modules and not (project / "src" / "kvflash" / "py.typed").exists()
    readme = (project / "README.md").read_text()
    assert not re.search(r"\]\((?!https?://)[^)]*\)", readme), "relative links do not work on an index page"
    assert not re.search(r"pip install kvflash", readme), "kvflash is not published: no index install line"

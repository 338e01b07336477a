"""nox sessions for the kvflash monorepo.

Every session's virtual environment sees the interpreter's site-packages (``--system-site-packages``), so
one torch + Triton install (the README's set-up command) serves them all instead of a download per session.
Each session installs exactly the kvflash packages it tests into its own environment, so
``tests(package='paged-decode')`` proves that paged-decode works with attn-common alone. That holds even where
the kvflash packages were also installed into the shared site (``pip install ./packages/*``): a start-up hook
(``tools/nox_env/kvflash_from_this_env.py``) makes a session import ``kvflash*`` from its own environment
only, and the requirement check (``tools/nox_env/check_requirements.py``, in place of ``pip check``, which
would also judge every unrelated package of a distribution's Python) covers kvflash's distributions alone.

    nox -s tests                       # every package in its own environment (+ cross-package tests)
    nox -s "tests(package='paged-decode')"
    nox -s lint build demo
    nox -s integrations                # kvflash inside transformers (pinned), CPU
    nox -s vllm                        # the vLLM backend against vLLM's classes (optional; needs vLLM to install)
    nox -s bench                       # GPU only
"""

from __future__ import annotations

import pathlib
import re
import sysconfig
import zipfile

import nox

ROOT = pathlib.Path(__file__).parent
PACKAGES = ["attn-common", "chunk-prefill", "paged-decode", "fp8-utils", "kvflash"]
# Which kvflash packages each package needs (its own sibling pins), in install order.
SIBLINGS = {
    "attn-common": [],
    "chunk-prefill": ["attn-common"],
    "paged-decode": ["attn-common"],
    "fp8-utils": ["attn-common"],
    "kvflash": ["attn-common", "chunk-prefill", "paged-decode", "fp8-utils"],
}
# The test folders each package's session runs (the meta-package's also holds the cross-package tests).
TEST_DIRS = {
    "attn-common": ["tests/attn_common"],
    "chunk-prefill": ["tests/chunk_prefill"],
    "paged-decode": ["tests/paged_decode"],
    "fp8-utils": ["tests/fp8_utils"],
    "kvflash": ["tests/kvflash", "tests/tools"],
}
IMPORT_NAMES = {
    "attn-common": "kvflash.attn_common",
    "chunk-prefill": "kvflash.chunk_prefill",
    "paged-decode": "kvflash.paged_decode",
    "fp8-utils": "kvflash.fp8_utils",
    "kvflash": "kvflash.flash_attn_interface",
}
VENV = ["--system-site-packages"]
# The site-packages of the interpreter running nox (where the README's command put torch and Triton). A
# session venv sees it through a .pth file; --system-site-packages alone would miss it when nox itself runs
# inside a virtual environment (it points at the base interpreter's site-packages instead).
SHARED_SITE = sysconfig.get_paths()["purelib"]
NOX_ENV_TOOLS = ROOT / "tools" / "nox_env"

# The engine versions the integration tests pin (kvflash itself depends on neither).
TRANSFORMERS_PIN = "transformers==5.17.0"
VLLM_PIN = "vllm==0.33.0"

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = False


def _share_site(python: str, session: nox.Session) -> None:
    """Put SHARED_SITE on the path of the environment of ``python`` (a .pth file in its site-packages), and
    install the hook that keeps kvflash imports inside that environment."""
    purelib = pathlib.Path(
        session.run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True, external=True
        ).strip()
    )
    if purelib.resolve() != pathlib.Path(SHARED_SITE).resolve():
        (purelib / "kvflash_shared_site.pth").write_text(SHARED_SITE + "\n")
    hook = NOX_ENV_TOOLS / "kvflash_from_this_env.py"
    (purelib / hook.name).write_text(hook.read_text())
    (purelib / "kvflash_from_this_env.pth").write_text("import kvflash_from_this_env\n")


def _check_requirements(python: str, session: nox.Session) -> None:
    """kvflash's own ``pip check``: its distributions come from this environment and their requirements are met."""
    session.run(python, str(NOX_ENV_TOOLS / "check_requirements.py"), "--here", external=True)


def _install_local(session: nox.Session, packages: list[str]) -> None:
    """Install local packages without touching the index for them; torch/Triton come from the system site.
    ``--ignore-installed``: copies in the shared site must not stand in for the checkout's."""
    paths = [str(ROOT / "packages" / p) for p in packages]
    session.install("--no-deps", "--no-build-isolation", "--ignore-installed", *paths)
    _check_requirements("python", session)


def _absent(package: str) -> str:
    return (
        f"try:\n    import {IMPORT_NAMES[package]}\nexcept ModuleNotFoundError:\n    pass\n"
        f"else:\n    raise AssertionError('{package} present')"
    )


@nox.session(venv_params=VENV)
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """One package's tests in a fresh environment holding only that package and its kvflash dependencies."""
    _share_site("python", session)
    session.install("pytest", "numpy", "hatchling")
    if package == "kvflash":
        session.install("matplotlib")  # tests/tools checks the benchmark report's plot
    _install_local(session, SIBLINGS[package] + [package])
    for other in set(PACKAGES) - set(SIBLINGS[package]) - {package}:
        session.run("python", "-c", _absent(other))
    dirs = [d for d in TEST_DIRS[package] if (ROOT / d).is_dir()]
    session.run("python", "-m", "pytest", *dirs, *session.posargs, env={"PYTHONDONTWRITEBYTECODE": "1"})


@nox.session(venv_params=VENV)
def integrations(session: nox.Session) -> None:
    """kvflash as a transformers attention implementation: tiny random Llama, greedy tokens vs sdpa (CPU)."""
    _share_site("python", session)
    # psutil: transformers' continuous batching sizes its cache from it on a CPU-only machine.
    session.install("pytest", "numpy", "hatchling", TRANSFORMERS_PIN, "psutil")
    _install_local(session, PACKAGES)
    session.run("python", "-m", "pytest", "tests/integrations/test_transformers_backend.py", *session.posargs)


@nox.session(venv_params=VENV)
def vllm(session: nox.Session) -> None:
    """The vLLM attention backend against vLLM's real classes (installs vLLM: several GB with its CUDA wheels)."""
    _share_site("python", session)
    session.install("pytest", "numpy", "hatchling", VLLM_PIN)
    _install_local(session, PACKAGES)
    session.run("python", "-m", "pytest", "tests/integrations/test_vllm_backend.py", *session.posargs)


def _versions() -> dict[str, str]:
    found = {}
    for p in PACKAGES:
        text = (ROOT / "packages" / p / "pyproject.toml").read_text()
        found[p] = re.search(r'^version = "([^"]+)"', text, re.M).group(1)
    return found


@nox.session(venv_params=VENV)
def lint(session: nox.Session) -> None:
    """ruff, plus the lock-step check: one version everywhere and exact sibling pins to it."""
    _share_site("python", session)
    session.install("ruff")
    session.run("ruff", "check", ".")
    versions = _versions()
    if len(set(versions.values())) != 1:
        session.error(f"package versions differ: {versions}")
    version = next(iter(versions.values()))
    for p in PACKAGES:
        text = (ROOT / "packages" / p / "pyproject.toml").read_text()
        pins = dict(re.findall(r'"(kvflash-[a-z0-9-]+|kvflash)(==[^";]*)?[";]', text.split("dependencies", 1)[1]))
        for dep in SIBLINGS[p]:
            dist = "kvflash" if dep == "kvflash" else f"kvflash-{dep}"
            if pins.get(dist) != f"=={version}":
                session.error(f"packages/{p}: {dist} must be pinned as =={version}, found {pins.get(dist)!r}")
        if (ROOT / "packages" / p / "src" / "kvflash" / "__init__.py").exists():
            session.error(f"packages/{p}/src/kvflash/__init__.py breaks the PEP 420 namespace")
    session.log(f"versions in lock-step at {version}; sibling pins exact")


@nox.session(venv_params=VENV)
def build(session: nox.Session) -> None:
    """Build the five wheels, check the namespace, and install each kernel wheel alone in a fresh venv."""
    _share_site("python", session)
    session.install("hatchling", "build")
    dist = ROOT / "dist"
    for old in dist.glob("*.whl"):
        old.unlink()
    for p in PACKAGES:
        session.run(
            "python", "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT / "packages" / p)
        )
    wheels = sorted(dist.glob("*.whl"))
    if len(wheels) != len(PACKAGES):
        session.error(f"expected {len(PACKAGES)} wheels, got {[w.name for w in wheels]}")
    for wheel in wheels:
        names = zipfile.ZipFile(wheel).namelist()
        if "kvflash/__init__.py" in names:
            session.error(f"{wheel.name} ships kvflash/__init__.py: the namespace would break")
        with zipfile.ZipFile(wheel) as archive:
            meta = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        if "License-File: LICENSE" not in meta or not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
            session.error(f"{wheel.name}: the LICENSE file is missing (License-File in METADATA)")
        if not any(n.endswith("/py.typed") for n in names):
            session.error(f"{wheel.name}: no py.typed marker")
        session.log(f"{wheel.name}: {sum(n.endswith('.py') for n in names)} modules, namespace intact")
    tmp = pathlib.Path(session.create_tmp())
    for p in ["chunk-prefill", "paged-decode", "fp8-utils"]:
        env_dir = tmp / f"alone-{p}"
        # --without-pip: pip comes from the shared site; a seeded (older) setuptools would shadow the one torch needs.
        session.run("python", "-m", "venv", "--system-site-packages", "--without-pip", "--clear", str(env_dir))
        py = str(env_dir / "bin" / "python")
        _share_site(py, session)
        dist_name = f"kvflash-{p}"
        # The wheel and the kvflash wheels its own metadata requires, from dist/ only (--no-index), into this
        # venv even where the shared site holds copies (--ignore-installed, --no-deps: torch and Triton stay
        # the shared site's); then its requirements, all of them, must be met.
        wheel = next(w for w in wheels if w.name.startswith(dist_name.replace("-", "_") + "-"))
        with zipfile.ZipFile(wheel) as archive:
            meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            requires = re.findall(r"^Requires-Dist: (kvflash[a-z0-9-]*)", archive.read(meta).decode(), re.M)
        session.run(
            py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(dist), "--no-deps",
            "--ignore-installed", dist_name, *requires, external=True,
        )  # fmt: skip
        _check_requirements(py, session)
        session.run(
            py, "-c", f"import {IMPORT_NAMES[p]}, kvflash.attn_common; print('{dist_name}: imports')", external=True
        )
        for other in set(PACKAGES) - {p, "attn-common"}:
            session.run(py, "-c", _absent(other), external=True)
        session.log(f"{dist_name} alone: {IMPORT_NAMES[p]} + kvflash.attn_common, no siblings")


@nox.session(venv_params=VENV)
def demo(session: nox.Session) -> None:
    """The main job: a small serving loop over a paged FP8 cache (tools/demo.py)."""
    _share_site("python", session)
    session.install("hatchling")
    _install_local(session, PACKAGES)
    session.run("python", str(ROOT / "tools" / "demo.py"), *session.posargs)


@nox.session(venv_params=VENV)
def bench(session: nox.Session) -> None:
    """The benchmark suite (needs a GPU): ``python -m tools.bench`` (nox runs it from the repository root)."""
    _share_site("python", session)
    session.install("hatchling")
    _install_local(session, PACKAGES)
    session.run("python", "-m", "tools.bench", *session.posargs)

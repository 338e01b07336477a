"""Start-up hook that nox writes into every session environment (with ``kvflash_from_this_env.pth``, whose
``import`` line runs it): ``kvflash`` and its subpackages are imported from this environment only.

Session environments see the shared site-packages of the interpreter that runs nox (torch and Triton are
installed there once). If the kvflash packages were installed there too (``pip install ./packages/*``), the
``kvflash`` namespace would merge those copies with the session's own: a session meant to hold paged-decode
alone would import chunk-prefill from the shared site, and tests would run against whatever was installed
there instead of the checkout. This finder, first on ``sys.meta_path``, looks for ``kvflash*`` modules only in
path entries inside ``sys.prefix`` and raises ``ModuleNotFoundError`` for one that is not here.
"""

import importlib.machinery
import os
import sys

_PREFIX = os.path.realpath(sys.prefix)


def _inside(entry):
    path = os.path.realpath(entry or os.getcwd())
    return path == _PREFIX or path.startswith(_PREFIX + os.sep)


class KVFlashFromThisEnvironment:
    """A meta-path finder for ``kvflash`` and ``kvflash.*`` restricted to this environment's path entries."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "kvflash" and not fullname.startswith("kvflash."):
            return None
        entries = [p for p in (sys.path if path is None else list(path)) if isinstance(p, str) and _inside(p)]
        spec = importlib.machinery.PathFinder.find_spec(fullname, entries, target)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {fullname!r} in this environment ({_PREFIX})", name=fullname)
        return spec

    @classmethod
    def invalidate_caches(cls):
        pass


if not any(getattr(f, "__name__", "") == "KVFlashFromThisEnvironment" for f in sys.meta_path):
    sys.meta_path.insert(0, KVFlashFromThisEnvironment)

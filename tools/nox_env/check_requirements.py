"""``pip check`` for kvflash's own environment: every requirement of every installed kvflash distribution is
met. With ``--here`` only the kvflash distributions of this environment count (copies in a shared site are
hidden from imports by ``kvflash_from_this_env``), and their kvflash requirements must be met here too.

Plain ``pip check`` also judges every unrelated package the base interpreter carries (a distribution's
``/usr/lib/python3/dist-packages`` seen through ``--system-site-packages``, where ``pygobject requires
pycairo`` fails with nothing of kvflash's involved). nox runs this instead: ``python check_requirements.py``.
Exit status 1 with one line per problem.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare environment: pip carries a copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name


def _inside(path: str, prefix: str) -> bool:
    path, prefix = os.path.realpath(path), os.path.realpath(prefix)
    return path == prefix or path.startswith(prefix + os.sep)


def _is_kvflash(name: str) -> bool:
    return name == "kvflash" or name.startswith("kvflash-")


def main(argv: list[str]) -> int:
    here = "--here" in argv
    visible: dict[str, metadata.Distribution] = {}
    local: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():  # sys.path order: the first one found is the one imported
        name = canonicalize_name(dist.metadata["Name"])
        visible.setdefault(name, dist)
        if _inside(str(dist.locate_file("")), sys.prefix):
            local.setdefault(name, dist)
    # With --here, kvflash distributions outside this environment (a shared site's) are hidden from imports
    # by kvflash_from_this_env: they neither count nor satisfy a requirement.
    kvflash_pool = local if here else visible
    ours = sorted(n for n in kvflash_pool if _is_kvflash(n))
    hidden = sorted(n for n in visible if _is_kvflash(n) and n not in kvflash_pool)
    problems = []
    for name in ours:
        dist = kvflash_pool[name]
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            req_name = canonicalize_name(req.name)
            found = (kvflash_pool if _is_kvflash(req_name) else visible).get(req_name)
            if found is None:
                problems.append(f"{name} {dist.version} requires {req}, which is not installed here")
            elif not req.specifier.contains(found.version, prereleases=True):
                problems.append(f"{name} {dist.version} requires {req}, but {found.version} is installed")
    for line in problems:
        print(line)
    note = f"; ignored outside this environment: {', '.join(hidden)}" if hidden else ""
    print(f"{len(ours)} kvflash distributions checked ({', '.join(ours) or 'none'}): {len(problems)} problems{note}")
    return 1 if problems or not ours else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

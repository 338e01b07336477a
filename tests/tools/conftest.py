"""The tools are imported as the ``tools`` package of the repository root (``tools.bench``, ``tools.gpu_check``),
as ``python -m tools.bench`` run from the root imports them."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

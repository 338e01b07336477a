"""Root conftest: without a GPU, kernels run under the Triton interpreter on the CPU.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` kernel module is imported, so this runs first.
Also registers the ``gpu`` mark (tests that need a real GPU: bf16 ``tl.dot``, large caches, CUDA graphs),
and seeds torch's global generators before every test from the test's id, so that a test drawing from
them gets the same numbers alone, in a full run, in any order and in any xdist worker (a failure can be
replayed with the test id alone).
"""

import os
import zlib

import pytest
import torch

HAS_GPU = torch.cuda.is_available() or bool(getattr(torch, "xpu", None) and torch.xpu.is_available())
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU (bf16 tl.dot, large caches, CUDA graphs, speed)")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a GPU: run tools/gpu_check.py on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_global_rng(request):
    """``torch.manual_seed(crc32(test id))``: deterministic, unlike ``hash()`` (randomised per process)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def device() -> torch.device:
    """The device the kernel tests run on: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

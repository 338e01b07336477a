"""Platform probe: is there a GPU, is the Triton interpreter on, how many multiprocessors.

Launchers ask this module instead of touching ``torch.cuda`` or Triton's driver, so the same launcher
code runs on NVIDIA, AMD (ROCm builds of torch also answer through ``torch.cuda``), Intel XPU, and the
CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = [
    "interpreter_enabled",
    "gpu_available",
    "runs_triton",
    "multiprocessor_count",
    "is_rocm",
    "compiles_to_ptx",
    "prefers_fp8_e4m3fnuz",
    "stream_capturing",
    "INTERPRETER_MULTIPROCESSORS",
    "current_device_index",
    "current_stream_handle",
    "hopper_gluon_available",
    "gluon_switched_off",
    "GLUON_ENV",
    "programmatic_launch_available",
    "PDL_ENV",
]

# Set to 0 (or false / no / off) to keep every call on the portable Triton kernels (on sm_90 with Triton 3.6 the
# Hopper-only Gluon kernels serve the calls they cover by default).
GLUON_ENV = "KVFLASH_GLUON"
OFF_VALUES = ("0", "false", "no", "off")  # what switches an environment switch off (any case)
# The Gluon dialect is experimental and its API moves between Triton releases: the Hopper kernels are written
# against these.
GLUON_TRITON_VERSIONS = ("3.6.",)

# Set to 0 (or false / no / off) to launch every kernel the plain way: no programmatic dependent launch (a
# dependent kernel, such as decode's split merge, then starts only after the kernel before it has finished).
PDL_ENV = "KVFLASH_PDL"

# A fixed, small "SM count" for the interpreter so split heuristics are deterministic on the CPU.
INTERPRETER_MULTIPROCESSORS = 4


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a true value (kernels then run on the CPU).

    Read from the environment at every call (tests switch it)."""
    return _env_word(os.environ.get("TRITON_INTERPRET") or "0") not in ("", "0", "false", "no")


@functools.cache
def _env_word(raw: str) -> str:
    """An environment switch's value as compared: stripped, lower case. Cached per value seen: every launch asks
    (``TRITON_INTERPRET``, ``KVFLASH_GLUON``), so a string is not re-parsed each time."""
    return raw.strip().lower()


def _switched_off(name: str) -> bool:
    """True when the environment switch ``name`` is ``0``, ``false``, ``no`` or ``off`` (any case; read at every
    call). Unset or any other value leaves it on."""
    return _env_word(os.environ.get(name, "")) in OFF_VALUES


def gpu_available() -> bool:
    """True when torch sees a GPU (CUDA, ROCm or XPU)."""
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def is_rocm() -> bool:
    """True on a ROCm build of torch."""
    return getattr(torch.version, "hip", None) is not None


def runs_triton(device: torch.device, interpreter: bool | None = None) -> bool:
    """Whether a Triton kernel can run on tensors of ``device``.

    GPU devices always can; CPU tensors only under the interpreter. Launchers send CPU tensors to the
    plain PyTorch reference when this is False. ``interpreter``: :func:`interpreter_enabled`, when the caller
    has read it already for its launch settings (``None``: read it here).
    """
    if device.type in ("cuda", "xpu"):
        return True
    if device.type != "cpu":
        return False
    return interpreter_enabled() if interpreter is None else interpreter


def compiles_to_ptx(device: torch.device) -> bool:
    """True where Triton compiles to NVIDIA PTX (so a kernel may use inline PTX): CUDA devices of a
    non-ROCm torch, outside the interpreter."""
    return device.type == "cuda" and not is_rocm() and not interpreter_enabled()


def stream_capturing(device: torch.device) -> bool:
    """True while the current stream of ``device`` is being captured into a CUDA graph (nothing may
    synchronise then)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@functools.cache
def prefers_fp8_e4m3fnuz() -> bool:
    """True on MI300-class AMD GPUs (gfx94x), whose FP8 hardware format is e4m3 "fnuz"; every other
    target uses OCP ``float8_e4m3fn``. Read from device 0 once."""
    if not (is_rocm() and torch.cuda.is_available()):
        return False
    return getattr(torch.cuda.get_device_properties(0), "gcnArchName", "").startswith("gfx94")


@functools.cache
def _multiprocessor_count(device_type: str, index: int) -> int:
    if device_type == "cuda":
        return int(torch.cuda.get_device_properties(index).multi_processor_count)
    if device_type == "xpu":
        props = torch.xpu.get_device_properties(index)
        return int(getattr(props, "gpu_subslice_count", 0) or getattr(props, "max_compute_units", 64))
    return INTERPRETER_MULTIPROCESSORS


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors (CUDA/ROCm compute units, XPU subslices) of ``device``; cached.

    For CPU tensors (the interpreter) a fixed :data:`INTERPRETER_MULTIPROCESSORS`.
    """
    found = _MP_BY_DEVICE.get(device)
    if found is not None:
        return found
    index = device.index
    if index is None and device.type == "cuda":
        index = torch.cuda.current_device()
    elif index is None and device.type == "xpu":
        index = torch.xpu.current_device()
    count = _multiprocessor_count(device.type, 0 if index is None else index)
    if device.index is not None or device.type == "cpu":  # an index-less GPU device means "the current one"
        _MP_BY_DEVICE[device] = count
    return count


# device (with its index) -> multiprocessor count: the probe asked once per device, then a dict lookup.
_MP_BY_DEVICE: dict[torch.device, int] = {}


@functools.cache
def _triton_driver():
    from triton.runtime import driver

    return driver


@functools.cache
def _driver_queries():
    """The active Triton driver's ``(get_current_device, get_current_stream)``, looked up once (each lookup through
    Triton's lazy driver proxy costs about a microsecond, and every eager call asks).

    Triton's CUDA and ROCm drivers ask ``torch.cuda.current_device``: ``torch.cuda._lazy_init()`` (three Python
    calls once initialised) then ``torch._C._cuda_getDevice()``, which initialises CUDA lazily itself. So the C
    function is asked directly: the same answer, about 0.3 µs less per eager call."""
    active = _triton_driver().active
    get_device = active.get_current_device
    if get_device is torch.cuda.current_device and hasattr(torch._C, "_cuda_getDevice"):
        get_device = torch._C._cuda_getDevice
    return get_device, active.get_current_stream


def current_device_index() -> int:
    """The current GPU's index as Triton launches on it (Triton's driver, the one Triton itself asks)."""
    return _driver_queries()[0]()


def current_stream_handle(device_index: int) -> int:
    """The raw handle of the current stream of GPU ``device_index`` (what Triton's launcher takes)."""
    return _driver_queries()[1](device_index)


@functools.cache
def _hopper_gluon(device_type: str, index: int) -> bool:
    if device_type != "cuda" or is_rocm() or torch.cuda.get_device_capability(index) != (9, 0):
        return False
    import triton

    if not triton.__version__.startswith(GLUON_TRITON_VERSIONS):
        return False
    try:
        from triton.experimental.gluon.language.nvidia import hopper  # noqa: F401
    except ImportError:
        return False
    return True


def gluon_switched_off() -> bool:
    """True when ``KVFLASH_GLUON`` is ``0``, ``false``, ``no`` or ``off`` (any case): every call then takes the
    portable Triton kernels. Unset or any other value leaves the Gluon kernels on where they apply."""
    return _switched_off(GLUON_ENV)


def hopper_gluon_available(device: torch.device) -> bool:
    """Whether ``device`` takes the Hopper-only Gluon kernels: an sm_90 NVIDIA GPU (H100, H200), a Triton release
    whose Gluon API the kernels are written for, no interpreter, and not switched off (:func:`gluon_switched_off`;
    read at every call, like ``TRITON_INTERPRET``)."""
    if device.type != "cuda" or gluon_switched_off() or interpreter_enabled():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _hopper_gluon(device.type, index)


@functools.cache
def _programmatic_launch(device_type: str, index: int) -> bool:
    if device_type != "cuda" or is_rocm() or torch.cuda.get_device_capability(index) < (9, 0):
        return False
    from triton.language.extra import cuda as triton_cuda

    return hasattr(triton_cuda, "gdc_wait") and hasattr(triton_cuda, "gdc_launch_dependents")


def programmatic_launch_available(device: torch.device) -> bool:
    """Whether kernels on ``device`` may use programmatic dependent launch (PDL): an NVIDIA GPU of compute
    capability 9.0 or newer, a Triton that exposes grid dependency control (``griddepcontrol``), no interpreter,
    and not switched off by ``KVFLASH_PDL=0`` (read at every call). A kernel launched with PDL may start while the
    kernel before it in the stream finishes; it waits for that kernel's results with
    :func:`kvflash.attn_common.jit_helpers.wait_for_prior_grid` before reading them."""
    if device.type != "cuda" or interpreter_enabled() or _switched_off(PDL_ENV):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _programmatic_launch(device.type, index)

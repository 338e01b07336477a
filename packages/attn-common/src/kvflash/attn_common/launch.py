"""One place where kvflash launches a Triton kernel: specialisation keys, a cheap relaunch, and a launch registry.

**Specialisation key.** Triton compiles one binary per *specialisation* of a kernel: the values of its
``tl.constexpr`` parameters, the dtype of each pointer and whether its address is 16-byte aligned, for each int
whether it equals 1 (then it becomes a constant) or is divisible by 16 and whether it fits 32 bits, plus the
launch options (``num_warps``, ``num_stages``). :func:`launch_key` computes exactly that tuple from the
keyword arguments of a launch, on the host, without reading tensor values.

**Cheap relaunch.** ``kernel[grid](**kwargs)`` re-derives the specialisation in Triton's generic launcher on
every call, reads several configuration knobs and builds launch metadata. On a GPU, :func:`launch` keeps the
compiled kernel Triton returns from the first launch of each key (and device) and later calls its launcher
directly, which is what Triton's ``CompiledKernel[grid](*args)`` does. It is used only where it is safe to: a
real GPU (not the interpreter), a Triton that has ``triton.knobs``, no launch hooks installed (profilers), and
not in ``KVFLASH_VALIDATE=1`` mode, where every launch takes Triton's generic path and the kernel Triton picks is
checked against the one kept for the key. ``KVFLASH_FAST_LAUNCH=0`` switches the relaunch off (read once).
Triton settings that change a binary without changing the arguments (``TRITON_DEBUG``, instrumentation) are
read by Triton at the first launch of each key; later launches of that key reuse the binary it built then.

**Launch registry.** Inside :func:`record_launches` every launch's key is added to a set (also under the
interpreter, where nothing compiles), so a test can assert that serving reaches no key a warm-up did not.
Inside :func:`dry_run` launches are recorded and skipped: the warm-up uses it to find, cheaply, which of many
candidate calls reach a key not seen yet, and runs only those.

**Launch observers.** Inside :func:`observe_launches` every GPU launch is reported, after it is issued, with the
compiled kernel that ran, the grid and the parameter values in signature order: :mod:`kvflash.attn_common.call_plan`
builds its plans from these.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterator

import torch

from kvflash.attn_common import platform
from kvflash.attn_common.validate import validation_enabled

__all__ = [
    "launch",
    "launch_key",
    "launch_key_reference",
    "record_launches",
    "dry_run",
    "count_compilations",
    "compile_only",
    "CompileCount",
    "describe_key",
    "FAST_LAUNCH_ENV",
    "fast_launch_enabled",
    "observe_launches",
    "bookkeeping_active",
    "hooks_installed",
]

FAST_LAUNCH_ENV = "KVFLASH_FAST_LAUNCH"
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl")

# kernel -> the generated key function of _key_function (parameters in order, one expression each)
_KEY_FUNCTIONS: dict[int, object] = {}
# kernel -> (name, parameter names in order, how each parameter specialises: "constexpr", "value" (dtype and
# alignment of a tensor, 1 / divisible by 16 / 32-bit for an int), "type" (do_not_specialize: type only) or
# "dtype" (do_not_specialize_on_alignment: a tensor's dtype, an int's 1 / 16 / 32-bit facts))
_SIGNATURES: dict[int, tuple[str, tuple[str, ...], tuple[str, ...]]] = {}
# (device index, key) -> the compiled kernel Triton returned for the first launch with that key
_COMPILED: dict[tuple, object] = {}
_RECORDERS: list[set] = []
_DRY_RUN: list[bool] = []  # non-empty inside dry_run()
_COMPILE_ONLY: list[bool] = []  # non-empty inside compile_only()
_OBSERVERS: list = []  # callables (compiled kernel or None, grid, values), inside observe_launches()


def _signature(kernel) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """Name, parameter names and specialisation modes of a ``@triton.jit`` kernel (JIT or interpreted), read once."""
    found = _SIGNATURES.get(id(kernel))
    if found is None:
        fn = getattr(kernel, "fn", kernel)
        params = list(inspect.signature(fn).parameters.values())
        names = tuple(p.name for p in params)
        options = getattr(kernel, "kwargs", None) or {}  # the interpreter keeps @triton.jit's keyword arguments
        no_spec = _listed(getattr(kernel, "do_not_specialize", None) or options.get("do_not_specialize"), names)
        no_align = _listed(
            getattr(kernel, "do_not_specialize_on_alignment", None) or options.get("do_not_specialize_on_alignment"),
            names,
        )
        modes = tuple(
            "constexpr" if _is_constexpr(p.annotation) else "type" if p.name in no_spec else
            "dtype" if p.name in no_align else "value"
            for p in params
        )  # fmt: skip
        found = _SIGNATURES[id(kernel)] = (getattr(fn, "__name__", repr(kernel)), names, modes)
    return found


def _listed(entries, names: tuple[str, ...]) -> set[str]:
    """Parameter names from a ``do_not_specialize``-style list of names or indices."""
    return {names[e] if isinstance(e, int) else e for e in entries or ()}


def _is_constexpr(annotation) -> bool:
    if isinstance(annotation, str):  # ``from __future__ import annotations`` in the kernel module
        return annotation.rsplit(".", 1)[-1] == "constexpr"
    import triton.language as tl

    return annotation is tl.constexpr


def _arg_spec(value, mode: str):
    """What Triton specialises on for one argument (see the module docstring and ``_SIGNATURES``)."""
    if mode == "constexpr":
        return value
    if isinstance(value, torch.Tensor):
        return (value.dtype, mode == "value" and value.data_ptr() & 15 == 0)
    if type(value) is int:
        if mode == "type":
            return _INT32_MIN <= value <= _INT32_MAX
        if value == 1:
            return 1
        return (value & 15 == 0, _INT32_MIN <= value <= _INT32_MAX)
    if type(value) is bool or type(value) is float or value is None:
        return type(value)
    if hasattr(value, "block_shape") and hasattr(value, "layout"):
        # A TMA tensor descriptor (Gluon kernels): Triton specialises on its dtype, box and shared layout.
        return ("tensordesc", value.base.dtype, tuple(value.block_shape), repr(value.layout))
    raise TypeError(f"kvflash launch: unexpected argument type {type(value).__name__} (a bug in a launcher)")


def launch_key(kernel, kwargs: dict) -> tuple:
    """The specialisation key of ``kernel[grid](**kwargs)``: ``(kernel name, options, per-parameter spec)``.

    Two launches with the same key run the same compiled binary; a launch with a new key compiles (on a GPU).
    Equal to :func:`launch_key_reference` (the plain loop it is generated from; a test compares the two).
    """
    return _key_and_args(kernel, kwargs)[0]


def _key_and_args(kernel, kwargs: dict) -> tuple[tuple, tuple]:
    """``(launch_key, the parameters' values in signature order)`` in one pass over ``kwargs``."""
    fn = _KEY_FUNCTIONS.get(id(kernel))
    if fn is None:
        fn = _KEY_FUNCTIONS[id(kernel)] = _key_function(kernel)
    try:
        return fn(kwargs)
    except KeyError as exc:  # every parameter is passed by keyword at kvflash's launch sites
        raise TypeError(f"kvflash launch of {_signature(kernel)[0]}: parameter {exc.args[0]} not passed") from None


def launch_key_reference(kernel, kwargs: dict) -> tuple:
    """:func:`launch_key` computed by a loop over the parameters (readable, slower: about 10 µs for 66)."""
    name, names, modes = _signature(kernel)
    specs = tuple([_arg_spec(kwargs[n], m) for n, m in zip(names, modes)])
    return (name, tuple(kwargs.get(o) for o in _OPTION_NAMES), specs)


def _key_function(kernel):
    """Generate ``key(kwargs) -> (launch key, parameter values in order)`` for one kernel: the loop of
    :func:`launch_key_reference` unrolled, with the common cases (a plain tensor, a Python int) inlined, so a
    launch pays a few µs instead of a function call per parameter. Built once per kernel from its signature."""
    name, names, modes = _signature(kernel)
    lines, specs = [], []
    for i, (n, mode) in enumerate(zip(names, modes)):
        lines.append(f"    v{i} = kw[{n!r}]")
        if mode == "constexpr":
            specs.append(f"v{i}")
        elif mode == "value":
            specs.append(
                f"((v{i}.dtype, v{i}.data_ptr() & 15 == 0) if type(v{i}) is Tensor else "
                f"(v{i} if v{i} == 1 else (v{i} & 15 == 0, {_INT32_MIN} <= v{i} <= {_INT32_MAX})) "
                f"if type(v{i}) is int else spec(v{i}, 'value'))"
            )
        else:
            specs.append(f"spec(v{i}, {mode!r})")
    options = ", ".join(f"kw.get({o!r})" for o in _OPTION_NAMES)
    values = ", ".join(f"v{i}" for i in range(len(names)))
    key = f"({name!r}, ({options},), ({', '.join(specs)},))"
    source = "def key(kw):\n" + "\n".join(lines) + f"\n    return {key}, ({values},)\n"
    namespace = {"Tensor": torch.Tensor, "spec": _arg_spec}
    exec(compile(source, f"<kvflash launch key of {name}>", "exec"), namespace)
    return namespace["key"]


def describe_key(key: tuple) -> dict:
    """A readable ``{parameter: spec}`` form of a :func:`launch_key` (for test failure messages)."""
    name, options, specs = key
    for kname, names, _ in _SIGNATURES.values():
        if kname == name:
            return {"kernel": name, **dict(zip(_OPTION_NAMES, options)), **dict(zip(names, specs))}
    return {"kernel": name, "options": options, "specs": specs}


@contextlib.contextmanager
def record_launches() -> Iterator[set]:
    """Collect the :func:`launch_key` of every kvflash launch inside the block into the yielded set."""
    keys: set = set()
    _RECORDERS.append(keys)
    try:
        yield keys
    finally:
        _RECORDERS.remove(keys)


@contextlib.contextmanager
def dry_run() -> Iterator[None]:
    """Inside the block, :func:`launch` records keys (into every active :func:`record_launches` set) and launches
    nothing. Outputs of kvflash calls made inside are left unwritten."""
    _DRY_RUN.append(True)
    try:
        yield
    finally:
        _DRY_RUN.pop()


@contextlib.contextmanager
def compile_only() -> Iterator[None]:
    """Inside the block, GPU launches compile their kernel (Triton's ``kernel.warmup``) and launch nothing; under
    Triton's asynchronous compile mode the compilations run in its executor, in parallel. The warm-up uses it to
    compile many variants at once before running them. Interpreted kernels are launched as usual."""
    _COMPILE_ONLY.append(True)
    try:
        yield
    finally:
        _COMPILE_ONLY.pop()


@contextlib.contextmanager
def observe_launches(observer) -> Iterator[None]:
    """Inside the block, ``observer(compiled, grid, values)`` follows every GPU launch: the compiled kernel Triton
    ran (``None`` where this Triton returns none), the grid, and every parameter's value in signature order."""
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


def bookkeeping_active() -> bool:
    """A launch-recording, dry-run or compile-only block is open (launches must go through :func:`launch`)."""
    return bool(_RECORDERS or _DRY_RUN or _COMPILE_ONLY)


def hooks_installed() -> bool:
    """Triton's launch enter or exit hook is set (a profiler wants every launch's metadata)."""
    knobs = _knobs()
    if knobs is None:
        return False
    return _hook_set(knobs.runtime.launch_enter_hook) or _hook_set(knobs.runtime.launch_exit_hook)


@functools.cache
def fast_launch_enabled() -> bool:
    """The cheap relaunch is allowed: not switched off by ``KVFLASH_FAST_LAUNCH=0``, not in validate mode, and
    Triton has the knobs the relaunch reads hooks from. Read once (``fast_launch_enabled.cache_clear()`` re-reads)."""
    if os.environ.get(FAST_LAUNCH_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return not validation_enabled() and _knobs() is not None


@functools.cache
def _knobs():
    try:
        from triton import knobs
    except ImportError:  # Triton < 3.4: the generic launch only
        return None
    return knobs


def _hook_set(hook) -> bool:
    """A launch hook is installed: a callable (Triton 3.4-3.6) or a non-empty ``HookChain`` (later releases)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def launch(kernel, grid: tuple[int, ...], interpreter: bool, **kwargs) -> None:
    """``kernel[grid](**kwargs)``, through the kept compiled kernel when that is safe (module docstring).

    Parameters
    ----------
    kernel : triton.runtime.JITFunction
        A ``@triton.jit`` kernel (an interpreted one under ``TRITON_INTERPRET=1``).
    grid : tuple of int
        1 to 3 program counts.
    interpreter : bool
        The Triton interpreter is on (the caller has read it for its own launch settings already).
    **kwargs
        Every kernel parameter by name, plus launch options (``num_warps``, ``num_stages``).
    """
    fast = not interpreter and fast_launch_enabled()
    if not (fast or _RECORDERS or _DRY_RUN or _COMPILE_ONLY or (not interpreter and validation_enabled())):
        kernel[grid](**kwargs)
        return
    key, values = _key_and_args(kernel, kwargs)
    for keys in _RECORDERS:
        keys.add(key)
    if _DRY_RUN:
        return
    if _COMPILE_ONLY and not interpreter:
        kernel.warmup(grid=grid, **kwargs)
        return
    if interpreter:
        kernel[grid](**kwargs)
        for observer in _OBSERVERS:
            observer(None, grid, values)  # nothing compiled: no plan can replay this launch
        return
    device = platform.current_device_index()
    slot = (device, key)
    if fast:
        kept = _COMPILED.get(slot)
        if kept is not None and not hooks_installed():
            g = (tuple(grid) + (1, 1))[:3]
            # What Triton's CompiledKernel[grid](*args) does: the C launcher, every parameter in signature order
            # (constexprs included; the launcher skips them), no launch metadata (no hooks are installed).
            kept.run(
                g[0], g[1], g[2], platform.current_stream_handle(device), kept.function, kept.packed_metadata,
                None, None, None, *values,
            )  # fmt: skip
            for observer in _OBSERVERS:
                observer(kept, grid, values)
            return
    compiled = kernel[grid](**kwargs)
    if compiled is None or not hasattr(compiled, "packed_metadata") or not hasattr(compiled, "function"):
        for observer in _OBSERVERS:
            observer(None, grid, values)
        return  # a Triton whose launch returns no compiled kernel: the generic path every time
    kept = _COMPILED.get(slot)
    if kept is None:
        _COMPILED[slot] = compiled
    elif kept is not compiled:
        # Validate mode re-launches through Triton: a different binary for one key means the key misses
        # something Triton specialises on, and the cheap relaunch would run the wrong binary.
        raise RuntimeError(
            f"kvflash launch key of {key[0]} maps to two compiled kernels; set {FAST_LAUNCH_ENV}=0 and report this"
        )
    for observer in _OBSERVERS:
        observer(compiled, grid, values)


class CompileCount:
    """What :func:`count_compilations` yields: ``count`` is the number of kernels Triton compiled (or loaded from
    its disk cache) so far in the block, or ``None`` where Triton has no compile hook or under the interpreter."""

    def __init__(self, count: int | None):
        self.count = count


@contextlib.contextmanager
def count_compilations() -> Iterator[CompileCount]:
    """Count Triton's compilations inside the block through its own ``knobs.runtime.jit_post_compile_hook``
    (called once per binary added to a kernel's in-memory cache), keeping any hook already installed."""
    knobs = _knobs()
    if knobs is None or platform.interpreter_enabled() or not hasattr(knobs.runtime, "jit_post_compile_hook"):
        yield CompileCount(None)
        return
    result = CompileCount(0)
    previous = knobs.runtime.jit_post_compile_hook

    def hook(*args, **kwargs):
        result.count += 1
        return previous(*args, **kwargs) if previous is not None else None

    knobs.runtime.jit_post_compile_hook = hook
    try:
        yield result
    finally:
        knobs.runtime.jit_post_compile_hook = previous

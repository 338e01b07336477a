"""The replay of a call plan: one straight-line Python function, generated when the plan is built.

Every layer of every step replays a plan, so a replay should cost nothing beyond the allocations and the launcher
calls it must make. Walking a plan's launches and pointer slots in a loop (copy an argument template, patch each
slot, unpack the launcher's arguments) cost about 3 µs of a two-launch replay; :func:`replay_function` writes the
same work out once as a function body instead: the allocations, one ``data_ptr()`` per allocated buffer, and one
launcher call per launch with every argument in place. Constants are literals (ints, bools, ``None``), names
bound when the function is made, or, four or more in a row, one bound tuple unpacked; pointers are ``address +
offset`` over the argument addresses the call facts already read (:func:`kvflash.attn_common.call_plan.call_facts`).

For a split decode the generated function reads like::

    def replay(tensors, pointers):
        b0 = empty_like(tensors[0])
        workspace = workspace_like.new_empty(1212416)
        w = workspace.data_ptr()
        stream = stream_handle(0)
        c5(64, 4, 1, stream, *k6, pointers[0], pointers[1], pointers[2], ..., w + 1024, w + 263168, *k7)
        c8(8, 32, 1, stream, *k9, w + 1024, w + 263168, w + 263168, w + 263168, p0, w, *k10)
        return b0
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from kvflash.attn_common import platform

__all__ = ["ARGUMENT", "BUFFER", "WORKSPACE", "Pointer", "TmaDescriptor", "Launch", "Allocation", "replay_function"]

# Where a pointer points: into the call's tensor argument ``index``, its returned buffer ``index``, or the workspace.
ARGUMENT, BUFFER, WORKSPACE = "argument", "buffer", "workspace"


class Pointer(NamedTuple):
    """A launch argument that is an address: ``offset`` bytes into ``kind`` number ``index``."""

    kind: str
    index: int
    offset: int


class TmaDescriptor(NamedTuple):
    """A host TMA tensor-descriptor argument (Gluon kernels) over the address ``pointer``: remade at every replay
    with that call's address; its shape, strides and padding follow from the call facts."""

    pointer: Pointer
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str


class _Address:
    """The base of a remade descriptor: Triton's launcher reads only its ``data_ptr()``."""

    __slots__ = ("address",)

    def __init__(self, address: int):
        self.address = address

    def data_ptr(self) -> int:
        return self.address


class _Descriptor(NamedTuple):
    """What Triton's launcher reads of a host tensor descriptor (``base.data_ptr()``, shape, strides, padding)."""

    base: _Address
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str


def _descriptor(address: int, facts: tuple) -> _Descriptor:
    return _Descriptor(_Address(address), *facts)


class Launch(NamedTuple):
    """One launcher call: ``launcher(*grid, stream, *leading, *values)``, a :class:`Pointer` in ``values`` for each
    address."""

    launcher: Callable
    grid: tuple[int, int, int]
    leading: tuple
    values: list


class Allocation(NamedTuple):
    """A buffer the call returns: ``torch.empty_like`` of tensor argument ``like``, else a contiguous tensor of
    ``shape`` and ``dtype``."""

    like: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype


class _Code(str):
    """A launcher argument written as an expression (the stream, a pointer), not a constant."""


# Runs of at least this many constant launcher arguments are passed as one bound tuple (``*k12``): pushing ~90
# arguments one by one cost about 1.1 µs a launch, the same call with its constant runs unpacked about 0.7 µs.
_CONSTANT_RUN = 4


def _spelled(arguments: list, constant: Callable[[object], str], namespace: dict) -> list[str]:
    """The source of each launcher argument, runs of :data:`_CONSTANT_RUN` or more constants as one ``*name``."""
    spelled, run = [], []

    def flush():
        if len(run) >= _CONSTANT_RUN:
            bound = f"k{len(namespace)}"
            namespace[bound] = tuple(run)
            spelled.append(f"*{bound}")
        else:
            spelled.extend(map(constant, run))
        run.clear()

    for argument in arguments:
        if type(argument) is _Code:
            flush()
            spelled.append(argument)
        else:
            run.append(argument)
    flush()
    return spelled


def replay_function(
    name: str,
    allocations: list[Allocation],
    workspace_bytes: int,
    device: torch.device,
    device_index: int,
    launches: list[Launch],
    outputs: tuple[tuple[bool, int], ...] | None,
    as_tuple: bool,
) -> Callable[[list[torch.Tensor], list[int]], object]:
    """``replay(tensors, pointers)``: allocate, launch, return the call's result, for a call's tensor arguments and
    their addresses.

    Parameters
    ----------
    name : str
        The planned function's name (the generated code's file name in tracebacks).
    allocations : list of Allocation
        The buffers the call returns, in order (``BUFFER`` pointers and ``outputs`` index them).
    workspace_bytes : int
        Bytes of the one workspace allocation that holds every other buffer (0: none).
    device : torch.device
        Where the buffers are allocated.
    device_index : int
        The GPU whose current stream the launches go to.
    launches : list of Launch
        In order.
    outputs : tuple of (bool, int), optional
        What the call returns: ``(True, j)`` buffer ``j``, ``(False, i)`` tensor argument ``i``; ``None``: ``None``.
    as_tuple : bool
        The call returns a tuple (else its only output).
    """
    namespace = {
        "empty_like": torch.empty_like,
        "empty_strided": torch.empty_strided,
        "device": device,
        "stream_handle": platform.current_stream_handle,
        "descriptor": _descriptor,
    }

    def constant(value) -> str:
        if value is None or type(value) is bool or type(value) is int:
            return repr(value)
        bound = f"c{len(namespace)}"
        namespace[bound] = value
        return bound

    bases = {ARGUMENT: "pointers[{}]", BUFFER: "p{}", WORKSPACE: "w"}

    def address(pointer: Pointer) -> str:
        base = bases[pointer.kind].format(pointer.index)
        if pointer.offset == 0:
            return base
        return f"{base} {'+' if pointer.offset > 0 else '-'} {abs(pointer.offset)}"

    lines = []
    for n, (like, shape, dtype) in enumerate(allocations):
        if like is not None:
            lines.append(f"b{n} = empty_like(tensors[{like}])")
        else:  # contiguous strides spelled out: about 0.5 µs less than torch.empty(shape, ...)
            strides = tuple(torch.empty(shape, device="meta").stride())
            lines.append(f"b{n} = empty_strided({shape!r}, {strides!r}, dtype={constant(dtype)}, device=device)")
    if workspace_bytes:
        # new_empty(bytes) of a zero-size uint8 tensor on the device (it holds no memory): about 0.25 µs less
        # argument parsing than torch.empty(bytes, dtype=..., device=...). A local: alive to the end of the call
        # (later work on the stream reuses it only after these kernels).
        namespace["workspace_like"] = torch.empty(0, dtype=torch.uint8, device=device)
        lines.append(f"workspace = workspace_like.new_empty({workspace_bytes})")
    pointers = [v.pointer if type(v) is TmaDescriptor else v for launch in launches for v in launch.values]
    used = {(v.kind, v.index) for v in pointers if type(v) is Pointer}
    lines += [f"p{n} = b{n}.data_ptr()" for n in range(len(allocations)) if (BUFFER, n) in used]
    if (WORKSPACE, 0) in used:
        lines.append("w = workspace.data_ptr()")
    lines.append(f"stream = stream_handle({device_index})")
    for launch in launches:
        # Triton's launcher takes an int as a device pointer as it is (no pointer-attribute query).
        arguments = [*launch.grid, _Code("stream"), *launch.leading]
        for v in launch.values:
            if type(v) is Pointer:
                arguments.append(_Code(address(v)))
            elif type(v) is TmaDescriptor:
                facts = constant((v.shape, v.strides, v.padding))
                arguments.append(_Code(f"descriptor({address(v.pointer)}, {facts})"))
            else:
                arguments.append(v)
        lines.append(f"{constant(launch.launcher)}({', '.join(_spelled(arguments, constant, namespace))})")
    if outputs is None:
        lines.append("return None")
    else:
        results = [f"b{index}" if is_buffer else f"tensors[{index}]" for is_buffer, index in outputs]
        lines.append(f"return ({', '.join(results)},)" if as_tuple else f"return {results[0]}")
    source = "def replay(tensors, pointers):\n" + "".join(f"    {line}\n" for line in lines)
    exec(_compiled(source, name), namespace)
    return namespace["replay"]


@functools.lru_cache(maxsize=1024)
def _compiled(source: str, name: str):
    """The code object of a replay's source. Compiling costs about 120 µs, running the definition under 1 µs:
    a plan miss whose launches read the same as an earlier plan's (a new ``max_seqlen_k`` that chose the same
    launch settings: every decode step) reuses the code with its own bound constants."""
    return compile(source, f"<kvflash call plan of {name}>", "exec")

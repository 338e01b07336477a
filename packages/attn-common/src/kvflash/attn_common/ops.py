"""Registration of kvflash's custom ops with the cheapest dispatch that keeps ``torch.compile`` and CUDA graphs.

``@torch.library.custom_op`` wraps an op in Python layers (autograd function, ADInplaceOrView, argument default
filling) that cost over 100 µs per eager call; an inference kernel needs none of them. :func:`define_op` instead
defines the schema (inferred from the implementation's annotations, so the signature lives in one place),
registers the implementation once for every backend (``CompositeExplicitAutograd``: CPU, CUDA, XPU) and the fake
implementation for tracing. The eager call is then one C++ dispatch into the Python implementation, and
``torch.compile`` sees a mutable op with a schema and a fake kernel, like any other.

The ops run no autograd: their outputs have no gradient (these are inference kernels; a call on tensors that
require grad warns through PyTorch's autograd fallback rather than computing a wrong gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["define_op", "NAMESPACE"]

NAMESPACE = "kvflash"
# One fragment of the namespace for every kvflash package (each package defines its own ops in it). The Library
# object must stay alive: registrations are removed when it is collected.
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def define_op(name: str, impl: Callable, fake: Callable, *, mutates_args: Sequence[str]) -> torch._ops.OpOverload:
    """Define ``torch.ops.kvflash.<name>`` from ``impl`` and return its default overload.

    Parameters
    ----------
    name : str
        The op name inside the ``kvflash`` namespace.
    impl : callable
        The eager implementation; its type annotations give the schema (``torch.library.infer_schema``).
    fake : callable
        The fake (meta) implementation used by ``torch.compile`` and ``opcheck``: same arguments, returns
        outputs of the right shapes on the inputs' device.
    mutates_args : sequence of str
        Arguments written in place (declared as ``Tensor(a!)`` in the schema).

    Returns
    -------
    torch._ops.OpOverload
        ``torch.ops.kvflash.<name>.default``; calling it dispatches straight to ``impl`` (eager) or is traced.
    """
    schema = torch.library.infer_schema(impl, mutates_args=tuple(mutates_args))
    _LIB.define(name + schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    return getattr(getattr(torch.ops, NAMESPACE), name).default

"""kvflash as a vLLM attention backend, selected with ``--attention-backend CUSTOM``.

:func:`register` (also the ``vllm.general_plugins`` entry point ``kvflash``, which vLLM calls in every process
it starts) points vLLM's ``AttentionBackendEnum.CUSTOM`` at
:class:`kvflash.integrations.vllm.backend.KvflashAttentionBackend`. This package imports vLLM only when a
backend class is asked for, so ``import kvflash.integrations.vllm`` works without vLLM; the classes then raise
an ``ImportError`` naming vllm.
"""

from __future__ import annotations

__all__ = ["register", "BACKEND_PATH", "KvflashAttentionBackend", "KvflashAttentionImpl", "KvflashMetadataBuilder"]

BACKEND_PATH = "kvflash.integrations.vllm.backend.KvflashAttentionBackend"
_LAZY = ("KvflashAttentionBackend", "KvflashAttentionImpl", "KvflashMetadataBuilder")


def _missing_vllm(error: ImportError) -> ImportError:
    return ImportError(f"kvflash.integrations.vllm needs vllm (pip install 'kvflash[vllm]'): {error}")


def register() -> None:
    """Register kvflash as vLLM's ``CUSTOM`` attention backend (idempotent)."""
    try:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    except ImportError as error:
        raise _missing_vllm(error) from error
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)


def __getattr__(name: str):
    if name in _LAZY:
        try:
            from kvflash.integrations.vllm import backend
        except ModuleNotFoundError as error:
            if not (error.name or "").split(".")[0] == "vllm":
                raise  # something else is missing: do not blame vLLM
            raise _missing_vllm(error) from error
        return getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""``kv_cache_dtype`` strings as engines spell them, and what each one stores.

``"auto"`` stores the model's (the key's) dtype; ``"fp8"`` and ``"fp8_e4m3"`` store ``float8_e4m3fn``
(``float8_e4m3fnuz`` on the AMD targets whose FP8 hardware format it is); ``"fp8_e5m2"`` stores
``float8_e5m2``. A cache is written and read as the same format: an FP8 cache whose dtype disagrees with
the string is an error, never a silent reinterpretation of its bytes.

``"fp8_e4m3_per_token_head"`` / ``"fp8_e5m2_per_token_head"`` store the same formats with one dynamic scale per
stored (token, KV head): the cache writer computes it (``amax / fp8_max``) and writes it into float32
``k_scale`` / ``v_scale`` tensors ``[num_blocks, block_size, Hkv]`` beside the quantised values; the attention
kernels read those tensors as per-token-head ``k_descale`` / ``v_descale``.
"""

from __future__ import annotations

import torch

from kvflash.attn_common import MODEL_TORCH_DTYPES, platform

__all__ = [
    "KV_CACHE_DTYPES",
    "PER_TOKEN_HEAD_KV_CACHE_DTYPES",
    "kv_cache_torch_dtype",
    "check_kv_cache_dtype",
    "is_per_token_head",
    "resolve_cache_storage_dtype",
]

PER_TOKEN_HEAD_SUFFIX = "_per_token_head"
PER_TOKEN_HEAD_KV_CACHE_DTYPES = ("fp8_e4m3_per_token_head", "fp8_e5m2_per_token_head")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2") + PER_TOKEN_HEAD_KV_CACHE_DTYPES

_E4M3_STRINGS = ("fp8", "fp8_e4m3")
_E4M3_FAMILY = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def check_kv_cache_dtype(kv_cache_dtype: object) -> str:
    """Return ``kv_cache_dtype`` if it is one of :data:`KV_CACHE_DTYPES`; ``ValueError`` listing them if not."""
    if not isinstance(kv_cache_dtype, str) or kv_cache_dtype not in KV_CACHE_DTYPES:
        valid = ", ".join(repr(s) for s in KV_CACHE_DTYPES)
        raise ValueError(f"kv_cache_dtype: expected one of {valid}, got {kv_cache_dtype!r}")
    return kv_cache_dtype


def is_per_token_head(kv_cache_dtype: str) -> bool:
    """Whether a (checked) ``kv_cache_dtype`` names per-token-head dynamic scales."""
    return kv_cache_dtype in PER_TOKEN_HEAD_KV_CACHE_DTYPES


def _storage_string(kv_cache_dtype: str) -> str:
    """The format part of a checked string: ``"fp8_e4m3_per_token_head"`` -> ``"fp8_e4m3"``."""
    return kv_cache_dtype.removesuffix(PER_TOKEN_HEAD_SUFFIX)


def _e4m3_torch_dtype() -> torch.dtype:
    return torch.float8_e4m3fnuz if platform.prefers_fp8_e4m3fnuz() else torch.float8_e4m3fn


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype a KV cache allocated for ``kv_cache_dtype`` should have.

    Parameters
    ----------
    kv_cache_dtype : str
        One of :data:`KV_CACHE_DTYPES`.
    model_dtype : torch.dtype
        float16, bfloat16 or float32: the dtype of the keys and values; what ``"auto"`` stands for.

    Returns
    -------
    torch.dtype
        ``model_dtype`` for ``"auto"``, ``float8_e4m3fn`` (``float8_e4m3fnuz`` on gfx94x) for ``"fp8"``,
        ``"fp8_e4m3"`` and ``"fp8_e4m3_per_token_head"``, ``float8_e5m2`` for ``"fp8_e5m2"`` and
        ``"fp8_e5m2_per_token_head"``.
    """
    kv_cache_dtype = _storage_string(check_kv_cache_dtype(kv_cache_dtype))
    if model_dtype not in MODEL_TORCH_DTYPES:
        raise TypeError(f"model_dtype: expected torch.float16, torch.bfloat16 or torch.float32, got {model_dtype}")
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in _E4M3_STRINGS:
        return _e4m3_torch_dtype()
    return torch.float8_e5m2


def resolve_cache_storage_dtype(kv_cache_dtype: str, cache_dtype: torch.dtype, input_dtype: torch.dtype) -> torch.dtype:
    """The element type the cache's bytes hold, checked against the cache tensor's dtype.

    A ``uint8`` cache takes its format from the string alone; an FP8 cache must be of the string's
    format (either e4m3 variant for ``"fp8"`` / ``"fp8_e4m3"``); an ``"auto"`` cache must have the
    input's dtype. Anything else is a ``ValueError`` naming ``key_cache`` and ``kv_cache_dtype``. A
    ``*_per_token_head`` string stores the format it names.
    """
    kv_cache_dtype = _storage_string(check_kv_cache_dtype(kv_cache_dtype))
    if kv_cache_dtype == "auto":
        if cache_dtype != input_dtype:
            raise ValueError(
                f"key_cache: kv_cache_dtype='auto' stores key's dtype {input_dtype}, got a cache of dtype "
                f"{cache_dtype} (pass 'fp8', 'fp8_e4m3' or 'fp8_e5m2' for an FP8 cache)"
            )
        return cache_dtype
    if cache_dtype == torch.uint8:
        return kv_cache_torch_dtype(kv_cache_dtype, input_dtype)
    accepted = _E4M3_FAMILY if kv_cache_dtype in _E4M3_STRINGS else (torch.float8_e5m2,)
    if cache_dtype not in accepted:
        names = " or ".join(str(d) for d in accepted + (torch.uint8,))
        raise ValueError(
            f"key_cache: kv_cache_dtype={kv_cache_dtype!r} stores {names}, got a cache of dtype {cache_dtype}; "
            "the cache would be written in one format and read in another"
        )
    return cache_dtype

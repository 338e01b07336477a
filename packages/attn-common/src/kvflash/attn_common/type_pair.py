"""The Q/KV type pair: which (query dtype, KV-cache dtype) combinations a kernel accepts.

It is built once from the tensors, validates them together, and every later decision (dequantise K/V
tiles or not, output dtype) reads from it instead of re-inspecting dtypes.
"""

from __future__ import annotations

import dataclasses

import torch

from kvflash.attn_common.dtypes import ATTENTION_QUERY_DTYPES, FP8_QUERY_DTYPE, KVFlashDType

__all__ = ["QKVTypePair"]


@dataclasses.dataclass(frozen=True)
class QKVTypePair:
    """A validated (q, kv) element-type pair.

    Attributes
    ----------
    q_dtype : KVFlashDType
        fp16 or bf16; or float8_e4m3fn over an FP8 cache (an fp8 query, real value ``q * q_descale``).
    kv_dtype : KVFlashDType
        K and V share it: ``q_dtype`` itself, or one of the FP8 formats.
    """

    q_dtype: KVFlashDType
    kv_dtype: KVFlashDType

    @property
    def kv_is_fp8(self) -> bool:
        """True when the cache is stored in FP8 and tiles must be dequantised after loading."""
        return self.kv_dtype.is_fp8

    @property
    def q_is_fp8(self) -> bool:
        """True for an fp8 query: the prefill QK dot then runs on fp8 tensor cores."""
        return self.q_dtype.is_fp8

    @classmethod
    def from_dtypes(cls, q_dtype: torch.dtype, k_dtype: torch.dtype, v_dtype: torch.dtype) -> QKVTypePair:
        """Validate a dtype triple; ``TypeError`` naming the dtypes on an invalid combination."""
        # A pure function of three dtypes, met at every call: valid pairs are kept (errors are raised every time).
        found = _VALID_PAIRS.get((q_dtype, k_dtype, v_dtype))
        if found is not None:
            return found
        found = _VALID_PAIRS[(q_dtype, k_dtype, v_dtype)] = cls._validate(q_dtype, k_dtype, v_dtype)
        return found

    @classmethod
    def _validate(cls, q_dtype: torch.dtype, k_dtype: torch.dtype, v_dtype: torch.dtype) -> QKVTypePair:
        if q_dtype not in ATTENTION_QUERY_DTYPES:
            raise TypeError(f"q: expected dtype float16, bfloat16 or float8_e4m3fn, got {q_dtype}")
        if k_dtype != v_dtype:
            raise TypeError(f"k and v must share one dtype, got k {k_dtype} and v {v_dtype}")
        kv = KVFlashDType.from_torch(k_dtype, "k")
        if q_dtype == FP8_QUERY_DTYPE:
            if k_dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise TypeError(
                    f"q: a float8_e4m3fn query needs an FP8 KV cache (k/v float8_e4m3fn or float8_e5m2), got k/v "
                    f"{k_dtype}"
                )
            return cls(KVFlashDType.from_torch(q_dtype, "q"), kv)
        if not kv.is_fp8 and k_dtype != q_dtype:
            raise TypeError(
                f"k/v dtype {k_dtype} does not pair with q dtype {q_dtype}: the KV cache must have q's dtype "
                "or be float8_e4m3fn / float8_e5m2"
            )
        return cls(KVFlashDType.from_torch(q_dtype, "q"), kv)

    @classmethod
    def from_tensors(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> QKVTypePair:
        """Validate the dtypes of ``(q, k, v)``."""
        return cls.from_dtypes(q.dtype, k.dtype, v.dtype)


_VALID_PAIRS: dict[tuple[torch.dtype, torch.dtype, torch.dtype], QKVTypePair] = {}

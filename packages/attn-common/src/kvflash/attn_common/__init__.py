"""kvflash.attn_common: what every kvflash kernel package shares.

- :class:`KVFlashDType` and :class:`QKVTypePair`: element types and the (q, kv) pair trait.
- checks (:func:`check_tensor`, :func:`check_kv_cache`, ...): argument validation with named errors.
- :func:`normalize_descale`: ``k_descale`` / ``v_descale`` in every accepted form to ``[num_seqs, Hkv]``.
- :func:`empty_out`, :func:`check_out`: the output a call allocates (fp8 with ``output_scale``) and ``out`` checks.
- :func:`reference_attention`: the plain PyTorch oracle.
- :mod:`kvflash.attn_common.platform`: GPU / interpreter / SM-count probe.
- :mod:`kvflash.attn_common.call_plan`: eager calls with known shapes replay their launches (:func:`planned`);
  :mod:`kvflash.attn_common.plan_replay` writes a plan's replay out as one generated function.
- :func:`validate_index_tensors`: the ``KVFLASH_VALIDATE=1`` debug checks of index values.
- :mod:`kvflash.attn_common.jit_helpers`: shared ``@triton.jit`` functions (imported by kernels only).
"""

from kvflash.attn_common.attention_call import check_attention_call, check_query, num_seqs_from_cu_seqlens_q
from kvflash.attn_common.checks import (
    check_block_size,
    check_bool,
    check_device_type,
    check_gqa,
    check_head_size,
    check_index_tensor,
    check_int,
    check_real,
    check_same_device,
    check_tensor,
)
from kvflash.attn_common.descale import normalize_descale
from kvflash.attn_common.dtypes import (
    ATTENTION_QUERY_DTYPES,
    FP8_QUERY_DTYPE,
    FP8_TORCH_DTYPES,
    MODEL_TORCH_DTYPES,
    OUTPUT_FP8_DTYPE,
    QUERY_TORCH_DTYPES,
    SCALE_TORCH_DTYPES,
    KVFlashDType,
    saturate_to_fp8,
)
from kvflash.attn_common.feature_args import (
    UNBOUNDED_WINDOW,
    check_softcap,
    kernel_window,
    normalize_alibi_slopes,
    normalize_sinks,
    normalize_window,
    resolve_softmax_scale,
)
from kvflash.attn_common.features import AttentionFeatures, normalize_attention_features
from kvflash.attn_common.kv_layout import KVLayout, check_kv_cache
from kvflash.attn_common.output import check_out, empty_out, normalize_output_scale
from kvflash.attn_common.reference import gather_sequence_kv, reference_attention, reference_attention_into
from kvflash.attn_common.type_pair import QKVTypePair
from kvflash.attn_common.validate import validate_index_tensors, validation_enabled

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_QUERY_DTYPES",
    "AttentionFeatures",
    "FP8_QUERY_DTYPE",
    "FP8_TORCH_DTYPES",
    "KVFlashDType",
    "KVLayout",
    "MODEL_TORCH_DTYPES",
    "OUTPUT_FP8_DTYPE",
    "QKVTypePair",
    "QUERY_TORCH_DTYPES",
    "SCALE_TORCH_DTYPES",
    "UNBOUNDED_WINDOW",
    "check_attention_call",
    "check_block_size",
    "check_bool",
    "check_device_type",
    "check_gqa",
    "check_head_size",
    "check_index_tensor",
    "check_int",
    "check_real",
    "check_kv_cache",
    "check_out",
    "check_query",
    "empty_out",
    "check_same_device",
    "check_softcap",
    "check_tensor",
    "gather_sequence_kv",
    "kernel_window",
    "normalize_alibi_slopes",
    "normalize_attention_features",
    "normalize_descale",
    "normalize_output_scale",
    "normalize_sinks",
    "normalize_window",
    "num_seqs_from_cu_seqlens_q",
    "reference_attention",
    "reference_attention_into",
    "resolve_softmax_scale",
    "saturate_to_fp8",
    "validate_index_tensors",
    "validation_enabled",
]

"""The vLLM attention backend classes over kvflash's kernels (imported only where vLLM is installed).

- :class:`KvflashAttentionBackend`: what vLLM asks a backend (name ``CUSTOM``, supported dtypes, KV cache
  dtypes, block sizes, features).
- :class:`KvflashMetadataBuilder`: vLLM's Triton backend metadata builder, reused as is (query offsets,
  sequence lengths, block table, slot mapping are exactly what kvflash needs).
- :class:`KvflashAttentionImpl`: the cache update through :func:`kvflash.fp8_utils.reshape_and_cache_flash`
  and attention through :func:`kvflash.flash_attn_interface.flash_attn_varlen_func`.

vLLM's KV cache for a layer is the logical ``[num_blocks, Hkv, block_size, 2 * D]`` tensor (K and V side by
side in the last dimension). ``transpose(1, 2)`` and a split give kvflash's NHD page views
``[num_blocks, block_size, Hkv, D]`` without a copy, whatever the physical stride order.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionCGSupport, AttentionImpl, AttentionType, MultipleOf
from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadata, TritonAttentionMetadataBuilder

from kvflash.attn_common.checks import HEAD_SIZE_STEP, MAX_HEAD_SIZE, MIN_HEAD_SIZE
from kvflash.flash_attn_interface import flash_attn_varlen_func
from kvflash.fp8_utils import kv_cache_torch_dtype, reshape_and_cache_flash

__all__ = ["KvflashAttentionBackend", "KvflashAttentionImpl", "KvflashMetadataBuilder"]

# vLLM's cache dtype strings kvflash serves, and the writer's string for each.
_KV_CACHE_DTYPES = {
    "auto": "auto",
    "float16": "auto",
    "bfloat16": "auto",
    "fp8": "fp8",
    "fp8_e4m3": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2",
}
# Impl arguments newer vLLM releases pass, and the value that means "feature off".
_OFF_BY_DEFAULT = {"use_alibi_sqrt": False, "chunk_lookback": -1}


class KvflashMetadataBuilder(TritonAttentionMetadataBuilder):
    """vLLM's Triton metadata builder; kvflash reads ``query_start_loc``, ``seq_lens``, ``block_table``,
    ``slot_mapping``, ``max_query_len``, ``max_seq_len`` and ``causal`` from what it builds."""

    # Full CUDA graphs for single-token decode batches only: the decode kernel divides each sequence's keys
    # among its splits at run time, so a graph captured with any max_seq_len stays correct. The prefill
    # kernel's grid follows max_query_len, which a replay could exceed; mixed batches stay piecewise.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE


class KvflashAttentionBackend(AttentionBackend):
    """kvflash's paged (optionally FP8) attention, registered as vLLM's ``CUSTOM`` backend."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(_KV_CACHE_DTYPES)
    # The cache is written by do_kv_cache_update, before forward.
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        # vLLM maps the name back to its enum: the registered slot is CUSTOM.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[KvflashAttentionImpl]:
        return KvflashAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KvflashMetadataBuilder]:
        return KvflashMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        # attn_common's head-size rule (check_head_size), as a bool for vLLM.
        return head_size % HEAD_SIZE_STEP == 0 and MIN_HEAD_SIZE <= head_size <= MAX_HEAD_SIZE

    @classmethod
    def supports_sink(cls) -> bool:
        return True

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_per_head_quant_scales(cls) -> bool:
        return True

    @classmethod
    def supports_non_causal(cls) -> bool:
        return True


def _check_off(extra: dict) -> None:
    for name, value in extra.items():
        if name == "sinks":
            continue
        if name not in _OFF_BY_DEFAULT or value != _OFF_BY_DEFAULT[name]:
            raise NotImplementedError(f"{name}: not supported by the kvflash vLLM backend (got {value!r})")


class KvflashAttentionImpl(AttentionImpl[TritonAttentionMetadata]):
    """Decoder attention over vLLM's paged cache with kvflash's kernels.

    Parameters
    ----------
    num_heads, head_size, scale, num_kv_heads
        Hq, D, the softmax scale and Hkv of the layer.
    alibi_slopes : list of float, optional
        ``[Hq]``.
    sliding_window : int, optional
        A window of ``w`` keys, the query's own included (``window_size = (w - 1, 0)``).
    kv_cache_dtype : str
        ``auto``, ``float16``, ``bfloat16``, ``fp8``, ``fp8_e4m3`` or ``fp8_e5m2``.
    logits_soft_cap : float, optional
        Softcap of the scaled scores.
    attn_type : str
        Decoder only; other types raise ``NotImplementedError``.
    kv_sharing_target_layer_name : str, optional
        With it, the layer reads another layer's cache and writes none.
    sinks : torch.Tensor, optional
        ``[Hq]`` float32 sink logits (keyword, from the layer).
    """

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, **extra_impl_args) -> None:  # fmt: skip
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"attn_type: only decoder attention is supported, got {attn_type!r}")
        if kv_cache_dtype not in _KV_CACHE_DTYPES:
            raise NotImplementedError(
                f"kv_cache_dtype: expected one of {sorted(_KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}"
            )
        _check_off(extra_impl_args)
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.alibi_slopes = None if alibi_slopes is None else torch.tensor(alibi_slopes, dtype=torch.float32)
        self.sliding_window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
        self.kv_cache_dtype = kv_cache_dtype
        self.logits_soft_cap = float(logits_soft_cap or 0.0)
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.sinks = extra_impl_args.get("sinks")

    def _pages(self, kv_cache: torch.Tensor, model_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key_cache, value_cache)`` ``[num_blocks, block_size, Hkv, D]`` views, in the stored format."""
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        storage = kv_cache_torch_dtype(_KV_CACHE_DTYPES[self.kv_cache_dtype], model_dtype)
        if key_cache.dtype != storage:  # vLLM may hand the FP8 cache over as raw bytes
            key_cache, value_cache = key_cache.view(storage), value_cache.view(storage)
        return key_cache, value_cache

    def _descales(self, layer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if _KV_CACHE_DTYPES[self.kv_cache_dtype] == "auto":
            return None, None
        # [1] per tensor or [Hkv] per head: both broadcast to kvflash's [num_seqs, Hkv].
        return layer._k_scale, layer._v_scale

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """Write ``key``/``value`` ``[num_tokens, Hkv, D]`` at ``slot_mapping`` (quantised for FP8 caches)."""
        if self.kv_sharing_target_layer_name is not None:
            return  # the target layer writes the shared cache
        key_cache, value_cache = self._pages(kv_cache, key.dtype)
        num_tokens = slot_mapping.shape[0]  # keys may be padded past the scheduled tokens (CUDA graphs)
        # layer._k_scale / _v_scale: float32 [1] (per tensor) or [Hkv] (per head), on the device.
        reshape_and_cache_flash(key[:num_tokens], value[:num_tokens], key_cache, value_cache, slot_mapping,
                                _KV_CACHE_DTYPES[self.kv_cache_dtype], layer._k_scale, layer._v_scale)  # fmt: skip

    def fused_output_quant_supported(self, quant_key) -> bool:
        """Static per-tensor fp8 output quantisation fuses into the kernels' epilogues (``output_scale``)."""
        from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8StaticTensorSym

        return quant_key == kFp8StaticTensorSym

    def supports_quant_query_input(self) -> bool:
        """Over an FP8 cache the layer may hand the query over in fp8 e4m3 (with its static ``_q_scale``)."""
        return _KV_CACHE_DTYPES[self.kv_cache_dtype] != "auto"

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None) -> torch.Tensor:  # fmt: skip
        """Attention of ``query [num_tokens, Hq, D]`` (the model's dtype, or fp8 e4m3 quantised by the layer with
        ``layer._q_scale``) over the cache into ``output`` (``[num_tokens, Hq, D]``; fp8 e4m3 holding
        ``saturate(attention / output_scale)`` when vLLM fused its static output quantisation)."""
        if output_block_scale is not None:
            raise NotImplementedError("output_block_scale: block-scaled (nvfp4) output quantisation is not supported")
        if attn_metadata is None:  # vLLM's profiling run: no metadata, nothing to attend to
            return output.fill_(0)
        if isinstance(attn_metadata.causal, torch.Tensor):
            raise NotImplementedError("causal: a per-request causal tensor would need a host read; pass a bool")
        if getattr(attn_metadata, "mm_prefix_range_tensor", None) is not None:
            raise NotImplementedError("mm_prefix_range: bidirectional multimodal prefixes are not supported")
        if getattr(attn_metadata, "rswa_prefix_lens", None) is not None:
            raise NotImplementedError("rswa_window: restricted sliding-window prefixes are not supported")
        num_tokens = attn_metadata.num_actual_tokens
        out = output.view(-1, self.num_heads, self.head_size)[:num_tokens]
        query_fp8 = query.dtype == torch.float8_e4m3fn
        key_cache, value_cache = self._pages(kv_cache, torch.float16 if query_fp8 else query.dtype)
        k_descale, v_descale = self._descales(layer)
        if self.alibi_slopes is not None and self.alibi_slopes.device != query.device:
            self.alibi_slopes = self.alibi_slopes.to(query.device)  # once: the layer's device does not change
        flash_attn_varlen_func(
            query[:num_tokens], key_cache, value_cache, attn_metadata.max_query_len, attn_metadata.query_start_loc,
            attn_metadata.max_seq_len, seqused_k=attn_metadata.seq_lens, block_table=attn_metadata.block_table,
            softmax_scale=self.scale, causal=bool(attn_metadata.causal), window_size=self.sliding_window,
            softcap=self.logits_soft_cap, alibi_slopes=self.alibi_slopes, out=out, k_descale=k_descale,
            v_descale=v_descale, s_aux=self.sinks, q_descale=layer._q_scale if query_fp8 else None,
            output_scale=output_scale,
        )  # fmt: skip
        return output

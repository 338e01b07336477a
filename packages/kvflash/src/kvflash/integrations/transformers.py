"""kvflash as a Hugging Face transformers attention implementation.

:func:`register` adds two entries to transformers' ``AttentionInterface``:

- ``"kvflash"``: the attention of ``model.generate`` (a ``DynamicCache`` holds the keys). Batches with left
  padding are handled without unpadding: each row's keys start after its padding (``cu_seqlens_k`` points
  past it, ``seqused_k`` counts the real keys), and bottom-right causal alignment puts every query where it
  belongs; padding queries see no key and give 0.
- ``"paged|kvflash"``: continuous batching (``model.generate_batch``): transformers' paged cache stores the
  keys, kvflash attends over the packed, gathered keys with the varlen kernel.

:func:`register_fp8` adds a paged variant whose cache is stored in FP8 by kvflash's writer
(:func:`kvflash.fp8_utils.reshape_and_cache_flash`) with static K and V scales; attention reads only the FP8
copy. transformers is imported only inside these functions, so importing this module never needs it.

transformers treats every implementation name containing "flash" as a FlashAttention provider and preloads
its ``flash_attn_varlen_func`` / ``flash_attn_with_kvcache`` when the implementation is set; for the names
registered here, :func:`register` makes that preload resolve to :mod:`kvflash.flash_attn` (upstream's
surface) instead of failing. Other names are passed through to transformers untouched.
"""

from __future__ import annotations

import torch

from kvflash.flash_attn import flash_attn_varlen_func
from kvflash.fp8_utils import kv_cache_torch_dtype, reshape_and_cache_flash

__all__ = ["register", "register_fp8", "attention_forward", "paged_attention_forward", "EAGER_NAME", "PAGED_NAME"]

EAGER_NAME = "kvflash"
PAGED_NAME = "paged|kvflash"


def _import_transformers():
    try:
        import transformers  # noqa: F401
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as error:  # tests/kvflash/test_integrations_without_engines.py checks the message
        raise ImportError(
            "kvflash.integrations.transformers needs transformers: pip install 'kvflash[transformers]'"
        ) from error
    return AttentionInterface, AttentionMaskInterface


def _hook_flash_preload(names: set[str]) -> None:
    """Make transformers' FlashAttention preload return kvflash's functions for ``names`` (see module doc)."""
    try:
        from transformers import modeling_flash_attention_utils as fa_utils
    except ImportError:  # releases without this module do not preload, so they need no hook
        return
    original = getattr(fa_utils, "_lazy_imports", None)
    if original is None or getattr(original, "_kvflash_names", None) is not None:
        if original is not None:
            original._kvflash_names.update(names)
        return

    def lazy_imports(implementation, *args, **kwargs):
        base = implementation.split("|", 1)[-1] if implementation else implementation
        if base in lazy_imports._kvflash_names:
            from kvflash.flash_attn import flash_attn_varlen_func as varlen
            from kvflash.flash_attn import flash_attn_with_kvcache as with_kvcache

            # No fixed-length flash_attn_func, and no (un)padding helpers: the registered functions need none.
            return None, varlen, with_kvcache, None, None
        return original(implementation, *args, **kwargs)

    lazy_imports._kvflash_names = set(names)
    fa_utils._lazy_imports = lazy_imports


def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):  # fmt: skip
    """transformers' mask hook for ``"kvflash"``: the 2D padding mask of the keys, or ``None``.

    Unlike FlashAttention's hook it never drops an all-ones mask (that would read the mask on the host);
    the attention below turns it into per-row key offsets on the device.
    """
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:]


def _window(sliding_window: int | None) -> tuple[int, int]:
    # transformers counts the current token in the window: a window of w keys is w - 1 to the left.
    return (-1, -1) if not sliding_window else (sliding_window - 1, 0)


def _check_module(module) -> None:
    config = getattr(module, "config", None)
    if getattr(config, "attention_chunk_size", None):
        raise NotImplementedError("attention_chunk_size: chunked (block-local) attention is not supported by kvflash")


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, is_causal=None, s_aux=None, **kwargs):  # fmt: skip
    """The ``"kvflash"`` attention function (transformers' calling convention).

    Parameters
    ----------
    module : torch.nn.Module
        The attention layer (``is_causal``, ``config`` are read from it).
    query : torch.Tensor
        ``[batch, Hq, seqlen_q, D]`` fp16 or bf16.
    key, value : torch.Tensor
        ``[batch, Hkv, seqlen_k, D]``: the cached keys followed by the new ones (same dtype as ``query``).
    attention_mask : torch.Tensor or None
        ``[batch, seqlen_k]`` bool (from :func:`_padding_mask`): left padding only, checked on the device
        with an asynchronous assertion (no host synchronisation).
    dropout, scaling, sliding_window, softcap, is_causal, s_aux
        As transformers passes them: dropout must be 0; ``scaling`` is the softmax scale; ``s_aux`` sinks ``[Hq]``.

    Returns
    -------
    (torch.Tensor, None)
        ``[batch, seqlen_q, Hq, D]`` and no attention weights.
    """
    if kwargs.get("output_attentions"):
        raise NotImplementedError("output_attentions: kvflash does not materialise attention weights")
    _check_module(module)
    batch, num_q_heads, seqlen_q, head_size = query.shape
    num_kv_heads, seqlen_k = key.shape[1], key.shape[2]
    device = query.device
    q = query.transpose(1, 2).reshape(batch * seqlen_q, num_q_heads, head_size)
    k = key.transpose(1, 2).reshape(batch * seqlen_k, num_kv_heads, head_size)
    v = value.transpose(1, 2).reshape(batch * seqlen_k, num_kv_heads, value.shape[-1])
    rows = torch.arange(batch + 1, dtype=torch.int32, device=device)
    cu_seqlens_q = rows * seqlen_q
    cu_seqlens_k, seqused_k = rows * seqlen_k, None
    if attention_mask is not None:
        if attention_mask.shape != (batch, seqlen_k):
            raise ValueError(
                f"attention_mask: expected a [batch, seqlen_k] = {(batch, seqlen_k)} padding mask, "
                f"got shape {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.to(torch.bool)
        seqused_k = mask.sum(-1, dtype=torch.int32)
        pad = seqlen_k - seqused_k
        left_padded = torch.arange(seqlen_k, device=device)[None, :] >= pad[:, None]
        # Right or inner padding would need unpadding; checked on the device, never read back to the host.
        torch._assert_async((left_padded == mask).all(), "attention_mask: kvflash supports left padding only")
        cu_seqlens_k = cu_seqlens_k + torch.cat([pad, pad.new_zeros(1)])
    causal = module.is_causal if is_causal is None else is_causal
    out = flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, dropout, scaling, bool(causal),
        _window(sliding_window), softcap or 0.0, seqused_k=seqused_k, s_aux=s_aux,
    )  # fmt: skip
    return out.reshape(batch, seqlen_q, num_q_heads, -1), None


class _Fp8PagedStore:
    """An FP8 copy of transformers' paged cache, one ``[num_slots, Hkv, D]`` pair per layer, kept on the cache.

    transformers allocates its cache in the model dtype; kvflash writes the quantised keys here instead and
    attention reads only this copy (the model-dtype cache stays allocated and unused on this path).
    """

    def __init__(self, cache, dtype: torch.dtype):
        self.dtype = dtype
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cache = cache

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self.layers:
            shape = self.cache.cache_shape
            # Zeros: padding tokens read the "read trash" block, which transformers zero-fills too.
            device = self.cache.key_cache[0].device
            self.layers[layer_idx] = (torch.zeros(shape, dtype=self.dtype, device=device),
                                      torch.zeros(shape, dtype=self.dtype, device=device))  # fmt: skip
        return self.layers[layer_idx]


def _gather(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # index_select has no float8 kernels in every torch release; bytes always work.
    return torch.index_select(cache.view(torch.uint8), 0, index).view(cache.dtype)


def _paged_kv(module, key, value, cache, read_index, write_index, fp8):
    """``(k, v)`` ``[total_k, Hkv, D]`` for the batch: through transformers' cache, or kvflash's FP8 copy."""
    if fp8 is None:
        return cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                            read_index=read_index, write_index=write_index)  # fmt: skip
    kv_cache_dtype, k_scale, v_scale = fp8
    if cache.sliding_windows[module.layer_idx] != 1:
        raise NotImplementedError("sliding_window: the FP8 paged cache supports full-attention layers only")
    store = getattr(cache, "_kvflash_fp8", None)
    if store is None:
        store = _Fp8PagedStore(cache, kv_cache_torch_dtype(kv_cache_dtype, key.dtype))
        cache._kvflash_fp8 = store
    group_idx, _ = cache.layer_index_to_group_indices[module.layer_idx]
    k_cache, v_cache = store.layer(module.layer_idx)
    writes = write_index[group_idx].to(torch.int64)
    new_k = key.transpose(1, 2).squeeze(0)
    new_v = value.transpose(1, 2).squeeze(0)
    # Page size 1: a transformers slot index is directly a kvflash slot.
    reshape_and_cache_flash(new_k, new_v, k_cache[:, None], v_cache[:, None], writes, kv_cache_dtype, k_scale, v_scale)
    reads = read_index[group_idx]
    reads = writes if reads.numel() == 0 else reads  # a prefill-only batch reads back exactly what it wrote
    return _gather(k_cache, reads), _gather(v_cache, reads)


def paged_attention_forward(module, query, key, value, attention_mask, cache=None, cu_seq_lens_q=None,
                            cu_seq_lens_k=None, max_seqlen_q=None, max_seqlen_k=None, read_index=None,
                            write_index=None, block_table=None, _kvflash_fp8=None, **kwargs):  # fmt: skip
    """The ``"paged|kvflash"`` attention function (continuous batching).

    ``query [1, Hq, total_q, D]``, ``key``/``value [1, Hkv, total_q, D]`` are the packed new tokens of all
    requests; ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32 ``[num_seqs + 1]``, or dicts per layer type) and
    ``read_index``/``write_index`` come from transformers' batch. Returns ``([total_q, Hq, D], None)``.
    """
    if cache is None:
        raise ValueError("cache: paged|kvflash needs transformers' paged cache (use it through generate_batch)")
    if block_table is not None:
        raise NotImplementedError("block_table: transformers' decode fast path is not wired to kvflash; "
                                  "set max_blocks_per_request=0")  # fmt: skip
    if kwargs.get("output_attentions"):
        raise NotImplementedError("output_attentions: kvflash does not materialise attention weights")
    _check_module(module)
    sliding = getattr(module, "sliding_window", None)
    layer_type = "sliding_attention" if sliding else "full_attention"
    if isinstance(cu_seq_lens_k, dict):
        cu_seq_lens_k, max_seqlen_k = cu_seq_lens_k[layer_type], max_seqlen_k[layer_type]
    k, v = _paged_kv(module, key, value, cache, read_index, write_index, _kvflash_fp8)
    descales = {} if _kvflash_fp8 is None else dict(k_descale=_kvflash_fp8[1], v_descale=_kvflash_fp8[2])
    out = flash_attn_varlen_func(
        query.transpose(1, 2).squeeze(0), k, v, cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32),
        max_seqlen_q, max_seqlen_k, 0.0, module.scaling, True, _window(sliding), s_aux=kwargs.get("s_aux"),
        **descales,
    )  # fmt: skip
    return out, None


def register() -> None:
    """Register ``"kvflash"`` and ``"paged|kvflash"`` in transformers' attention (and mask) interfaces.

    Then ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="kvflash")`` uses kvflash in
    ``generate``, and ``attn_implementation="paged|kvflash"`` in ``generate_batch``. Raises ``ImportError``
    naming transformers when it is not installed.
    """
    attention, masks = _import_transformers()
    attention.register(EAGER_NAME, attention_forward)
    masks.register(EAGER_NAME, _padding_mask)
    attention.register(PAGED_NAME, paged_attention_forward)
    _hook_flash_preload({EAGER_NAME})


def register_fp8(name: str = "paged|kvflash_fp8", kv_cache_dtype: str = "fp8_e4m3",
                 k_scale: float | torch.Tensor = 1.0, v_scale: float | torch.Tensor = 1.0) -> str:  # fmt: skip
    """Register a continuous-batching implementation whose paged cache is FP8, written by kvflash.

    Parameters
    ----------
    name : str
        The ``attn_implementation`` to register; must start with ``"paged|"``.
    kv_cache_dtype : str
        ``"fp8"``, ``"fp8_e4m3"`` or ``"fp8_e5m2"``.
    k_scale, v_scale : float or torch.Tensor
        Static scales for every layer: ``stored = saturate(x / scale)``; a float or a float32 ``[Hkv]`` tensor
        on the model's device.

    Returns
    -------
    str
        ``name``, to pass as ``attn_implementation``.
    """
    if not name.startswith("paged|"):
        raise ValueError(f"name: continuous batching needs a 'paged|' prefix, got {name!r}")
    if kv_cache_dtype not in ("fp8", "fp8_e4m3", "fp8_e5m2"):
        raise ValueError(f"kv_cache_dtype: expected 'fp8', 'fp8_e4m3' or 'fp8_e5m2', got {kv_cache_dtype!r}")
    attention, _ = _import_transformers()
    fp8 = (kv_cache_dtype, k_scale, v_scale)

    def forward(*args, **kwargs):
        return paged_attention_forward(*args, _kvflash_fp8=fp8, **kwargs)

    attention.register(name, forward)
    _hook_flash_preload({name.split("|", 1)[1]})
    return name

"""The argument checks of one attention call, shared by every attention route.

``chunk_prefill_attention``, ``paged_decode_attention`` and ``flash_attn_varlen_func`` take the same query,
KV-cache and feature arguments; :func:`check_attention_call` checks and normalises all of them in one order, so a
bad argument gets the same error on every route. What only one route has (``num_splits``, ``skip_q_len``, ``lse``)
its own public function checks.
"""

from __future__ import annotations

import torch

from kvflash.attn_common.checks import check_bool, check_device_type, check_index_tensor, check_int, check_tensor
from kvflash.attn_common.dtypes import ATTENTION_QUERY_DTYPES
from kvflash.attn_common.features import AttentionFeatures, normalize_attention_features
from kvflash.attn_common.kv_layout import check_kv_cache
from kvflash.attn_common.output import check_out

__all__ = ["check_query", "num_seqs_from_cu_seqlens_q", "check_attention_call"]


def check_query(q: torch.Tensor) -> torch.Tensor:
    """``q [tokens, Hq, D]`` fp16/bf16 (or float8_e4m3fn, paired with an FP8 cache by the KV-cache check) on a
    supported device (checked before anything is compared with it)."""
    check_tensor("q", q, dtypes=ATTENTION_QUERY_DTYPES, ndim=3)
    return check_device_type("q", q)


def num_seqs_from_cu_seqlens_q(q: torch.Tensor, cu_seqlens_q: torch.Tensor) -> int:
    """The sequence count of a varlen call: ``cu_seqlens_q [num_seqs + 1]`` int32 on ``q``'s device, num_seqs >= 1."""
    check_index_tensor("cu_seqlens_q", cu_seqlens_q, shape=(None,), device=q.device)
    if cu_seqlens_q.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens_q: expected at least 2 entries (num_seqs + 1), got shape {tuple(cu_seqlens_q.shape)}"
        )
    return cu_seqlens_q.shape[0] - 1


def check_attention_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_seqs: int,
    *,
    cu_seqlens_q: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_table: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    softmax_scale: float | None,
    causal: bool,
    window_size,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    s_aux: torch.Tensor | None,
    k_descale,
    v_descale,
    output_scale: torch.Tensor | None,
    kv_descale_per_token: bool | None,
    out: torch.Tensor | None,
    out_extra_dtypes: tuple[torch.dtype, ...] = (),
    q_descale: torch.Tensor | float | None = None,
    q_descale_per_token: bool | None = None,
) -> AttentionFeatures:
    """Check every shared argument of an attention call over ``num_seqs`` sequences; return the normalised features.

    ``q`` has passed :func:`check_query` (the caller derived ``num_seqs`` from its route's index tensor). Checks, in
    order: the Python ints and bools, ``cu_seqlens_q`` (``[num_seqs + 1]`` int32, when given), the KV cache and its
    index tensors (:func:`kvflash.attn_common.check_kv_cache`), every feature argument
    (:func:`kvflash.attn_common.normalize_attention_features`, ``q_descale`` and its mode too) and ``out``
    (``q``'s shape; ``q``'s dtype or one of ``out_extra_dtypes``, fp8 e4m3 with ``output_scale``; fp16 or bf16 for
    an fp8 ``q``). Raises ``TypeError`` / ``ValueError`` naming the argument, what was expected and what came. Reads
    no tensor value.
    """
    check_int("max_seqlen_q", max_seqlen_q)
    check_int("max_seqlen_k", max_seqlen_k)
    check_bool("causal", causal)
    if cu_seqlens_q is not None:
        check_index_tensor("cu_seqlens_q", cu_seqlens_q, shape=(num_seqs + 1,), device=q.device)
    layout = check_kv_cache(
        q, k, v, num_seqs, block_table=block_table, seqused_k=seqused_k, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_k=max_seqlen_k,
    )  # fmt: skip
    features = normalize_attention_features(
        q, layout, softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, s_aux=s_aux, k_descale=k_descale, v_descale=v_descale, output_scale=output_scale,
        k=k, kv_descale_per_token=kv_descale_per_token, q_descale=q_descale, q_descale_per_token=q_descale_per_token,
    )  # fmt: skip
    if out is not None:
        check_out(out, q, features.output_scale, extra_dtypes=out_extra_dtypes)
    return features

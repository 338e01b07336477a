"""Builders of random varlen attention problems for the meta-package tests."""

from __future__ import annotations

import dataclasses

import torch

from kvflash.attn_common.testing import encode_fp8, make_paged_kv
from kvflash.flash_attn_interface import flash_attn_varlen_func


@dataclasses.dataclass
class VarlenCase:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    kv_args: dict  # block_table + seqused_k, or cu_seqlens_k
    k_descale: torch.Tensor | None
    v_descale: torch.Tensor | None

    def attend(self, **features):
        """``flash_attn_varlen_func`` on this case (its tensors, lengths, KV layout and descales); ``features``
        add arguments or override the descales."""
        args = dict(self.kv_args, k_descale=self.k_descale, v_descale=self.v_descale)
        args.update(features)
        return flash_attn_varlen_func(
            self.q, self.k, self.v, self.max_seqlen_q, self.cu_seqlens_q, self.max_seqlen_k, **args
        )


def cumulative(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def make_case(
    seq_mix: list[tuple[int, int]],
    *,
    hq: int = 4,
    hkv: int = 2,
    d: int = 64,
    q_dtype: torch.dtype = torch.float16,
    kv_dtype: torch.dtype | None = None,
    block_size: int | None = 16,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> VarlenCase:
    """``seq_mix`` is a list of ``(q_len, kv_len)``; ``block_size=None`` gives the contiguous layout.
    FP8 caches get distinct, non-unit per-(sequence, KV head) K and V descales."""
    g = torch.Generator().manual_seed(seed)
    kv_dtype = kv_dtype or q_dtype
    num_seqs = len(seq_mix)
    fp8 = kv_dtype != q_dtype
    k_scale = (torch.rand(num_seqs, hkv, generator=g) * 0.5 + 0.1) if fp8 else None
    v_scale = (torch.rand(num_seqs, hkv, generator=g) * 2.0 + 1.2) if fp8 else None
    q = torch.randn(sum(m[0] for m in seq_mix), hq, d, generator=g).to(q_dtype)
    ks, vs = [], []
    for s, (_, kv_len) in enumerate(seq_mix):
        k = torch.randn(kv_len, hkv, d, generator=g)
        v = torch.randn(kv_len, hkv, d, generator=g)
        ks.append(encode_fp8(k, k_scale[s], kv_dtype) if fp8 else k.to(kv_dtype))
        vs.append(encode_fp8(v, v_scale[s], kv_dtype) if fp8 else v.to(kv_dtype))
    if block_size is None:
        k_all, v_all = torch.cat(ks).to(device), torch.cat(vs).to(device)
        kv_args = dict(cu_seqlens_k=cumulative([m[1] for m in seq_mix], device))
    else:
        cache = make_paged_kv(ks, vs, block_size, generator=g)
        k_all, v_all = cache.k_cache.to(device), cache.v_cache.to(device)
        kv_args = dict(block_table=cache.block_table.to(device), seqused_k=cache.seqused_k.to(device))
    return VarlenCase(
        q=q.to(device),
        k=k_all,
        v=v_all,
        cu_seqlens_q=cumulative([m[0] for m in seq_mix], device),
        max_seqlen_q=max(m[0] for m in seq_mix),
        max_seqlen_k=max(m[1] for m in seq_mix),
        kv_args=kv_args,
        k_descale=None if k_scale is None else k_scale.to(device),
        v_descale=None if v_scale is None else v_scale.to(device),
    )

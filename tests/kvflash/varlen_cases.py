"""Builders of random varlen attention problems for the meta-package tests."""

from __future__ import annotations

import dataclasses

import torch

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import assert_close_fa_rule, encode_fp8, make_paged_kv
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


# Sequence mixes ((q_len, kv_len) per sequence) that the call-plan tests replay on the GPU and on the CPU stand-in.
LONG_DECODE = [(1, 3000), (1, 1500)]  # split over the keys
SPECULATIVE = [(4, 37), (2, 90), (3, 3), (4, 64)]
MIXED = [(1, 37), (40, 60), (3, 20), (0, 5), (17, 30), (1, 1)]
PREFILL = [(50, 80), (33, 33), (64, 100)]


def check_against_reference(case: VarlenCase, out: torch.Tensor, lse: torch.Tensor, **features) -> None:
    """``out [total_q, Hq, D]`` and ``lse [Hq, total_q]`` of ``case`` under ``features`` against the float64
    reference, by FlashAttention's rule (twice PyTorch's error in the input precision + 2e-3); ``lse`` must be
    ``-inf`` exactly where no key is visible."""
    kwargs = dict(case.kv_args, k_descale=case.k_descale, v_descale=case.v_descale, **features)
    exact, exact_lse = reference_attention(
        case.q, case.k, case.v, case.cu_seqlens_q, compute_dtype=torch.float64, **kwargs
    )
    lowp, _ = reference_attention(case.q, case.k, case.v, case.cu_seqlens_q, compute_dtype=case.q.dtype, **kwargs)
    assert_close_fa_rule(out, exact, lowp, atol=2e-3)
    finite = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly where no key is visible"
    torch.testing.assert_close(lse[finite].double(), exact_lse[finite], rtol=0, atol=2e-3)


def replay_matches_eager(step, load_new_state, attention, out: torch.Tensor, lse: torch.Tensor, seeds=(1, 2, 3)):
    """Capture ``step()`` (which writes ``out`` and ``lse``) in a CUDA graph after one warm-up outside the capture
    (kernels compile there), then for each seed: ``load_new_state(seed)`` refills the captured inputs in place,
    the graph replays over NaN-poisoned ``out``, and the result must equal an eager ``attention()`` bit for bit."""
    load_new_state(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in seeds:
        load_new_state(seed)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want, want_lse = attention()  # eager, with the new state
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


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

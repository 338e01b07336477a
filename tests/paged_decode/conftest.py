"""Shared case builder for the paged-decode tests: random caches, the kernel call with a poisoned output,
and the comparison against ``reference_attention`` under FlashAttention's tolerance rule."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import assert_close_fa_rule, encode_fp8, make_paged_kv, poison
from kvflash.paged_decode import paged_decode_attention


@dataclasses.dataclass
class DecodeCase:
    """Inputs of one decode call (``kwargs`` go to both the kernel and the reference)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    max_seqlen_k: int
    kwargs: dict


def build_case(
    device: torch.device,
    lens: list[int],
    *,
    num_q_heads: int = 4,
    num_kv_heads: int = 2,
    head_size: int = 64,
    block_size: int = 16,
    q_dtype: torch.dtype = torch.float16,
    kv_dtype: torch.dtype | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    contiguous: bool = False,
    joint_layout: bool = False,
    seed: int = 0,
) -> DecodeCase:
    """Random q/K/V for sequences of ``lens`` keys; FP8 caches are encoded with the given descales
    (``[Hkv]`` or ``[num_seqs, Hkv]``) so that ``stored * descale`` approximates the drawn values."""
    gen = torch.Generator().manual_seed(seed)
    kv_dtype = kv_dtype or q_dtype
    q = torch.randn(len(lens), num_q_heads, head_size, generator=gen).to(q_dtype).to(device)
    k_seqs, v_seqs = [], []
    for s, n in enumerate(lens):
        ks = torch.randn(n, num_kv_heads, head_size, generator=gen)
        vs = torch.randn(n, num_kv_heads, head_size, generator=gen)
        if kv_dtype != q_dtype:
            ks = encode_fp8(ks, _row(k_descale, s).cpu(), kv_dtype)
            vs = encode_fp8(vs, _row(v_descale, s).cpu(), kv_dtype)
        k_seqs.append(ks.to(kv_dtype).to(device))
        v_seqs.append(vs.to(kv_dtype).to(device))
    kwargs: dict = {"k_descale": k_descale, "v_descale": v_descale}
    if contiguous:
        k = torch.cat(k_seqs).to(device)
        v = torch.cat(v_seqs).to(device)
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        kwargs["cu_seqlens_k"] = cu.to(device)
    else:
        kv = make_paged_kv(k_seqs, v_seqs, block_size, generator=gen, joint_layout=joint_layout)
        k, v = kv.k_cache.to(device), kv.v_cache.to(device)  # joint_layout views stay views
        kwargs["block_table"] = kv.block_table.to(device)
        kwargs["seqused_k"] = kv.seqused_k.to(device)
    return DecodeCase(q, k, v, max(lens, default=0), kwargs)


def _row(descale: torch.Tensor | None, seq: int) -> torch.Tensor | float:
    if descale is None:
        return 1.0
    return descale[seq] if descale.dim() == 2 else descale


def run_and_check(case: DecodeCase, *, num_splits: int = 0, atol: float = 2e-3, **features) -> tuple:
    """Run the kernel (poisoned ``out``) and compare ``out`` and ``lse`` with the float64 reference."""
    q = case.q
    out = poison(torch.empty_like(q))
    got, lse = paged_decode_attention(
        q, case.k, case.v, case.max_seqlen_k, num_splits=num_splits, out=out, return_lse=True,
        **case.kwargs, **features,
    )  # fmt: skip
    assert got is out
    cu_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    ref_kwargs = {**case.kwargs, **features}
    ref, ref_lse = reference_attention(q, case.k, case.v, cu_q, compute_dtype=torch.float64, **ref_kwargs)
    ref_lp, _ = reference_attention(q, case.k, case.v, cu_q, compute_dtype=q.dtype, **ref_kwargs)
    assert_close_fa_rule(got, ref, ref_lp, atol=atol)
    assert_lse_close(lse, ref_lse)
    return got, lse


def assert_lse_close(lse: torch.Tensor, ref_lse: torch.Tensor, atol: float = 2e-3) -> None:
    """Same ``-inf`` entries; finite entries within ``atol + 1e-3 * |ref|``; never NaN."""
    assert lse.dtype == torch.float32
    assert not torch.isnan(lse).any(), "lse has NaN"
    ref = ref_lse.to(lse.device, torch.float64)
    got = lse.double()
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), "lse: -inf entries differ"
    finite = torch.isfinite(ref)
    err = (got[finite] - ref[finite]).abs()
    if err.numel():
        bound = atol + 1e-3 * ref[finite].abs()
        assert bool((err <= bound).all()), f"lse: max error {float(err.max()):.3e}"


@pytest.fixture
def decode_case():
    """The case builder (tests take it as a fixture; the test files do not import each other)."""
    return build_case


@pytest.fixture
def check_decode():
    """The run-and-compare helper."""
    return run_and_check

"""Seeded random valid calls of ``flash_attn_varlen_func`` against the float64 reference.

Each seed draws one configuration: a mix of query lengths (decode rows, short and long chunks, empty
queries; all-decode batches take the split-KV decode route), paged (page sizes 1 to 32) or contiguous KV
(optionally capped by ``seqused_k``), GQA ratios including non-powers of two, head sizes that are multiples
of 8, fp16 or bf16 queries, a cache in the query's dtype or in either FP8 format with descales per tensor
(float or tensor), per KV head, per (sequence, KV head) or as an expanded view, and any combination of
causal, sliding windows, softcap, ALiBi, sinks and ``num_splits``. A failure prints the seed and the
configuration; rerun one with ``-k "test_fuzz[SEED]"``.

``KVFLASH_FUZZ_CASES`` sets the number of seeds (default: 48 on the CPU, where the kernels run under the
interpreter; the GPU tier's ``test_fuzz_gpu`` runs ``KVFLASH_FUZZ_GPU_CASES``, default 120, on larger shapes:
most of its time is Triton compiling the kernel variants the seeds ask for).
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import assert_close_fa_rule, encode_fp8, make_paged_kv, poison
from kvflash.flash_attn_interface import flash_attn_varlen_func

from ..cases import assert_lse_close, cumulative

CPU_CASES = int(os.environ.get("KVFLASH_FUZZ_CASES", "48"))
GPU_CASES = int(os.environ.get("KVFLASH_FUZZ_GPU_CASES", "120"))
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclasses.dataclass
class FuzzConfig:
    seqs: list[tuple[int, int]]  # (q_len, kv_len)
    hq: int
    hkv: int
    head_size: int
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    page_size: int | None  # None: contiguous KV
    seqused_cap: bool  # contiguous only: seqused_k caps some lengths
    descale: str  # none, float, tensor1, per_head, per_seq_head, expanded
    causal: bool
    window: tuple[int, int] | None
    softcap: float
    alibi: str  # none, per_head, per_seq
    sinks: bool
    num_splits: int


def draw_config(seed: int, *, large: bool = False) -> FuzzConfig:
    """One random valid configuration (``large``: longer sequences, for the GPU)."""
    rng = random.Random(seed)
    scale = 8 if large else 1
    num_seqs = rng.randint(1, 6 if large else 4)
    all_decode = rng.random() < 0.35
    seqs = []
    for _ in range(num_seqs):
        q_len = 1 if all_decode else rng.choice([0, 1, 1, 2, 3, 5, 9, 17, 33 * scale])
        kv_len = q_len + rng.choice([0, 0, 1, 7, 16, 31, 50 * scale, 120 * scale])
        seqs.append((q_len, kv_len))
    hkv = rng.choice([1, 2, 3])
    q_dtype = rng.choice([torch.float16, torch.bfloat16])
    kv_dtype = rng.choice([q_dtype, *FP8])
    page_size = rng.choice([1, 3, 16, 32, None] + ([64, 128, 256] if large else []))
    descale_forms = ["float", "tensor1", "per_head", "per_seq_head", "expanded"]
    window = rng.choice([None, None, (rng.randint(0, 40), rng.randint(0, 8)), (rng.randint(0, 40), -1), (-1, 3)])
    return FuzzConfig(
        seqs=seqs,
        hq=hkv * rng.choice([1, 2, 3, 5, 7, 8]),
        hkv=hkv,
        head_size=rng.choice([8, 16, 24, 40, 64, 72, 80, 120, 128] + ([192, 256] if large else [])),
        q_dtype=q_dtype,
        kv_dtype=kv_dtype,
        page_size=page_size,
        seqused_cap=page_size is None and rng.random() < 0.5,
        descale=rng.choice(descale_forms) if kv_dtype in FP8 else rng.choice(["none", "none", *descale_forms]),
        causal=rng.random() < 0.6,
        window=window,
        softcap=rng.choice([0.0, 0.0, 3.0, 30.0]),
        alibi=rng.choice(["none", "none", "per_head", "per_seq"]),
        sinks=rng.random() < 0.4,
        num_splits=rng.choice([0, 1, 3]),
    )


def _descales(cfg: FuzzConfig, g: torch.Generator, lo: float, span: float):
    """The descale argument and its per-(sequence, KV head) values ``[num_seqs, Hkv]`` for encoding."""
    num_seqs = len(cfg.seqs)
    if cfg.descale == "none":
        return None, torch.ones(num_seqs, cfg.hkv)
    if cfg.descale == "float":
        value = lo + span * float(torch.rand(1, generator=g))
        return value, torch.full((num_seqs, cfg.hkv), value)
    if cfg.descale == "tensor1":
        t = lo + span * torch.rand(1, generator=g)
        return t, t.expand(num_seqs, cfg.hkv)
    if cfg.descale == "per_head":
        t = lo + span * torch.rand(cfg.hkv, generator=g)
        return t, t.expand(num_seqs, cfg.hkv)
    if cfg.descale == "expanded":
        t = lo + span * torch.rand(num_seqs, 1, generator=g)
        return t.expand(num_seqs, cfg.hkv), t.expand(num_seqs, cfg.hkv)
    t = lo + span * torch.rand(num_seqs, cfg.hkv, generator=g)
    return t, t


def build_call(cfg: FuzzConfig, seed: int, device) -> dict:
    """The arguments of ``flash_attn_varlen_func`` for ``cfg`` (K and V descales distinct and non-unit)."""
    g = torch.Generator().manual_seed(seed)
    num_seqs = len(cfg.seqs)
    k_arg, k_values = _descales(cfg, g, 0.2, 0.6)
    v_arg, v_values = _descales(cfg, g, 1.3, 1.5)
    q = torch.randn(sum(n for n, _ in cfg.seqs), cfg.hq, cfg.head_size, generator=g).to(cfg.q_dtype)
    ks, vs = [], []
    for s, (_, kv_len) in enumerate(cfg.seqs):
        k = torch.randn(kv_len, cfg.hkv, cfg.head_size, generator=g)
        v = torch.randn(kv_len, cfg.hkv, cfg.head_size, generator=g)
        if cfg.kv_dtype in FP8:
            ks.append(encode_fp8(k, k_values[s], cfg.kv_dtype))
            vs.append(encode_fp8(v, v_values[s], cfg.kv_dtype))
        else:  # descales on a 16-bit cache scale the stored values as well
            ks.append((k / k_values[s][:, None]).to(cfg.kv_dtype))
            vs.append((v / v_values[s][:, None]).to(cfg.kv_dtype))
    lengths = [kv for _, kv in cfg.seqs]
    cu_q = cumulative([n for n, _ in cfg.seqs], "cpu")
    call = dict(q=q, cu_seqlens_q=cu_q, max_seqlen_q=max(n for n, _ in cfg.seqs))
    if cfg.page_size is None:
        call.update(
            k=torch.cat(ks), v=torch.cat(vs),
            cu_seqlens_k=cumulative(lengths, "cpu"),
        )  # fmt: skip
        used = lengths
        if cfg.seqused_cap:
            used = [max(0, n - int(torch.randint(0, 6, (1,), generator=g))) for n in lengths]
            call["seqused_k"] = torch.tensor(used, dtype=torch.int32)
        call["max_seqlen_k"] = max(used)
    else:
        cache = make_paged_kv(ks, vs, cfg.page_size, generator=g)
        call.update(k=cache.k_cache, v=cache.v_cache, block_table=cache.block_table, seqused_k=cache.seqused_k)
        call["max_seqlen_k"] = max(lengths)
    call.update(
        k_descale=k_arg, v_descale=v_arg, causal=cfg.causal, window_size=cfg.window, softcap=cfg.softcap,
        num_splits=cfg.num_splits,
    )  # fmt: skip
    if cfg.alibi == "per_head":
        call["alibi_slopes"] = torch.rand(cfg.hq, generator=g) * 0.3
    elif cfg.alibi == "per_seq":
        call["alibi_slopes"] = torch.rand(num_seqs, cfg.hq, generator=g) * 0.3
    if cfg.sinks:
        call["s_aux"] = torch.randn(cfg.hq, generator=g) * 2
    return {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in call.items()}


def run_config(cfg: FuzzConfig, seed: int, device) -> None:
    call = build_call(cfg, seed, device)
    q = call["q"]
    out = poison(torch.empty_like(q))
    try:
        result, lse = flash_attn_varlen_func(out=out, return_softmax_lse=True, **call)
        assert result.data_ptr() == out.data_ptr()
        ref_args = {n: call[n] for n in call if n not in ("q", "k", "v", "cu_seqlens_q", "max_seqlen_q",
                                                          "max_seqlen_k", "num_splits")}  # fmt: skip
        exact, exact_lse = reference_attention(
            q, call["k"], call["v"], call["cu_seqlens_q"], compute_dtype=torch.float64, **ref_args
        )
        lowp, _ = reference_attention(q, call["k"], call["v"], call["cu_seqlens_q"], compute_dtype=q.dtype, **ref_args)
        assert_close_fa_rule(out, exact, lowp, atol=3e-3)
        assert_lse_close(lse, exact_lse, atol=3e-3)  # -inf exactly where no key is visible
    except Exception as exc:
        route = "decode" if call["max_seqlen_q"] == 1 and q.shape[0] == len(cfg.seqs) else "prefill"
        raise AssertionError(f"fuzz seed {seed} ({route} route) failed: {cfg}\n{type(exc).__name__}: {exc}") from exc


@pytest.mark.parametrize("seed", range(CPU_CASES))
def test_fuzz(device, seed):
    run_config(draw_config(seed), seed, device)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(10_000, 10_000 + GPU_CASES))
def test_fuzz_gpu(seed):
    """More seeds, longer sequences, larger pages and head sizes, on the GPU (bf16 tl.dot for real). One test
    per seed, so pytest-xdist spreads them (most of the time is Triton compiling the variants drawn)."""
    run_config(draw_config(seed, large=True), seed, torch.device("cuda"))


def test_configurations_cover_every_axis():
    """The CPU seeds together draw every kind of value of every axis (a generator change that loses one is
    caught here, not by a coverage that silently shrank)."""
    cfgs = [draw_config(s) for s in range(CPU_CASES)]
    if CPU_CASES < 48:
        pytest.skip("fewer seeds than the default: coverage is not promised")
    assert {c.descale for c in cfgs if c.kv_dtype in FP8} >= {"float", "tensor1", "per_head", "per_seq_head"}
    assert {c.kv_dtype for c in cfgs} >= {torch.float16, torch.bfloat16, *FP8}
    assert {c.page_size for c in cfgs} >= {1, 16, None}
    assert any(all(n == 1 for n, _ in c.seqs) for c in cfgs), "an all-decode batch (the decode route)"
    assert any({1} < {n for n, _ in c.seqs} for c in cfgs), "a mixed batch"
    assert {c.hq // c.hkv for c in cfgs} & {3, 5, 7}, "a GQA ratio that is not a power of two"
    assert any(c.head_size % 16 for c in cfgs), "a head size that is not a multiple of 16"
    for axis in ("causal", "sinks"):
        assert {getattr(c, axis) for c in cfgs} == {True, False}, axis
    assert {c.alibi for c in cfgs} == {"none", "per_head", "per_seq"}
    assert any(c.window for c in cfgs) and any(c.softcap for c in cfgs)

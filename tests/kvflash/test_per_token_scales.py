"""Per-token-head KV descales through ``flash_attn_varlen_func``: every route (decode, prefill, mixed), paged and
contiguous, written by ``reshape_and_cache_flash`` under a ``*_per_token_head`` ``kv_cache_dtype``; the bad
calls of every new form; and the accuracy on data with outlier tokens and a loud head against per-head static
scales.
"""

import statistics

import pytest
import torch

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import assert_close_fa_rule, make_fp8_per_token_kv, poison
from kvflash.flash_attn_interface import flash_attn_varlen_func, reshape_and_cache_flash
from kvflash.fp8_utils import compute_kv_scales

from ..cases import assert_lse_close, cumulative

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
STRING = {torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}
HQ, HKV, D = 4, 2, 32
NUM_SEQS = 8  # sequences per accuracy batch (the interpreter runs every program on the CPU)


def _draw(n, gen):
    mag = 10 ** (torch.rand(n, HKV, 1, generator=gen) * 2 - 1)
    return torch.randn(n, HKV, D, generator=gen) * mag


def _case(device, seqs, kv_dtype, block_size, seed):
    gen = torch.Generator().manual_seed(seed)
    kv = make_fp8_per_token_kv([_draw(n, gen) for _, n in seqs], [_draw(n, gen) for _, n in seqs], kv_dtype,
                               block_size, generator=gen, device=device)  # fmt: skip
    q = torch.randn(sum(s[0] for s in seqs), HQ, D, generator=gen).half().to(device)
    cu_q = cumulative([s[0] for s in seqs], device)
    return q, cu_q, kv


# decode only (max_seqlen_q <= 16), prefill only, and mixed (decode rows beside prefill rows: two launches)
ROUTES = {
    "decode": [(1, 40), (3, 17), (1, 66)],
    "prefill": [(20, 50), (24, 24)],
    "mixed": [(1, 37), (25, 61), (2, 9), (19, 19)],
}


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("block_size", [1, 16, 64, None])
def test_varlen_per_token_routes(device, kv_dtype, route, block_size):
    seqs = ROUTES[route]
    q, cu_q, kv = _case(device, seqs, kv_dtype, block_size, seed=len(route) + (block_size or 0))
    features = dict(causal=True, softcap=10.0, s_aux=torch.tensor([0.3, -1.0, 1.5, 0.0], device=device))
    if route == "mixed":
        features["window_size"] = (21, 0)
    extra = {"kv_descale_per_token": True} if block_size is None else {}
    out = poison(torch.empty_like(q))
    got, lse = flash_attn_varlen_func(
        q, kv.k, kv.v, max(s[0] for s in seqs), cu_q, max(s[1] for s in seqs), k_descale=kv.k_descale,
        v_descale=kv.v_descale, out=out, return_softmax_lse=True, **kv.kv_args, **extra, **features,
    )  # fmt: skip
    ref_kw = dict(kv.kv_args, k_descale=kv.k_descale, v_descale=kv.v_descale, kv_descale_per_token=True, **features)
    ref, ref_lse = reference_attention(q, kv.k, kv.v, cu_q, compute_dtype=torch.float64, **ref_kw)
    low, _ = reference_attention(q, kv.k, kv.v, cu_q, compute_dtype=torch.float16, **ref_kw)
    assert_close_fa_rule(got, ref, low, atol=2e-3)
    assert_lse_close(lse, ref_lse, atol=2e-3)


@pytest.mark.parametrize("kv_dtype", FP8)
def test_writer_to_attention(device, kv_dtype):
    """The writer's scales feed the kernels as they are: attention over the written cache equals the reference
    over the same stored values, and is close to attention over the unquantised keys and values."""
    gen = torch.Generator().manual_seed(9)
    num_blocks, block_size, lens = 8, 16, [45, 30]
    keys = [_draw(n, gen).half().to(device) for n in lens]
    values = [_draw(n, gen).half().to(device) for n in lens]
    kc = torch.zeros(num_blocks, block_size, HKV, D, device=device).to(kv_dtype)
    vc = torch.zeros_like(kc)
    ks = torch.full((num_blocks, block_size, HKV), float("nan"), device=device)
    vs = torch.full_like(ks, float("nan"))
    table = torch.tensor([[5, 2, 7], [0, 3, 1]], dtype=torch.int32, device=device)
    for s, n in enumerate(lens):
        pos = torch.arange(n, device=device)
        slots = table[s].long()[pos // block_size] * block_size + pos % block_size
        reshape_and_cache_flash(keys[s], values[s], kc, vc, slots, STRING[kv_dtype] + "_per_token_head", ks, vs)
    seqused = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(2, HQ, D, generator=gen).half().to(device)
    cu_q = torch.arange(3, dtype=torch.int32, device=device)
    got = flash_attn_varlen_func(q, kc, vc, 1, cu_q, max(lens), block_table=table, seqused_k=seqused,
                                 k_descale=ks, v_descale=vs)  # fmt: skip
    kw = dict(block_table=table, seqused_k=seqused)
    ref, _ = reference_attention(q, kc, vc, cu_q, k_descale=ks, v_descale=vs, compute_dtype=torch.float64, **kw)
    low, _ = reference_attention(q, kc, vc, cu_q, k_descale=ks, v_descale=vs, compute_dtype=torch.float16, **kw)
    assert_close_fa_rule(got, ref, low)
    real, _ = reference_attention(q, torch.cat(keys), torch.cat(values), cu_q, compute_dtype=torch.float64,
                                  cu_seqlens_k=torch.tensor([0, 45, 75], dtype=torch.int32, device=device))  # fmt: skip
    tol = 0.1 if kv_dtype == torch.float8_e4m3fn else 0.2  # FP8 rounding of K and V, relative to the output
    assert float((got.double() - real).norm() / real.norm()) < tol


# ---- bad calls ----


def _bad_case(device, block_size=16):
    return _case(device, [(1, 20), (1, 13)], torch.float8_e4m3fn, block_size, seed=1)


def _call(q, cu_q, kv, k=None, v=None, **kw):
    args = dict(kv.kv_args, k_descale=kv.k_descale, v_descale=kv.v_descale)
    args.update(kw)
    return flash_attn_varlen_func(q, kv.k if k is None else k, kv.v if v is None else v, 1, cu_q, 20, **args)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda kv: dict(k_descale=kv.k_descale[:, :, :1]), ValueError, "k_descale"),  # [nb, bs, 1]
        (lambda kv: dict(v_descale=kv.v_descale[:-1]), ValueError, "v_descale"),  # one block short
        (lambda kv: dict(k_descale=kv.k_descale.half()), TypeError, "k_descale"),
        (lambda kv: dict(v_descale=kv.v_descale.to(torch.bfloat16)), TypeError, "v_descale"),
        (lambda kv: dict(v_descale=torch.ones(HKV, device=kv.k.device)), ValueError, "v_descale"),  # K only
        (lambda kv: dict(k_descale=0.5), TypeError, "k_descale"),  # V only
        (lambda kv: dict(kv_descale_per_token=False), ValueError, "k_descale"),
        (lambda kv: dict(kv_descale_per_token="yes"), TypeError, "kv_descale_per_token"),
        (
            lambda kv: dict(kv_descale_per_token=True, k_descale=torch.ones(HKV, device=kv.k.device)),
            ValueError,
            "k_descale",
        ),  # fmt: skip
        (lambda kv: dict(kv_descale_per_token=True, k_descale=None, v_descale=None), TypeError, "k_descale"),
    ],
)
def test_bad_per_token_calls(device, change, error, match):
    q, cu_q, kv = _bad_case(device)
    with pytest.raises(error, match=match):
        _call(q, cu_q, kv, **change(kv))


def test_contiguous_per_token_needs_the_keyword(device):
    """``[total_k, Hkv]`` over a contiguous cache is refused without ``kv_descale_per_token=True`` (it would read
    like ``[num_seqs, Hkv]`` when the counts are equal); the message names both."""
    q, cu_q, kv = _bad_case(device, block_size=None)
    with pytest.raises(ValueError, match="k_descale.*kv_descale_per_token=True"):
        _call(q, cu_q, kv)
    with pytest.raises(ValueError, match="k_descale"):  # the paged form over a contiguous cache
        _call(q, cu_q, kv, kv_descale_per_token=True, k_descale=kv.k_descale[None], v_descale=kv.v_descale[None])
    _call(q, cu_q, kv, kv_descale_per_token=True)  # and with it, it works


def test_per_token_with_a_non_fp8_cache_raises(device):
    q, cu_q, kv = _bad_case(device)
    with pytest.raises(ValueError, match="k_descale.*FP8"):
        _call(q, cu_q, kv, k=kv.k.half(), v=kv.v.half())


def test_per_token_on_another_device_raises():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    q, cu_q, kv = _bad_case(torch.device("cuda"))
    with pytest.raises(ValueError, match="k_descale"):
        _call(q, cu_q, kv, k_descale=kv.k_descale.cpu())


def test_context_parallel_passes_the_mode_keyword():
    """``context_parallel_decode`` forwards ``kv_descale_per_token`` (a bad value raises naming it)."""
    from kvflash.parallel import context_parallel_decode

    q, _, kv = _bad_case(torch.device("cpu"))
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed missing")
    with pytest.raises(TypeError, match="kv_descale_per_token"):
        _fake_world_cp(context_parallel_decode, q, kv, kv_descale_per_token=1)


def _fake_world_cp(fn, q, kv, **kw):
    import kvflash.parallel.context_parallel as cp

    old = cp.dist.get_world_size, cp.dist.get_rank
    cp.dist.get_world_size, cp.dist.get_rank = (lambda group=None: 1), (lambda group=None: 0)
    try:
        return fn(q, kv.k, kv.v, kv.kv_args["block_table"], kv.kv_args["seqused_k"], 20, k_descale=kv.k_descale,
                  v_descale=kv.v_descale, **kw)  # fmt: skip
    finally:
        cp.dist.get_world_size, cp.dist.get_rank = old


# ---- accuracy on outlier data ----


def _outlier_batch(num_seqs, n, factor, gen):
    """Per sequence ``[n, Hkv, D]`` keys and values: KV head 1 four times louder than head 0, and 6 % of the
    tokens ``factor`` times louder in V (3x in K). Also returns the same data without the outlier tokens (what a
    static calibration that never saw them measures)."""

    def one(fac):
        base = torch.randn(num_seqs * n, HKV, D, generator=gen)
        base[:, 1] *= 4
        x = base.clone()
        x[torch.rand(num_seqs * n, generator=gen) < 0.06] *= fac
        return base.half(), x.half()

    return one(3.0), one(factor)


def _accuracy(device, kv_dtype, factor, q_len, seed=0, num_seqs=NUM_SEQS):
    """Relative error ``||out - ref|| / ||ref||`` of attention over an FP8 cache against float64 attention over the
    unquantised data, for: static per-head scales calibrated on outlier-free data (margin 1.5), static per-head
    scales calibrated on the data itself (amax, outliers included), per-token-head scales from the writer."""
    gen = torch.Generator().manual_seed(seed)
    n, block_size = 48, 16
    (k_calib, k), (v_calib, v) = _outlier_batch(num_seqs, n, factor, gen)
    k, v, k_calib, v_calib = (t.to(device) for t in (k, v, k_calib, v_calib))
    q = (torch.randn(num_seqs * q_len, HQ, D, generator=gen) * 0.5).half().to(device)
    num_blocks = num_seqs * n // block_size
    slots = torch.arange(num_seqs * n, device=device)
    table = torch.arange(num_blocks, dtype=torch.int32, device=device).view(num_seqs, -1)
    kw = dict(block_table=table, seqused_k=torch.full((num_seqs,), n, dtype=torch.int32, device=device))
    cu_q = torch.arange(num_seqs + 1, dtype=torch.int32, device=device) * q_len
    string = STRING[kv_dtype]
    variants = {
        "per-head static (calibrated without outliers)": (
            compute_kv_scales(k_calib, kv_dtype, per_head=True, margin=1.5),
            compute_kv_scales(v_calib, kv_dtype, per_head=True, margin=1.5),
        ),
        "per-head static (amax with outliers)": (
            compute_kv_scales(k, kv_dtype, per_head=True),
            compute_kv_scales(v, kv_dtype, per_head=True),
        ),
        "per-token-head": None,
    }
    ref, _ = reference_attention(q, k.view(num_blocks, block_size, HKV, D), v.view(num_blocks, block_size, HKV, D),
                                 cu_q, causal=True, compute_dtype=torch.float64, **kw)  # fmt: skip
    errors = {}
    for name, scales in variants.items():
        kc = torch.empty(num_blocks, block_size, HKV, D, device=device).to(kv_dtype)
        vc = torch.empty_like(kc)
        if scales is None:
            scales = (torch.empty(num_blocks, block_size, HKV, device=device),
                      torch.empty(num_blocks, block_size, HKV, device=device))  # fmt: skip
            reshape_and_cache_flash(k, v, kc, vc, slots, string + "_per_token_head", *scales)
        else:
            reshape_and_cache_flash(k, v, kc, vc, slots, string, *scales)
        out = flash_attn_varlen_func(q, kc, vc, q_len, cu_q, n, causal=True, k_descale=scales[0],
                                     v_descale=scales[1], **kw)  # fmt: skip
        errors[name] = float((out.double() - ref).norm() / ref.norm())
    return errors


def _accuracy_table(device, kv_dtype, q_len, seeds, num_seqs):
    rows = {}
    for factor in (10, 100):
        runs = [_accuracy(device, kv_dtype, factor, q_len, seed, num_seqs) for seed in seeds]
        rows[factor] = {name: statistics.mean(r[name] for r in runs) for name in runs[0]}
    lines = [f"{kv_dtype}, q_len {q_len}, {len(seeds) * num_seqs} sequences: relative error of attention vs float64 "
             "over the unquantised K/V"]  # fmt: skip
    for factor, mean in rows.items():
        lines.append(f"  outlier tokens x{factor}: " + ", ".join(f"{name} {err:.4f}" for name, err in mean.items()))
    return rows, "\n".join(lines)


def _assert_gain(rows, table, strict):
    for mean in rows.values():
        tok = mean["per-token-head"]
        # Static scales calibrated on data without the outliers clip them; per-token-head scales never clip.
        assert tok * 3 < mean["per-head static (calibrated without outliers)"], table
        # Static scales that cover the outliers (amax) lose far less, FP8 being a floating-point format: over
        # enough sequences per-token-head is still better (the GPU run); on the CPU's few sequences it is on par.
        bound = 1.0 if strict else 1.25
        assert tok < bound * mean["per-head static (amax with outliers)"], table


@pytest.mark.parametrize("kv_dtype", FP8)
def test_accuracy_gain_on_outlier_tokens_and_heads(device, kv_dtype, capsys):
    rows, table = _accuracy_table(device, kv_dtype, 1, seeds=range(3), num_seqs=NUM_SEQS)
    with capsys.disabled():
        print("\n" + table)
    _assert_gain(rows, table, strict=False)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("q_len", [1, 4, 32])  # decode, speculative rows, prefill
def test_accuracy_gain_on_outlier_tokens_and_heads_large(device, kv_dtype, q_len, capsys):
    rows, table = _accuracy_table(device, kv_dtype, q_len, seeds=range(4), num_seqs=256)
    with capsys.disabled():
        print("\n" + table)
    _assert_gain(rows, table, strict=True)


def test_upstream_kvcache_reads_per_token_pages_and_refuses_to_append(device):
    """``kvflash.flash_attn.flash_attn_with_kvcache`` reads a paged cache with rank-3 per-token-head descales;
    appending new k/v with them raises naming the descale (the writer's per-token-head mode is the way)."""
    from kvflash.flash_attn import flash_attn_with_kvcache

    seqs = [(1, 20), (1, 13)]
    q, cu_q, kv = _case(device, seqs, torch.float8_e4m3fn, 16, seed=12)
    lens = kv.kv_args["seqused_k"]
    got = flash_attn_with_kvcache(q[:, None], kv.k, kv.v, cache_seqlens=lens, block_table=kv.kv_args["block_table"],
                                  k_descale=kv.k_descale, v_descale=kv.v_descale)  # fmt: skip
    want = _call(q, cu_q, kv)
    torch.testing.assert_close(got[:, 0], want, rtol=0, atol=1e-3)
    new = torch.randn(2, 1, HKV, D, device=device).half()
    with pytest.raises(NotImplementedError, match="k_descale"):
        flash_attn_with_kvcache(q[:, None], kv.k, kv.v, new, new, cache_seqlens=lens - 1,
                                block_table=kv.kv_args["block_table"], k_descale=kv.k_descale,
                                v_descale=kv.v_descale)  # fmt: skip


@pytest.mark.parametrize("route", ["decode", "prefill", "mixed"])
def test_per_token_with_fp8_output(device, route):
    """``output_scale`` (fused static fp8 output) with per-token-head descales: the fp8 output times the scale
    equals the fp16 output within e4m3's rounding (relative 2^-4 of each element, plus the fp16 output's own)."""
    seqs = ROUTES[route]
    q, cu_q, kv = _case(device, seqs, torch.float8_e5m2, 16, seed=13)
    args = dict(causal=True, **kv.kv_args, k_descale=kv.k_descale, v_descale=kv.v_descale)
    max_q, max_k = max(s[0] for s in seqs), max(s[1] for s in seqs)
    plain = flash_attn_varlen_func(q, kv.k, kv.v, max_q, cu_q, max_k, **args)
    scale = torch.tensor([0.01], device=device)
    out = poison(torch.empty(q.shape, dtype=torch.float16, device=device)).to(torch.float8_e4m3fn)
    got = flash_attn_varlen_func(q, kv.k, kv.v, max_q, cu_q, max_k, out=out, output_scale=scale, **args)
    assert got is out and got.dtype == torch.float8_e4m3fn
    back = got.float() * scale
    ref = plain.float().clamp(-448 * 0.01, 448 * 0.01)
    assert bool(((back - ref).abs() <= ref.abs() * 2.0**-4 + 2e-3 * 0.01 + 1e-3 * ref.abs().max()).all())

"""Per-token-head descales in the decode kernel: one float32 scale per stored (token, KV head), indexed like the
cache (``[num_blocks, block_size, Hkv]`` paged, ``[total_k, Hkv]`` contiguous with ``kv_descale_per_token``).

Keys and values are drawn with per-token and per-head magnitudes spread over two decades, so the scales differ
from token to token and head to head; unused scale slots hold NaN (a kernel reading one shows it); outputs are
poisoned; the references are float64 (exact) and fp16 (the tolerance rule's low-precision baseline).
"""

import dataclasses

import pytest
import torch

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import assert_close_fa_rule, make_fp8_per_token_kv, poison
from kvflash.paged_decode import paged_decode_attention
from kvflash.paged_decode.launch_config import choose_paged_decode_config

from ..cases import decode_config

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _draw(lens, num_kv_heads, head_size, gen):
    """Per sequence ``[n, Hkv, D]`` with magnitudes varying by token and head (10^-1 .. 10^1)."""
    out = []
    for n in lens:
        mag = 10 ** (torch.rand(n, num_kv_heads, 1, generator=gen) * 2 - 1)
        out.append(torch.randn(n, num_kv_heads, head_size, generator=gen) * mag)
    return out


def _case(device, lens, kv_dtype, *, block_size=16, num_q_heads=4, num_kv_heads=2, head_size=32, seed=0,
          q_dtype=torch.float16):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    k_seqs = _draw(lens, num_kv_heads, head_size, gen)
    v_seqs = _draw(lens, num_kv_heads, head_size, gen)
    kv = make_fp8_per_token_kv(k_seqs, v_seqs, kv_dtype, block_size, generator=gen, device=device)
    q = torch.randn(len(lens), num_q_heads, head_size, generator=gen).to(q_dtype).to(device)
    return q, kv


def _check(q, kv, max_seqlen_k, *, per_token_kw=None, atol=2e-3, **features):
    out = poison(torch.empty_like(q))
    extra = {} if per_token_kw is None else {"kv_descale_per_token": per_token_kw}
    got, lse = paged_decode_attention(
        q, kv.k, kv.v, max_seqlen_k, k_descale=kv.k_descale, v_descale=kv.v_descale, out=out, return_lse=True,
        **kv.kv_args, **extra, **features,
    )  # fmt: skip
    assert got is out
    cu_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    ref_kw = dict(k_descale=kv.k_descale, v_descale=kv.v_descale, kv_descale_per_token=True, **kv.kv_args)
    ref_kw.update({key: val for key, val in features.items() if key != "num_splits"})
    ref, ref_lse = reference_attention(q, kv.k, kv.v, cu_q, compute_dtype=torch.float64, **ref_kw)
    ref_lp, _ = reference_attention(q, kv.k, kv.v, cu_q, compute_dtype=q.dtype, **ref_kw)
    assert_close_fa_rule(got, ref, ref_lp, atol=atol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse.double()), torch.isneginf(ref_lse.to(lse.device)))
    assert float((lse.double() - ref_lse.to(lse.device))[finite].abs().max()) < 2e-3
    return got


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_per_token_paged(device, kv_dtype, block_size, num_splits):
    q, kv = _case(device, [40, 3, 70], kv_dtype, block_size=block_size, seed=block_size + num_splits)
    _check(q, kv, 70, num_splits=num_splits)


def _kv_heads_per_program(num_q_heads, num_kv_heads):
    """KV heads per program of the chooser's decode config for these heads at this file's head size, 32, with
    per-token-head descales (at most 2; per-(sequence, head) descales would take up to 4 here)."""
    return decode_config(num_q_heads, num_kv_heads, 32, per_token_scales=True).kv_heads


def test_per_token_takes_at_most_two_kv_heads_per_program():
    """Per-token-head descales: two KV heads per program on the four-head block's tiles and split count (twice the
    programs), where per-(sequence, head) descales take four (the H200's config for 64 x 4096, D 128)."""
    common = dict(num_seqs=64, num_kv_heads=8, group=4, head_size=128, kv_itemsize=1, max_seqlen_k=4096,
                  window_left=-1, num_splits=0, multiprocessor_count=132, interpreter=False)  # fmt: skip
    per_head = choose_paged_decode_config(**common)
    per_token = choose_paged_decode_config(**common, per_token_scales=True)
    assert (per_head.kv_heads, per_token.kv_heads) == (4, 2)
    assert dataclasses.replace(per_token, kv_heads=4) == per_head
    assert decode_config(24, 8, 32).kv_heads == 4 and _kv_heads_per_program(24, 8) == 2


@pytest.mark.parametrize("heads, kv_heads_per_program", [((4, 2), 2), ((12, 6), 2), ((24, 8), 2), ((16, 1), 1)])
def test_per_token_many_kv_heads(device, heads, kv_heads_per_program):
    """Hkv 2, 6 and 8 (GQA 2, 2 and 3): two KV heads per program, each row gathering its own head's scales (one
    reading another head's would be off by the heads' magnitudes); GQA 3 leaves 10 of the 16 rows as padding. GQA
    16 over one KV head: one head per program."""
    num_q_heads, num_kv_heads = heads
    assert _kv_heads_per_program(num_q_heads, num_kv_heads) == kv_heads_per_program
    q, kv = _case(device, [37, 66], torch.float8_e4m3fn, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                  seed=num_kv_heads)  # fmt: skip
    _check(q, kv, 66, num_splits=2)


@pytest.mark.parametrize("kv_dtype", FP8)
def test_per_token_features(device, kv_dtype):
    """Window, softcap, sinks, ALiBi and GQA 6/2 together (both KV heads in one program, in 6 of its 16 rows),
    split over the keys."""
    q, kv = _case(device, [57, 9, 33], kv_dtype, num_q_heads=6, seed=3)
    assert _kv_heads_per_program(6, 2) == 2
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -0.5], device=device)
    slopes = torch.linspace(0.01, 0.2, 3 * 6, device=device).view(3, 6)
    _check(q, kv, 57, num_splits=2, window_size=(20, 0), softcap=15.0, s_aux=sinks, alibi_slopes=slopes)


@pytest.mark.parametrize("kv_dtype", FP8)
def test_per_token_contiguous(device, kv_dtype):
    """The contiguous [total_k, Hkv] form, with the explicit keyword; num_seqs == Hkv's count of tokens would
    otherwise be ambiguous."""
    q, kv = _case(device, [21, 44], kv_dtype, block_size=None, seed=4)
    _check(q, kv, 44, per_token_kw=True, num_splits=2)


def _fp8_query(q16, num_kv_heads, per_token):
    """``q`` in e4m3 and its descale, ``amax / 448``: ``[Hkv]`` (per KV head) or ``[total_q, Hq]`` (per token and query
    head). Written here: this package's tests do not import fp8_utils (its ``quantize_query``)."""
    qf = q16.float()
    if per_token:
        descale = qf.abs().amax(-1) / 448
        return (qf / descale[..., None]).to(torch.float8_e4m3fn), descale
    group = q16.shape[1] // num_kv_heads
    descale = qf.abs().view(q16.shape[0], num_kv_heads, group, -1).amax((0, 2, 3)) / 448
    return (qf / descale.repeat_interleave(group)[None, :, None]).to(torch.float8_e4m3fn), descale


@pytest.mark.parametrize("per_token_q", [False, True])
def test_per_token_kv_with_fp8_query(device, per_token_q):
    """An fp8 query with its descales (per KV head, or per token and query head: a per-row factor) over per-token-head
    K/V scales, two KV heads per program: the query's and each row's head's K scales both reach the scores."""
    q16, kv = _case(device, [41, 70], torch.float8_e5m2, seed=10)
    assert _kv_heads_per_program(4, 2) == 2
    cu_q = torch.arange(q16.shape[0] + 1, dtype=torch.int32, device=device)
    q8, q_descale = _fp8_query(q16, 2, per_token_q)
    q_kw = dict(q_descale=q_descale, q_descale_per_token=per_token_q)
    out = poison(torch.empty(q16.shape, dtype=torch.float16, device=device))
    got = paged_decode_attention(q8, kv.k, kv.v, 70, k_descale=kv.k_descale, v_descale=kv.v_descale, out=out,
                                 num_splits=2, **kv.kv_args, **q_kw)  # fmt: skip
    ref_kw = dict(k_descale=kv.k_descale, v_descale=kv.v_descale, kv_descale_per_token=True, **kv.kv_args, **q_kw)
    ref, _ = reference_attention(q8, kv.k, kv.v, cu_q, compute_dtype=torch.float64, **ref_kw)
    ref_lp, _ = reference_attention(q8, kv.k, kv.v, cu_q, compute_dtype=torch.float16, **ref_kw)
    assert_close_fa_rule(got, ref, ref_lp, atol=2e-3)


def test_per_token_scales_matter(device):
    """Per-token scales are really read per token: the same cache with every scale set to the per-head mean, or
    K and V scales swapped, gives a visibly different answer."""
    q, kv = _case(device, [50, 17], torch.float8_e4m3fn, seed=5)
    right = _check(q, kv, 50)
    kw = dict(**kv.kv_args)
    swapped = paged_decode_attention(q, kv.k, kv.v, 50, k_descale=kv.v_descale, v_descale=kv.k_descale, **kw)
    assert (right.float() - swapped.float()).abs().max() > 0.05
    flat_k = torch.nan_to_num(kv.k_descale, nan=0.0)
    flat_v = torch.nan_to_num(kv.v_descale, nan=0.0)
    flat_k = torch.full_like(flat_k, float(flat_k[flat_k > 0].mean()))
    flat_v = torch.full_like(flat_v, float(flat_v[flat_v > 0].mean()))
    flat = paged_decode_attention(q, kv.k, kv.v, 50, k_descale=flat_k, v_descale=flat_v, **kw)
    assert (right.float() - flat.float()).abs().max() > 0.05


def test_per_token_extreme_value_scales(device):
    """V scales far from 1 (x1e-5 and x1e2 in one sequence; the output stays inside fp16) stay exact: the
    P-column factor is taken in units of a running power of two, so fp16 neither underflows nor overflows."""
    q, kv = _case(device, [48], torch.float8_e5m2, seed=6)
    used = torch.isfinite(kv.v_descale)
    tiny_then_huge = torch.where(torch.rand_like(kv.v_descale) < 0.5, 1e-5, 1e2)
    kv.v_descale = torch.where(used, kv.v_descale * tiny_then_huge, kv.v_descale)
    got = _check(q, kv, 48, num_splits=1, atol=0.0)
    assert torch.isfinite(got).all()


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", FP8)
def test_per_token_bf16_query(device, kv_dtype):
    q, kv = _case(device, [300, 1000, 17], kv_dtype, num_q_heads=8, num_kv_heads=2, head_size=128,
                  q_dtype=torch.bfloat16, seed=7)  # fmt: skip
    _check(q, kv, 1000, atol=1e-2)


def _fp32_out_and_reference(q, kv, max_seqlen_k, num_splits):
    """The kernel's output into a poisoned float32 ``out`` (no fp16 rounding of the result) and the float64
    reference, both float64."""
    out = poison(torch.empty(q.shape, dtype=torch.float32, device=q.device))
    paged_decode_attention(q, kv.k, kv.v, max_seqlen_k, k_descale=kv.k_descale, v_descale=kv.v_descale, out=out,
                           num_splits=num_splits, **kv.kv_args)  # fmt: skip
    cu_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    ref, _ = reference_attention(q, kv.k, kv.v, cu_q, k_descale=kv.k_descale, v_descale=kv.v_descale,
                                 compute_dtype=torch.float64, **kv.kv_args)  # fmt: skip
    return out.double(), ref.to(out.device, torch.float64)


@pytest.mark.parametrize("factor", [2.0**-30, 2.0**30])
def test_per_token_tiny_and_huge_value_scales_fp32_out(device, factor):
    """Every V scale multiplied by 2^-30 (or 2^30), read into a float32 ``out``: ``p_j * vscale_j`` taken
    directly in fp16 would underflow to 0 (or overflow); in units of 2^E the result keeps its relative error."""
    q, kv = _case(device, [45, 20], torch.float8_e4m3fn, seed=8)
    kv.v_descale = kv.v_descale * factor
    out, ref = _fp32_out_and_reference(q, kv, 45, num_splits=2)
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert rel < 2e-3, rel


def test_per_token_heads_far_apart(device):
    """Two KV heads whose V scales are 2^40 apart, in one program: each row's fp16 operand is taken in units of its
    own head's scales, so neither head loses its bits to the other's range."""
    assert _kv_heads_per_program(4, 2) == 2
    q, kv = _case(device, [45, 20], torch.float8_e4m3fn, seed=9)
    head_factor = torch.tensor([2.0**-20, 2.0**20], device=device)
    kv.v_descale = kv.v_descale * head_factor
    out, ref = _fp32_out_and_reference(q, kv, 45, num_splits=1)
    for head in range(q.shape[1]):  # query heads 0, 1 read KV head 0; 2, 3 read KV head 1
        rel = float((out[:, head] - ref[:, head]).abs().max() / ref[:, head].abs().max())
        assert rel < 2e-3, (head, rel)


@pytest.mark.parametrize("kv_heads", [8, 3])
def test_an_explicit_config_with_another_head_count_for_per_token_scales_is_an_error(kv_heads):
    """The kernel splits a tile's per-token scales into 1, 2 or 4 head columns: an explicit launch config (as the
    tuning sweeps pass) with another head count is refused before anything is launched, naming ``config``."""
    from kvflash.paged_decode.op import launch_paged_decode

    common = dict(num_seqs=2, num_kv_heads=8, group=1, head_size=64, kv_itemsize=1, max_seqlen_k=64,
                  window_left=-1, num_splits=0, multiprocessor_count=132, interpreter=False)  # fmt: skip
    config = dataclasses.replace(choose_paged_decode_config(**common), kv_heads=kv_heads)
    q = torch.zeros(2, 8, 64, dtype=torch.float16)
    k = torch.zeros(4, 16, 8, 64).to(torch.float8_e4m3fn)
    per_token = torch.ones(4, 16, 8)
    with pytest.raises(ValueError, match="config: per-token-head descales take 1, 2 or 4 KV heads"):
        launch_paged_decode(
            q, k, k, torch.zeros(2, 4, dtype=torch.int32), torch.full((2,), 64, dtype=torch.int32), None, None,
            per_token, per_token, None, None, torch.empty_like(q), torch.empty(8, 2), max_seqlen_q=1, max_seqlen_k=64,
            softmax_scale=0.125, window_left=-1, window_right=-1, softcap=0.0, num_splits=0,
            defer_longer_sequences=False, output_scale=None, config=config,
        )  # fmt: skip

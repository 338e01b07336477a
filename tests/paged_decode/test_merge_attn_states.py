"""merge_attn_states and merge_partial_attentions against the torch formula (and against attention over the union
of the key sets); -inf / +inf rows, strided views, dtypes, out_lse, bad arguments."""

import pytest
import torch

from kvflash.attn_common.launch import describe_key, dry_run, record_launches
from kvflash.attn_common.testing import poison
from kvflash.paged_decode import merge_attn_states, merge_partial_attentions, paged_decode_attention
from kvflash.paged_decode.merge_states_op import launch_merge_partial_attentions

from ..cases import make_case


def torch_merge(out_p, lse_p, out_s, lse_s):
    """Float64 reference: weights exp(lse - logsumexp) per (token, head); empty parts weigh 0."""
    lse_p = lse_p.double().masked_fill(lse_p == float("inf"), float("-inf"))
    lse_s = lse_s.double().masked_fill(lse_s == float("inf"), float("-inf"))
    lse = torch.logaddexp(lse_p, lse_s)
    safe = lse.masked_fill(torch.isneginf(lse), 0.0)
    w_p = torch.exp(lse_p - safe).t()[:, :, None]
    w_s = torch.exp(lse_s - safe).t()[:, :, None]
    out_p = out_p.double().masked_fill(torch.isneginf(lse_p).t()[:, :, None], 0.0)
    out_s = out_s.double().masked_fill(torch.isneginf(lse_s).t()[:, :, None], 0.0)
    return out_p * w_p + out_s * w_s, lse


def make_parts(device, tokens, heads, head_size, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(2):
        out = torch.randn(tokens, heads, head_size, generator=gen).to(dtype).to(device)
        lse = (torch.randn(heads, tokens, generator=gen) * 4).to(device)
        parts += [out, lse]
    return parts


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("head_size", [64, 80])
def test_matches_formula_with_empty_rows(device, dtype, head_size):
    out_p, lse_p, out_s, lse_s = make_parts(device, 7, 5, head_size, dtype, seed=head_size)
    lse_p[1, 2] = float("-inf")  # prefix empty
    out_p[2, 1] = float("nan")  # an empty part's output is ignored, even NaN
    lse_s[3, 4] = float("-inf")  # suffix empty
    lse_p[0, 5] = lse_s[0, 5] = float("-inf")  # both empty
    lse_s[4, 6] = float("inf")  # some FlashAttention builds mark an empty row with +inf
    out = poison(torch.empty_like(out_p))
    out_lse = poison(torch.empty_like(lse_p))
    got, got_lse = merge_attn_states(out_p, lse_p, out_s, lse_s, out=out, out_lse=out_lse)
    assert got is out and got_lse is out_lse
    ref, ref_lse = torch_merge(out_p, lse_p, out_s, lse_s)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(got_lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.all(got[5, 0] == 0) and torch.isneginf(got_lse[0, 5])


def test_default_out_and_strided_inputs(device):
    out_p, lse_p, out_s, lse_s = make_parts(device, 6, 16, 64, torch.float16, seed=1)
    wide = torch.randn(6, 32, 64, device=device).half()
    out_s = wide[:, 1::2]  # a strided view
    lse_p = lse_p.t().contiguous().t()  # [Hq, T] with transposed strides
    got = merge_attn_states(out_p, lse_p, out_s, lse_s)
    assert got.dtype == torch.float16 and got.shape == out_p.shape
    ref, _ = torch_merge(out_p, lse_p, out_s, lse_s)
    torch.testing.assert_close(got.double(), ref, atol=2e-3, rtol=2e-3)


def test_merge_of_two_key_ranges_equals_attention_over_both(device):
    """Attention over keys [0, 40) merged with keys [40, 100) equals attention over [0, 100)."""
    case = make_case([(1, 100)], num_q_heads=4, num_kv_heads=2, block_size=None, device=device, seed=3)
    q, k, v = case.q, case.k, case.v
    full, full_lse = paged_decode_attention(q, k, v, 100, cu_seqlens_k=case.kv_args["cu_seqlens_k"], return_lse=True)
    # The suffix (keys 40..99) is the last 60 keys: a window of 59 keys to the left of the query.
    suf, suf_lse = paged_decode_attention(q, k, v, 100, cu_seqlens_k=case.kv_args["cu_seqlens_k"],
                                          window_size=(59, -1), return_lse=True)  # fmt: skip
    cu40 = torch.tensor([0, 40], dtype=torch.int32, device=device)
    pre, pre_lse = paged_decode_attention(q, k[:40], v[:40], 40, cu_seqlens_k=cu40, return_lse=True)
    merged, merged_lse = merge_attn_states(pre, pre_lse, suf, suf_lse, out_lse=torch.empty_like(pre_lse))
    torch.testing.assert_close(merged, full, atol=2e-3, rtol=0)
    torch.testing.assert_close(merged_lse, full_lse, atol=1e-4, rtol=1e-4)


def test_cpu_fallback_matches_kernel(device, monkeypatch):
    if device.type != "cpu":
        pytest.skip("the fallback is for CPU tensors")
    parts = make_parts(device, 4, 3, 32, torch.float32, seed=4)
    parts[1][0, 0] = float("-inf")
    kernel, kernel_lse = merge_attn_states(*parts, out_lse=torch.empty_like(parts[1]))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fallback, fallback_lse = merge_attn_states(*parts, out_lse=torch.empty_like(parts[1]))
    torch.testing.assert_close(kernel, fallback, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel_lse, fallback_lse, atol=1e-5, rtol=1e-5)


def test_bad_arguments(device):
    out_p, lse_p, out_s, lse_s = make_parts(device, 4, 2, 32, torch.float16, seed=5)
    with pytest.raises(ValueError, match="suffix_out"):
        merge_attn_states(out_p, lse_p, out_s[:3], lse_s)
    with pytest.raises(TypeError, match="prefix_lse"):
        merge_attn_states(out_p, lse_p.half(), out_s, lse_s)
    with pytest.raises(ValueError, match="suffix_lse"):
        merge_attn_states(out_p, lse_p, out_s, lse_s.t())
    with pytest.raises(TypeError, match="out"):
        merge_attn_states(out_p, lse_p, out_s, lse_s, out=torch.empty_like(out_p, dtype=torch.int32))
    with pytest.raises(ValueError, match="out_lse"):
        merge_attn_states(out_p, lse_p, out_s, lse_s, out_lse=torch.empty(3, 3, device=device))


def test_custom_op_opcheck(device):
    parts = make_parts(device, 3, 2, 32, torch.float16, seed=6)
    args = (*parts, torch.empty_like(parts[0]), torch.empty_like(parts[1]))
    torch.library.opcheck(torch.ops.kvflash.merge_attn_states.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))  # fmt: skip


def torch_merge_parts(outs, lses):
    """Float64 reference of the W-way merge: weights exp(lse_i - logsumexp(lse)); empty parts weigh 0."""
    lses = lses.double()
    lse = torch.logsumexp(lses, 0)  # -inf where every part is empty
    safe = lse.masked_fill(torch.isneginf(lse), 0.0)
    weights = torch.exp(lses - safe).transpose(1, 2)[..., None]  # [W, T, Hq, 1]
    parts = outs.double().masked_fill(torch.isneginf(lses).transpose(1, 2)[..., None], 0.0)
    return (parts * weights).sum(0), lse


def make_partials(device, num_parts, tokens, heads, head_size, seed):
    """``outs [W, T, Hq, D]`` fp32 and ``lses [W, Hq, T]`` (``T >= 5``, ``Hq >= 3``), with rows empty in one part, in
    all but one, in all; the outputs of empty parts are NaN (never read)."""
    gen = torch.Generator().manual_seed(seed)
    outs = torch.randn(num_parts, tokens, heads, head_size, generator=gen)
    lses = torch.randn(num_parts, heads, tokens, generator=gen) * 4
    lses[0, 1, 2] = float("-inf")  # token 2, head 1: empty in the first part
    lses[1:, 0, 3] = float("-inf")  # token 3, head 0: empty in every part but the first
    lses[:, 2, 4] = float("-inf")  # token 4, head 2: empty in every part
    outs.transpose(1, 2)[torch.isneginf(lses)] = float("nan")
    return outs.to(device), lses.to(device)


# 150 parts: on the CPU the merge takes 128 parts per step at D 40 (its rows are not sliced), so the last 22 are a
# second step after the first, which is loaded beside the LSEs.
@pytest.mark.parametrize("num_parts", [1, 3, 5, 150])
def test_merge_partial_attentions_matches_formula_with_empty_rows(device, num_parts):
    outs, lses = make_partials(device, num_parts, 6, 3, 40, seed=num_parts)
    out = poison(torch.empty(outs.shape[1:], device=device))
    out_lse = poison(torch.empty(lses.shape[1:], device=device))
    got, got_lse = merge_partial_attentions(outs, lses, out=out, out_lse=out_lse)
    assert got is out and got_lse is out_lse
    ref, ref_lse = torch_merge_parts(outs, lses)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert not torch.isnan(got).any() and not torch.isnan(got_lse).any()
    assert torch.all(got[4, 2] == 0) and torch.isneginf(got_lse[2, 4])


@pytest.mark.parametrize("head_size", [80, 128])
def test_merge_partial_attentions_few_rows_many_parts(device, head_size):
    """One token of two heads over 37 parts (a long single sequence's split-KV): fewer rows than the programs the
    launcher wants, so each row's head columns are sliced across programs (some slices wholly past D 80)."""
    gen = torch.Generator().manual_seed(head_size)
    outs = torch.randn(37, 1, 2, head_size, generator=gen).to(device)
    lses = (torch.randn(37, 2, 1, generator=gen) * 4).to(device)
    lses[5, 1, 0] = float("-inf")
    outs[5, 0, 1] = float("nan")  # an empty part's row: never read
    out = poison(torch.empty(outs.shape[1:], device=device))
    out_lse = poison(torch.empty(lses.shape[1:], device=device))
    got, got_lse = merge_partial_attentions(outs, lses, out=out, out_lse=out_lse)
    ref, ref_lse = torch_merge_parts(outs, lses)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_merge_partial_attentions_strided_and_dtypes(device):
    """lses as a [W, Hq, T] view of a [T, Hq, W] buffer (decode's split layout), a strided outs view, an fp16 out;
    the default out is float32, and W = 2 equals merge_attn_states."""
    outs, lses = make_partials(device, 2, 5, 4, 64, seed=7)
    lses_view = lses.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    wide = torch.randn(2, 5, 8, 64, device=device)
    wide[:, :, ::2] = outs
    ref, ref_lse = torch_merge_parts(outs, lses)
    got = merge_partial_attentions(wide[:, :, ::2], lses_view)
    assert got.dtype == torch.float32 and got.shape == (5, 4, 64)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    half = merge_partial_attentions(outs, lses, out=torch.empty(5, 4, 64, dtype=torch.float16, device=device))
    torch.testing.assert_close(half.double(), ref, atol=2e-3, rtol=2e-3)
    pair, pair_lse = merge_attn_states(outs[0], lses[0], outs[1], lses[1], out_lse=torch.empty_like(lses[0]))
    got, got_lse = merge_partial_attentions(outs, lses, out_lse=torch.empty_like(lses[0]))
    torch.testing.assert_close(got, pair, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_lse, pair_lse, atol=1e-6, rtol=1e-6)


def test_merge_partial_attentions_cpu_fallback_matches_kernel(device, monkeypatch):
    if device.type != "cpu":
        pytest.skip("the fallback is for CPU tensors")
    outs, lses = make_partials(device, 3, 5, 3, 32, seed=8)
    kernel, kernel_lse = merge_partial_attentions(outs, lses, out_lse=torch.empty_like(lses[0]))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fallback, fallback_lse = merge_partial_attentions(outs, lses, out_lse=torch.empty_like(lses[0]))
    torch.testing.assert_close(kernel, fallback, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel_lse, fallback_lse, atol=1e-5, rtol=1e-5)


def test_merge_partial_attentions_bad_arguments(device):
    outs, lses = make_partials(device, 3, 5, 3, 32, seed=9)
    with pytest.raises(TypeError, match="outs"):
        merge_partial_attentions(outs.half(), lses)
    with pytest.raises(ValueError, match="outs"):
        merge_partial_attentions(outs[:0], lses[:0])
    with pytest.raises(ValueError, match="lses"):
        merge_partial_attentions(outs, lses[:2])
    with pytest.raises(ValueError, match="out"):
        merge_partial_attentions(outs, lses, out=torch.empty(5, 3, 16, device=device))
    with pytest.raises(ValueError, match="out_lse"):
        merge_partial_attentions(outs, lses, out_lse=torch.empty(5, 3, device=device))


def test_merge_partial_attentions_opcheck(device):
    outs, lses = make_partials(device, 3, 5, 3, 32, seed=10)
    args = (outs, lses, torch.empty_like(outs[0]), torch.empty_like(lses[0]))
    torch.library.opcheck(torch.ops.kvflash.merge_partial_attentions.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))  # fmt: skip


@pytest.mark.parametrize("parts, warps", [(4, 1), (16, 2), (256, 4)])
def test_split_merge_warps_follow_its_tile(parts, warps):
    """One warp per 1024 elements of a step's [parts, D] tile, 1 to 4: a decode batch's merge of 4 splits runs
    one-warp programs (H200: 64 x 4096 e4m3 decode 0.1465 -> 0.1415 ms against 4 warps)."""
    outs, lses = torch.zeros(parts, 64, 32, 128), torch.zeros(parts, 32, 64)
    with record_launches() as keys, dry_run():
        launch_merge_partial_attentions(outs, lses, torch.empty(64, 32, 128), None)
    (key,) = keys
    assert describe_key(key)["num_warps"] == warps

"""chunk_prefill_attention against the reference: features, layouts, GQA, FP8 KV, out=, empty rows.

fp16 (and FP8 KV with fp16 q) so that the CPU tier runs them under the interpreter; on a GPU they run
as they are. Shapes are small: the interpreter runs every program in Python.
"""

import zlib

import pytest
import torch

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import poison
from kvflash.chunk_prefill import chunk_prefill_attention

from ..cases import check_against_reference, check_chunk_prefill, launch_chunk_prefill_with, make_case, reference

# Decode rows (q_len 1), odd lengths, an empty query, prefill over a longer context, q_len == kv_len.
MIX = [(1, 37), (19, 19), (5, 44), (0, 7), (26, 61), (1, 1), (3, 3)]


def _features(name: str, num_seqs: int, num_q_heads: int, device) -> dict:
    slopes = lambda *shape: torch.rand(*shape, device=device) * 0.3 + 0.05
    sinks = lambda: torch.randn(num_q_heads, device=device) * 2
    return {
        "causal": dict(causal=True),
        "full": dict(),
        "window_left_right": dict(window_size=(7, 3)),
        "causal_window": dict(causal=True, window_size=(9, -1)),
        "right_only_window": dict(window_size=(-1, 2)),
        "softcap": dict(causal=True, softcap=3.0),
        "alibi_per_seq": dict(causal=True, alibi_slopes=slopes(num_seqs, num_q_heads)),
        "sinks": dict(causal=True, s_aux=sinks()),
        "everything": dict(
            causal=True,
            window_size=(20, -1),
            softcap=5.0,
            alibi_slopes=slopes(num_q_heads),
            s_aux=sinks(),
            softmax_scale=0.2,
        ),
    }[name]


@pytest.mark.parametrize(
    "feature",
    [
        "causal", "full", "window_left_right", "causal_window", "right_only_window", "softcap",
        "alibi_per_seq", "sinks", "everything",
    ],
)  # fmt: skip
def test_features_on_a_mixed_batch(device, feature):
    case = make_case(MIX, num_q_heads=8, nan_unused=True, device=device, seed=zlib.crc32(feature.encode()) % 1000)
    check_chunk_prefill(case, **_features(feature, case.num_seqs, 8, device))


@pytest.mark.parametrize(
    "block_size, joint_layout, capped, heads",
    [
        (1, False, False, (8, 2)),  # one token per page
        (16, True, False, (5, 1)),  # strided [:, 0] / [:, 1] views of a joint cache; MQA with 5 heads
        (32, False, False, (12, 2)),  # group of 6
        (None, False, False, (8, 2)),  # contiguous
        (None, False, True, (5, 1)),  # contiguous capped by seqused_k (garbage past it)
    ],
)
def test_kv_layouts_and_gqa(device, block_size, joint_layout, capped, heads):
    case = make_case(
        MIX, num_q_heads=heads[0], num_kv_heads=heads[1], head_size=48, block_size=block_size,
        joint_layout=joint_layout, nan_unused=True, capped=capped, device=device, seed=block_size or 7,
    )  # fmt: skip
    check_chunk_prefill(case, causal=True)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("descale_form", ["per_head", "per_seq_head"])
def test_fp8_kv_with_distinct_k_and_v_descales(device, kv_dtype, descale_form):
    num_seqs, num_kv_heads = len(MIX), 2
    if descale_form == "per_head":  # [Hkv] for K and for V, different and non-unit
        k_descale = torch.tensor([0.02, 0.05], device=device)
        v_descale = torch.tensor([0.3, 0.007], device=device)
    else:  # [num_seqs, Hkv]: every (sequence, head) its own
        kv_scale = torch.rand(num_seqs, 2, num_kv_heads, device=device) * 0.1 + 0.01
        k_descale, v_descale = kv_scale[:, 0], kv_scale[:, 1]
    case = make_case(MIX, num_q_heads=8, kv_dtype=kv_dtype, k_descale=k_descale, v_descale=v_descale, nan_unused=True,
                     device=device, seed=3)  # fmt: skip
    check_chunk_prefill(case, causal=True)
    # The data must tell the descales apart: a kernel that descaled V with K's scale would be far off.
    exact_out, _ = reference(case, causal=True)
    swapped, _ = reference(case, causal=True, v_descale=k_descale)
    assert (swapped - exact_out).abs().max() > 0.1


def test_fp8_kv_with_float_descales_and_sinks(device):
    case = make_case(MIX, num_q_heads=8, kv_dtype=torch.float8_e4m3fn, k_descale=0.5, v_descale=2.0, nan_unused=True,
                     device=device, seed=5)  # fmt: skip
    check_chunk_prefill(case, causal=True, s_aux=torch.randn(8, device=device))


def test_strided_q_and_out_buffer(device):
    case = make_case(MIX, num_q_heads=8, nan_unused=True, device=device, seed=11)
    wide_q = torch.randn(case.q.shape[0], 11, 64, device=device).to(torch.float16)
    wide_q[:, 2:10] = case.q
    case.q = wide_q[:, 2:10]  # stride(1) == 64, stride(0) == 11 * 64
    buffer = poison(torch.empty(case.q.shape[0], 8, 2, 64, dtype=torch.float16, device=device))
    out = buffer[:, :, 1]  # a strided view: every other D-row of the buffer
    check_chunk_prefill(case, out=out, causal=True)
    assert torch.isnan(buffer[:, :, 0]).all(), "wrote outside the out view"


@pytest.mark.parametrize("with_sinks", [False, True])
def test_rows_with_no_visible_key(device, with_sinks):
    # seqused_k = 0 for a sequence with queries; q_len > kv_len with causal (first rows see nothing);
    # a window (0, 0) whose only key is past the end for some rows.
    seqs = [(4, 0), (6, 2), (3, 40)]
    case = make_case(seqs, num_q_heads=8, nan_unused=True, device=device, seed=13)
    sinks = torch.randn(8, device=device) if with_sinks else None
    check_chunk_prefill(case, causal=True, s_aux=sinks)
    exact_out, exact_lse = reference(case, causal=True, s_aux=sinks)
    assert (exact_out[:4] == 0).all()
    if with_sinks:
        torch.testing.assert_close(exact_lse[:, 0].float(), sinks)
    else:
        assert torch.isneginf(exact_lse[:, :8]).all()
    check_chunk_prefill(case, window_size=(0, 0), s_aux=sinks)


def test_without_lse_returns_out_only(device):
    case = make_case([(5, 9), (1, 30)], num_q_heads=8, nan_unused=True, device=device, seed=17)
    out = poison(torch.empty_like(case.q))
    got = chunk_prefill_attention(
        case.q, case.k, case.v, case.cu_seqlens_q, case.max_seqlen_q, case.max_seqlen_k, causal=True, out=out,
        **case.kv_args,
    )  # fmt: skip
    assert got is out
    want = reference_attention(case.q, case.k, case.v, case.cu_seqlens_q, **case.kv_args, causal=True)[0]
    assert (got.float() - want).abs().max() < 1e-2


@pytest.mark.parametrize("window_size", [None, (5, 1)])
def test_diagonal_at_every_offset_within_a_key_tile(device, window_size):
    # kv_len - q_len takes every value 0..16, so the causal diagonal and the window edges of the query
    # tiles fall on every residue modulo the key tile: off-by-one tile bounds show somewhere.
    case = make_case([(10, 10 + c) for c in range(17)], num_q_heads=8, nan_unused=True, device=device, seed=19)
    check_chunk_prefill(case, causal=window_size is None, window_size=window_size)


def test_negative_and_zero_k_descale(device):
    # The kernel moves K's descale sign into q (its hot loop needs a non-negative score scale); a zero
    # descale makes every visible key equally likely.
    case = make_case(MIX[:3], num_q_heads=8, nan_unused=True, device=device, seed=37)
    check_chunk_prefill(case, causal=True, k_descale=torch.tensor([-0.7, 0.0], device=device),
                   v_descale=torch.tensor(-1.5, device=device))  # fmt: skip


@pytest.mark.parametrize("split_query", [True, False], ids=["split", "fp16"])
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_both_query_paths_over_fp8_caches(device, kv_dtype, split_query):
    """A bf16 query over an FP8 cache, either path of launch option ``split_query`` (QK as two fp8 dots of q's two
    e4m3 terms; or q converted to fp16 with K, the default): the FlashAttention-rule
    bound. bf16 dots need a GPU; under the interpreter the fp16 path converts q to fp16 and the split path to
    e4m3, both without a bf16 dot."""
    case = make_case([(40, 70), (17, 17), (1, 33)], q_dtype=torch.bfloat16, kv_dtype=kv_dtype, nan_unused=True,
                     device=device, seed=23)  # fmt: skip
    case.q = (case.q.float() * 30).to(torch.bfloat16)  # spread scores: a bad split would show
    out = poison(torch.empty_like(case.q))
    launch_chunk_prefill_with(case, out, dict(split_query=split_query))
    check_against_reference(case, out, atol=1e-3, causal=True)

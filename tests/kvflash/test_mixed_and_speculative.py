"""Serving-shaped batches through flash_attn_varlen_func: speculative-decode queries (2..16 per sequence) on the
decode kernel, and mixed prefill + decode steps split between the two kernels on the device. Every row is
checked against the float64 reference, outputs poisoned first; FP8 caches carry distinct K and V descales."""

import pytest
import torch

from kvflash.attn_common.launch import describe_key, record_launches
from kvflash.attn_common.testing import poison
from kvflash.flash_attn_interface import flash_attn_varlen_func
from kvflash.flash_attn_interface.routing import MAX_DECODE_QUERIES, Route, choose_route

from ..cases import check_against_reference, cumulative, make_case, replay_matches_eager

# (q_len, kv_len): drafts of 2..16 queries beside plain decode rows, an empty query range and an empty cache.
SPECULATIVE_MIX = [(4, 37), (1, 20), (0, 9), (2, 2), (16, 50), (7, 7), (3, 0)]
# Long chunks (past MAX_DECODE_QUERIES) beside decode rows and short drafts.
MIXED_MIX = [(1, 37), (40, 60), (3, 20), (0, 5), (2, 2), (17, 30), (1, 1), (5, 0)]
FP8 = [None, torch.float8_e4m3fn, torch.float8_e5m2]
FP8_IDS = ["fp16", "e4m3", "e5m2"]


def test_routes_from_shapes():
    assert choose_route(64, 64, 1, 4) == Route(True, 0)  # decode
    assert choose_route(256, 64, 4, 4) == Route(True, 0)  # drafts of 4
    assert choose_route(64 * MAX_DECODE_QUERIES, 64, MAX_DECODE_QUERIES, 4) == Route(True, 0)
    # 120 decode rows + 8 chunks of 512: a short sequence fits beside the long ones.
    assert choose_route(120 + 8 * 512, 128, 512, 4) == Route(False, 4)
    assert choose_route(120 + 8 * 512, 128, 512, 1) == Route(False, 16)
    assert choose_route(120 + 8 * 512, 128, 512, 32) == Route(False, 1)
    # Every sequence at its bound (pure prefill), a single sequence, a malformed cache: prefill alone.
    assert choose_route(4 * 2048, 4, 2048, 4) == Route(False, 0)
    assert choose_route(16384, 1, 16384, 4) == Route(False, 0)
    assert choose_route(100, 10, 40, 0) == Route(False, 0)


@pytest.mark.parametrize("kv_dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("block_size", [16, 1], ids=["page16", "page1"])
def test_speculative_queries_on_the_decode_kernel(device, kv_dtype, block_size):
    case = make_case(SPECULATIVE_MIX, num_q_heads=6, num_kv_heads=2, kv_dtype=kv_dtype, block_size=block_size,
                     device=device, seed=11)  # fmt: skip
    assert choose_route(case.q.shape[0], len(SPECULATIVE_MIX), case.max_seqlen_q, 3).decode_only
    sinks = torch.randn(6, device=device)
    for features in (dict(causal=True, softcap=4.0, s_aux=sinks), dict(causal=True, window_size=(6, 0))):
        for num_splits in (1, 3):  # 3: the split-merge path with several query rows per program
            out = poison(torch.empty_like(case.q))
            result, lse = case.attend(out=out, num_splits=num_splits, return_softmax_lse=True, **features)
            assert result.data_ptr() == out.data_ptr()
            check_against_reference(case, out, lse, **features)


@pytest.mark.parametrize("kv_dtype", FP8[:2], ids=FP8_IDS[:2])
def test_speculative_queries_over_tiles_inside_and_at_the_edges_of_a_window(device, kv_dtype):
    """Drafts over long caches: full tiles that every query of a chunk sees skip the per-row mask, tiles at the
    window's left edge, at the causal diagonal and at a split's end take it (16-token tiles under the interpreter)."""
    mix = [(4, 200), (9, 131), (2, 64), (16, 97)]
    case = make_case(mix, num_q_heads=8, num_kv_heads=2, kv_dtype=kv_dtype, block_size=16, device=device, seed=13)
    for features in (dict(causal=True), dict(causal=True, window_size=(70, 0)), dict(window_size=(40, 21))):
        for num_splits in (1, 2):
            out = poison(torch.empty_like(case.q))
            _, lse = case.attend(out=out, num_splits=num_splits, return_softmax_lse=True, **features)
            check_against_reference(case, out, lse, **features)


def test_speculative_queries_with_alibi_and_a_non_causal_window(device):
    case = make_case(SPECULATIVE_MIX, num_q_heads=4, num_kv_heads=1, device=device, seed=12)
    slopes = torch.rand(len(SPECULATIVE_MIX), 4, device=device)
    features = dict(window_size=(5, 2), alibi_slopes=slopes)
    out, lse = case.attend(out=poison(torch.empty_like(case.q)), return_softmax_lse=True, **features)
    check_against_reference(case, out, lse, **features)


def test_an_undercounting_max_seqlen_q_is_served_exactly(device):
    """max_seqlen_q = 2 while a sequence has 9 queries: the decode kernel takes several passes."""
    case = make_case([(9, 30), (2, 5), (1, 12)], num_q_heads=4, num_kv_heads=2, kv_dtype=torch.float8_e4m3fn,
                     device=device, seed=13)  # fmt: skip
    out = poison(torch.empty_like(case.q))
    flash_attn_varlen_func(
        case.q, case.k, case.v, 2, case.cu_seqlens_q, case.max_seqlen_k, causal=True, out=out,
        k_descale=case.k_descale, v_descale=case.v_descale, **case.kv_args,
    )  # fmt: skip
    lse = flash_attn_varlen_func(
        case.q, case.k, case.v, 2, case.cu_seqlens_q, case.max_seqlen_k, causal=True, return_softmax_lse=True,
        k_descale=case.k_descale, v_descale=case.v_descale, **case.kv_args,
    )[1]  # fmt: skip
    check_against_reference(case, out, lse, causal=True)


@pytest.mark.parametrize("kv_dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("block_size", [16, None], ids=["paged", "contiguous"])
def test_mixed_batch_rows_from_both_kernels(device, kv_dtype, block_size):
    case = make_case(MIXED_MIX, num_q_heads=4, num_kv_heads=2, kv_dtype=kv_dtype, block_size=block_size, device=device,
                     seed=14)  # fmt: skip
    route = choose_route(case.q.shape[0], len(MIXED_MIX), case.max_seqlen_q, 2)
    assert route == Route(False, 8)  # (1, 3, 2, 1, 5)-query sequences on the decode kernel, 40 and 17 on prefill
    sinks = torch.randn(4, device=device)
    # num_splits 3: the decode rows' split partials are kept per sequence and merged into the decode rows only
    for num_splits in (0, 3):
        for features in (dict(causal=True, softcap=6.0, s_aux=sinks), dict(causal=True, window_size=(9, 0))):
            out = poison(torch.empty_like(case.q))
            result, lse = case.attend(out=out, return_softmax_lse=True, num_splits=num_splits, **features)
            assert result.data_ptr() == out.data_ptr()
            check_against_reference(case, out, lse, **features)
            plain = poison(torch.empty_like(case.q))
            case.attend(out=plain, num_splits=num_splits, **features)  # without LSE: the same rows
            torch.testing.assert_close(plain, out, rtol=0, atol=0)


@pytest.mark.parametrize("kv_dtype", FP8, ids=FP8_IDS)
def test_mixed_batch_decode_launches(device, kv_dtype):
    """Over an FP8 cache a mixed batch's 1-query rows take the decode config (two KV heads per program here) in a
    launch of their own and its 2..8-query rows a second one; a 16-bit cache keeps one launch for both."""
    case = make_case(MIXED_MIX, num_q_heads=4, num_kv_heads=2, kv_dtype=kv_dtype, block_size=16, device=device,
                     seed=3)  # fmt: skip
    with record_launches() as keys:
        case.attend(out=torch.empty_like(case.q), causal=True)
    launches = [describe_key(key) for key in keys]
    decode = sorted((d["MIN_QUERIES"], d["Q_TOKENS"], d["KV_HEADS"]) for d in launches
                    if d["kernel"] == "paged_decode_kernel")  # fmt: skip
    assert decode == ([(0, 1, 2), (2, 8, 1)] if kv_dtype is not None else [(0, 8, 1)]), launches


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn, torch.float8_e5m2], ids=["bf16", "e4m3", "e5m2"])
@pytest.mark.parametrize("mix", ["speculative", "mixed"])
def test_serving_batches_bf16_at_gpu_size(kv_dtype, mix):
    g = torch.Generator().manual_seed(15)
    if mix == "speculative":
        seqs = [(int(q), int(k)) for q, k in zip(torch.randint(0, 9, (24,), generator=g),
                                                 torch.randint(8, 3000, (24,), generator=g))]  # fmt: skip
    else:
        seqs = [(1, int(k)) for k in torch.randint(1, 2500, (40,), generator=g)] + [(300, 900), (77, 77), (3, 64)]
    case = make_case(seqs, num_q_heads=32, num_kv_heads=8, head_size=128, q_dtype=torch.bfloat16, kv_dtype=kv_dtype,
                     device="cuda", seed=16)  # fmt: skip
    sinks = torch.randn(32, device="cuda")
    for features in (dict(causal=True, s_aux=sinks), dict(causal=True, window_size=(700, 0), softcap=8.0)):
        out, lse = case.attend(out=poison(torch.empty_like(case.q)), return_softmax_lse=True, **features)
        check_against_reference(case, out, lse, **features)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["speculative", "mixed"])
def test_cuda_graph_replay_with_new_query_lengths(kind):
    """One captured step replayed with new query lengths (same total_q and num_seqs), KV lengths and tables."""
    hq, hkv, d, bs, num_seqs = 8, 2, 128, 16, 6
    total_q = 6 * 4 if kind == "speculative" else 5 + 60
    max_q = 8 if kind == "speculative" else 60
    max_k = 700
    num_blocks = num_seqs * (max_k // bs + 1) + 8
    k_cache = torch.randn(num_blocks, bs, hkv, d, device="cuda").to(torch.float8_e4m3fn)
    v_cache = torch.randn(num_blocks, bs, hkv, d, device="cuda").to(torch.float8_e4m3fn)
    cu_q = torch.zeros(num_seqs + 1, dtype=torch.int32, device="cuda")
    q = torch.empty(total_q, hq, d, device="cuda", dtype=torch.bfloat16)
    table = torch.zeros(num_seqs, max_k // bs + 1, dtype=torch.int32, device="cuda")
    used = torch.zeros(num_seqs, dtype=torch.int32, device="cuda")
    k_descale = torch.rand(num_seqs, hkv, device="cuda") + 0.5
    v_descale = torch.rand(num_seqs, hkv, device="cuda") + 0.5
    out = torch.empty_like(q)
    lse = torch.empty(hq, total_q, device="cuda")

    def attention(**kw):
        return flash_attn_varlen_func(
            q, k_cache, v_cache, max_q, cu_q, max_k, block_table=table, seqused_k=used, causal=True,
            k_descale=k_descale, v_descale=v_descale, return_softmax_lse=True, **kw,
        )  # fmt: skip

    def step():
        lse.copy_(attention(out=out)[1])

    def load_new_state(seed):
        g = torch.Generator().manual_seed(seed)
        if kind == "speculative":
            lengths = torch.randint(0, max_q + 1, (num_seqs,), generator=g)
            lengths[-1] = total_q - lengths[:-1].sum()  # may exceed max_q: served in more passes
        else:
            lengths = torch.ones(num_seqs, dtype=torch.int64)
            lengths[int(torch.randint(0, num_seqs, (1,), generator=g))] = 60
        cu_q.copy_(cumulative(lengths.tolist(), "cpu"))
        used.copy_(torch.randint(int(lengths.max()), max_k + 1, (num_seqs,), generator=g).to(torch.int32))
        table.copy_(torch.randperm(num_blocks, generator=g)[: table.numel()].view_as(table).to(torch.int32))
        q.copy_(torch.randn(q.shape, generator=g).to(q.dtype))

    replay_matches_eager(step, load_new_state, attention, out, lse)


def _many_sequences() -> list[tuple[int, int]]:
    """300 sequences (the Hopper kernel's work-item search then takes two steps of 128 probes): decode rows, empty
    query ranges, and prefill chunks first, in the middle and last, one of them spanning several 128-query tiles."""
    seqs = [(1 + i % 3, 40 + 5 * i) for i in range(300)]
    seqs[7] = (0, 50)
    seqs[0], seqs[150], seqs[299] = (260, 400), (129, 129), (64, 700)
    return seqs


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype, many", [(None, False), (None, True), (torch.float8_e4m3fn, True)],
                         ids=["bf16-44-seqs", "bf16-300-seqs", "e4m3-300-seqs"])
def test_mixed_batch_with_the_hopper_prefill_kernel(monkeypatch, kv_dtype, many):
    """Decode rows and a few chunks with ``KVFLASH_GLUON=1``: the decode kernel takes the short rows, the Hopper
    prefill kernel (on sm_90; the portable one elsewhere) the rest, into one ``out`` and ``lse``."""
    monkeypatch.setenv("KVFLASH_GLUON", "1")
    seqs = [(1, 300 + 7 * i) for i in range(40)] + [(200, 900), (333, 333), (2, 40), (150, 1024)]
    if many:
        seqs = _many_sequences()
    case = make_case(seqs, num_q_heads=32, num_kv_heads=8, head_size=128, q_dtype=torch.bfloat16, kv_dtype=kv_dtype,
                     nan_unused=True, device="cuda", seed=9)  # fmt: skip
    out = poison(torch.empty_like(case.q))
    _, lse = case.attend(out=out, return_softmax_lse=True, causal=True)
    # the LSE by FlashAttention's rule too, as the kernel tests judge it: over an FP8 cache the bf16 query's QK^T
    # runs on the fp8 tensor cores, whose accumulation is coarser than fp32 (4.2e-3 at 300 sequences on the H200)
    check_against_reference(case, out, lse, lse_low_precision=True, causal=True)

"""GPU tier of chunk_prefill_attention: bf16, every head size and page size, GQA ratios, FP8 KV with bf16 q,
long chunks (the unmasked hot loop and the GPU launch settings), a cache over 4 GiB, CUDA-graph replay."""

import pytest
import torch

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import assert_close_fa_rule, poison
from kvflash.chunk_prefill import chunk_prefill_attention

from ..cases import check_chunk_prefill, make_case

pytestmark = pytest.mark.gpu

# Decode rows, prefill with context, chunks crossing many 64/128-key tiles, an empty query.
LONG_MIX = [(1, 1000), (300, 700), (129, 129), (0, 5), (517, 1300), (1, 1), (64, 200), (7, 9)]


@pytest.mark.parametrize("head_size", [8, 16, 24, 32, 40, 64, 72, 80, 96, 112, 120, 128, 192, 256, 320, 504, 512])
def test_bf16_head_sizes(head_size):
    case = make_case(LONG_MIX, num_q_heads=8, head_size=head_size, q_dtype=torch.bfloat16, nan_unused=True,
                     device="cuda", seed=head_size)  # fmt: skip
    check_chunk_prefill(case, causal=True)


@pytest.mark.parametrize("block_size", [1, 16, 32, 48, 64, 128, 256])
def test_bf16_page_sizes_with_every_feature(block_size):
    case = make_case(LONG_MIX, num_q_heads=8, q_dtype=torch.bfloat16, block_size=block_size, nan_unused=True,
                     device="cuda", seed=block_size)  # fmt: skip
    check_chunk_prefill(case, causal=True)
    check_chunk_prefill(
        case, causal=True, window_size=(200, -1), softcap=20.0, alibi_slopes=torch.rand(8, device="cuda") * 0.1,
        s_aux=torch.randn(8, device="cuda"),
    )  # fmt: skip


@pytest.mark.parametrize("heads", [(8, 8), (32, 8), (10, 2), (12, 2), (14, 2), (16, 1), (71, 1)])
def test_bf16_gqa_ratios(heads):
    seqs = [(1, 300), (150, 450), (33, 33)]
    case = make_case(seqs, num_q_heads=heads[0], num_kv_heads=heads[1], q_dtype=torch.bfloat16, nan_unused=True,
                     device="cuda", seed=1)  # fmt: skip
    check_chunk_prefill(case, causal=True)
    check_chunk_prefill(case, window_size=(40, 17))


@pytest.mark.parametrize("seqs", [[(1, n) for n in (1, 17, 300, 2000, 64)], [(4, 60), (3, 513), (2, 2)]])
def test_decode_and_speculative_batches_use_small_tiles(seqs):
    case = make_case(seqs, num_q_heads=32, num_kv_heads=8, q_dtype=torch.bfloat16, nan_unused=True, device="cuda",
                     seed=2)  # fmt: skip
    check_chunk_prefill(case, causal=True)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("block_size", [16, 64, None])
def test_fp8_kv_with_bf16_q(kv_dtype, block_size):
    kv_scale = torch.rand(len(LONG_MIX), 2, 2, device="cuda") * 0.1 + 0.01
    case = make_case(
        LONG_MIX, num_q_heads=8, q_dtype=torch.bfloat16, kv_dtype=kv_dtype, k_descale=kv_scale[:, 0],
        v_descale=kv_scale[:, 1], block_size=block_size, nan_unused=True, device="cuda", seed=4,
    )  # fmt: skip
    check_chunk_prefill(case, causal=True)
    check_chunk_prefill(case, window_size=(100, 30), softcap=10.0)


def test_long_chunk_with_context():
    case = make_case([(2048, 4096), (1000, 1000)], num_q_heads=8, q_dtype=torch.bfloat16, block_size=64,
                     nan_unused=True, device="cuda", seed=5)  # fmt: skip
    check_chunk_prefill(case, causal=True)


def test_cache_over_4_gib_uses_int64_offsets():
    # A joint [num_blocks, 2, block_size, Hkv, D] bf16 cache of 9.8 GB: pages past 2^31 elements are read.
    num_blocks, block_size, num_kv_heads, head_size = 300_000, 16, 2, 128
    joint = torch.full((num_blocks, 2, block_size, num_kv_heads, head_size), float("nan"), dtype=torch.bfloat16,
                       device="cuda")  # fmt: skip
    k_cache, v_cache = joint[:, 0], joint[:, 1]
    assert k_cache.stride(0) * (num_blocks - 13) > 2**31  # element offsets past int32
    seqs = [(40, 200), (1, 77)]
    pages = [torch.arange(num_blocks - 13, num_blocks), torch.tensor([5, num_blocks - 20, 140_000, 7, 3])]
    block_table = torch.zeros(2, 13, dtype=torch.int32)
    for s, (_, kv_len) in enumerate(seqs):
        n = -(-kv_len // block_size)
        block_table[s, :n] = pages[s][:n].int()
        for b in range(n):
            rows = min(block_size, kv_len - b * block_size)
            k_cache[pages[s][b], :rows] = torch.randn(rows, num_kv_heads, head_size, device="cuda").bfloat16()
            v_cache[pages[s][b], :rows] = torch.randn(rows, num_kv_heads, head_size, device="cuda").bfloat16()
    q = torch.randn(41, 8, head_size, device="cuda").bfloat16()
    cu_seqlens_q = torch.tensor([0, 40, 41], dtype=torch.int32, device="cuda")
    kv_args = dict(block_table=block_table.cuda(), seqused_k=torch.tensor([200, 77], dtype=torch.int32, device="cuda"))
    out = chunk_prefill_attention(q, k_cache, v_cache, cu_seqlens_q, 40, 200, causal=True, **kv_args)
    exact = reference_attention(q, k_cache, v_cache, cu_seqlens_q, causal=True, **kv_args, compute_dtype=torch.float64)
    low = reference_attention(q, k_cache, v_cache, cu_seqlens_q, causal=True, **kv_args, compute_dtype=torch.bfloat16)
    assert_close_fa_rule(out, exact[0], low[0])


def test_cuda_graph_replay_with_new_lengths_and_pages():
    num_blocks, block_size, num_kv_heads, num_q_heads, head_size = 64, 16, 2, 8, 128
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_size, device="cuda").bfloat16()
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_size, device="cuda").bfloat16()
    q = torch.randn(70, num_q_heads, head_size, device="cuda").bfloat16()
    cu_seqlens_q = torch.tensor([0, 5, 6, 70], dtype=torch.int32, device="cuda")
    block_table = torch.randperm(num_blocks, device="cuda")[:60].int().view(3, 20)
    seqused_k = torch.tensor([100, 300, 64], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    kv_args = dict(block_table=block_table, seqused_k=seqused_k)

    def step():
        chunk_prefill_attention(q, k_cache, v_cache, cu_seqlens_q, 64, 320, causal=True, out=out, **kv_args)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for new_lens, new_cu in [([17, 320, 200], [0, 30, 31, 70]), ([1, 2, 0], [0, 1, 2, 70])]:
        seqused_k.copy_(torch.tensor(new_lens))
        cu_seqlens_q.copy_(torch.tensor(new_cu))
        block_table.copy_(torch.randperm(num_blocks, device="cuda")[:60].view(3, 20))
        q.normal_()
        poison(out)
        graph.replay()
        torch.cuda.synchronize()
        ref_args = (q, k_cache, v_cache, cu_seqlens_q)
        exact = reference_attention(*ref_args, causal=True, **kv_args, compute_dtype=torch.float64)[0]
        low = reference_attention(*ref_args, causal=True, **kv_args, compute_dtype=torch.bfloat16)[0]
        assert_close_fa_rule(out, exact, low)

"""GPU tier: bf16 (the interpreter cannot dot in bf16), the head-size / page-size / GQA grid with both FP8
formats, 128k contexts through split-KV, a cache larger than 4 GiB (int64 offsets), and CUDA-graph capture
replayed with new block tables and lengths."""

import pytest
import torch

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import assert_close_fa_rule, poison
from kvflash.paged_decode import paged_decode_attention

from ..cases import assert_lse_close, check_paged_decode, make_case

pytestmark = pytest.mark.gpu

HEAD_SIZES = [8, 40, 64, 72, 80, 96, 112, 120, 128, 192, 256]
KV_DTYPES = [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
PAGE_SIZES = [1, 16, 64, 256, 32]
GQA = [(32, 8), (5, 1), (12, 2), (7, 7), (6, 1), (64, 4), (16, 2)]
# A sparse grid: every head size, page size, GQA ratio, KV dtype and split mode (auto, none, 3) appears,
# in rotating combinations.
GRID = [
    (d, KV_DTYPES[(i + j) % 3], PAGE_SIZES[(i + 2 * j) % 5], GQA[(i + j) % 7], (0, 1, 3)[(i + 2 * j) % 3])
    for i, d in enumerate(HEAD_SIZES)
    for j in range(3)
]


def descales(kv_dtype, num_seqs, num_kv_heads, device, seed):
    if kv_dtype == torch.bfloat16:
        return None, None
    gen = torch.Generator().manual_seed(seed)
    k = (torch.rand(num_seqs, num_kv_heads, generator=gen) * 0.1 + 0.01).to(device)
    v = (torch.rand(num_seqs, num_kv_heads, generator=gen) * 0.3 + 0.005).to(device)
    return k, v


@pytest.mark.parametrize("head_size,kv_dtype,block_size,gqa,num_splits", GRID)
def test_bf16_grid(head_size, kv_dtype, block_size, gqa, num_splits):
    seqs = [(1, 1), (1, 517), (1, 0), (1, 2049), (1, 33)]
    k_descale, v_descale = descales(kv_dtype, len(seqs), gqa[1], "cuda", head_size)
    case = make_case(seqs, num_q_heads=gqa[0], num_kv_heads=gqa[1], head_size=head_size, block_size=block_size,
                     q_dtype=torch.bfloat16, kv_dtype=kv_dtype, k_descale=k_descale, v_descale=v_descale,
                     device="cuda", seed=head_size + block_size)  # fmt: skip
    check_paged_decode(case, num_splits=num_splits)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_bf16_all_features_split(kv_dtype):
    seqs = [(1, 3000), (1, 70), (1, 0), (1, 1200)]
    k_descale, v_descale = descales(kv_dtype, len(seqs), 2, "cuda", 9)
    case = make_case(seqs, num_q_heads=12, num_kv_heads=2, q_dtype=torch.bfloat16, kv_dtype=kv_dtype,
                     k_descale=k_descale, v_descale=v_descale, device="cuda", seed=10)  # fmt: skip
    gen = torch.Generator().manual_seed(11)
    check_paged_decode(
        case,
        num_splits=7,
        window_size=(1500, 0),
        softcap=30.0,
        alibi_slopes=(torch.rand(12, generator=gen) * 0.01).cuda(),
        s_aux=torch.randn(12, generator=gen).cuda(),
    )


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e5m2])
def test_long_context_128k(kv_dtype):
    seqs = [(1, 131072), (1, 70001)]
    k_descale, v_descale = descales(kv_dtype, len(seqs), 8, "cuda", 12)
    case = make_case(seqs, num_q_heads=32, num_kv_heads=8, head_size=128, block_size=64, q_dtype=torch.bfloat16,
                     kv_dtype=kv_dtype, k_descale=k_descale, v_descale=v_descale, device="cuda", seed=13)  # fmt: skip
    check_paged_decode(case, s_aux=torch.randn(32, device="cuda"))


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_cache_over_4gib(kv_dtype):
    """Pages placed past element offset 2^31 of a >4 GiB joint [num_blocks, 2, 16, Hkv, D] cache."""
    num_kv_heads, head_size, block_size = 8, 128, 16
    per_block = 2 * block_size * num_kv_heads * head_size
    num_blocks = (5 << 30) // (per_block * kv_dtype.itemsize)
    joint = torch.empty(num_blocks, 2, block_size, num_kv_heads, head_size, dtype=kv_dtype, device="cuda")
    k, v = joint[:, 0], joint[:, 1]
    lens = [3000, 1777, 4096]
    max_blocks = 4096 // block_size
    gen = torch.Generator(device="cuda").manual_seed(14)
    table = torch.randperm(num_blocks - (1 << 31) // per_block - 1, device="cuda", generator=gen)[: 3 * max_blocks]
    table = (table + (1 << 31) // per_block + 1).to(torch.int32).view(3, max_blocks)
    joint[table.long()] = torch.randn(3, max_blocks, 2, block_size, num_kv_heads, head_size, device="cuda",
                                      generator=gen).to(kv_dtype)  # fmt: skip
    q = torch.randn(3, 32, head_size, device="cuda", generator=gen).bfloat16()
    seqused = torch.tensor(lens, dtype=torch.int32, device="cuda")
    kw = dict(block_table=table, seqused_k=seqused, k_descale=0.5, v_descale=2.0)
    for num_splits in (1, 0):
        out, lse = paged_decode_attention(q, k, v, 4096, num_splits=num_splits, return_lse=True, **kw)
        cu = torch.arange(4, dtype=torch.int32, device="cuda")
        ref, ref_lse = reference_attention(q, k, v, cu, compute_dtype=torch.float64, **kw)
        ref_lp, _ = reference_attention(q, k, v, cu, compute_dtype=torch.bfloat16, **kw)
        assert_close_fa_rule(out, ref, ref_lp)
        assert_lse_close(lse, ref_lse, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_cuda_graph_replay(kv_dtype):
    """Capture once (split-KV on: few sequences, long max_seqlen_k), replay with new values."""
    num_seqs, num_q_heads, num_kv_heads, head_size, block_size, max_len = 6, 16, 4, 128, 16, 8192
    num_blocks = num_seqs * max_len // block_size + 7
    gen = torch.Generator(device="cuda").manual_seed(15)
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_size, device="cuda", generator=gen).to(kv_dtype)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_size, device="cuda", generator=gen).to(kv_dtype)
    q = torch.empty(num_seqs, num_q_heads, head_size, device="cuda", dtype=torch.bfloat16)
    table = torch.empty(num_seqs, max_len // block_size, dtype=torch.int32, device="cuda")
    seqused = torch.empty(num_seqs, dtype=torch.int32, device="cuda")
    k_descale = torch.empty(num_seqs, num_kv_heads, device="cuda")
    out = torch.empty_like(q)
    sinks = torch.randn(num_q_heads, device="cuda", generator=gen)

    def refill():
        q.copy_(torch.randn(q.shape, device="cuda", generator=gen))
        table.copy_(torch.randperm(num_blocks, device="cuda", generator=gen)[: table.numel()].view(table.shape))
        seqused.copy_(torch.randint(0, max_len + 1, (num_seqs,), device="cuda", generator=gen))
        k_descale.copy_(torch.rand(k_descale.shape, device="cuda", generator=gen) + 0.5)
        poison(out)

    def step():
        paged_decode_attention(q, k, v, max_len, block_table=table, seqused_k=seqused, k_descale=k_descale,
                               v_descale=0.7, s_aux=sinks, out=out)  # fmt: skip

    refill()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    cu = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda")
    for _ in range(3):
        refill()
        graph.replay()
        torch.cuda.synchronize()
        kw = dict(block_table=table, seqused_k=seqused, k_descale=k_descale, v_descale=0.7, s_aux=sinks)
        ref, _ = reference_attention(q, k, v, cu, compute_dtype=torch.float64, **kw)
        ref_lp, _ = reference_attention(q, k, v, cu, compute_dtype=torch.bfloat16, **kw)
        assert_close_fa_rule(out, ref, ref_lp)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_many_splits_merge_in_chunks(kv_dtype):
    """80 splits at D = 256: the split-merge kernel walks the partials in several chunks."""
    seqs = [(1, 20000), (1, 9001), (1, 0)]
    k_descale, v_descale = descales(kv_dtype, len(seqs), 2, "cuda", 16)
    case = make_case(seqs, num_q_heads=4, num_kv_heads=2, head_size=256, block_size=64, q_dtype=torch.bfloat16,
                     kv_dtype=kv_dtype, k_descale=k_descale, v_descale=v_descale, device="cuda", seed=17)  # fmt: skip
    check_paged_decode(case, num_splits=80, s_aux=torch.randn(4, device="cuda"))

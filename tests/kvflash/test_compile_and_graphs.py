"""flash_attn_varlen_func under torch.compile(fullgraph=True), and CUDA-graph capture/replay of a decode
step and a mixed step with new lengths and block tables (GPU)."""

import pytest
import torch

from kvflash.flash_attn_interface import flash_attn_varlen_func

from ..cases import cumulative, make_case, replay_matches_eager


@pytest.mark.parametrize("mix", [[(1, 30), (1, 5)], [(1, 30), (6, 11)]], ids=["decode", "mixed"])
def test_torch_compile_fullgraph(device, mix):
    case = make_case(mix, kv_dtype=torch.float8_e5m2, device=device, seed=4)

    def step(q, k, v, cu_q, block_table, seqused_k, k_descale, v_descale):
        out, lse = flash_attn_varlen_func(
            q,
            k,
            v,
            case.max_seqlen_q,
            cu_q,
            case.max_seqlen_k,
            block_table=block_table,
            seqused_k=seqused_k,
            causal=True,
            k_descale=k_descale,
            v_descale=v_descale,
            return_softmax_lse=True,
        )
        return out * 2, lse

    args = (
        case.q,
        case.k,
        case.v,
        case.cu_seqlens_q,
        case.kv_args["block_table"],
        case.kv_args["seqused_k"],
        case.k_descale,
        case.v_descale,
    )
    backend = (
        "inductor" if device.type == "cuda" else "aot_eager"
    )  # inductor on the CPU would need a C++ build per test
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    out_c, lse_c = compiled(*args)
    out_e, lse_e = step(*args)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(lse_c, lse_e)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_cuda_graph_replay_with_new_lengths_and_tables(kind):
    hq, hkv, d, bs = 8, 2, 128, 16
    q_lens = [1, 1, 1, 1] if kind == "decode" else [1, 7, 1, 12]
    max_q, max_k = max(q_lens), 600
    num_blocks = 4 * (max_k // bs + 1) + 8
    k_cache = torch.randn(num_blocks, bs, hkv, d, device="cuda").to(torch.float8_e4m3fn)
    v_cache = torch.randn(num_blocks, bs, hkv, d, device="cuda").to(torch.float8_e4m3fn)
    cu_q = cumulative(q_lens, "cuda")
    q = torch.randn(sum(q_lens), hq, d, device="cuda", dtype=torch.bfloat16)
    table = torch.zeros(4, max_k // bs + 1, dtype=torch.int32, device="cuda")
    used = torch.zeros(4, dtype=torch.int32, device="cuda")
    k_descale = torch.rand(4, hkv, device="cuda") + 0.5
    v_descale = torch.rand(4, hkv, device="cuda") + 0.5
    out = torch.empty_like(q)
    lse = torch.empty(hq, q.shape[0], device="cuda")

    def attention(**kw):
        return flash_attn_varlen_func(
            q,
            k_cache,
            v_cache,
            max_q,
            cu_q,
            max_k,
            block_table=table,
            seqused_k=used,
            causal=True,
            k_descale=k_descale,
            v_descale=v_descale,
            return_softmax_lse=True,
            **kw,
        )

    def step():
        lse.copy_(attention(out=out)[1])

    def load_new_state(seed):
        g = torch.Generator(device="cpu").manual_seed(seed)
        lengths = torch.randint(max(q_lens), max_k + 1, (4,), generator=g).to(torch.int32)
        used.copy_(lengths)
        table.copy_(torch.randperm(num_blocks, generator=g)[: table.numel()].view_as(table).to(torch.int32))
        q.copy_(torch.randn(q.shape, generator=g).to(q.dtype))

    replay_matches_eager(step, load_new_state, attention, out, lse)


@pytest.mark.parametrize("mix", [[(1, 30), (1, 5)], [(1, 30), (6, 11)]], ids=["decode", "mixed"])
def test_torch_compile_fullgraph_fp8_output(device, mix):
    """``output_scale`` goes through the custom ops (their fake implementations give the fp8 output)."""
    case = make_case(mix, kv_dtype=torch.float8_e4m3fn, device=device, seed=6)
    scale = torch.tensor([0.02], device=device)

    def step(q, k, v, cu_q, block_table, seqused_k, k_descale, v_descale, output_scale):
        return flash_attn_varlen_func(
            q, k, v, case.max_seqlen_q, cu_q, case.max_seqlen_k, block_table=block_table, seqused_k=seqused_k,
            causal=True, k_descale=k_descale, v_descale=v_descale, output_scale=output_scale,
        )  # fmt: skip

    args = (case.q, case.k, case.v, case.cu_seqlens_q, case.kv_args["block_table"], case.kv_args["seqused_k"],
            case.k_descale, case.v_descale, scale)  # fmt: skip
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    out_c = torch.compile(step, fullgraph=True, backend=backend)(*args)
    out_e = step(*args)
    assert out_c.dtype == out_e.dtype == torch.float8_e4m3fn
    assert torch.equal(out_c.view(torch.uint8), out_e.view(torch.uint8))

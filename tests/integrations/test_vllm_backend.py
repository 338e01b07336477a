"""kvflash's vLLM backend against vLLM's real classes: registration as CUSTOM, the configuration vLLM validates,
metadata from the builder constructed on a real VllmConfig, and a cache update + forward (mixed prefill/decode
batch, FP8 with distinct per-tensor or per-head K and V scales, sinks, sliding window, softcap) against the
float64 reference. Needs vLLM: ``nox -s vllm``."""

import importlib
import importlib.metadata
import pathlib
import re
import types

import pytest
import torch

pytest.importorskip("vllm.v1.attention.backend")

from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.registry import AttentionBackendEnum

import kvflash.integrations.vllm as kvflash_vllm
from kvflash.attn_common import reference_attention, saturate_to_fp8
from kvflash.attn_common.testing import assert_close_fa_rule, encode_fp8, poison

ROOT = pathlib.Path(__file__).resolve().parents[2]
HQ, HKV, D, BLOCK, NUM_BLOCKS = 4, 2, 32, 16, 12
MIX = [(1, 20), (5, 5), (3, 18)]  # (new tokens, kv length with them): decode, prefill, chunked prefill


def test_registers_as_custom_backend():
    kvflash_vllm.register()
    backend = AttentionBackendEnum.CUSTOM.get_class()
    assert backend is kvflash_vllm.KvflashAttentionBackend and backend.get_name() == "CUSTOM"
    assert AttentionBackendEnum[backend.get_name()] is AttentionBackendEnum.CUSTOM  # what vLLM's layer looks up
    assert backend.get_builder_cls() is kvflash_vllm.KvflashMetadataBuilder


def test_vllm_validates_the_configuration():
    backend = kvflash_vllm.KvflashAttentionBackend
    capability = types.SimpleNamespace(major=9, minor=0)
    common = dict(head_size=128, dtype=torch.bfloat16, block_size=16, use_mla=False, has_sink=True, use_sparse=False,
                  use_mm_prefix=False, use_per_head_quant_scales=True, device_capability=capability,
                  attn_type="decoder", has_sliding_window=True)  # fmt: skip
    for kv_cache_dtype in ("auto", "fp8", "fp8_e4m3", "fp8_e5m2"):
        assert backend.validate_configuration(kv_cache_dtype=kv_cache_dtype, **common) == []
    reasons = backend.validate_configuration(**dict(common, kv_cache_dtype="int8_per_token_head", block_size=8))
    assert "kv_cache_dtype not supported" in reasons and "block_size not supported" in reasons


def test_plugin_entry_point():
    text = (ROOT / "packages" / "kvflash" / "pyproject.toml").read_text()
    target = re.search(r'^\[project.entry-points."vllm.general_plugins"\]\nkvflash = "([^"]+)"', text, re.M).group(1)
    module, _, name = target.partition(":")
    assert getattr(importlib.import_module(module), name) is kvflash_vllm.register
    installed = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "kvflash"]
    if not installed:
        pytest.skip("kvflash is not installed as a distribution here: vLLM's plugin loader cannot see it")
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    assert AttentionBackendEnum.CUSTOM.get_path() == kvflash_vllm.BACKEND_PATH


# A Llama-shaped config with the test's heads (no weights: vLLM's config classes only read config.json).
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HQ * D, "intermediate_size": 256,
    "num_hidden_layers": 1, "num_attention_heads": HQ, "num_key_value_heads": HKV, "head_dim": D,
    "vocab_size": 96, "max_position_embeddings": 256, "torch_dtype": "float16",
}  # fmt: skip


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    """kvflash's metadata builder (vLLM's Triton one) constructed from a real VllmConfig."""
    import json

    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    folder = tmp_path_factory.mktemp("tiny_llama")
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    model = ModelConfig(model=str(folder), skip_tokenizer_init=True, dtype="float16")
    config = VllmConfig(model_config=model, cache_config=CacheConfig(block_size=BLOCK),
                        device_config=DeviceConfig(device="cpu"))  # fmt: skip
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HKV, head_size=D, dtype=torch.float16)
    return kvflash_vllm.KvflashMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], config, torch.device("cpu"))


def _impl(kv_cache_dtype, **kwargs):
    args = dict(num_heads=HQ, head_size=D, scale=0.3, num_kv_heads=HKV, alibi_slopes=None, sliding_window=12,
                kv_cache_dtype=kv_cache_dtype, logits_soft_cap=6.0)  # fmt: skip
    args.update(kwargs)
    return kvflash_vllm.KvflashAttentionImpl(**args)


@pytest.mark.parametrize(
    "kv_cache_dtype, storage, per_head, query_fp8, fused_out",
    [("auto", torch.float16, False, False, False), ("fp8_e4m3", torch.float8_e4m3fn, True, False, False),
     ("fp8", torch.uint8, False, False, False), ("fp8_e5m2", torch.uint8, True, False, False),
     ("fp8_e4m3", torch.float8_e4m3fn, True, True, False), ("fp8_e5m2", torch.uint8, False, True, True),
     ("auto", torch.float16, False, False, True)],
    ids=["auto", "e4m3-per-head", "fp8-bytes", "e5m2-bytes-per-head", "e4m3-fp8-query", "e5m2-fp8-query-fp8-out",
         "auto-fp8-out"],
)  # fmt: skip
def test_cache_update_and_forward_match_reference(
    device, builder, kv_cache_dtype, storage, per_head, query_fp8, fused_out
):
    """``query_fp8``: vLLM's layer quantised the query with its static ``_q_scale`` (``supports_quant_query_input``);
    ``fused_out``: the fused static fp8 output quantisation (``output_scale``, ``fused_output_quant_supported``)."""
    g = torch.Generator().manual_seed(31)
    fp8 = kv_cache_dtype != "auto"
    fp8_dtype = torch.float8_e5m2 if kv_cache_dtype == "fp8_e5m2" else torch.float8_e4m3fn
    shape = (HKV,) if per_head else (1,)
    k_scale = torch.rand(shape, generator=g) * 0.3 + 0.05 if fp8 else torch.ones(1)
    v_scale = torch.rand(shape, generator=g) * 0.5 + 0.4 if fp8 else torch.ones(1)
    q_scale = torch.tensor([0.02])
    layer = types.SimpleNamespace(_k_scale=k_scale.to(device), _v_scale=v_scale.to(device), _q_scale=q_scale.to(device))
    # vLLM's logical layer cache [num_blocks, Hkv, block_size, 2 * D], physically NHD; stale garbage inside.
    raw = (torch.rand(NUM_BLOCKS, BLOCK, HKV, 2 * D, generator=g) * 50).to(torch.float16 if not fp8 else fp8_dtype)
    kv_cache = raw.view(storage).to(device).transpose(1, 2)
    pages = torch.randperm(NUM_BLOCKS, generator=g)[: 2 * len(MIX)].reshape(len(MIX), 2).to(torch.int32)
    keys = [torch.randn(n, HKV, D, generator=g).half() for _, n in MIX]  # the model's fp16 keys and values
    values = [torch.randn(n, HKV, D, generator=g).half() for _, n in MIX]
    positions = [torch.arange(n) for _, n in MIX]
    slots = [pages[s].long()[p // BLOCK] * BLOCK + p % BLOCK for s, p in enumerate(positions)]
    impl = _impl(kv_cache_dtype, sinks=torch.randn(HQ, generator=g).to(device))
    # Earlier steps wrote each sequence's context; this step writes the new tokens (plus 2 padded key rows).
    ctx = [n - q for q, n in MIX]
    write = lambda rows, slot: impl.do_kv_cache_update(layer, *(r.half().to(device) for r in rows), kv_cache,
                                                       slot.to(device))  # fmt: skip
    write((torch.cat([k[:c] for k, c in zip(keys, ctx)]), torch.cat([v[:c] for v, c in zip(values, ctx)])),
          torch.cat([s[:c] for s, c in zip(slots, ctx)]))  # fmt: skip
    new_k = torch.cat([k[c:] for k, c in zip(keys, ctx)] + [torch.randn(2, HKV, D, generator=g)])
    new_v = torch.cat([v[c:] for v, c in zip(values, ctx)] + [torch.randn(2, HKV, D, generator=g)])
    write((new_k, new_v), torch.cat([s[c:] for s, c in zip(slots, ctx)]))
    total_q = sum(q for q, _ in MIX)
    query = torch.randn(total_q + 2, HQ, D, generator=g).half().to(device)  # 2 padded rows (CUDA-graph padding)
    if query_fp8:  # what vLLM's layer hands over: saturate(query / _q_scale) in e4m3
        query = saturate_to_fp8(query, layer._q_scale, torch.float8_e4m3fn)
    output = poison(torch.empty(total_q + 2, HQ * D, dtype=torch.float16, device=device))
    output_scale = None
    if fused_out:
        output, output_scale = output.to(torch.float8_e4m3fn), torch.tensor([0.01], device=device)
    cu_q = torch.tensor([0] + torch.tensor([q for q, _ in MIX]).cumsum(0).tolist(), dtype=torch.int32)
    seq_lens = torch.tensor([n for _, n in MIX], dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=cu_q.to(device), query_start_loc_cpu=cu_q, seq_lens=seq_lens.to(device), num_reqs=len(MIX),
        num_actual_tokens=total_q, max_query_len=max(q for q, _ in MIX), max_seq_len=max(n for _, n in MIX),
        block_table_tensor=pages.to(device), slot_mapping=torch.cat([s[c:] for s, c in zip(slots, ctx)]).to(device),
    )  # fmt: skip
    metadata = builder.build(0, common)
    impl.forward(layer, query, None, None, kv_cache, metadata, output, output_scale=output_scale)
    assert torch.isnan(output[total_q:].float()).all(), "rows past num_actual_tokens are not written"
    # The stored cache holds exactly the quantised tokens; the reference reads them as a contiguous cache.
    enc = lambda x, s: encode_fp8(x, s if per_head else float(s), fp8_dtype) if fp8 else x.half()
    k_ref = torch.cat([enc(k, k_scale) for k in keys])
    v_ref = torch.cat([enc(v, v_scale) for v in values])
    stored = kv_cache.transpose(1, 2).cpu()
    all_slots = torch.cat(slots)
    k_stored = stored[all_slots // BLOCK, all_slots % BLOCK, :, :D]
    v_stored = stored[all_slots // BLOCK, all_slots % BLOCK, :, D:]
    assert torch.equal(k_stored.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_stored.view(torch.uint8), v_ref.view(torch.uint8))
    cu_k = torch.tensor([0] + seq_lens.cumsum(0).tolist(), dtype=torch.int32)
    descales = dict(k_descale=k_scale, v_descale=v_scale) if fp8 else {}
    ref_args = dict(cu_seqlens_k=cu_k, softmax_scale=0.3, causal=True, window_size=(11, 0), softcap=6.0,
                    s_aux=impl.sinks.cpu(), **descales)  # fmt: skip
    q = query[:total_q].cpu()
    if query_fp8:
        ref_args["q_descale"] = q_scale
    exact, _ = reference_attention(q, k_ref, v_ref, cu_q, compute_dtype=torch.float64, **ref_args)
    lowp, _ = reference_attention(q, k_ref, v_ref, cu_q, compute_dtype=torch.float16, **ref_args)
    got = output[:total_q].cpu().view(total_q, HQ, D)
    if fused_out:  # both rounded to the e4m3 output grid, then read back in real units
        got = got.double() * 0.01
        lowp = saturate_to_fp8(lowp, 0.01, torch.float8_e4m3fn).double() * 0.01
    assert_close_fa_rule(got, exact, lowp, atol=2e-3)


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(attn_type="encoder_only"), "attn_type"), (dict(kv_cache_dtype="int8_per_token_head"), "kv_cache_dtype"),
     (dict(use_alibi_sqrt=True), "use_alibi_sqrt"), (dict(chunk_lookback=64), "chunk_lookback")],
)  # fmt: skip
def test_unsupported_configurations_are_named(kwargs, name):
    with pytest.raises(NotImplementedError, match=name):
        _impl(kwargs.pop("kv_cache_dtype", "auto"), **kwargs)


def test_fused_output_and_query_quantisation_are_declared():
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8DynamicTensorSym, kFp8StaticTensorSym

    assert _impl("auto").fused_output_quant_supported(kFp8StaticTensorSym)
    assert not _impl("auto").fused_output_quant_supported(kFp8DynamicTensorSym)
    assert _impl("fp8_e5m2").supports_quant_query_input() and not _impl("auto").supports_quant_query_input()
    with pytest.raises(NotImplementedError, match="output_block_scale"):
        _impl("auto").forward(None, None, None, None, None, None, None, output_block_scale=torch.ones(1))


def test_full_cuda_graphs_for_single_token_decode_only():
    from vllm.v1.attention.backend import AttentionCGSupport

    builder = kvflash_vllm.KvflashMetadataBuilder
    assert builder._cudagraph_support == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

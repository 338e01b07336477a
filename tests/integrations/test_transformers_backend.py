"""kvflash inside Hugging Face transformers: a tiny randomly initialised Llama generates the same greedy tokens
with ``attn_implementation="kvflash"`` as with ``"sdpa"`` (left-padded batch), and with ``"paged|kvflash"`` as
with ``"paged|sdpa"`` in ``generate_batch``; an FP8 paged cache written by kvflash's writer is measured.

Runs on the CPU under the Triton interpreter (fp16, head size 16). Needs transformers (and psutil, which
transformers' continuous batching uses to size its cache on the CPU): ``nox -s integrations``.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("psutil")

from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import kvflash.integrations.transformers as kvflash_hf  # noqa: E402

NEW_TOKENS = 8
# FP8 run, documented threshold: every request's first token (decided by the prefill over the FP8 cache) equals
# sdpa's, and at least half of all generated tokens agree position by position. A tiny random model has small
# logit margins, so a few late tokens may flip after the first divergence; a wrong scale or layout flips nearly all.
FP8_MIN_AGREEMENT = 0.5
K_SCALE, V_SCALE = 0.05, 0.03  # distinct, non-unit; |k|, |v| stay below ~8 here, the FP8 limits are 22.4 and 13.4


@pytest.fixture(scope="module")
def model():
    kvflash_hf.register()
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)  # the weights: LlamaForCausalLM draws them from the global generator
    return LlamaForCausalLM(config).to(torch.float16).eval()


@pytest.fixture
def calls(monkeypatch):
    """Counts the kvflash entry points the integration calls (proves kvflash, not a fallback, ran)."""
    counts = {"attention": 0, "cache_writes": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(kvflash_hf, "flash_attn_varlen_func", counted("attention", kvflash_hf.flash_attn_varlen_func))
    monkeypatch.setattr(
        kvflash_hf, "reshape_and_cache_flash", counted("cache_writes", kvflash_hf.reshape_and_cache_flash)
    )
    return counts


def _prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 96, (n,), generator=g).tolist() for n in lengths]


def _generate(model, implementation, ids, mask):
    model.set_attn_implementation(implementation)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1] :]


def test_generate_matches_sdpa_with_left_padding(model, calls):
    prompts = _prompts([7, 4], seed=1)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    expected = _generate(model, "sdpa", ids, mask)
    got = _generate(model, "kvflash", ids, mask)
    assert calls["attention"] == NEW_TOKENS * model.config.num_hidden_layers
    assert got.tolist() == expected.tolist()


def test_generate_rejects_right_padding(model):
    # The model is on the CPU: there the device-side assertion raises at once (on a GPU it would be fatal).
    ids = torch.tensor([[5, 6, 7, 0]])
    with pytest.raises(RuntimeError, match="left padding"):
        _generate(model, "kvflash", ids, torch.tensor([[1, 1, 1, 0]]))


def _generate_batch(model, implementation, prompts):
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model.set_attn_implementation(implementation)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # A small explicit cache (the CPU has no memory probe worth trusting); 0 blocks per request: no decode fast path.
    batching = ContinuousBatchingConfig(block_size=16, num_blocks=16, max_batch_tokens=64, max_blocks_per_request=0)
    out = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=batching,
                               progress_bar=False)  # fmt: skip
    return [out[key].generated_tokens for key in sorted(out)]


# transformers 5.17's continuous batching asks for a CUDA device whenever CUDA is available, while this tiny model
# runs on the CPU (it failed so on the H200: "Expected a cuda device, but got: cpu"). CI's CPU tier runs these.
CPU_HOST_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="generate_batch of a CPU model on a GPU host")


@CPU_HOST_ONLY
def test_generate_batch_matches_paged_sdpa(model, calls):
    prompts = _prompts([5, 9, 3], seed=2)
    expected = _generate_batch(model, "paged|sdpa", prompts)
    got = _generate_batch(model, "paged|kvflash", prompts)
    assert calls["attention"] >= NEW_TOKENS * model.config.num_hidden_layers
    assert got == expected


@CPU_HOST_ONLY
def test_generate_batch_fp8_cache_agreement(model, calls):
    prompts = _prompts([5, 9, 3], seed=2)
    expected = _generate_batch(model, "paged|sdpa", prompts)
    name = kvflash_hf.register_fp8(kv_cache_dtype="fp8_e4m3", k_scale=K_SCALE, v_scale=V_SCALE)
    got = _generate_batch(model, name, prompts)
    assert calls["cache_writes"] >= NEW_TOKENS * model.config.num_hidden_layers, "kvflash's writer fills the cache"
    same = sum(a == b for g, e in zip(got, expected) for a, b in zip(g, e))
    total = sum(map(len, expected))
    prefixes = [next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), len(e)) for g, e in zip(got, expected)]
    print(f"FP8 e4m3 cache (k_scale={K_SCALE}, v_scale={V_SCALE}): {same}/{total} tokens agree with paged|sdpa; "
          f"common prefix per request {prefixes}")  # fmt: skip
    assert all(g[0] == e[0] for g, e in zip(got, expected)), f"first tokens differ: {got} vs {expected}"
    assert same / total >= FP8_MIN_AGREEMENT


def test_unsupported_arguments_are_named(model):
    q = torch.zeros(1, 4, 2, 16, dtype=torch.float16)
    kv = torch.zeros(1, 2, 2, 16, dtype=torch.float16)
    layer = model.model.layers[0].self_attn
    with pytest.raises(NotImplementedError, match="output_attentions"):
        kvflash_hf.attention_forward(layer, q, kv, kv, None, output_attentions=True)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        kvflash_hf.attention_forward(layer, q, kv, kv, None, dropout=0.1)
    with pytest.raises(ValueError, match="cache"):
        kvflash_hf.paged_attention_forward(layer, q, kv, kv, None)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kvflash_hf.register_fp8(kv_cache_dtype="int8")

"""``warmup()``: after it, a serving loop of varied batches compiles no kernel.

Counted through Triton's own machinery, never by timing. On the CPU (Triton interpreter) nothing compiles, so
the test compares specialisation keys: kvflash records, at each launch site, what Triton specialises a kernel
on (constexprs, dtypes, 16-byte alignment, ints equal to 1 or divisible by 16, warps and stages); every key the
serving loop reaches must be one the warm-up reached. On the GPU it also counts Triton's
``jit_post_compile_hook`` calls during serving: zero.

The "engine" here keeps persistent buffers (queries, block table, lengths) and slices them per step, as engines
do, so strides and alignment match what the warm-up used. Batches outside the warmed ranges must produce new
keys: that is checked too, so the test can fail.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from kvflash.attn_common.launch import count_compilations, describe_key, dry_run, record_launches
from kvflash.flash_attn_interface import flash_attn_varlen_func, merge_attn_states, reshape_and_cache_flash, warmup
from kvflash.fp8_utils import kv_cache_torch_dtype

from ..cases import cumulative

HQ, HKV, D, PAGE = 4, 2, 32, 16
MAX_SEQS, MAX_Q, MAX_K, MAX_TOKENS, NUM_BLOCKS = 4, 24, 1100, 48, 300
KV_STRINGS = ("auto", "fp8_e4m3", "fp8_e5m2_per_token_head")
# Where enumeration-only tests (execute=False, dry runs) put their tensors: the device whose launch path records
# keys. CPU tensors on a GPU machine take the PyTorch reference, which launches nothing and so records nothing.
DRY_DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclasses.dataclass
class Engine:
    """Persistent serving buffers of one KV-cache dtype, sliced per step."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    seqused_k: torch.Tensor
    cu_seqlens_q: torch.Tensor
    kv_string: str
    token_scales: tuple[torch.Tensor, torch.Tensor] | None  # per-token-head caches: [NUM_BLOCKS, PAGE, HKV] each

    @classmethod
    def make(cls, kv_string: str, q_dtype: torch.dtype, device, gen: torch.Generator) -> Engine:
        kv_dtype = kv_cache_torch_dtype(kv_string, q_dtype)
        width = -(-MAX_K // PAGE)
        cache = [torch.randn(NUM_BLOCKS, PAGE, HKV, D, generator=gen).to(kv_dtype).to(device) for _ in range(2)]
        table = torch.randint(0, NUM_BLOCKS, (MAX_SEQS, width), generator=gen, dtype=torch.int32).to(device)
        return cls(
            q=torch.randn(MAX_TOKENS, HQ, D, generator=gen).to(q_dtype).to(device),
            k_cache=cache[0],
            v_cache=cache[1],
            block_table=table,
            seqused_k=torch.zeros(MAX_SEQS, dtype=torch.int32, device=device),
            cu_seqlens_q=torch.zeros(MAX_SEQS + 1, dtype=torch.int32, device=device),
            kv_string=kv_string,
            token_scales=tuple(torch.rand(NUM_BLOCKS, PAGE, HKV, generator=gen).add(0.5).to(device) for _ in range(2))
            if kv_string.endswith("_per_token_head")
            else None,
        )

    def step(self, q_lens: list[int], kv_lens: list[int], **features):
        """One attention call over ``len(q_lens)`` sequences (query lengths, KV lengths with the new tokens)."""
        num_seqs, total_q = len(q_lens), sum(q_lens)
        offsets = [0]
        for n in q_lens:
            offsets.append(offsets[-1] + n)
        self.cu_seqlens_q[: num_seqs + 1].copy_(torch.tensor(offsets, dtype=torch.int32))
        self.seqused_k[:num_seqs].copy_(torch.tensor(kv_lens, dtype=torch.int32))
        descales = {}
        if self.token_scales is not None:
            descales = dict(k_descale=self.token_scales[0], v_descale=self.token_scales[1])
        elif self.kv_string != "auto":
            descales = dict(
                k_descale=torch.rand(num_seqs, HKV, device=self.q.device) + 0.5,
                v_descale=torch.rand(num_seqs, HKV, device=self.q.device) + 0.5,
            )
        return flash_attn_varlen_func(
            features.pop("q", self.q[:total_q]), self.k_cache, self.v_cache, max(q_lens),
            self.cu_seqlens_q[: num_seqs + 1], max(kv_lens), block_table=self.block_table[:num_seqs],
            seqused_k=self.seqused_k[:num_seqs], causal=True, **descales, **features,
        )  # fmt: skip


def _warm(device, q_dtype, kv_strings=KV_STRINGS):
    return warmup(
        num_q_heads=HQ, num_kv_heads=HKV, head_size=D, block_size=PAGE, q_dtype=q_dtype, kv_cache_dtypes=kv_strings,
        max_num_seqs=MAX_SEQS, max_seqlen_q=MAX_Q, max_seqlen_k=MAX_K, max_num_batched_tokens=MAX_TOKENS,
        num_blocks=NUM_BLOCKS, return_softmax_lse=(False, True), device=device,
    )  # fmt: skip


def _random_batches(rng: random.Random) -> list[tuple[list[int], list[int], bool]]:
    """(q_lens, kv_lens, return_lse) of decode, speculative, mixed and prefill steps inside the warmed ranges."""
    batches = []
    kinds = ["decode", "decode-long", "speculative", "mixed", "prefill"] * 3
    for kind in kinds:
        num_seqs = rng.randint(1, MAX_SEQS)
        if kind in ("decode", "decode-long"):
            q_lens = [1] * num_seqs
        elif kind == "speculative":
            q_lens = [rng.randint(1, 4) for _ in range(num_seqs)]
        elif kind == "mixed":
            num_seqs = max(2, num_seqs)
            q_lens = [1] * (num_seqs - 1) + [rng.randint(17, MAX_Q)]
        else:
            q_lens = [rng.randint(17, MAX_Q) for _ in range(min(num_seqs, MAX_TOKENS // MAX_Q))]
        # Long contexts (split-KV) now and then; the kernels read seqused_k, the launch settings max_seqlen_k.
        top = MAX_K if kind == "decode-long" else 80
        kv_lens = [rng.randint(q, max(q, top)) for q in q_lens]
        batches.append((q_lens, kv_lens, rng.random() < 0.5))
    return batches


def _serve(engines: dict[str, Engine], batches, *, real: bool) -> set:
    """Run the batches on every engine; return the launch keys (``real=False``: dry runs, nothing launched)."""
    with record_launches() as keys:
        for q_lens, kv_lens, lse in batches:
            for engine in engines.values():
                if real:
                    result = engine.step(q_lens, kv_lens, return_softmax_lse=lse)
                    out = result[0] if lse else result
                    assert torch.isfinite(out.float()).all()
                else:
                    with dry_run():
                        engine.step(q_lens, kv_lens, return_softmax_lse=lse)
    return keys


def _new_keys(keys: set, warmed: frozenset) -> list[dict]:
    return [describe_key(k) for k in sorted(keys - warmed, key=repr)]


@pytest.fixture(scope="module")
def warmed_cpu():
    if torch.cuda.is_available():
        pytest.skip("the CPU registry test runs where the kernels are interpreted")
    return _warm(torch.device("cpu"), torch.float16)


def test_warmup_reports_what_it_did(warmed_cpu):
    report = warmed_cpu
    kernels = {key[0] for key in report.keys}
    assert kernels == {
        "paged_decode_kernel", "split_merge_kernel", "chunk_prefill_kernel", "reshape_and_cache_kernel",
        "merge_states_kernel",
    }  # fmt: skip
    assert report.variants == len(report.keys) and 0 < report.calls <= report.variants < report.candidates
    assert report.compiled is None  # the interpreter compiles nothing
    assert "kernel variants" in str(report)


def test_serving_after_warmup_reaches_no_new_kernel_variant(warmed_cpu):
    gen = torch.Generator().manual_seed(18)
    engines = {s: Engine.make(s, torch.float16, "cpu", gen) for s in KV_STRINGS}
    batches = _random_batches(random.Random(18))
    # A few real steps (the kernels run under the interpreter), the rest as dry runs: the same Python path and
    # the same keys, without interpreting every kernel.
    keys = _serve(engines, batches[:5], real=True) | _serve(engines, batches[5:], real=False)
    # The cache writer and the merge, as a serving step calls them.
    with record_launches() as extra:
        for tokens in (1, 3, 16, 40):
            engine = engines["fp8_e4m3"]
            key = torch.randn(tokens, HKV, D).half()
            slots = torch.randperm(NUM_BLOCKS * PAGE)[:tokens].to(torch.int64)
            scale = torch.tensor([0.05])
            reshape_and_cache_flash(key, key, engine.k_cache, engine.v_cache, slots, "fp8_e4m3", scale, scale)
            part, lse = torch.randn(tokens, HQ, D).half(), torch.randn(HQ, tokens)
            merge_attn_states(part, lse, part, lse, out_lse=torch.empty_like(lse))
    keys |= extra
    assert {k[0] for k in keys} >= {"paged_decode_kernel", "split_merge_kernel", "chunk_prefill_kernel"}
    assert not _new_keys(keys, warmed_cpu.keys)


def test_batches_outside_the_warmed_ranges_are_new_variants(warmed_cpu):
    gen = torch.Generator().manual_seed(5)
    e5m2 = Engine.make("fp8_e5m2", torch.float16, "cpu", gen)  # a cache dtype the warm-up was not given
    with record_launches() as keys, dry_run():
        e5m2.step([1, 1], [30, 40])
    assert _new_keys(keys, warmed_cpu.keys)
    engine = Engine.make("auto", torch.float16, "cpu", gen)
    with record_launches() as keys, dry_run():
        engine.step([1, 1], [30, 40], softcap=30.0)  # a feature the warm-up was not given
    assert any(d["USE_SOFTCAP"] for d in _new_keys(keys, warmed_cpu.keys))
    with record_launches() as keys, dry_run():
        engine.step([1], [30], q=engine.q[1:2])  # a query slice 256 bytes in is aligned: the same variant
    assert not _new_keys(keys, warmed_cpu.keys)
    odd = torch.zeros(MAX_TOKENS * HQ * D + 1, dtype=torch.float16)[1:].view(MAX_TOKENS, HQ, D)
    with record_launches() as keys, dry_run():
        engine.step([1], [30], q=odd[:1])  # 2 bytes in: not 16-byte aligned, another specialisation
    assert any(d["q_ptr"] == (torch.float16, False) for d in _new_keys(keys, warmed_cpu.keys))


def test_warmed_features_cover_serving_with_them():
    """Features, a non-default block-table width and one-element descales, enumerated only (execute=False)."""
    width = 80  # wider than cdiv(MAX_K, PAGE) = 69: another row stride of the block table
    report = warmup(
        num_q_heads=HQ, num_kv_heads=HKV, head_size=D, block_size=PAGE, q_dtype=torch.float16,
        kv_cache_dtypes=("fp8_e5m2",), max_num_seqs=3, max_seqlen_q=20, max_seqlen_k=600, max_num_batched_tokens=40,
        num_blocks=NUM_BLOCKS, block_table_width=width, window_sizes=((63, 0),), softcaps=(20.0,), sinks=(True,),
        alibi=(True,), num_splits=(0, 1), descale_forms=("per_tensor",), cache_writer=False, merge_states=False,
        device=DRY_DEVICE, execute=False,
    )  # fmt: skip
    kernels = {k[0] for k in report.keys}
    assert report.compiled is None and {"paged_decode_kernel", "chunk_prefill_kernel"} <= kernels <= {
        "paged_decode_kernel", "chunk_prefill_kernel", "split_merge_kernel"}  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    k_cache, v_cache = (torch.randn(NUM_BLOCKS, PAGE, HKV, D, generator=gen).to(torch.float8_e5m2).to(DRY_DEVICE)
                        for _ in range(2))  # fmt: skip
    table = torch.zeros(3, width, dtype=torch.int32, device=DRY_DEVICE)
    features = dict(
        window_size=(63, 0), softcap=20.0, s_aux=torch.zeros(HQ, device=DRY_DEVICE),
        alibi_slopes=torch.ones(HQ, device=DRY_DEVICE), k_descale=torch.tensor([0.5], device=DRY_DEVICE),
        v_descale=torch.tensor([0.25], device=DRY_DEVICE), causal=True,
    )  # fmt: skip
    keys = _dry_steps(random.Random(3), k_cache, v_cache, table, (1, 1, 3, 20), (0, 1), **features)
    assert {k[0] for k in keys} >= {"paged_decode_kernel", "chunk_prefill_kernel"}
    assert not _new_keys(keys, report.keys)


def test_warmed_per_token_head_caches_cover_serving_with_them():
    """A per-token-head cache (one float32 scale per stored token and KV head): the warm-up reaches what decode,
    speculative, mixed and prefill steps over it and the writer computing its scales launch (enumerated only)."""
    report = warmup(
        num_q_heads=HQ, num_kv_heads=HKV, head_size=D, block_size=PAGE, q_dtype=torch.float16,
        kv_cache_dtypes=("fp8_e4m3_per_token_head",), max_num_seqs=3, max_seqlen_q=20, max_seqlen_k=600,
        max_num_batched_tokens=40, num_blocks=NUM_BLOCKS, merge_states=False, device=DRY_DEVICE, execute=False,
    )  # fmt: skip
    assert any(describe_key(k).get("PER_TOKEN_SCALES") for k in report.keys if k[0] == "paged_decode_kernel")
    gen = torch.Generator().manual_seed(11)
    k_cache, v_cache = (torch.randn(NUM_BLOCKS, PAGE, HKV, D, generator=gen).to(torch.float8_e4m3fn).to(DRY_DEVICE)
                        for _ in range(2))  # fmt: skip
    k_scale, v_scale = ((torch.rand(NUM_BLOCKS, PAGE, HKV, generator=gen) + 0.5).to(DRY_DEVICE) for _ in range(2))
    table = torch.zeros(3, -(-600 // PAGE), dtype=torch.int32, device=DRY_DEVICE)  # the warm-up's default width
    keys = _dry_steps(random.Random(4), k_cache, v_cache, table, (1, 1, 2, 8, 20), (0,), k_descale=k_scale,
                      v_descale=v_scale, causal=True)  # fmt: skip
    keys |= _dry_writes(gen, k_cache, v_cache, "fp8_e4m3_per_token_head", k_scale, v_scale)
    assert {k[0] for k in keys} >= {"paged_decode_kernel", "chunk_prefill_kernel", "reshape_and_cache_kernel"}
    assert not _new_keys(keys, report.keys)


def _dry_writes(gen: torch.Generator, k_cache, v_cache, kv_string: str, k_scale, v_scale) -> set:
    """Launch keys of dry-run ``reshape_and_cache_flash`` calls writing 1, 5, 16 and 40 fp16 tokens."""
    with record_launches() as keys, dry_run():
        for tokens in (1, 5, 16, 40):
            key = torch.randn(tokens, HKV, D, generator=gen).half().to(DRY_DEVICE)
            slots = torch.randperm(NUM_BLOCKS * PAGE, generator=gen)[:tokens].to(torch.int64).to(DRY_DEVICE)
            reshape_and_cache_flash(key, key, k_cache, v_cache, slots, kv_string, k_scale, v_scale)
    return keys


def _dry_steps(
    rng: random.Random, k_cache, v_cache, table, q_choices, splits, fp8_query=False, q_descale_rows=None, **features
) -> set:
    """Launch keys of 40 dry-run calls over up to 3 sequences with query lengths drawn from ``q_choices`` and
    ``num_splits`` from ``splits``; tensors on ``DRY_DEVICE``. ``fp8_query``: e4m3 queries writing into an fp16
    ``out`` (``q_descale`` comes with ``features``, or per token and head as slices of ``q_descale_rows``)."""
    with record_launches() as keys, dry_run():
        for _ in range(40):
            num_seqs = rng.randint(1, 3)
            q_lens = [rng.choice(q_choices) for _ in range(num_seqs)]
            kv_lens = [rng.randint(q, 600) for q in q_lens]
            q = torch.zeros(sum(q_lens), HQ, D, dtype=torch.float16, device=DRY_DEVICE)
            if fp8_query:
                features["out"], q = q, q.to(torch.float8_e4m3fn)
            if q_descale_rows is not None:  # [total_q, Hq], sliced from a persistent buffer as engines do
                features.update(q_descale=q_descale_rows[: q.shape[0]], q_descale_per_token=True)
            flash_attn_varlen_func(
                q, k_cache, v_cache, max(q_lens), cumulative(q_lens, DRY_DEVICE), max(kv_lens),
                block_table=table[:num_seqs], seqused_k=torch.tensor(kv_lens, dtype=torch.int32, device=DRY_DEVICE),
                num_splits=rng.choice(splits), **features,
            )  # fmt: skip
    return keys


@pytest.mark.parametrize("forms", [("per_kv_head",), ("per_tensor", "per_sequence_kv_head")])
def test_warmed_descale_forms_cover_engines_passing_them(forms):
    """Descales passed as ``[Hkv]`` (vLLM's per-head scales) are a specialisation of their own: warmed with
    ``"per_kv_head"`` the attention and writer calls reach no new variant, warmed without it they do."""
    report = warmup(
        num_q_heads=HQ, num_kv_heads=HKV, head_size=D, block_size=PAGE, q_dtype=torch.float16,
        kv_cache_dtypes=("fp8_e4m3",), max_num_seqs=3, max_seqlen_q=20, max_seqlen_k=600, max_num_batched_tokens=40,
        num_blocks=NUM_BLOCKS, descale_forms=forms, merge_states=False, device=DRY_DEVICE, execute=False,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(14)
    k_cache, v_cache = (torch.randn(NUM_BLOCKS, PAGE, HKV, D, generator=gen).to(torch.float8_e4m3fn).to(DRY_DEVICE)
                        for _ in range(2))  # fmt: skip
    table = torch.zeros(3, -(-600 // PAGE), dtype=torch.int32, device=DRY_DEVICE)
    per_head = torch.tensor([0.5, 0.25], device=DRY_DEVICE)  # [Hkv]
    keys = _dry_steps(random.Random(8), k_cache, v_cache, table, (1, 1, 3, 20), (0,), k_descale=per_head,
                      v_descale=per_head, causal=True)  # fmt: skip
    keys |= _dry_writes(gen, k_cache, v_cache, "fp8_e4m3", per_head, per_head)
    assert {k[0] for k in keys} >= {"paged_decode_kernel", "chunk_prefill_kernel", "reshape_and_cache_kernel"}
    assert bool(_new_keys(keys, report.keys)) == ("per_kv_head" not in forms)


@pytest.mark.parametrize("per_token", [False, True], ids=["query-descale-like-kv", "query-descale-per-token"])
def test_warmed_fp8_queries_cover_serving_with_them(per_token):
    """fp8 e4m3 queries with ``q_descale`` (``[1]``, or per token and head) over an FP8 cache, into an fp16 ``out``
    (enumerated only); the same serving loop with 16-bit queries reaches variants the fp8-query warm-up did not."""
    report = warmup(
        num_q_heads=HQ, num_kv_heads=HKV, head_size=D, block_size=PAGE, q_dtype=torch.float16,
        kv_cache_dtypes=("fp8_e4m3",), max_num_seqs=3, max_seqlen_q=20, max_seqlen_k=600, max_num_batched_tokens=40,
        num_blocks=NUM_BLOCKS, descale_forms=("per_tensor",), fp8_queries=True, query_descale_per_token=per_token,
        cache_writer=False, merge_states=False, device=DRY_DEVICE, execute=False,
    )  # fmt: skip
    assert any(describe_key(k).get("Q_FP8") for k in report.keys if k[0] == "chunk_prefill_kernel")
    assert any(describe_key(k).get("Q_PER_TOKEN") for k in report.keys) == per_token
    gen = torch.Generator().manual_seed(12)
    k_cache, v_cache = (torch.randn(NUM_BLOCKS, PAGE, HKV, D, generator=gen).to(torch.float8_e4m3fn).to(DRY_DEVICE)
                        for _ in range(2))  # fmt: skip
    table = torch.zeros(3, -(-600 // PAGE), dtype=torch.int32, device=DRY_DEVICE)
    one = torch.ones(1, device=DRY_DEVICE)
    scales = dict(k_descale=one, v_descale=one, causal=True)
    rows = torch.ones(60, HQ, device=DRY_DEVICE) if per_token else None  # up to 3 sequences of 20 queries
    keys = _dry_steps(random.Random(6), k_cache, v_cache, table, (1, 1, 3, 20), (0,), True, rows, q_descale=one,
                      **scales)  # fmt: skip
    assert {k[0] for k in keys} >= {"paged_decode_kernel", "chunk_prefill_kernel"}
    assert not _new_keys(keys, report.keys)
    keys = _dry_steps(random.Random(6), k_cache, v_cache, table, (1, 1, 3, 20), (0,), **scales)
    assert _new_keys(keys, report.keys)


@pytest.mark.parametrize(
    "override, error, match",
    [
        (dict(num_q_heads=5), ValueError, "multiple of the number of KV heads"),
        (dict(head_size=12), ValueError, "head_size"),
        (dict(max_num_seqs=0), ValueError, "max_num_seqs"),
        (dict(q_dtype=torch.float32), TypeError, "q_dtype"),
        (dict(block_table_width=10), ValueError, "block_table_width"),
        (dict(kv_cache_dtypes=("fp4",)), ValueError, "kv_cache_dtype"),
        (dict(compile_workers=0), ValueError, "compile_workers"),
        (dict(fp8_queries=1), TypeError, "fp8_queries"),
        (dict(descale_forms=("per_head",)), ValueError, "descale_forms"),
        (dict(query_descale_per_token=True), ValueError, "query_descale_per_token"),
    ],
)
def test_bad_warmup_arguments_are_named(override, error, match):
    args = dict(num_q_heads=HQ, num_kv_heads=HKV, head_size=D, block_size=PAGE, max_num_seqs=2, max_seqlen_q=4,
                max_seqlen_k=300, device="cpu", execute=False)  # fmt: skip
    with pytest.raises(error, match=match):
        warmup(**{**args, **override})


@pytest.mark.gpu
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_no_triton_compilation_while_serving_after_warmup(q_dtype):
    device = torch.device("cuda")
    report = _warm(device, q_dtype)
    assert report.compiled is not None, "this Triton has no jit_post_compile_hook: the test cannot count"
    gen = torch.Generator().manual_seed(18)
    engines = {s: Engine.make(s, q_dtype, device, gen) for s in KV_STRINGS}
    batches = _random_batches(random.Random(18))
    with count_compilations() as compiled:
        keys = _serve(engines, batches, real=True)
        torch.cuda.synchronize()
    assert not _new_keys(keys, report.keys)
    assert compiled.count == 0, f"{compiled.count} kernels compiled while serving after warm-up"
    # The counter does count: an unwarmed variant compiles (softcap was not warmed).
    with count_compilations() as compiled:
        engines["auto"].step([1, 1], [30, 40], softcap=30.0)
        torch.cuda.synchronize()
    assert compiled.count >= 1

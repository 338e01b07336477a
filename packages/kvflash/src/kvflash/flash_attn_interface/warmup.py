"""``warmup``: compile, at engine start-up, every kernel variant the engine's calls can reach.

Triton compiles one binary per *specialisation* of a kernel (see :mod:`kvflash.attn_common.launch`): the
``tl.constexpr`` values (feature flags, tile sizes chosen from ``max_seqlen_q``, the GQA group, the split
count), the dtypes, and for every int argument whether it is 1 or divisible by 16 (batch sizes, token counts,
split counts and the strides made from them). An engine that meets a new one mid-serving stalls for the
compilation (seconds). A warm-up therefore has to cover shape *classes*, not just feature flags.

How: for each KV-cache dtype and feature combination, many candidate calls (every route of
``flash_attn_varlen_func``: decode-only, mixed prefill + decode, prefill-only; batch sizes, token counts,
``max_seqlen_q`` and ``max_seqlen_k`` values across the given ranges, which is what moves the split count) are
first run in :func:`kvflash.attn_common.launch.dry_run` mode: the whole Python path runs, each launch's
specialisation key is recorded, nothing is launched. Cheap pre-signatures (the launch configuration the
launchers would choose, and the residues mod 16 of the ints they pass) skip candidates that cannot add a key.
Then the smallest set of candidates reaching every recorded key runs for real, on small dummy tensors of the
right dtypes and strides and zero KV lengths (the kernels exit at once; the binaries are those serving needs).
The cache writer and ``merge_attn_states`` are covered the same way.

Compiled binaries also land in Triton's on-disk cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), so
a second start-up on the same machine loads instead of compiling.

Command line (prints the count of variants and the seconds)::

    python -m kvflash.flash_attn_interface --heads 32 8 --head-size 128 --page 16 --kv auto,fp8_e4m3
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import triton

from kvflash.attn_common import FP8_QUERY_DTYPE, QUERY_TORCH_DTYPES, check_gqa, check_head_size, check_int, platform
from kvflash.attn_common.launch import compile_only, count_compilations, dry_run, record_launches
from kvflash.chunk_prefill.launch_config import choose_chunk_prefill_config, pack_heads
from kvflash.flash_attn_interface.routing import MAX_DECODE_QUERIES, MIXED_DECODE_ROWS
from kvflash.flash_attn_interface.varlen import flash_attn_varlen_func
from kvflash.fp8_utils import kv_cache_torch_dtype, reshape_and_cache_flash
from kvflash.fp8_utils.cache_dtype import check_kv_cache_dtype, is_per_token_head
from kvflash.paged_decode import merge_attn_states
from kvflash.paged_decode.launch_config import MIN_KEYS_PER_SPLIT, choose_paged_decode_config, one_query_rows_apart

__all__ = ["warmup", "WarmupReport", "main", "DESCALE_FORMS"]

# The shapes an engine passes descales in (warmup's descale_forms): [1], [Hkv], [num_seqs, Hkv].
DESCALE_FORMS = ("per_tensor", "per_kv_head", "per_sequence_kv_head")

# Batch sizes enumerated one by one for the mixed and prefill routes (past it, residues mod 16 repeat).
_DENSE_SEQS = 48
# max_seqlen_q values tried on the prefill routes (deduplicated by the launch configuration they give).
_PREFILL_Q_BOUNDS = (17, 24, 32, 33, 48, 64, 65, 96, 128, 129, 256, 257, 512, 1024, 2048, 4096, 8192)


@dataclasses.dataclass(frozen=True)
class WarmupReport:
    """What a warm-up did.

    Attributes
    ----------
    variants : int
        Distinct kernel specialisations reached (launch keys): each is one compiled binary on a GPU.
    calls : int
        Real calls run to reach them (the rest of the candidates ran as dry runs).
    candidates : int
        Candidate calls dry-run.
    seconds : float
        Wall time of the whole warm-up (compilation included on a GPU).
    compiled : int or None
        Binaries Triton reported compiling or loading during the warm-up (its ``jit_post_compile_hook``); ``None``
        under the interpreter or a Triton without the hook.
    note : str
        How the kernels were compiled: in parallel (Triton's asynchronous compile mode, ``compile_workers``
        threads), serially, or why the parallel phase was skipped.
    keys : frozenset
        The launch keys (:func:`kvflash.attn_common.launch.launch_key`), for tests and diagnostics.
    """

    variants: int
    calls: int
    candidates: int
    seconds: float
    compiled: int | None
    keys: frozenset
    note: str = ""

    def __str__(self) -> str:
        compiled = "" if self.compiled is None else f", {self.compiled} compiled or loaded by Triton"
        note = f" [{self.note}]" if self.note else ""
        return (
            f"kvflash warm-up: {self.variants} kernel variants from {self.calls} calls "
            f"({self.candidates} candidates dry-run){compiled} in {self.seconds:.1f} s{note}"
        )


@dataclasses.dataclass
class _Buffers:
    """Persistent input buffers sliced per call, as an engine slices its own (same alignment, same strides)."""

    q: torch.Tensor  # [max_tokens, Hq, D]
    q_fp8: torch.Tensor | None  # [max_tokens, Hq, D] float8_e4m3fn (fp8_queries)
    out: torch.Tensor | None  # [max_tokens, Hq, D] q's dtype: the out buffer of fp8-query calls (fp8_queries)
    q_descale: torch.Tensor | None  # [max_tokens, Hq] fp32: per-token-head query descales (query_descale_per_token)
    cu_seqlens_q: torch.Tensor  # [max_num_seqs + 1] int32
    seqused_k: torch.Tensor  # [max_num_seqs] int32, zeros: the kernels read no key
    block_table: torch.Tensor  # [max_num_seqs, width] int32, zeros: page 0


def _kv_cache(
    num_blocks: int, block_size: int, hkv: int, d: int | None, dtype: torch.dtype, device
) -> torch.Tensor:
    """A ``[num_blocks, block_size, Hkv, D]`` cache (``d=None``: the ``[num_blocks, block_size, Hkv]`` per-token
    scales beside it) with a real pool's strides class and size, in one page of memory when the block stride is a
    multiple of 16 (a stride of 0 specialises like one), else materialised."""
    shape = (num_blocks, block_size, hkv) + ((d,) if d is not None else ())
    if (block_size * hkv * (d or 1)) % 16 == 0:
        return torch.zeros((1,) + shape[1:], dtype=dtype, device=device).expand(shape)
    return torch.zeros(shape, dtype=dtype, device=device)


def _fill_lengths(buf: _Buffers, q_lens: Sequence[int]) -> None:
    offsets = [0]
    for n in q_lens:
        offsets.append(offsets[-1] + n)
    buf.cu_seqlens_q[: len(offsets)].copy_(torch.tensor(offsets, dtype=torch.int32))


def _q_lens(num_seqs: int, total_q: int, max_q: int, decode_queries: int, mixed: bool) -> list[int] | None:
    """Per-sequence query lengths summing to ``total_q`` under ``max_q`` (one short sequence for ``mixed``)."""
    if mixed:
        rest, lens = total_q - 1, [1]
        others = num_seqs - 1
    else:
        rest, lens, others = total_q, [], num_seqs
    if others == 0:
        return lens if rest == 0 else None
    if rest < others or rest > others * max_q:
        return None
    base, extra = divmod(rest, others)
    lens += [base + 1] * extra + [base] * (others - extra)
    return lens


def _total_q_values(lo: int, hi: int) -> list[int]:
    """Token counts in ``[lo, hi]`` covering every residue mod 16 (and 1) near both ends."""
    if hi < lo:
        return []
    values = set(range(lo, min(hi, lo + 33) + 1)) | set(range(max(lo, hi - 33), hi + 1))
    return sorted(values)


def warmup(
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    q_dtype: torch.dtype = torch.bfloat16,
    kv_cache_dtypes: Iterable[str] = ("auto",),
    max_num_seqs: int = 256,
    max_seqlen_q: int = 2048,
    max_seqlen_k: int = 8192,
    max_num_batched_tokens: int | None = None,
    num_blocks: int = 4096,
    block_table_width: int | None = None,
    causal: Iterable[bool] = (True,),
    window_sizes: Iterable[tuple[int, int] | None] = (None,),
    softcaps: Iterable[float] = (0.0,),
    sinks: Iterable[bool] = (False,),
    alibi: Iterable[bool] = (False,),
    return_softmax_lse: Iterable[bool] = (False,),
    num_splits: Iterable[int] = (0,),
    descale_forms: Iterable[str] = ("per_sequence_kv_head",),
    fp8_queries: bool = False,
    query_descale_per_token: bool = False,
    cache_writer: bool = True,
    merge_states: bool = True,
    device: torch.device | str | None = None,
    execute: bool = True,
    compile_workers: int | None = None,
) -> WarmupReport:
    """Compile every kernel variant that serving with these settings can reach, and say how many and how long.

    Parameters
    ----------
    num_q_heads, num_kv_heads, head_size : int
        ``Hq``, ``Hkv`` (``Hq % Hkv == 0``) and ``D`` of the model's attention layers.
    block_size : int
        Tokens per KV-cache page.
    q_dtype : torch.dtype
        float16 or bfloat16: the queries' (and the model's) dtype.
    kv_cache_dtypes : iterable of str
        ``kv_cache_dtype`` strings of the caches served: ``"auto"`` (``q_dtype``), ``"fp8"``/``"fp8_e4m3"``,
        ``"fp8_e5m2"``, and the per-token-head ``"fp8_e4m3_per_token_head"`` / ``"fp8_e5m2_per_token_head"``
        (attention with ``[num_blocks, block_size, Hkv]`` descales, the writer computing them).
    max_num_seqs : int
        Most sequences in one step.
    max_seqlen_q : int
        Most query tokens of one sequence in one step (the prefill chunk size); up to 16 is decode only.
    max_seqlen_k : int
        Most keys of one sequence (the model length).
    max_num_batched_tokens : int, optional
        Most query tokens in one step; default ``max_num_seqs * max_seqlen_q``.
    num_blocks : int
        Pages in the engine's KV pool (an int the kernels take: it specialises like any other).
    block_table_width : int, optional
        Columns of the engine's block table (its row stride); default ``cdiv(max_seqlen_k, block_size)``.
    causal, window_sizes, softcaps, sinks, alibi, return_softmax_lse : iterables
        The feature values served; every combination is warmed. ``sinks``/``alibi``: whether ``s_aux`` /
        ``alibi_slopes`` tensors are passed.
    num_splits : iterable of int
        The ``num_splits`` values the engine passes (0: automatic).
    descale_forms : iterable of str
        FP8 caches: the shapes the engine passes its K/V descales (and, with ``fp8_queries``, ``q_descale``) in,
        each a specialisation of its own: ``"per_tensor"`` (``[1]``), ``"per_kv_head"`` (``[Hkv]``, vLLM's
        per-head scales) and ``"per_sequence_kv_head"`` (``[num_seqs, Hkv]``). The cache writer is warmed with
        ``[1]`` scales, and with ``[Hkv]`` ones for ``"per_kv_head"``.
    fp8_queries : bool
        Over the FP8 caches, queries arrive in ``float8_e4m3fn`` with ``q_descale`` (shaped like the K/V
        descales), writing into an ``out`` buffer of ``q_dtype`` (as vLLM's layer does when its backend takes
        quantised queries); ``"auto"`` caches keep ``q_dtype`` queries.
    query_descale_per_token : bool
        With ``fp8_queries``: the query descales are per (token, query head), ``[total_q, Hq]`` with
        ``q_descale_per_token=True`` (their own specialisation), instead of the K/V descales' shape.
    cache_writer, merge_states : bool
        Also warm ``reshape_and_cache_flash`` (every dtype above, one-element scale tensors) and
        ``merge_attn_states`` (``q_dtype`` partials, with and without ``out_lse``).
    device : torch.device or str, optional
        Default: the current GPU, else the CPU (interpreter: nothing compiles, the keys are still recorded).
    execute : bool
        False: only enumerate (dry runs) and report how many variants the configuration reaches; nothing runs
        or compiles (``calls`` is then the number of calls a real warm-up would make).
    compile_workers : int, optional
        GPU: threads compiling in parallel (Triton's asynchronous compile mode) before the calls run; default
        the CPU count, ``1`` compiles serially as the calls run.

    Returns
    -------
    WarmupReport
        Variants (distinct launch keys), calls, candidates, seconds, and what Triton reported compiling.

    Notes
    -----
    Inputs an engine slices from persistent buffers keep the alignment and strides the warm-up uses (slices from
    the start of row-major buffers). A serving call with, e.g., a query tensor starting at an odd offset, a key
    tensor sliced from a fused QKV projection, or a block table of another width is another specialisation.
    """
    start = time.perf_counter()
    for name, value in (
        ("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads), ("head_size", head_size),
        ("block_size", block_size), ("max_num_seqs", max_num_seqs), ("max_seqlen_q", max_seqlen_q),
        ("max_seqlen_k", max_seqlen_k), ("num_blocks", num_blocks),
    ):  # fmt: skip
        check_int(name, value, 1)
    for name, value in (
        ("max_num_batched_tokens", max_num_batched_tokens), ("block_table_width", block_table_width),
        ("compile_workers", compile_workers),
    ):  # fmt: skip
        if value is not None:
            check_int(name, value, 1)
    check_gqa(num_q_heads, num_kv_heads)
    check_head_size(head_size, "head_size")
    if q_dtype not in QUERY_TORCH_DTYPES:
        raise TypeError(f"q_dtype: expected torch.float16 or torch.bfloat16, got {q_dtype}")
    if block_table_width is not None and block_table_width * block_size < max_seqlen_k:
        raise ValueError(
            f"block_table_width: {block_table_width} pages of {block_size} tokens cannot hold max_seqlen_k = "
            f"{max_seqlen_k} keys"
        )
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    kv_cache_dtypes = tuple(check_kv_cache_dtype(kv_string) for kv_string in kv_cache_dtypes)
    max_tokens = max_num_batched_tokens or max_num_seqs * max_seqlen_q
    width = block_table_width or triton.cdiv(max_seqlen_k, block_size)
    for name, flag in (("fp8_queries", fp8_queries), ("query_descale_per_token", query_descale_per_token)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    if query_descale_per_token and not fp8_queries:
        raise ValueError("query_descale_per_token: describes fp8 queries; pass fp8_queries=True too")
    descale_forms = tuple(descale_forms)
    for form in descale_forms:
        if form not in DESCALE_FORMS:
            raise ValueError(f"descale_forms: expected entries among {DESCALE_FORMS}, got {form!r}")
    buf = _Buffers(
        q=torch.zeros(max_tokens, num_q_heads, head_size, dtype=q_dtype, device=device),
        q_fp8=torch.zeros(max_tokens, num_q_heads, head_size, dtype=FP8_QUERY_DTYPE, device=device)
        if fp8_queries
        else None,
        out=torch.zeros(max_tokens, num_q_heads, head_size, dtype=q_dtype, device=device) if fp8_queries else None,
        q_descale=torch.ones(max_tokens, num_q_heads, dtype=torch.float32, device=device)
        if query_descale_per_token
        else None,
        cu_seqlens_q=torch.zeros(max_num_seqs + 1, dtype=torch.int32, device=device),
        seqused_k=torch.zeros(max_num_seqs, dtype=torch.int32, device=device),
        block_table=torch.zeros(max_num_seqs, width, dtype=torch.int32, device=device),
    )
    all_keys: set = set()
    chosen: list[Callable[[], None]] = []
    candidates = 0

    def consider(make_call: Callable[[], Callable[[], None]]) -> None:
        """Dry-run one candidate; keep it for the real run when it reaches a key not seen yet."""
        nonlocal candidates
        candidates += 1
        call = make_call()
        with record_launches() as keys, dry_run():
            call()
        if not keys <= all_keys:
            all_keys.update(keys)
            chosen.append(call)

    for kv_string in kv_cache_dtypes:
        kv_dtype = kv_cache_torch_dtype(kv_string, q_dtype)
        k_cache = _kv_cache(num_blocks, block_size, num_kv_heads, head_size, kv_dtype, device)
        v_cache = _kv_cache(num_blocks, block_size, num_kv_heads, head_size, kv_dtype, device)
        # Per-token-head caches: one float32 descale per stored (token, KV head), indexed like the cache.
        token_scales = None
        if is_per_token_head(kv_string):
            token_scales = tuple(_kv_cache(num_blocks, block_size, num_kv_heads, None, torch.float32, device)
                                 for _ in range(2))  # fmt: skip
        features = itertools.product(causal, window_sizes, softcaps, sinks, alibi, return_softmax_lse, num_splits)
        for is_causal, window, softcap, use_sinks, use_alibi, lse, splits in features:
            extra = dict(causal=is_causal, window_size=window, softcap=softcap, return_softmax_lse=lse)
            if use_sinks:
                extra["s_aux"] = torch.zeros(num_q_heads, dtype=torch.float32, device=device)
            if use_alibi:
                extra["alibi_slopes"] = torch.ones(num_q_heads, dtype=torch.float32, device=device)
            fp8 = kv_dtype != q_dtype
            # Descale shapes specialise the kernels (their strides); a per-token-head or 16-bit cache has one form.
            forms = descale_forms if fp8 and token_scales is None else (None,)
            for form in forms:
                for make in _varlen_candidates(
                    buf, k_cache, v_cache, fp8, extra, splits, num_q_heads, num_kv_heads, head_size, max_num_seqs,
                    max_seqlen_q, max_seqlen_k, max_tokens, window, form, token_scales, device,
                ):  # fmt: skip
                    consider(make)
        if cache_writer:
            per_head_scales = "per_kv_head" in descale_forms and kv_dtype != q_dtype and token_scales is None
            for scale_heads in (1, num_kv_heads) if per_head_scales else (1,):
                for make in _cache_candidates(kv_string, q_dtype, num_kv_heads, head_size, block_size, max_tokens,
                                              token_scales is not None, scale_heads, device):  # fmt: skip
                    consider(make)
    if merge_states:
        for make in _merge_candidates(q_dtype, num_q_heads, head_size, max_tokens, device):
            consider(make)

    if not execute:
        seconds = time.perf_counter() - start
        return WarmupReport(len(all_keys), len(chosen), candidates, seconds, None, frozenset(all_keys))
    with record_launches() as ran, count_compilations() as counter:
        note = _compile_in_parallel(chosen, device, compile_workers)
        for call in chosen:  # every kernel is compiled now (or compiles here): this loads and runs them
            call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    missing = all_keys - ran
    if missing:  # a dry run and the real run of the same calls must reach the same keys
        raise RuntimeError(f"warmup: {len(missing)} launch keys seen in dry runs were not reached by the real calls")
    return WarmupReport(
        variants=len(all_keys),
        calls=len(chosen),
        candidates=candidates,
        seconds=time.perf_counter() - start,
        compiled=counter.count,
        keys=frozenset(all_keys),
        note=note,
    )


def _compile_in_parallel(calls: list[Callable[[], None]], device: torch.device, workers: int | None) -> str:
    """Compile the kernels of ``calls`` in Triton's asynchronous compile mode (GPU only), launching nothing.

    Best effort by design: the serial pass that follows compiles whatever this did not, so a Triton without the
    mode, or a failure in it, costs time, never a kernel. What happened is returned for the report.
    """
    import os

    workers = workers if workers is not None else (os.cpu_count() or 1)
    if device.type == "cpu" or workers <= 1:
        return "compiled serially"
    try:
        from concurrent.futures import ThreadPoolExecutor

        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return "compiled serially (this Triton has no asynchronous compile mode)"
    try:
        with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool), compile_only():
            for call in calls:
                call()
    except Exception as exc:  # reported, and the serial pass compiles the rest
        return f"parallel compilation failed ({type(exc).__name__}: {str(exc)[:120]}); compiled serially"
    return f"compiled in parallel, {workers} threads"


def _varlen_candidates(
    buf, k_cache, v_cache, fp8, extra, splits, hq, hkv, d, max_num_seqs, max_seqlen_q, max_seqlen_k, max_tokens,
    window, descale_form, token_scales, device,
):  # fmt: skip
    """Candidate ``flash_attn_varlen_func`` calls of every route, deduplicated by a cheap pre-signature.
    ``token_scales``: the ``(k, v)`` per-token-head descales of a per-token-head cache, else ``None``."""
    group = hq // hkv
    interpreter = platform.interpreter_enabled() and device.type == "cpu"
    sms = platform.multiprocessor_count(device)
    itemsize = k_cache.element_size()
    window_left = -1 if window is None else window[0]
    seen: set = set()

    def make(q_lens: list[int], max_q: int, max_k: int):
        def build():
            num_seqs, total_q = len(q_lens), sum(q_lens)
            _fill_lengths(buf, q_lens)
            descales = {}
            shape = {"per_tensor": (1,), "per_kv_head": (hkv,), "per_sequence_kv_head": (num_seqs, hkv)}.get(
                descale_form, (1,)
            )
            if token_scales is not None:
                descales = dict(k_descale=token_scales[0], v_descale=token_scales[1])
            elif fp8:
                descales = dict(
                    k_descale=torch.ones(shape, dtype=torch.float32, device=device),
                    v_descale=torch.ones(shape, dtype=torch.float32, device=device),
                )
            q = buf.q[:total_q]
            if fp8 and buf.q_fp8 is not None:  # an fp8 query, its descale, and the model-dtype out buffer
                q = buf.q_fp8[:total_q]
                descales.update(q_descale=torch.ones(shape, dtype=torch.float32, device=device), out=buf.out[:total_q])
                if buf.q_descale is not None:
                    descales.update(q_descale=buf.q_descale[:total_q], q_descale_per_token=True)
            args = (q, k_cache, v_cache, max_q, buf.cu_seqlens_q[: num_seqs + 1].clone(), max_k)
            kwargs = dict(
                block_table=buf.block_table[:num_seqs], seqused_k=buf.seqused_k[:num_seqs], num_splits=splits,
                **descales, **extra,
            )  # fmt: skip

            def call():
                flash_attn_varlen_func(*args, **kwargs)

            return call

        return build

    def decode_configs(num_seqs: int, max_q: int, fill_rows: bool) -> dict:
        """``{decode launch configs: a max_seqlen_k that reaches them}``: the split count moves with max_seqlen_k.
        The key is the tuple of configs a call launches: a mixed batch's decode rows (``fill_rows`` False) may take
        two launches, its 1-query rows with the decode config, which may split differently
        (``one_query_rows_apart``)."""

        def config(max_k, queries):
            return choose_paged_decode_config(
                num_seqs=num_seqs, num_kv_heads=hkv, group=group, head_size=d, kv_itemsize=itemsize,
                max_seqlen_k=max_k, window_left=window_left, num_splits=splits, multiprocessor_count=sms,
                interpreter=interpreter, max_seqlen_q=queries, fill_rows=fill_rows,
                per_token_scales=token_scales is not None,
            )  # fmt: skip

        def launched(max_k):
            several = config(max_k, max_q)
            if fill_rows or not one_query_rows_apart(config(max_k, 1), several):
                return (several,)
            return config(max_k, 1), several

        bounds = [max_seqlen_k]
        if any(c.num_splits > 1 for c in launched(max_seqlen_k)):
            # every smaller split count is reachable with shorter contexts
            bounds += list(range(1, max_seqlen_k, MIN_KEYS_PER_SPLIT)) + [16, MIN_KEYS_PER_SPLIT]
        configs = {}
        for max_k in sorted({b for b in bounds if 1 <= b <= max_seqlen_k}):
            configs.setdefault(launched(max_k), max_k)
        return configs

    # Decode only: max_seqlen_q 1..16; the split count moves with the batch size and max_seqlen_k, and the token
    # count can be anything from num_seqs (one query each) to num_seqs * max_seqlen_q.
    for max_q in range(1, min(MAX_DECODE_QUERIES, max_seqlen_q) + 1):
        for num_seqs in range(1, min(max_num_seqs, max_tokens) + 1):
            for cfg, max_k in decode_configs(num_seqs, max_q, True).items():
                for total_q in _total_q_values(num_seqs, min(num_seqs * max_q, max_tokens)):
                    sig = ("decode", cfg, max_q, total_q == 1, total_q % 16)
                    if sig in seen:
                        continue
                    seen.add(sig)
                    yield make(_q_lens(num_seqs, total_q, max_q, 0, False), max_q, max_k)
    if max_seqlen_q <= MAX_DECODE_QUERIES:
        return
    decode_queries = max(1, MIXED_DECODE_ROWS // group)
    bounds_q = sorted({b for b in _PREFILL_Q_BOUNDS if b < max_seqlen_q} | {max_seqlen_q})
    seqs = sorted(set(range(1, min(max_num_seqs, _DENSE_SEQS) + 1)) | {max_num_seqs})
    for max_q in bounds_q:
        cfg = choose_chunk_prefill_config(
            d, fp8, group, max_q, interpreter=interpreter, q_is_fp8=fp8 and buf.q_fp8 is not None
        )
        g_pack, _ = pack_heads(group, cfg.block_m)
        rows = cfg.block_m // g_pack
        for num_seqs in seqs:
            # Mixed: some sequence short (<= decode_queries); prefill only: none can be.
            mixed_hi = min((num_seqs - 1) * max_q + decode_queries, max_tokens)
            ranges = [(True, num_seqs, mixed_hi)] if num_seqs > 1 else []
            ranges.append((False, max(num_seqs, mixed_hi + 1), min(num_seqs * max_q, max_tokens)))
            for mixed, lo, hi in ranges:
                # a mixed batch's decode rows take split-KV like a decode batch's (its sequences' split counts)
                decode = decode_configs(num_seqs, decode_queries, False) if mixed else {None: max_seqlen_k}
                for decode_cfg, max_k in decode.items():
                    for total_q in _total_q_values(lo, hi):
                        tiles = triton.cdiv(total_q, rows) + num_seqs
                        sig = ("prefill", mixed, cfg, decode_cfg, num_seqs == 1, num_seqs % 16, total_q == 1,
                               total_q % 16, tiles == 1, tiles % 16)  # fmt: skip
                        if sig in seen:
                            continue
                        q_lens = _q_lens(num_seqs, total_q, max_q, decode_queries, mixed)
                        if q_lens is None:
                            continue
                        seen.add(sig)
                        yield make(q_lens, max_q, max_k)


def _cache_candidates(kv_string, q_dtype, hkv, d, block_size, max_tokens, per_token, scale_heads, device):
    """``reshape_and_cache_flash`` calls over token counts (padding slots: nothing is written), with ``[scale_heads]``
    scales (1 or ``Hkv``). ``per_token``: the scales are the ``[num_blocks, block_size, Hkv]`` float32 outputs of a
    per-token-head string."""
    num_blocks = max(1, triton.cdiv(max_tokens, block_size))
    cache_dtype = kv_cache_torch_dtype(kv_string, q_dtype)
    key_cache = torch.zeros(num_blocks, block_size, hkv, d, dtype=cache_dtype, device=device)
    value_cache = torch.zeros_like(key_cache)
    scale = torch.ones(scale_heads, dtype=torch.float32, device=device)
    k_scale = v_scale = scale
    if per_token:
        k_scale, v_scale = (torch.ones(num_blocks, block_size, hkv, dtype=torch.float32, device=device)
                            for _ in range(2))  # fmt: skip
    keys = torch.zeros(max_tokens, hkv, d, dtype=q_dtype, device=device)
    slots = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
    for tokens in sorted(set(range(1, min(max_tokens, 80) + 1)) | set(range(max(1, max_tokens - 33), max_tokens + 1))):

        def build(tokens=tokens):
            args = (keys[:tokens], keys[:tokens], key_cache, value_cache, slots[:tokens], kv_string, k_scale, v_scale)
            return lambda: reshape_and_cache_flash(*args)

        yield build


def _merge_candidates(q_dtype, hq, d, max_tokens, device):
    """``merge_attn_states`` over token counts, with and without ``out_lse``."""
    tokens_set = sorted(set(range(1, min(max_tokens, 40) + 1)) | {max_tokens})
    for tokens, with_lse in itertools.product(tokens_set, (False, True)):

        def build(tokens=tokens, with_lse=with_lse):
            part = torch.zeros(tokens, hq, d, dtype=q_dtype, device=device)
            lse = torch.zeros(hq, tokens, dtype=torch.float32, device=device)
            out_lse = torch.empty_like(lse) if with_lse else None
            return lambda: merge_attn_states(part, lse, part, lse, out_lse=out_lse)

        yield build


def main(argv: list[str] | None = None) -> int:
    """``python -m kvflash.flash_attn_interface``: run a warm-up and print what it did."""
    parser = argparse.ArgumentParser(description="Compile the kvflash kernels an engine configuration reaches.")
    parser.add_argument("--heads", type=int, nargs=2, metavar=("HQ", "HKV"), default=(32, 8))
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--page", type=int, default=16, help="KV-cache block size")
    parser.add_argument("--q-dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--kv", default="auto,fp8_e4m3", help="comma-separated kv_cache_dtype strings")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-seqlen-q", type=int, default=2048)
    parser.add_argument("--max-seqlen-k", type=int, default=8192)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--num-blocks", type=int, default=4096)
    parser.add_argument("--fp8-queries", action="store_true", help="fp8 e4m3 queries over the FP8 caches")
    parser.add_argument(
        "--query-descale-per-token", action="store_true", help="with --fp8-queries: q_descale per token and head"
    )
    parser.add_argument("--dry-run", action="store_true", help="count the variants only; compile nothing")
    args = parser.parse_args(argv)
    report = warmup(
        num_q_heads=args.heads[0],
        num_kv_heads=args.heads[1],
        head_size=args.head_size,
        block_size=args.page,
        q_dtype=torch.bfloat16 if args.q_dtype == "bf16" else torch.float16,
        kv_cache_dtypes=[s.strip() for s in args.kv.split(",") if s.strip()],
        max_num_seqs=args.max_num_seqs,
        max_seqlen_q=args.max_seqlen_q,
        max_seqlen_k=args.max_seqlen_k,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_blocks=args.num_blocks,
        fp8_queries=args.fp8_queries,
        query_descale_per_token=args.query_descale_per_token,
        execute=not args.dry_run,
    )
    print(report)
    by_kernel: dict[str, int] = {}
    for key in report.keys:
        by_kernel[key[0]] = by_kernel.get(key[0], 0) + 1
    print("  " + ", ".join(f"{name} {count}" for name, count in sorted(by_kernel.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The test inputs of every attention suite, and the comparison of a kernel's result with the reference.

A list of ``(q_len, kv_len)`` tuples, one per sequence, is a batch: decode is ``[(1, kv_len), ...]``, speculative
decode has a few queries per sequence, chunked prefill and mixed batches anything else. :func:`make_case` turns it
into q, K/V stored paged (``block_table`` + ``seqused_k``, random page ids) or contiguous (``cu_seqlens_k``),
optionally in FP8. :func:`reference` is ``reference_attention`` on a case; :func:`assert_lse_close` is the one LSE
check; :func:`check_paged_decode`, :func:`check_chunk_prefill` and :func:`check_against_reference` (with
:meth:`Case.attend`, ``flash_attn_varlen_func``) run a kernel and compare its ``out`` and ``lse``.

Descales, one convention everywhere: the real value of a stored FP8 element is ``stored * descale``, with
``k_descale`` for K and ``v_descale`` for V, each a float, a ``[Hkv]`` tensor (per KV head) or a
``[num_seqs, Hkv]`` tensor (per sequence and KV head). K and V scales differ.

Only ``kvflash.attn_common`` is imported at the top: each package's test session installs that package and
attn-common alone, so an op is imported by the helper that calls it.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from kvflash.attn_common import gather_sequence_kv, reference_attention
from kvflash.attn_common.testing import assert_close_fa_rule, encode_fp8, error_vs, make_paged_kv, poison

# Sequence mixes that the call-plan tests replay on the GPU and on the CPU stand-in.
LONG_DECODE = [(1, 3000), (1, 1500)]  # split over the keys
SPECULATIVE = [(4, 37), (2, 90), (3, 3), (4, 64)]
MIXED = [(1, 37), (40, 60), (3, 20), (0, 5), (17, 30), (1, 1)]
PREFILL = [(50, 80), (33, 33), (64, 100)]

Descale = torch.Tensor | float | None


def cumulative(lengths: list[int], device: torch.device | str) -> torch.Tensor:
    """``[0, l0, l0 + l1, ...]`` int32: ``cu_seqlens_q`` / ``cu_seqlens_k`` of per-sequence ``lengths``."""
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


@dataclasses.dataclass
class Case:
    """One batch: ``q [total_q, Hq, D]``, ``k``/``v`` (paged ``[num_blocks, block_size, Hkv, D]`` or contiguous
    ``[total_k, Hkv, D]``), the query layout and ``kv_args`` (``block_table`` + ``seqused_k``, or ``cu_seqlens_k``
    with ``seqused_k`` when capped), and the descales of an FP8 cache (``None`` otherwise)."""

    seqs: list[tuple[int, int]]
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    kv_args: dict
    k_descale: Descale = None
    v_descale: Descale = None

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def kwargs(self) -> dict:
        """``kv_args`` with ``k_descale`` and ``v_descale``: the keyword arguments every op and the reference take."""
        return dict(self.kv_args, k_descale=self.k_descale, v_descale=self.v_descale)

    def attend(self, **features):
        """``flash_attn_varlen_func`` on this case (its tensors, lengths, KV layout and descales); ``features`` add
        arguments or override the case's."""
        from kvflash.flash_attn_interface import flash_attn_varlen_func

        return flash_attn_varlen_func(
            self.q, self.k, self.v, self.max_seqlen_q, self.cu_seqlens_q, self.max_seqlen_k,
            **{**self.kwargs, **features},
        )  # fmt: skip


def make_case(
    seqs: list[tuple[int, int]],
    *,
    num_q_heads: int = 4,
    num_kv_heads: int = 2,
    head_size: int = 64,
    q_dtype: torch.dtype = torch.float16,
    kv_dtype: torch.dtype | None = None,
    k_descale: Descale = None,
    v_descale: Descale = None,
    block_size: int | None = 16,
    joint_layout: bool = False,
    nan_unused: bool = False,
    capped: bool = False,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Case:
    """Random inputs for ``seqs`` (a list of ``(q_len, kv_len)``), drawn from a generator seeded with ``seed``.

    ``kv_dtype`` defaults to ``q_dtype``. With an FP8 ``kv_dtype``, K and V are drawn in float32 and stored as
    ``saturate(real / descale)`` with ``k_descale`` / ``v_descale`` (see the module docstring for their forms);
    a descale left ``None`` is drawn per (sequence, KV head), K's in [0.1, 0.6) and V's in [1.2, 3.2), before
    anything else. The case keeps the descales (on ``device``) and passes them to every call.

    ``block_size`` pages the cache (random page ids; unused pages and slots hold :func:`make_paged_kv`'s large
    finite garbage, or NaN with ``nan_unused`` so that a kernel reading one shows it); ``joint_layout`` makes K and
    V strided views of one ``[num_blocks, 2, block_size, Hkv, D]`` tensor. ``block_size=None`` stores K/V
    contiguously; ``capped`` then adds 3 NaN tokens after each sequence that ``seqused_k`` hides.
    """
    gen = torch.Generator().manual_seed(seed)
    kv_dtype = kv_dtype or q_dtype
    fp8 = kv_dtype.itemsize == 1
    num_seqs = len(seqs)
    if fp8 and k_descale is None:
        k_descale = torch.rand(num_seqs, num_kv_heads, generator=gen) * 0.5 + 0.1
    if fp8 and v_descale is None:
        v_descale = torch.rand(num_seqs, num_kv_heads, generator=gen) * 2.0 + 1.2
    q = torch.randn(sum(s[0] for s in seqs), num_q_heads, head_size, generator=gen).to(q_dtype)
    k_seqs, v_seqs = [], []
    for s, (_, kv_len) in enumerate(seqs):
        k = torch.randn(kv_len, num_kv_heads, head_size, generator=gen)
        v = torch.randn(kv_len, num_kv_heads, head_size, generator=gen)
        if fp8:
            k = encode_fp8(k, _seq_descale(k_descale, s), kv_dtype)
            v = encode_fp8(v, _seq_descale(v_descale, s), kv_dtype)
        k_seqs.append(k.to(kv_dtype).to(device))
        v_seqs.append(v.to(kv_dtype).to(device))
    kv_lens = [s[1] for s in seqs]
    if block_size is not None:
        paged = make_paged_kv(k_seqs, v_seqs, block_size, generator=gen, joint_layout=joint_layout)
        k_all, v_all = paged.k_cache, paged.v_cache  # built on the device: joint-layout views stay views
        if nan_unused:
            unused = ~_used_slots(paged.block_table.cpu(), kv_lens, k_all.shape[0], block_size).to(device)
            for cache in (k_all, v_all):  # through an integer view: index_put is not implemented for FP8
                bits = torch.uint8 if cache.dtype.itemsize == 1 else torch.int16
                cache.view(bits)[unused] = torch.full((1,), float("nan"), dtype=cache.dtype).view(bits).to(device)
        kv_args = dict(block_table=paged.block_table, seqused_k=paged.seqused_k)
    else:
        extra = 3 if capped else 0

        def with_garbage(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, torch.full((extra, *x.shape[1:]), float("nan"), device=device).to(x.dtype)])

        k_all = torch.cat([with_garbage(x) for x in k_seqs])
        v_all = torch.cat([with_garbage(x) for x in v_seqs])
        kv_args = dict(cu_seqlens_k=cumulative([n + extra for n in kv_lens], device))
        if capped:
            kv_args["seqused_k"] = torch.tensor(kv_lens, dtype=torch.int32, device=device)
    return Case(
        seqs=list(seqs),
        q=q.to(device),
        k=k_all,
        v=v_all,
        cu_seqlens_q=cumulative([s[0] for s in seqs], device),
        max_seqlen_q=max(s[0] for s in seqs),
        max_seqlen_k=max(kv_lens),
        kv_args=kv_args,
        k_descale=_on(k_descale, device),
        v_descale=_on(v_descale, device),
    )


def _seq_descale(descale: Descale, seq: int) -> torch.Tensor | float:
    """Sequence ``seq``'s descale for :func:`encode_fp8`: a float or a ``[Hkv]`` tensor (from ``[num_seqs, Hkv]``)."""
    if isinstance(descale, torch.Tensor):
        descale = descale.cpu()
        if descale.dim() == 2:
            return descale[seq]
        return descale if descale.dim() == 1 else float(descale)
    return 1.0 if descale is None else descale


def _on(descale: Descale, device: torch.device | str) -> Descale:
    return descale.to(device) if isinstance(descale, torch.Tensor) else descale


def _used_slots(block_table: torch.Tensor, kv_lens: list[int], num_blocks: int, block_size: int) -> torch.Tensor:
    """``[num_blocks, block_size]`` bool: the cache slots that hold a sequence's keys."""
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for s, kv_len in enumerate(kv_lens):
        for b in range(triton.cdiv(kv_len, block_size)):
            used[block_table[s, b], : min(block_size, kv_len - b * block_size)] = True
    return used


def reference(case: Case, *, compute_dtype: torch.dtype = torch.float64, **features) -> tuple:
    """``reference_attention`` on ``case`` (q, K/V, layout, descales) with ``features`` (they add arguments or
    override the case's): ``(out [total_q, Hq, D], lse [Hq, total_q])`` in ``compute_dtype``."""
    return reference_attention(
        case.q, case.k, case.v, case.cu_seqlens_q, compute_dtype=compute_dtype, **{**case.kwargs, **features}
    )


def assert_lse_close(
    lse: torch.Tensor,
    exact_lse: torch.Tensor,
    low_lse: torch.Tensor | None = None,
    *,
    atol: float = 2e-3,
    rtol: float = 0.0,
) -> None:
    """A kernel's ``lse [Hq, total_q]`` against the float64 reference's ``exact_lse``.

    ``lse`` is float32 and never NaN; it is ``-inf`` exactly where the reference is (a row with no visible key and
    no sink); every other entry is within ``atol + rtol * |exact|`` of the reference, plus, when ``low_lse`` (the
    reference computed in the input precision) is given, twice that computation's largest error (FlashAttention's
    rule).
    """
    assert lse.dtype == torch.float32, f"lse: expected float32, got {lse.dtype}"
    assert not torch.isnan(lse).any(), "lse has NaN"
    exact = exact_lse.to(lse.device, torch.float64)
    got = lse.double()
    empty = torch.isneginf(exact)
    assert torch.equal(torch.isneginf(got), empty), "lse: -inf entries differ from the reference"
    err = (got[~empty] - exact[~empty]).abs()
    if not err.numel():
        return
    bound = atol + rtol * exact[~empty].abs()
    if low_lse is not None:
        bound = bound + 2 * error_vs(low_lse.to(lse.device)[~empty].float(), exact[~empty])
    assert bool((err <= bound).all()), (
        f"lse: max error {float(err.max()):.3e} (at most atol {atol:.1e} + rtol {rtol:.1e} x |lse|"
        + (", + 2 x the low-precision reference's error" if low_lse is not None else "")
        + ")"
    )


def check_against_reference(
    case: Case,
    out: torch.Tensor,
    lse: torch.Tensor | None = None,
    *,
    atol: float = 2e-3,
    lse_rtol: float = 0.0,
    lse_low_precision: bool = False,
    **features,
) -> None:
    """``out [total_q, Hq, D]`` (and ``lse [Hq, total_q]``) of ``case`` under ``features`` against the float64
    reference: ``out`` by FlashAttention's rule (twice PyTorch's error in the input precision + ``atol``), ``lse``
    by :func:`assert_lse_close` (``lse_rtol`` its ``rtol``; ``lse_low_precision`` adds FlashAttention's rule)."""
    exact, exact_lse = reference(case, **features)
    low, low_lse = reference(case, compute_dtype=case.q.dtype, **features)
    assert_close_fa_rule(out, exact, low, atol=atol)
    if lse is not None:
        assert_lse_close(lse, exact_lse, low_lse if lse_low_precision else None, rtol=lse_rtol)


def check_paged_decode(case: Case, *, num_splits: int = 0, atol: float = 2e-3, **features):
    """``paged_decode_attention`` on a decode case (one query per sequence) into a poisoned ``out``, with ``lse``;
    both against the reference (``out``: ``atol``; ``lse``: 2e-3 + 1e-3 x |lse|). Returns ``(out, lse)``."""
    from kvflash.paged_decode import paged_decode_attention

    out = poison(torch.empty_like(case.q))
    got, lse = paged_decode_attention(
        case.q, case.k, case.v, case.max_seqlen_k, num_splits=num_splits, out=out, return_lse=True,
        **{**case.kwargs, **features},
    )  # fmt: skip
    assert got is out
    check_against_reference(case, out, lse, atol=atol, lse_rtol=1e-3, **features)
    return got, lse


def decode_config(num_q_heads: int, num_kv_heads: int, head_size: int, *, max_seqlen_q: int = 1, kv_itemsize: int = 1,
                  fill_rows: bool = True, per_token_scales: bool = False):  # fmt: skip
    """The decode chooser's launch config for 3 sequences of up to 100 keys, with the interpreter's settings: what
    the tests assert of it (KV heads per program, rows, tokens per pass) does not depend on the batch or the device."""
    from kvflash.paged_decode.launch_config import choose_paged_decode_config

    return choose_paged_decode_config(
        num_seqs=3, num_kv_heads=num_kv_heads, group=num_q_heads // num_kv_heads, head_size=head_size,
        kv_itemsize=kv_itemsize, max_seqlen_k=100, window_left=-1, num_splits=0, multiprocessor_count=4,
        interpreter=True, max_seqlen_q=max_seqlen_q, fill_rows=fill_rows, per_token_scales=per_token_scales,
    )  # fmt: skip


def check_chunk_prefill(case: Case, *, out: torch.Tensor | None = None, **features):
    """``chunk_prefill_attention`` on ``case`` into ``out`` (a poisoned one when not given), with ``lse``; both
    against the reference by FlashAttention's rule (``out``: + 1e-3; ``lse``: + 2e-3). Returns ``(out, lse)``."""
    from kvflash.chunk_prefill import chunk_prefill_attention

    if out is None:
        out = poison(torch.empty_like(case.q))
    got, lse = chunk_prefill_attention(
        case.q, case.k, case.v, case.cu_seqlens_q, case.max_seqlen_q, case.max_seqlen_k, out=out,
        return_lse=True, **{**case.kwargs, **features},
    )  # fmt: skip
    assert got is out
    check_against_reference(case, out, lse, atol=1e-3, lse_low_precision=True, **features)
    return got, lse


def replay_matches_eager(step, load_new_state, attention, out: torch.Tensor, lse: torch.Tensor, seeds=(1, 2, 3)):
    """Capture ``step()`` (which writes ``out`` and ``lse``) in a CUDA graph after one warm-up outside the capture
    (kernels compile there), then for each seed: ``load_new_state(seed)`` refills the captured inputs in place,
    the graph replays over NaN-poisoned ``out``, and the result must equal an eager ``attention()`` bit for bit."""
    load_new_state(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in seeds:
        load_new_state(seed)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want, want_lse = attention()  # eager, with the new state
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


def launch_chunk_prefill_with(case: Case, out: torch.Tensor, change: dict, *, q_descale=None):
    """``launch_chunk_prefill`` on a paged, causal ``case`` into ``out`` with the chooser's launch config changed by
    ``change`` (``dataclasses.replace``): how tests reach the launch options no chooser picks. Returns the config
    the chooser picked (before the change)."""
    from kvflash.attn_common import check_attention_call, platform
    from kvflash.chunk_prefill.launch_config import choose_chunk_prefill_config
    from kvflash.chunk_prefill.op import launch_chunk_prefill

    f = check_attention_call(
        case.q, case.k, case.v, case.num_seqs, cu_seqlens_q=case.cu_seqlens_q, max_seqlen_q=case.max_seqlen_q,
        max_seqlen_k=case.max_seqlen_k, cu_seqlens_k=None, softmax_scale=None, causal=True, window_size=None,
        softcap=0.0, alibi_slopes=None, s_aux=None, output_scale=None, kv_descale_per_token=None, out=out,
        q_descale=q_descale, **case.kwargs,
    )  # fmt: skip
    num_kv_heads = case.k.shape[-2]
    chosen = choose_chunk_prefill_config(
        case.q.shape[2], case.k.element_size() == 1, case.q.shape[1] // num_kv_heads, case.max_seqlen_q,
        interpreter=platform.interpreter_enabled(), q_is_fp8=q_descale is not None,
    )  # fmt: skip
    launch_chunk_prefill(
        case.q, case.k, case.v, out, None, case.cu_seqlens_q, case.max_seqlen_q, **case.kv_args, cu_seqlens_k=None,
        softmax_scale=f.softmax_scale, window_left=f.window_left, window_right=f.window_right, softcap=0.0,
        alibi_slopes=None, s_aux=None, k_descale=f.k_descale, v_descale=f.v_descale, q_descale=f.q_descale,
        config=dataclasses.replace(chosen, **change),
    )  # fmt: skip
    return chosen


P_RELATIVE_ERROR = 2.0**-4  # e4m3 rounding of a probability (3 mantissa bits)


def v_max_per_row(case) -> torch.Tensor:
    """``[total_q, 1, 1]`` float64: the largest real |V| of each row's sequence (the scale of the P-rounding bound)."""
    rows = []
    seqused = case.kv_args.get("seqused_k")
    starts = case.kv_args["cu_seqlens_k"].tolist() if "cu_seqlens_k" in case.kv_args else None
    for s, (q_len, kv_len) in enumerate(case.seqs):
        if seqused is not None:
            kv_len = int(seqused[s])
        v = gather_sequence_kv(case.v, s, kv_len, block_table=case.kv_args.get("block_table"), cu_seqlens_k=starts)
        descale = case.v_descale[s] if case.v_descale.dim() == 2 else case.v_descale
        real = v.double() * descale.double().reshape(-1, 1)
        rows += [real.abs().max().item() if kv_len else 0.0] * q_len
    return torch.tensor(rows, dtype=torch.float64, device=case.q.device).reshape(-1, 1, 1)


def assert_fp8_dot_error(
    out: torch.Tensor, exact: torch.Tensor, v_max: torch.Tensor, *, out_rounding: float = 2.0**-8, rms: float = 2.0**-5
) -> None:
    """The error bound of an attention whose PV dot may round P to e4m3 (3 mantissa bits: a relative error of at
    most 2^-4 per probability), row by row: ``|out - ref| <= 2^-4 * v_max`` (``v_max``, ``[total_q, 1, 1]``: the
    largest real |V| of the row's sequence; the bound of an error of 2^-4 in every weight of a convex combination)
    plus the output format's relative rounding ``out_rounding`` (bf16's by default) and 2e-3; and the relative RMS
    error over the whole output at most ``rms`` (a kernel that descales with a wrong scale is off by tens of per
    cent)."""
    assert not torch.isnan(out.double()).any(), "out has NaN (an element left unwritten)"
    got, ref = out.double(), exact.to(out.device).double()
    bound = P_RELATIVE_ERROR * v_max + out_rounding * ref.abs() + 2e-3
    excess = (got - ref).abs() - bound
    assert bool((excess <= 0).all()), f"max error over the bound by {float(excess.max()):.3e}"
    relative_rms = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
    assert relative_rms <= rms, f"relative RMS error {relative_rms:.3e} > {rms:.3e}"

#!/usr/bin/env python3
"""Malformed index inputs, and one normal call of each kernel and of the cache writer, one line per case.

Meant to run under ``compute-sanitizer --tool memcheck`` on a GPU (every case must show zero errors), and on
the CPU under the Triton interpreter (``tests/kvflash/test_malformed_inputs.py`` runs it so)::

    PYTHONPATH=packages/attn-common/src:packages/chunk-prefill/src:packages/paged-decode/src:\\
packages/fp8-utils/src:packages/kvflash/src compute-sanitizer --tool memcheck python3 tools/memcheck_cases.py

The kernels never read index values on the host; they clamp them instead (query ranges to ``[0, total_q]``,
KV lengths to what the block table or the contiguous cache can address, page ids to ``[0, num_blocks)``,
cache slots outside the cache skipped). Each case checks that nothing outside the output was written
(outputs are slices of NaN-filled buffers with guard rows), and, where the clamped meaning is defined, that
the numbers equal the reference computed on the clamped indices. Needs only torch, Triton and the packages'
``src`` folders. Exit status 1 if any case fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

GUARD = 5  # NaN rows before and after every output; a kernel writing outside its output changes them


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (the Triton interpreter)")
    parser.add_argument("--case", action="append", help="run only these cases (repeatable)")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    import torch

    from kvflash.attn_common import reference_attention, saturate_to_fp8
    from kvflash.flash_attn_interface import flash_attn_varlen_func, reshape_and_cache_flash
    from kvflash.fp8_utils import quantize_query

    device = torch.device(args.device)
    hq, hkv, d, page = 4, 2, 64, 16

    def paged(seqs, seed, kv_dtype=torch.float16):
        """seqs: (q_len, kv_len) pairs. A table exactly as wide as the longest sequence needs (so its
        capacity is small), random page ids, finite values in every slot of the cache."""
        g = torch.Generator().manual_seed(seed)
        pages = [max(1, -(-kv // page)) for _, kv in seqs]
        num_blocks = sum(pages) + 2
        perm = torch.randperm(num_blocks, generator=g)
        table = torch.zeros(len(seqs), max(pages), dtype=torch.int32)
        cursor = 0
        for s, n in enumerate(pages):
            table[s, :n] = perm[cursor : cursor + n]
            table[s, n:] = perm[cursor]
            cursor += n
        k = torch.randn(num_blocks, page, hkv, d, generator=g)
        v = torch.randn(num_blocks, page, hkv, d, generator=g)
        q = torch.randn(sum(ql for ql, _ in seqs), hq, d, generator=g).half()
        cu_q = torch.tensor([0] + torch.tensor([ql for ql, _ in seqs]).cumsum(0).tolist(), dtype=torch.int32)
        used = torch.tensor([kv for _, kv in seqs], dtype=torch.int32)
        to = lambda t: t.to(device)
        return dict(
            q=to(q), k=to(k.to(kv_dtype)), v=to(v.to(kv_dtype)), block_table=to(table), seqused_k=to(used),
            cu_seqlens_q=to(cu_q), max_seqlen_q=max(ql for ql, _ in seqs), max_seqlen_k=max(kv for _, kv in seqs),
        )  # fmt: skip

    def guarded(like):
        """An output slice with NaN guard rows around it (returns the slice and the whole buffer); ``like``'s dtype,
        bf16 for an fp8 query."""
        dtype = torch.bfloat16 if like.dtype == torch.float8_e4m3fn else like.dtype
        buf = torch.full((like.shape[0] + 2 * GUARD, *like.shape[1:]), float("nan"), dtype=dtype, device=device)
        return buf[GUARD : GUARD + like.shape[0]], buf

    def guards_untouched(buf):
        assert torch.isnan(buf[:GUARD]).all() and torch.isnan(buf[-GUARD:]).all(), "wrote outside its output"

    def attend(p, **changes):
        """flash_attn_varlen_func on problem ``p`` with ``changes``; returns out, lse, the guarded buffer."""
        call = dict(p, **changes)
        out, buf = guarded(call["q"])
        out_, lse = flash_attn_varlen_func(out=out, return_softmax_lse=True, causal=True, **call)
        assert out_.data_ptr() == out.data_ptr()
        guards_untouched(buf)
        return out, lse

    def reference(p, **changes):
        call = dict(p, **changes)
        kv = {n: call[n] for n in ("block_table", "seqused_k", "cu_seqlens_k") if call.get(n) is not None}
        kw = {n: call[n] for n in ("k_descale", "v_descale", "q_descale", "q_descale_per_token") if n in call}
        return reference_attention(call["q"], call["k"], call["v"], call["cu_seqlens_q"], causal=True, **kv, **kw)

    def same(out, lse, ref, rows=slice(None)):
        ref_out, ref_lse = ref
        err = (out[rows].float() - ref_out[rows].float()).abs().max().item()
        assert err < 1e-2, f"max error {err:.2e} against the reference on the clamped indices"
        finite = torch.isfinite(ref_lse[:, rows])
        assert torch.equal(torch.isfinite(lse[:, rows]), finite), "lse -inf pattern differs"
        return f"max error {err:.1e}"

    cases = {}

    def case(fn):
        cases[fn.__name__] = fn
        return fn

    i32 = lambda values: torch.tensor(values, dtype=torch.int32, device=device)

    @case
    def seqused_k_beyond_block_table_prefill():
        p = paged([(3, 20), (4, 30)], 1)  # table width 2 pages = 32 tokens
        out, lse = attend(p, seqused_k=i32([20, 10**6]))
        return same(out, lse, reference(p, seqused_k=i32([20, 32])))

    @case
    def seqused_k_beyond_block_table_decode():
        p = paged([(1, 20), (1, 30), (1, 5)], 2)
        out, lse = attend(p, seqused_k=i32([10**6, 30, -4]), num_splits=3)
        return same(out, lse, reference(p, seqused_k=i32([32, 30, 0])))

    @case
    def block_ids_out_of_range_prefill():
        p = paged([(5, 40), (2, 9)], 3)
        nb = p["k"].shape[0]
        bad = p["block_table"].clone()
        bad[0, 1], bad[1, 0] = nb + 10**6, -7
        clamped = bad.clamp(0, nb - 1)
        out, lse = attend(p, block_table=bad)
        return same(out, lse, reference(p, block_table=clamped))

    @case
    def block_ids_out_of_range_decode():
        p = paged([(1, 40), (1, 9)], 4)
        nb = p["k"].shape[0]
        bad = p["block_table"].clone()
        bad[0, 2], bad[1, 0] = 2**31 - 1, -(2**31)
        clamped = bad.clamp(0, nb - 1)
        out, lse = attend(p, block_table=bad, num_splits=2)
        return same(out, lse, reference(p, block_table=clamped))

    @case
    def cu_seqlens_q_past_total_q():
        p = paged([(3, 20), (5, 30)], 5)
        out, lse = attend(p, cu_seqlens_q=i32([0, 3, 8 + 50]))
        return same(out, lse, reference(p))  # the last range is clamped to total_q = 8

    @case
    def cu_seqlens_q_not_from_zero():
        p = paged([(3, 20), (5, 30)], 6)
        out, lse = attend(p, cu_seqlens_q=i32([2, 4, 8]))
        return same(out, lse, reference(p, cu_seqlens_q=i32([2, 4, 8])), rows=slice(2, None)) + " (rows 0-1 unwritten)"

    @case
    def cu_seqlens_q_decreasing():
        p = paged([(3, 20), (5, 30), (2, 7)], 7)
        out, lse = attend(p, cu_seqlens_q=i32([0, 6, 2, 10]))  # seq 1 is empty; seq 2 overlaps seq 0
        assert torch.isfinite(out).all(), "every row lies in some range: none may stay NaN"
        return "finite, nothing written outside out"

    @case
    def cu_seqlens_q_garbage_decode_route():
        p = paged([(1, 20), (1, 30), (1, 3)], 8)
        out, lse = attend(p, cu_seqlens_q=i32([5, -(2**31), 2**31 - 1, 1]), num_splits=2)
        assert torch.isfinite(out).all(), "the decode route writes every row"
        return "finite, nothing written outside out"

    @case
    def cu_seqlens_k_past_total_k():
        p = paged([(3, 20), (5, 30)], 9)
        k, v = p["k"].flatten(0, 1)[:50], p["v"].flatten(0, 1)[:50]
        contiguous = dict(p, k=k, v=v, block_table=None, seqused_k=None, max_seqlen_k=30)
        out, lse = attend(contiguous, cu_seqlens_k=i32([0, 20, 10**6]))
        return same(out, lse, reference(contiguous, cu_seqlens_k=i32([0, 20, 50])))

    @case
    def query_lengths_2_0_on_the_decode_route():
        p = paged([(2, 20), (0, 30)], 10)
        out, lse = attend(p, max_seqlen_q=1, num_splits=2)  # max_seqlen_q is wrong: a row of 2 queries
        return same(out, lse, reference(p))

    @case
    def writer_slots_outside_the_cache():
        g = torch.Generator().manual_seed(11)
        key = torch.randn(4, hkv, d, generator=g).half().to(device)
        value = torch.randn(4, hkv, d, generator=g).half().to(device)
        k_cache = torch.zeros(3, page, hkv, d, dtype=torch.float8_e4m3fn, device=device)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.tensor([-1, 3 * page, 2**62, 5], dtype=torch.int64, device=device)
        reshape_and_cache_flash(key, value, k_cache, v_cache, slots, "fp8_e4m3", 0.5, 2.0)
        written = k_cache.view(torch.uint8).flatten(0, 1).ne(0).any(-1).any(-1)
        assert written.nonzero().flatten().tolist() == [5], "only slot 5 may be written"
        return "only the valid slot written"

    @case
    def normal_prefill_fp8():
        p = paged([(1, 37), (9, 9), (17, 50), (0, 4)], 12, kv_dtype=torch.float8_e4m3fn)
        scales = dict(k_descale=torch.rand(4, hkv, device=device) + 0.5, v_descale=torch.rand(hkv, device=device) + 1.5)
        out, lse = attend(p, **scales)
        return same(out, lse, reference(p, **scales))

    @case
    def normal_decode_fp8():
        p = paged([(1, 37), (1, 90), (1, 1)], 13, kv_dtype=torch.float8_e5m2)
        scales = dict(k_descale=0.7, v_descale=torch.rand(3, hkv, device=device) + 1.5)
        out, lse = attend(p, num_splits=3, **scales)
        return same(out, lse, reference(p, **scales))

    @case
    def fp8_query_per_token_head_cu_seqlens_q_past_total_q():
        p = paged([(3, 20), (5, 30)], 15, kv_dtype=torch.float8_e4m3fn)
        q8, q_descale = quantize_query(p["q"], hkv, granularity="per_token_head")
        p = dict(p, q=q8)
        scales = dict(q_descale=q_descale, q_descale_per_token=True)
        out, lse = attend(p, cu_seqlens_q=i32([0, 3, 8 + 50]), **scales)
        return same(out, lse, reference(p, **scales))  # the last range is clamped to total_q = 8

    @case
    def fp8_query_decode_kv_lengths_beyond_the_table():
        p = paged([(1, 20), (1, 30), (1, 5)], 16, kv_dtype=torch.float8_e5m2)
        q8, q_descale = quantize_query(p["q"], hkv, granularity="per_sequence_kv_head", cu_seqlens_q=p["cu_seqlens_q"])
        p = dict(p, q=q8)
        out, lse = attend(p, seqused_k=i32([10**6, 30, -4]), num_splits=3, q_descale=q_descale)
        return same(out, lse, reference(p, seqused_k=i32([32, 30, 0]), q_descale=q_descale))

    @case
    def normal_writer_fp8():
        g = torch.Generator().manual_seed(14)
        key = torch.randn(20, hkv, d, generator=g).to(device)
        value = torch.randn(20, hkv, d, generator=g).to(device)
        k_cache = torch.zeros(4, page, hkv, d, dtype=torch.float8_e4m3fn, device=device)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.randperm(4 * page, generator=g)[:20].to(device)
        k_scale = torch.rand(hkv, device=device) + 0.1
        reshape_and_cache_flash(key, value, k_cache, v_cache, slots, "fp8_e4m3", k_scale, 1.7)
        want = saturate_to_fp8(key, k_scale[:, None], torch.float8_e4m3fn)
        got = k_cache.flatten(0, 1)[slots]
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), "stored keys differ from torch's cast"
        return "bit-exact"

    failed = 0
    for name, fn in cases.items():
        if args.case and name not in args.case:
            continue
        try:
            print(f"ok   {name}: {fn()}", flush=True)
        except Exception as exc:
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(file=sys.stderr)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"{len(cases) if not args.case else len(args.case)} cases, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

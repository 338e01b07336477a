"""Time kvflash's chunked-prefill kernel against torch SDPA (cuDNN and flash backends) on one GPU.

Usage (device machine; repo root)::

    PYTHONPATH=packages/attn-common/src:packages/chunk-prefill/src python tools/time_chunk_prefill.py \
        [--cases 4x(2048+2048),1x16384] [--configs 128,64,8,3;128,128,8,2] [--check]

Cases are ``N x (context + new)``: N sequences, each ``new`` query tokens appended to ``context`` cached
tokens, causal (bottom-right), Hq/Hkv 32/8, D 128. Our kernel reads a paged cache (pages shuffled) of
bf16 or FP8 e4m3 (non-unit per-head descales) at page sizes 16 and 64.

The SDPA baseline is the dense-equivalent bf16 problem with the same visible (query, key) pairs: per
sequence, the queries attend to the context keys without a mask (one SDPA call) and to the new keys with
a causal mask (a second call); K/V are expanded to Hq heads. FLOPs = 4 * Hq * D * visible pairs for every
implementation. Times are medians of ``triton.testing.do_bench`` (CUDA events, warm-up first).

``--configs`` times explicit launch settings (``block_m,block_n,num_warps,num_stages``) besides the
heuristic's; ``--check`` compares our output with the reference at size (FlashAttention's rule).
"""

from __future__ import annotations

import argparse
import dataclasses
import re

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import encode_fp8, error_vs
from kvflash.chunk_prefill import chunk_prefill_attention
from kvflash.chunk_prefill.launch_config import LaunchConfig
from kvflash.chunk_prefill.launcher import check_chunk_prefill_args, launch_chunk_prefill

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE = 32, 8, 128
PASSES = 2
DEFAULT_CASES = "4x(2048+2048),1x16384,2x(4096+4096),4x4096"
FP8 = torch.float8_e4m3fn


def parse_case(text: str) -> tuple[int, int, int]:
    """``"4x(2048+2048)"`` -> (4, 2048, 2048); ``"1x16384"`` -> (1, 0, 16384)."""
    m = re.fullmatch(r"(\d+)x\((\d+)\+(\d+)\)", text) or re.fullmatch(r"(\d+)x(\d+)", text)
    if m is None:
        raise ValueError(f"--cases: cannot parse {text!r}; expected NxL or Nx(context+new)")
    nums = [int(g) for g in m.groups()]
    return (nums[0], 0, nums[1]) if len(nums) == 2 else tuple(nums)


def visible_pairs(num_seqs: int, context: int, new: int) -> int:
    """Causal bottom-right: new query i sees context + i + 1 keys."""
    return num_seqs * (new * context + new * (new + 1) // 2)


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")


def sdpa_fn(backend: SDPBackend, num_seqs: int, context: int, new: int):
    """The dense-equivalent problem: q x context keys (no mask) + q x new keys (causal), on one backend."""
    shape = lambda n: (num_seqs, NUM_Q_HEADS, n, HEAD_SIZE)  # noqa: E731
    q = torch.randn(shape(new), device="cuda", dtype=torch.bfloat16)
    k_new, v_new = (torch.randn(shape(new), device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k_ctx, v_ctx = (torch.randn(shape(context), device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def run():
        with sdpa_kernel(backend):
            if context:
                scaled_dot_product_attention(q, k_ctx, v_ctx)
            scaled_dot_product_attention(q, k_new, v_new, is_causal=True)

    return run


def safe_median_ms(fn, what: str) -> float | None:
    """``median_ms``, or None (printed) when the call fails: a backend missing, a config out of resources."""
    try:
        return median_ms(fn)
    except Exception as err:  # noqa: BLE001
        print(f"  {what}: failed: {str(err).splitlines()[0][:100]}")
        return None


def make_paged_inputs(num_seqs: int, context: int, new: int, block_size: int, kv_dtype: torch.dtype):
    """q, a shuffled paged cache (bf16 or FP8 with per-head descales) and the kwargs of a causal call."""
    kv_len = context + new
    pages_per_seq = triton.cdiv(kv_len, block_size)
    num_blocks = num_seqs * pages_per_seq
    cache_shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_SIZE)
    k = torch.randn(cache_shape, device="cuda")
    v = torch.randn(cache_shape, device="cuda")
    kwargs = {}
    if kv_dtype == FP8:
        k_descale = torch.linspace(0.02, 0.03, NUM_KV_HEADS, device="cuda")
        v_descale = torch.linspace(0.015, 0.025, NUM_KV_HEADS, device="cuda")
        k = encode_fp8(k, k_descale, FP8)
        v = encode_fp8(v, v_descale, FP8)
        kwargs.update(k_descale=k_descale, v_descale=v_descale)
    else:
        k, v = k.to(kv_dtype), v.to(kv_dtype)
    block_table = torch.randperm(num_blocks, device="cuda").int().view(num_seqs, pages_per_seq)
    q = torch.randn(num_seqs * new, NUM_Q_HEADS, HEAD_SIZE, device="cuda", dtype=torch.bfloat16)
    cu_seqlens_q = torch.arange(0, num_seqs + 1, device="cuda", dtype=torch.int32) * new
    seqused_k = torch.full((num_seqs,), kv_len, device="cuda", dtype=torch.int32)
    kwargs.update(block_table=block_table, seqused_k=seqused_k, causal=True)
    return (q, k, v, cu_seqlens_q, new, kv_len), kwargs


def ours_fn(args, kwargs, config: LaunchConfig | None):
    """A zero-argument call of our kernel; with ``config``, through the launcher with fixed settings."""
    q = args[0]
    out = torch.empty_like(q)
    if config is None:
        return lambda: chunk_prefill_attention(*args, out=out, **kwargs)
    norm = check_chunk_prefill_args(
        *args, softmax_scale=None, window_size=None, softcap=0.0, alibi_slopes=None, s_aux=None, out=out,
        block_table=kwargs["block_table"], seqused_k=kwargs["seqused_k"], cu_seqlens_k=None, causal=True,
        k_descale=kwargs.get("k_descale"), v_descale=kwargs.get("v_descale"),
    )  # fmt: skip
    return lambda: launch_chunk_prefill(
        q, args[1], args[2], out, None, args[3], args[4], block_table=kwargs["block_table"],
        seqused_k=kwargs["seqused_k"], cu_seqlens_k=None, softmax_scale=norm.softmax_scale,
        window_left=norm.window_left, window_right=norm.window_right, softcap=0.0, alibi_slopes=None, s_aux=None,
        k_descale=norm.k_descale, v_descale=norm.v_descale, config=config,
    )  # fmt: skip


def spot_check(num_seqs: int, context: int, new: int) -> None:
    """Our output at size against the fp32 reference, bf16 and FP8 KV, page 16 (FlashAttention's rule)."""
    for kv_dtype in (torch.bfloat16, FP8):
        args, kwargs = make_paged_inputs(num_seqs, context, new, 16, kv_dtype)
        out = chunk_prefill_attention(*args, **kwargs)
        exact, _ = reference_attention(*args[:4], **kwargs, compute_dtype=torch.float32)
        low, _ = reference_attention(*args[:4], **kwargs, compute_dtype=torch.bfloat16)
        err, base = error_vs(out, exact), error_vs(low, exact)
        verdict = "PASS" if err <= 2 * base + 1e-3 else "FAIL"
        print(f"check {num_seqs}x({context}+{new}) kv={str(kv_dtype)[6:]}: max err {err:.2e}, "
              f"torch bf16 {base:.2e} -> {verdict}")  # fmt: skip
        del args, kwargs, out, exact, low
        torch.cuda.empty_cache()


def parse_configs(text: str) -> list[LaunchConfig]:
    return [LaunchConfig(*(int(x) for x in item.split(","))) for item in text.split(";") if item.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--configs", default="", help="extra launch settings: bm,bn,warps,stages;...")
    parser.add_argument("--block-sizes", default="16,64")
    parser.add_argument("--no-flash", action="store_true", help="skip the SDPA flash backend")
    parser.add_argument("--check", action="store_true", help="correctness spot-check at size first")
    opts = parser.parse_args()
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    cases = [parse_case(c) for c in opts.cases.split(",")]
    if opts.check:
        spot_check(*cases[0])
    configs: list[LaunchConfig | None] = [None, *parse_configs(opts.configs)]
    # (case, impl, kv, flops, fn); every fn is timed in each of PASSES interleaved passes (clock drift shows).
    entries = []
    for num_seqs, context, new in cases:
        name = f"{num_seqs}x({context}+{new})" if context else f"{num_seqs}x{new}"
        flops = 4 * NUM_Q_HEADS * HEAD_SIZE * visible_pairs(num_seqs, context, new)
        backends = [("cudnn", SDPBackend.CUDNN_ATTENTION)] + (
            [] if opts.no_flash else [("flash", SDPBackend.FLASH_ATTENTION)]
        )
        for label, backend in backends:
            entries.append((name, f"sdpa {label} (dense eq.)", "", flops, sdpa_fn(backend, num_seqs, context, new)))
        for block_size in (int(b) for b in opts.block_sizes.split(",")):
            for kv_dtype in (torch.bfloat16, FP8):
                args, kwargs = make_paged_inputs(num_seqs, context, new, block_size, kv_dtype)
                kv = f"{'bf16' if kv_dtype == torch.bfloat16 else 'e4m3'} bs{block_size}"
                for config in configs:
                    label = "heuristic" if config is None else ",".join(map(str, dataclasses.astuple(config)))
                    entries.append((name, f"kvflash {label}", kv, flops, ours_fn(args, kwargs, config)))
    times = [[] for _ in entries]
    for _ in range(PASSES):
        for i, entry in enumerate(entries):
            times[i].append(safe_median_ms(entry[4], f"{entry[0]} {entry[1]} {entry[2]}"))
    ms_of = {(e[0], e[1], e[2]): None if None in t else min(t) for e, t in zip(entries, times)}
    rows = []
    for (name, impl, kv, flops, _), t in zip(entries, times):
        ms = ms_of[(name, impl, kv)]
        spread = (max(t) / min(t) - 1) * 100 if ms else None
        cudnn = ms_of[(name, "sdpa cudnn (dense eq.)", "")]
        bf16 = ms_of.get((name, impl, kv.replace("e4m3", "bf16"))) if kv.startswith("e4m3") else None
        rows.append((name, impl, kv, ms, spread, flops, cudnn, ms / bf16 if ms and bf16 else None))
    print(f"\n{'case':<16} {'impl':<24} {'kv':<10} {'ms':>8} {'+-%':>5} {'TFLOP/s':>8} {'/cuDNN':>7} {'fp8/bf16':>8}")
    for name, impl, kv, ms, spread, flops, ref, ratio in rows:
        ms_s = f"{ms:8.3f} {spread:5.1f}" if ms else "     n/a      "
        tf = f"{flops / ms / 1e9:8.1f}" if ms else "     n/a"
        vs = f"{ref / ms:7.2f}" if ms and ref else "    n/a"
        rs = f"{ratio:8.2f}" if ratio else ""
        print(f"{name:<16} {impl:<24} {kv:<10} {ms_s} {tf} {vs} {rs}")


if __name__ == "__main__":
    main()

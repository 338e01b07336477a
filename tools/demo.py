"""kvflash demo: a small serving loop over a paged FP8 KV cache.

Requests with different prompt lengths are prefilled in chunks (mixed with the decode rows of requests
already running, as a chunked-prefill scheduler does), their keys and values written into a paged FP8 cache
with ``reshape_and_cache_flash``, then decoded step by step with ``flash_attn_varlen_func``. Pages are
allocated as they fill. Activations are synthetic (random projections; there is no model): the point is the
attention path. At every step the output is checked against the plain PyTorch reference on the dequantised
cache, and compared with the same attention over a bf16/fp16 cache (the FP8 quantisation error).

On a GPU it runs at a realistic size (64 requests, up to 8k context) in bf16 and reports time per step; on a
machine without a GPU the same kernels run under the Triton interpreter at a small size, in fp16.

    python tools/demo.py [--requests N] [--max-prompt L] [--decode-steps S] [--kv-dtype fp8_e4m3|fp8_e5m2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from progress import ProgressBar  # noqa: E402

from kvflash.attn_common import reference_attention  # noqa: E402
from kvflash.flash_attn_interface import flash_attn_varlen_func, reshape_and_cache_flash  # noqa: E402
from kvflash.fp8_utils import compute_kv_scales, kv_cache_torch_dtype  # noqa: E402


@dataclasses.dataclass
class Request:
    rid: int
    prompt_len: int
    decode_len: int
    cached: int = 0  # tokens already in the cache
    blocks: list = dataclasses.field(default_factory=list)

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.decode_len

    @property
    def finished(self) -> bool:
        return self.cached >= self.total_len


class BlockAllocator:
    """Hands out page ids from a free list; a request gets a new page when its last one is full."""

    def __init__(self, num_blocks: int, block_size: int):
        self.free = list(range(num_blocks - 1, -1, -1))
        self.block_size = block_size

    def reserve(self, req: Request, new_len: int) -> None:
        while len(req.blocks) * self.block_size < new_len:
            if not self.free:
                raise RuntimeError("out of KV-cache pages: raise --num-blocks")
            req.blocks.append(self.free.pop())

    def release(self, req: Request) -> None:
        self.free.extend(req.blocks)
        req.blocks.clear()


@dataclasses.dataclass
class Config:
    device: torch.device
    dtype: torch.dtype
    num_requests: int
    max_prompt: int
    decode_steps: int
    chunk_tokens: int
    block_size: int
    hq: int
    hkv: int
    head_size: int
    kv_cache_dtype: str


def default_config(args) -> Config:
    if HAS_GPU:
        cfg = Config(torch.device("cuda"), torch.bfloat16, 64, 8192, 16, 4096, 16, 32, 8, 128, args.kv_dtype)
    else:
        cfg = Config(torch.device("cpu"), torch.float16, 4, 40, 4, 48, 16, 4, 2, 64, args.kv_dtype)
    for name in ("num_requests", "max_prompt", "decode_steps"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    return cfg


def schedule(running: list[Request], budget: int) -> list[tuple[Request, int]]:
    """Decode rows first (1 token each), then prompt chunks in arrival order until the token budget is used."""
    batch = [(r, 1) for r in running if r.cached >= r.prompt_len and not r.finished]
    budget -= len(batch)
    for r in running:
        if r.cached < r.prompt_len and budget > 0:
            n = min(r.prompt_len - r.cached, budget)
            batch.append((r, n))
            budget -= n
    return batch


@dataclasses.dataclass
class BatchMetadata:
    """What one step's attention call needs besides q and the cache."""

    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    block_table: torch.Tensor  # [num_seqs, max_blocks] int32
    seqused_k: torch.Tensor  # [num_seqs] int32
    max_seqlen_q: int
    max_seqlen_k: int


def batch_metadata(batch: list[tuple[Request, int]], dev: torch.device) -> BatchMetadata:
    """Index tensors for a scheduled batch (built on the host, as an engine's scheduler does)."""
    seqs = [r for r, _ in batch]
    q_lens = [n for _, n in batch]
    table = torch.zeros(len(seqs), max(len(r.blocks) for r in seqs), dtype=torch.int32)
    for i, r in enumerate(seqs):
        table[i, : len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int32)
    cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    seqused = torch.tensor([r.cached for r in seqs], dtype=torch.int32)
    return BatchMetadata(cu_q.to(dev), table.to(dev), seqused.to(dev), max(q_lens), max(r.cached for r in seqs))


def attend(q: torch.Tensor, joint_cache: torch.Tensor, meta: BatchMetadata, **kw) -> torch.Tensor:
    """Causal attention of the step's queries over a joint ``[num_blocks, 2, block_size, Hkv, D]`` cache."""
    return flash_attn_varlen_func(
        q,
        joint_cache[:, 0],
        joint_cache[:, 1],
        meta.max_seqlen_q,
        meta.cu_seqlens_q,
        meta.max_seqlen_k,
        causal=True,
        block_table=meta.block_table,
        seqused_k=meta.seqused_k,
        **kw,
    )


def print_summary(cfg: Config, run: RunStats, fp8_cache: torch.Tensor, ref_cache: torch.Tensor) -> bool:
    """Print the readable summary; True when every step passed the kernel check."""
    dt = str(cfg.dtype)[6:]
    high = "float32" if cfg.device.type == "cuda" else "float64"  # the oracle's precision (see check_step)
    fp8_bytes = fp8_cache.numel() * fp8_cache.element_size()
    ref_bytes = ref_cache.numel() * ref_cache.element_size()
    ok = all(run.kernel_ok)
    prompts = [r.prompt_len for r in run.requests]
    lines = [
        "",
        "=== kvflash demo summary ===",
        f"requests             {len(run.requests)} (prompts {min(prompts)}..{max(prompts)} tokens, "
        f"{cfg.decode_steps} decode steps each)",
        f"tokens               {sum(r.total_len for r in run.requests)} in {run.steps} steps "
        f"({run.prefill_rows} prefill-chunk rows, {run.decode_rows} decode rows)",
        f"shape                Hq/Hkv {cfg.hq}/{cfg.hkv}, head size {cfg.head_size}, page {cfg.block_size}, q {dt}",
        f"KV cache             {cfg.kv_cache_dtype} ({str(fp8_cache.dtype)[6:]}): {fp8_bytes / 2**20:.2f} MiB vs "
        f"{dt} {ref_bytes / 2**20:.2f} MiB ({fp8_bytes / ref_bytes:.2f}x)",
        f"kernel vs reference  {sum(run.kernel_ok)}/{len(run.kernel_ok)} steps within FlashAttention's rule "
        f"(error <= 2x PyTorch in {dt} + 1e-3, vs {high}, FP8 and {dt} caches) -> {'OK' if ok else 'FAILED'}",
        f"FP8 vs {dt} cache    relative error max {max(run.fp8_errs):.2e}  mean {statistics.mean(run.fp8_errs):.2e}  "
        "(quantisation error)",
    ]
    if run.step_ms:
        decode_only = [t for t, prefill in zip(run.step_ms, run.step_has_prefill) if not prefill]
        lines.append(
            f"attention per step   median {statistics.median(run.step_ms):.3f} ms over all steps, "
            f"{statistics.median(decode_only) if decode_only else float('nan'):.3f} ms over decode-only steps"
        )
    print("\n".join(lines))
    return ok


@dataclasses.dataclass
class RunStats:
    requests: list
    steps: int = 0
    prefill_rows: int = 0
    decode_rows: int = 0
    kernel_ok: list = dataclasses.field(default_factory=list)
    fp8_errs: list = dataclasses.field(default_factory=list)
    step_ms: list = dataclasses.field(default_factory=list)
    step_has_prefill: list = dataclasses.field(default_factory=list)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (inf on NaN)."""
    diff = torch.linalg.vector_norm(out.double() - ref.double())
    return (
        float(diff / torch.linalg.vector_norm(ref.double()).clamp_min(1e-30)) if torch.isfinite(diff) else float("inf")
    )


def check_step(q, out_fp8, out_ref_cache, fp8_cache, ref_cache, k_scale, v_scale, ref_kw) -> tuple[bool, float]:
    """FlashAttention's rule on both caches (kernel error <= 2x PyTorch's in the input precision + 1e-3
    relative, both against a high-precision reference), and the FP8-vs-bf16 relative error (what quantising
    the cache costs). High precision is float64 on the CPU, float32 on the GPU (float64 score matrices of a
    4k-query chunk over 8k keys would need ~17 GB)."""
    high = torch.float32 if q.is_cuda else torch.float64
    ok, exact_by_cache = True, {}
    for name, out, cache, scales in (
        ("fp8", out_fp8, fp8_cache, dict(k_descale=k_scale, v_descale=v_scale)),
        ("ref", out_ref_cache, ref_cache, {}),
    ):
        exact, _ = reference_attention(q, cache[:, 0], cache[:, 1], compute_dtype=high, **scales, **ref_kw)
        lowp, _ = reference_attention(q, cache[:, 0], cache[:, 1], compute_dtype=q.dtype, **scales, **ref_kw)
        ok &= relative_error(out, exact) <= 2 * relative_error(lowp, exact) + 1e-3
        exact_by_cache[name] = exact
    return ok, relative_error(out_fp8, exact_by_cache["ref"])


def timed(fn):
    """Run ``fn`` and return (result, milliseconds by CUDA events), after one warm-up call (JIT compile)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = fn()
    end.record()
    end.synchronize()
    return result, start.elapsed_time(end)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", dest="num_requests", type=int)
    parser.add_argument("--max-prompt", dest="max_prompt", type=int)
    parser.add_argument("--decode-steps", dest="decode_steps", type=int)
    parser.add_argument("--kv-dtype", default="fp8_e4m3", choices=["fp8", "fp8_e4m3", "fp8_e5m2"])
    cfg = default_config(parser.parse_args())
    torch.manual_seed(0)
    where = (
        f"GPU: {torch.cuda.get_device_name()}"
        if HAS_GPU
        else ("no GPU: the real Triton kernels run under the Triton interpreter on the CPU, at a small size")
    )
    print(f"kvflash demo - {where}")
    dev, dt = cfg.device, cfg.dtype
    gen = torch.Generator().manual_seed(1234)
    prompts = torch.randint(max(cfg.max_prompt // 8, 1), cfg.max_prompt + 1, (cfg.num_requests,), generator=gen)
    run = RunStats([Request(i, p, cfg.decode_steps) for i, p in enumerate(prompts.tolist())])
    fp8_dtype = kv_cache_torch_dtype(cfg.kv_cache_dtype, dt)
    num_blocks = sum(-(-r.total_len // cfg.block_size) for r in run.requests) + 8
    # Joint [num_blocks, 2, block_size, Hkv, D] caches, K and V as strided views, as engines store them.
    shape = (num_blocks, 2, cfg.block_size, cfg.hkv, cfg.head_size)
    fp8_cache = torch.zeros(shape, dtype=fp8_dtype, device=dev)
    ref_cache = torch.zeros(shape, dtype=dt, device=dev)
    allocator = BlockAllocator(num_blocks, cfg.block_size)
    head_range = torch.linspace(0.5, 2.0, cfg.hkv, device=dev)[None, :, None]

    def activations(n: int):
        """Synthetic q, k, v for n new tokens; V larger than K, and the KV heads differ in range."""
        q = torch.randn(n, cfg.hq, cfg.head_size, device=dev, dtype=dt)
        k = (torch.randn(n, cfg.hkv, cfg.head_size, device=dev) * head_range).to(dt)
        v = (torch.randn(n, cfg.hkv, cfg.head_size, device=dev) * head_range * 3).to(dt)
        return q, k, v

    # Static per-KV-head scales, calibrated on a sample batch with head room for later tokens.
    _, k_cal, v_cal = activations(256)
    k_scale = compute_kv_scales(k_cal, fp8_dtype, per_head=True, margin=1.5)
    v_scale = compute_kv_scales(v_cal, fp8_dtype, per_head=True, margin=1.5)
    bar = ProgressBar(total=sum(r.total_len for r in run.requests), label="tokens")
    running = list(run.requests)
    while running:
        run.steps += 1
        batch = schedule(running, cfg.chunk_tokens)
        q, k_new, v_new = activations(sum(n for _, n in batch))
        slots = []
        for r, n in batch:
            allocator.reserve(r, r.cached + n)
            slots += [
                r.blocks[p // cfg.block_size] * cfg.block_size + p % cfg.block_size
                for p in range(r.cached, r.cached + n)
            ]
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=dev)
        reshape_and_cache_flash(
            k_new, v_new, fp8_cache[:, 0], fp8_cache[:, 1], slot_mapping, cfg.kv_cache_dtype, k_scale, v_scale
        )
        reshape_and_cache_flash(k_new, v_new, ref_cache[:, 0], ref_cache[:, 1], slot_mapping, "auto", None, None)
        for r, n in batch:
            r.cached += n
        meta = batch_metadata(batch, dev)
        fp8_step = lambda: attend(q, fp8_cache, meta, k_descale=k_scale, v_descale=v_scale)  # noqa: B023
        if HAS_GPU:
            out_fp8, ms = timed(fp8_step)
            run.step_ms.append(ms)
        else:
            out_fp8 = fp8_step()
        out_ref_cache = attend(q, ref_cache, meta)
        ref_kw = dict(
            cu_seqlens_q=meta.cu_seqlens_q, causal=True, block_table=meta.block_table, seqused_k=meta.seqused_k
        )
        ok, fp8_rel = check_step(q, out_fp8, out_ref_cache, fp8_cache, ref_cache, k_scale, v_scale, ref_kw)
        run.kernel_ok.append(ok)
        run.fp8_errs.append(fp8_rel)
        run.decode_rows += sum(1 for _, n in batch if n == 1)
        run.prefill_rows += sum(1 for _, n in batch if n > 1)
        run.step_has_prefill.append(any(n > 1 for _, n in batch))
        bar.update(sum(n for _, n in batch), note=f"step {run.steps}: {len(batch)} seqs")
        for r in [r for r in running if r.finished]:
            allocator.release(r)
        running = [r for r in running if not r.finished]
    return 0 if print_summary(cfg, run, fp8_cache, ref_cache) else 1


if __name__ == "__main__":
    sys.exit(main())

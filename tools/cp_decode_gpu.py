"""Context-parallel decode on several GPUs of one host (NCCL): correctness against one-GPU decode over the
whole cache, CUDA-graph capture of the step, and the time of a 1 x 262144-token decode step on N GPUs vs 1.

    python3 tools/cp_decode_gpu.py [--tokens 262144] [--dtype bfloat16|float8_e4m3fn]

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1): see the device notes.
Writes cp_decode.json to $OUT when set.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
for pkg in ("attn-common", "paged-decode", "chunk-prefill", "fp8-utils", "kvflash"):
    sys.path.insert(0, str(ROOT / "packages" / pkg / "src"))
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

HQ, HKV, D, BLOCK = 32, 8, 128, 16


def _graph_time_ms(fn, replays: int = 50, trials: int = 7, barrier=None) -> float:
    """Capture ``fn`` once, replay it ``replays`` times per trial; median per-step time in ms."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(trials):
        if barrier:
            barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return statistics.median(times)


def _quantize(x: torch.Tensor, kv_dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    if kv_dtype in (torch.float16, torch.bfloat16):
        return x.to(kv_dtype)
    fmax = torch.finfo(kv_dtype).max
    return (x.float() / scale[:, None]).clamp(-fmax, fmax).to(kv_dtype)


def _paged(tokens: int, kv_dtype, scale, seed: int, device):
    g = torch.Generator(device=device).manual_seed(seed)
    blocks = tokens // BLOCK
    k = torch.randn(blocks, BLOCK, HKV, D, device=device, generator=g)
    v = torch.randn(blocks, BLOCK, HKV, D, device=device, generator=g)
    table = torch.randperm(blocks, device=device, generator=g).to(torch.int32)[None, :]
    return _quantize(k, kv_dtype, scale), _quantize(v, kv_dtype, scale * 3), table


def _worker(rank: int, world: int, port: int, tokens: int, dtype_name: str, out_dir: str) -> None:
    from kvflash.paged_decode import paged_decode_attention
    from kvflash.parallel import context_parallel_decode

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    device = torch.device("cuda", rank)
    kv_dtype = getattr(torch, dtype_name)
    fp8 = kv_dtype not in (torch.float16, torch.bfloat16)
    shard = tokens // world
    q = torch.randn(1, HQ, D, device=device, generator=torch.Generator(device=device).manual_seed(0)).bfloat16()
    sinks = torch.linspace(-1, 1, HQ, device=device)
    # Each rank's own per-head scales (rank-dependent): shards are quantised independently.
    k_scale = (torch.arange(HKV, device=device) + 1 + rank) * 0.01 if fp8 else torch.ones(HKV, device=device)
    k_cache, v_cache, table = _paged(shard, kv_dtype, k_scale, 100 + rank, device)
    used = torch.tensor([shard], dtype=torch.int32, device=device)
    kd, vd = (k_scale, k_scale * 3) if fp8 else (None, None)
    out = torch.empty_like(q)

    def step():
        context_parallel_decode(
            q, k_cache, v_cache, table, used, shard, s_aux=sinks, k_descale=kd, v_descale=vd, out=out
        )

    step()
    torch.cuda.synchronize()
    # Correctness: rank 0 rebuilds the whole cache (every shard dequantised to bf16, in token order).
    deq_k = (k_cache.float() * k_scale[:, None]).bfloat16() if fp8 else k_cache
    deq_v = (v_cache.float() * (k_scale * 3)[:, None]).bfloat16() if fp8 else v_cache
    rows_k = deq_k[table[0].long()].reshape(shard, HKV, D)
    rows_v = deq_v[table[0].long()].reshape(shard, HKV, D)
    gathered_k = [torch.empty_like(rows_k) for _ in range(world)]
    gathered_v = [torch.empty_like(rows_v) for _ in range(world)]
    dist.all_gather(gathered_k, rows_k)
    dist.all_gather(gathered_v, rows_v)
    result = {}
    if rank == 0:
        whole_k = torch.cat(gathered_k).reshape(tokens // BLOCK, BLOCK, HKV, D)
        whole_v = torch.cat(gathered_v).reshape(tokens // BLOCK, BLOCK, HKV, D)
        whole_table = torch.arange(tokens // BLOCK, dtype=torch.int32, device=device)[None, :]
        whole_used = torch.tensor([tokens], dtype=torch.int32, device=device)
        single = paged_decode_attention(
            q, whole_k, whole_v, tokens, block_table=whole_table, seqused_k=whole_used, s_aux=sinks
        )
        err = float((out.float() - single.float()).abs().max())
        result.update(max_abs_err_vs_one_gpu=err, correct=err < 2e-2)
        # The one-GPU baseline the issue asks for: the whole context decoded on one GPU, in its own dtype.
        base_k, base_v, base_table = _paged(tokens, kv_dtype, k_scale, 7, device)
        base_used = torch.tensor([tokens], dtype=torch.int32, device=device)
        one = torch.empty_like(q)
        one_ms = _graph_time_ms(
            lambda: paged_decode_attention(
                q,
                base_k,
                base_v,
                tokens,
                block_table=base_table,
                seqused_k=base_used,
                s_aux=sinks,
                k_descale=kd,
                v_descale=vd,
                out=one,
            )
        )
        result["one_gpu_ms"] = one_ms
        del base_k, base_v
    dist.barrier()
    cp_ms = _graph_time_ms(step, barrier=dist.barrier)
    times = [None] * world
    dist.all_gather_object(times, cp_ms)
    if rank == 0:
        result.update(
            cp_ms_per_rank=times,
            cp_ms=max(times),
            world=world,
            tokens=tokens,
            kv_dtype=dtype_name,
            device=torch.cuda.get_device_name(),
            graph_captured=True,
        )
        result["speedup"] = result["one_gpu_ms"] / result["cp_ms"]
        print(json.dumps(result), flush=True)
        if out_dir:
            (pathlib.Path(out_dir) / f"cp_decode_{dtype_name}.json").write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=262144)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--world", type=int, default=torch.cuda.device_count())
    args = parser.parse_args()
    if args.world < 2:
        sys.exit(f"needs at least 2 GPUs, found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args.world, port, args.tokens, args.dtype, os.environ.get("OUT", "")), nprocs=args.world)


if __name__ == "__main__":
    main()

"""Context-parallel decode on several GPUs of one host (NCCL): correctness against one-GPU decode over the
whole cache, CUDA-graph capture of the step, and the time of a 1 x 262144-token decode step on N GPUs vs 1.

    python3 -m tools.cp_decode_gpu [--tokens 262144] [--dtype bf16|e4m3|e5m2]     # from the repository root

NVLink multicast (NVLS) stays off unless the environment turns it on: NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are set by default (the multi-GPU machines are used so).
Caches come from the bench (``tools.bench.inputs.make_paged_cache``: scattered pages, FP8 with per-(sequence, KV
head) descales, different on each rank). The step is timed by CUDA-graph replays between barriers (the bench's
event timing queues calls behind a sleep on one GPU, which would time the other ranks' wait in a collective).
Writes cp_decode_<dtype>.json to $OUT when set.
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

from tools.bench.inputs import PagedCache, make_paged_cache  # noqa: E402

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


def _cache(tokens: int, kv_dtype: str, seed: int, device) -> PagedCache:
    """One sequence of ``tokens`` keys in a paged cache (the bench's builder); descales ``[1, Hkv]``."""
    return make_paged_cache([tokens], HKV, D, BLOCK, kv_dtype, torch.Generator(device=device).manual_seed(seed))


def _dequantized_rows(t: torch.Tensor, descale: torch.Tensor | None, table: torch.Tensor) -> torch.Tensor:
    """The sequence's ``[tokens, Hkv, D]`` rows of cache ``t`` in token order, dequantised to bf16."""
    rows = t[table[0].long()].flatten(0, 1)
    return rows if descale is None else (rows.float() * descale[0][:, None]).bfloat16()


def _worker(rank: int, world: int, port: int, tokens: int, dtype_name: str, out_dir: str) -> None:
    from kvflash.paged_decode import paged_decode_attention
    from kvflash.parallel import context_parallel_decode

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    device = torch.device("cuda", rank)
    shard = tokens // world
    q = torch.randn(1, HQ, D, device=device, generator=torch.Generator(device=device).manual_seed(0)).bfloat16()
    sinks = torch.linspace(-1, 1, HQ, device=device)
    # Each rank's own cache and descales (seeded by rank): shards are quantised independently.
    cache = _cache(shard, dtype_name, 100 + rank, device)
    k_cache, v_cache, table, used = cache.k, cache.v, cache.block_table, cache.seqused_k
    kd, vd = cache.k_descale, cache.v_descale
    out = torch.empty_like(q)

    def step():
        context_parallel_decode(
            q, k_cache, v_cache, table, used, shard, s_aux=sinks, k_descale=kd, v_descale=vd, out=out
        )

    step()
    torch.cuda.synchronize()
    # Correctness: rank 0 rebuilds the whole cache (every shard dequantised to bf16, in token order).
    rows_k = _dequantized_rows(k_cache, kd, table)
    rows_v = _dequantized_rows(v_cache, vd, table)
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
        # The one-GPU baseline: the whole context decoded on one GPU, in its own dtype.
        base = _cache(tokens, dtype_name, 7, device)
        one = torch.empty_like(q)
        one_ms = _graph_time_ms(
            lambda: paged_decode_attention(
                q, base.k, base.v, tokens, block_table=base.block_table, seqused_k=base.seqused_k, s_aux=sinks,
                k_descale=base.k_descale, v_descale=base.v_descale, out=one,
            )
        )  # fmt: skip
        result["one_gpu_ms"] = one_ms
        del base
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
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "e4m3", "e5m2"], help="KV cache dtype")
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

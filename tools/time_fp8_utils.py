"""Time reshape_and_cache_flash against the device's own copy bandwidth, measured in the same process.

Bytes counted per call: key + value read, cache bytes written (and per-token-head scales), slot_mapping
read. Two timings, both ``do_bench`` medians (which flush L2 before every repetition):

- eager: one Python call per repetition, as an engine runs prefill without CUDA graphs. When the host
  overhead of a call (checks, torch.library dispatch, Triton launch) exceeds the GPU time, this measures
  the host, not the kernel; the host overhead is printed separately.
- graph: one replay of a CUDA graph holding ROTATIONS calls, each on its own key/value/slot set (disjoint
  slots of a pool larger than L2), so no call finds the previous one's data in L2; time / ROTATIONS.

Target: graph GB/s >= 80 % of copy. ``--sweep`` times other launch shapes the graph way.

    PYTHONPATH=packages/attn-common/src:packages/fp8-utils/src python tools/time_fp8_utils.py [--sweep]
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from triton.testing import do_bench

from kvflash.fp8_utils import compute_kv_scales, reshape_and_cache_flash
from kvflash.fp8_utils.reshape_and_cache import LaunchConfig, pick_launch_config, write_cache

ROTATIONS = 8


def _gbs(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def copy_bandwidth() -> float:
    """GB/s (bytes read + written) of a 1 GiB device-to-device copy."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    return _gbs(2 * src.nbytes, do_bench(lambda: dst.copy_(src), return_mode="median"))


def graph_ms(calls: list) -> float:
    """do_bench median of one CUDA-graph replay of ``calls`` (warmed up first), divided by their number."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return do_bench(graph.replay, return_mode="median") / len(calls)


def host_us(call, n: int = 2000) -> float:
    """Host microseconds per call of a 1-token ``call`` (GPU time negligible: the host is the bottleneck)."""
    for _ in range(50):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help="also time other launch shapes")
    args = parser.parse_args()
    torch.manual_seed(0)
    num_tokens, num_kv_heads, head_size, block_size = args.tokens, args.kv_heads, args.head_size, args.block_size
    shape = (num_tokens, num_kv_heads, head_size)

    copy_gbs = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"copy bandwidth (1 GiB d2d, read + write): {copy_gbs:.0f} GB/s")

    inputs = [(torch.randn(shape, device="cuda").bfloat16(), torch.randn(shape, device="cuda").bfloat16())]
    inputs += [(torch.randn_like(inputs[0][0]), torch.randn_like(inputs[0][0])) for _ in range(ROTATIONS - 1)]
    blocks_per_call = -(-num_tokens // block_size)
    num_blocks = ROTATIONS * blocks_per_call
    # Prefill-like slots: each group of block_size tokens fills one block; blocks shuffled, disjoint per set.
    perm = torch.randperm(num_blocks, device="cuda")
    t = torch.arange(num_tokens, device="cuda")
    slot_sets = [perm[r * blocks_per_call + t // block_size] * block_size + t % block_size for r in range(ROTATIONS)]
    default = pick_launch_config(num_tokens * num_kv_heads, head_size)
    cases = [
        ("fp8 e4m3, per-head scale tensors", "fp8", torch.float8_e4m3fn, "per_head"),
        ("fp8 e4m3, float scales", "fp8", torch.float8_e4m3fn, "float"),
        ("fp8 e5m2, per-tensor scale tensors", "fp8_e5m2", torch.float8_e5m2, "tensor"),
        ("fp8 e4m3, per-token-head scales", "fp8_e4m3_per_token_head", torch.float8_e4m3fn, "per_token"),
        ("auto (bf16 cache)", "auto", torch.bfloat16, None),
    ]
    print(
        f"\nreshape_and_cache_flash, {num_tokens} tokens x {num_kv_heads} KV heads x {head_size}, bf16 in, "
        f"block {block_size}, default launch {default}; cache pool {num_blocks} blocks"
    )
    print(f"{'case':36s} {'eager ms':>9s} {'GB/s':>6s} {'%copy':>6s} {'graph ms':>9s} {'GB/s':>6s} {'%copy':>6s}")
    rows = []
    for name, kv_cache_dtype, cache_dtype, scale_kind in cases:
        key_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_size, dtype=cache_dtype, device="cuda")
        value_cache = torch.zeros_like(key_cache)
        if scale_kind is None:
            k_scale = v_scale = None
        elif scale_kind == "float":
            k_scale, v_scale = 0.02, 0.03
        elif scale_kind == "per_token":  # outputs: one float32 scale per slot and head, written beside the values
            k_scale = torch.zeros(key_cache.shape[:3], device="cuda")
            v_scale = torch.zeros_like(k_scale)
        else:
            per_head = scale_kind == "per_head"
            k_scale = compute_kv_scales(inputs[0][0], cache_dtype, per_head=per_head)
            v_scale = compute_kv_scales(inputs[0][1], cache_dtype, per_head=per_head)
        calls = [
            functools.partial(
                reshape_and_cache_flash, k, v, key_cache, value_cache, s, kv_cache_dtype, k_scale, v_scale
            )
            for (k, v), s in zip(inputs, slot_sets)
        ]
        nbytes = 2 * inputs[0][0].nbytes + 2 * inputs[0][0].numel() * cache_dtype.itemsize + slot_sets[0].nbytes
        if scale_kind == "per_token":
            nbytes += 2 * num_tokens * num_kv_heads * 4
        eager = do_bench(calls[0], return_mode="median")
        graph = graph_ms(calls)
        print(
            f"{name:36s} {eager:9.4f} {_gbs(nbytes, eager):6.0f} {100 * _gbs(nbytes, eager) / copy_gbs:5.1f}% "
            f"{graph:9.4f} {_gbs(nbytes, graph):6.0f} {100 * _gbs(nbytes, graph) / copy_gbs:5.1f}%"
        )
        one = (inputs[0][0][:1], inputs[0][1][:1], key_cache, value_cache, slot_sets[0][:1], kv_cache_dtype)
        rows.append((name, one, k_scale, v_scale, key_cache, value_cache, kv_cache_dtype, nbytes))

    print("\nhost overhead per call (1 token, launch-bound):")
    for name, one, k_scale, v_scale, *_ in rows:
        print(f"  {name:36s} {host_us(functools.partial(reshape_and_cache_flash, *one, k_scale, v_scale)):7.1f} us")
    # The same work without the torch.library dispatch (what the custom op itself costs on the host).
    name, one, k_scale, v_scale, *_ = rows[0]
    bare = functools.partial(write_cache, *one, k_scale, v_scale, 1.0, 1.0)
    print(f"  {name + ', no op dispatch':36s} {host_us(bare):7.1f} us")

    if not args.sweep:
        return
    configs = [LaunchConfig(r, w) for r, w in ((8, 2), (16, 4), (32, 4), (64, 4), (16, 8), (32, 8), (64, 8), (128, 8))]
    print("\nlaunch-shape sweep (graph, % of copy); rows per program / warps")
    print(f"{'case':36s} " + " ".join(f"{f'{c.block_rows}/{c.num_warps}':>7s}" for c in configs))
    for name, _, k_scale, v_scale, key_cache, value_cache, kv_cache_dtype, nbytes in rows:
        k_t, k_v = (k_scale, 1.0) if isinstance(k_scale, torch.Tensor) else (None, k_scale or 1.0)
        v_t, v_v = (v_scale, 1.0) if isinstance(v_scale, torch.Tensor) else (None, v_scale or 1.0)
        cells = []
        for config in configs:
            calls = [
                functools.partial(
                    write_cache, k, v, key_cache, value_cache, s, kv_cache_dtype, k_t, v_t, k_v, v_v, config
                )
                for (k, v), s in zip(inputs, slot_sets)
            ]
            cells.append(f"{100 * _gbs(nbytes, graph_ms(calls)) / copy_gbs:6.1f}%")
        print(f"{name:36s} " + " ".join(cells))


if __name__ == "__main__":
    main()

"""Time kvflash's paged decode on the GPU against the device-to-device copy bandwidth of the same run.

Usage (on the GPU machine, from the repo root)::

    PYTHONPATH=packages/attn-common/src:packages/paged-decode/src python tools/time_paged_decode.py
    ... --sweep "block_n=64,num_stages=3;block_n=128,num_warps=8" --sweep-case 64x4096 --splits 1,2,4

``--sweep`` fields replace those of the chosen config as given: a ``kv_heads`` override needs its ``block_n``
too (the chooser sizes tiles for its own ``kv_heads``), and must keep ``q_tokens * kv_heads * h_rows <= block_h``
(the kernel asserts it).

Bytes per call = K and V of the tokens each sequence uses (read once) + q + out. Times are medians of
CUDA-graph replays (``triton.testing.do_bench_cudagraph``), so host launch overhead is not counted; KV pools
are far larger than L2 (>= 0.5 GB). A correctness spot-check at size compares with ``reference_attention``.
"""

import argparse
import dataclasses
import os
import tempfile

os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="kvflash_triton_"))
# Call plans replay the first call's launches for calls with the same arguments: a --sweep override would not be
# seen after the first setting.
os.environ["KVFLASH_CALL_PLANS"] = "0"

import torch  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from kvflash.attn_common import reference_attention  # noqa: E402
from kvflash.paged_decode import decode as decode_module  # noqa: E402
from kvflash.paged_decode import paged_decode_attention  # noqa: E402
from kvflash.paged_decode.decode_kernel import paged_decode_kernel  # noqa: E402

CASES = [(64, 4096), (128, 8192), (1, 131072), (4, 32768)]
KV_DTYPES = {"bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE = 32, 8, 128


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """GB/s of a large device-to-device copy, bytes read + written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / ms / 1e6


@dataclasses.dataclass
class Pool:
    """A KV pool of exactly the tokens the case uses, as flat per-dtype tensors (re-viewed per page size)."""

    num_seqs: int
    seqlen: int
    flat: dict  # dtype name -> (k, v) of shape [num_seqs * seqlen, Hkv, D]

    @classmethod
    def make(cls, num_seqs: int, seqlen: int, dtypes: list[str]) -> "Pool":
        tokens = num_seqs * seqlen
        flat = {}
        for name in dtypes:
            k = torch.randn(tokens, NUM_KV_HEADS, HEAD_SIZE, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(tokens, NUM_KV_HEADS, HEAD_SIZE, device="cuda", dtype=torch.bfloat16)
            flat[name] = (k.to(KV_DTYPES[name]), v.to(KV_DTYPES[name])) if name != "bf16" else (k, v)
            del k, v
        return cls(num_seqs, seqlen, flat)

    def args(self, name: str, block_size: int, seed: int = 0) -> tuple:
        k, v = self.flat[name]
        num_blocks = k.shape[0] // block_size
        gen = torch.Generator(device="cuda").manual_seed(seed)
        table = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32).view(self.num_seqs, -1)
        kc = k.view(num_blocks, block_size, NUM_KV_HEADS, HEAD_SIZE)
        vc = v.view(num_blocks, block_size, NUM_KV_HEADS, HEAD_SIZE)
        seqused = torch.full((self.num_seqs,), self.seqlen, dtype=torch.int32, device="cuda")
        q = torch.randn(self.num_seqs, NUM_Q_HEADS, HEAD_SIZE, device="cuda", generator=gen).bfloat16()
        scales = {}
        if name != "bf16":
            scales = {
                "k_descale": torch.rand(NUM_KV_HEADS, device="cuda", generator=gen) * 0.1 + 0.02,
                "v_descale": torch.rand(NUM_KV_HEADS, device="cuda", generator=gen) * 0.1 + 0.02,
            }
        return q, kc, vc, dict(block_table=table, seqused_k=seqused, **scales)

    def bytes_moved(self, name: str) -> int:
        kv = 2 * self.num_seqs * self.seqlen * NUM_KV_HEADS * HEAD_SIZE * KV_DTYPES[name].itemsize
        return kv + 2 * self.num_seqs * NUM_Q_HEADS * HEAD_SIZE * 2


def time_decode(pool: Pool, name: str, block_size: int, num_splits: int = 0) -> tuple[float, int]:
    """Median ms of one decode call (CUDA-graph replays), and the split count it used."""
    q, k, v, kw = pool.args(name, block_size)
    out = torch.empty_like(q)
    fn = lambda: paged_decode_attention(q, k, v, pool.seqlen, out=out, num_splits=num_splits, **kw)
    fn()
    torch.cuda.synchronize()
    ms = do_bench_cudagraph(fn, rep=200, return_mode="median")
    cfg = decode_module.choose_decode_config(
        num_seqs=pool.num_seqs, num_kv_heads=NUM_KV_HEADS, group=NUM_Q_HEADS // NUM_KV_HEADS, head_size=HEAD_SIZE,
        kv_itemsize=k.element_size(), max_seqlen_k=pool.seqlen, window_left=-1, num_splits=num_splits,
        multiprocessor_count=torch.cuda.get_device_properties(0).multi_processor_count, interpreter=False,
    )  # fmt: skip
    return ms, cfg.num_splits


def spot_check(pool: Pool, name: str, block_size: int) -> float:
    """Relative L2 error of the decode against the float32 reference at full size (first two sequences)."""
    q, k, v, kw = pool.args(name, block_size, seed=1)
    out = paged_decode_attention(q, k, v, pool.seqlen, **kw)
    n = min(2, pool.num_seqs)
    kw = {**kw, "block_table": kw["block_table"][:n], "seqused_k": kw["seqused_k"][:n]}
    cu = torch.arange(n + 1, dtype=torch.int32, device="cuda")
    ref, _ = reference_attention(q[:n], k, v, cu, **kw)
    return float((out[:n].float() - ref).norm() / ref.norm())


_CHOOSE_CONFIG = decode_module.choose_decode_config


def override_config(**fields) -> None:
    """Make the launcher use fixed launch settings (tuning only); no fields restores the heuristic."""
    if not fields:
        decode_module.choose_decode_config = _CHOOSE_CONFIG
        return
    decode_module.choose_decode_config = lambda **kw: dataclasses.replace(_CHOOSE_CONFIG(**kw), **fields)


def report_compiled() -> None:
    """Registers, spills and shared memory of each compiled decode-kernel variant (best effort)."""
    for cache in getattr(paged_decode_kernel, "device_caches", {}).values():
        kernels = next((c for c in cache if isinstance(c, dict)), {})
        for kernel in kernels.values():
            md = kernel.metadata
            ttgir = kernel.asm.get("ttgir", "")
            print(
                f"  variant warps={md.num_warps} stages={md.num_stages} regs={getattr(kernel, 'n_regs', '?')} "
                f"spills={getattr(kernel, 'n_spills', '?')} shared={md.shared} "
                f"async_copies={ttgir.count('async_copy_global_to_local')} "
                f"mma={'v3' if 'warp_group_dot' in ttgir else 'v2' if 'nvidia_mma' in ttgir else '?'}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(f"{n}x{s}" for n, s in CASES))
    parser.add_argument("--dtypes", default="bf16,e4m3,e5m2")
    parser.add_argument("--blocks", default="16,64")
    parser.add_argument("--sweep", default="", help="';'-separated launch overrides, e.g. 'block_n=64,num_stages=3'")
    parser.add_argument("--sweep-case", default="64x4096")
    parser.add_argument("--sweep-dtypes", default="bf16,e4m3")
    parser.add_argument("--sweep-splits", default="0", help="num_splits values for each sweep setting (0 = auto)")
    parser.add_argument("--splits", default="", help="forced num_splits values to sweep on --split-cases")
    parser.add_argument("--split-cases", default="1x131072,4x32768")
    parser.add_argument("--split-dtypes", default="bf16")
    parser.add_argument("--no-check", action="store_true")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    copy_gbs = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")

    def parse_case(text):
        n, s = text.split("x")
        return int(n), int(s)

    sweep_splits = [int(x) for x in args.sweep_splits.split(",")]
    for case in args.sweep_case.split(",") if args.sweep else []:
        pool = Pool.make(*parse_case(case), args.sweep_dtypes.split(","))
        for text in args.sweep.split(";"):
            fields = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in text.split(",")}
            override_config(**fields)
            for name in args.sweep_dtypes.split(","):
                for n in sweep_splits:
                    ms, splits = time_decode(pool, name, 16, num_splits=n)
                    gbs = pool.bytes_moved(name) / ms / 1e6
                    pct = 100 * gbs / copy_gbs
                    print(f"  sweep {text:<36} {case:<9} {name:<5} splits {splits:<3} {ms:.4f} ms {pct:4.1f} %")
        del pool
    override_config()
    split_dtypes = args.split_dtypes.split(",")
    for case in args.split_cases.split(",") if args.splits else []:
        pool = Pool.make(*parse_case(case), split_dtypes)
        for name in split_dtypes:
            for n in [int(x) for x in args.splits.split(",")]:
                ms, splits = time_decode(pool, name, 16, num_splits=n)
                gbs = pool.bytes_moved(name) / ms / 1e6
                pct = 100 * gbs / copy_gbs
                print(
                    f"  splits {case:<10} {name:<5} n={n:<4} used={splits:<4} {ms:.4f} ms {gbs:6.0f} GB/s {pct:5.1f}%"
                )
        del pool

    table = []
    for case in args.cases.split(","):
        pool = Pool.make(*parse_case(case), dtypes)
        for block in [int(b) for b in args.blocks.split(",")]:
            bf16_ms = None
            for name in dtypes:
                ms, splits = time_decode(pool, name, block)
                bf16_ms = ms if name == "bf16" else bf16_ms
                gbs = pool.bytes_moved(name) / ms / 1e6
                ratio = f"{ms / bf16_ms:.2f}" if bf16_ms and name != "bf16" else "-"
                table.append((case, name, block, splits, ms, gbs, 100 * gbs / copy_gbs, ratio))
        if not args.no_check and case in ("4x32768", "1x131072"):
            for name in dtypes:
                print(f"  spot-check {case} {name} block 16: rel. L2 error {spot_check(pool, name, 16):.2e}")
        del pool
        torch.cuda.empty_cache()
    report_compiled()
    print(f"\ncopy {copy_gbs:.0f} GB/s; Hq/Hkv {NUM_Q_HEADS}/{NUM_KV_HEADS}, D {HEAD_SIZE}, bf16 q")
    print(f"{'case':<10} {'kv':<5} {'page':>4} {'splits':>6} {'ms':>8} {'GB/s':>7} {'% copy':>7} {'fp8/bf16':>8}")
    for case, name, block, splits, ms, gbs, pct, ratio in table:
        print(f"{case:<10} {name:<5} {block:>4} {splits:>6} {ms:8.4f} {gbs:7.0f} {pct:7.1f} {ratio:>8}")


if __name__ == "__main__":
    main()

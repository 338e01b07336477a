"""Per-token-head descales on the GPU: decode time against per-head FP8, and the default paths' code unchanged.

PYTHONPATH=<packages/*/src> python3 tools/per_token_gpu_check.py time
    decode 64 x 4096 and 128 x 8192 (Hq/Hkv 32/8, D 128, page 16, bf16 q), e4m3 and e5m2: per-head vs
    per-token-head descales, median ms of CUDA-event timed calls over rotated caches, and the ratio (issue 17:
    <= 1.10). Bytes per call include the float32 scales.
PYTHONPATH=<one tree's packages/*/src> TRITON_CACHE_DIR=<empty dir> python3 tools/per_token_gpu_check.py compile
    compile (launch once) the default-path FP8 decode and prefill kernels; then
python3 tools/per_token_gpu_check.py compare DIR_A DIR_B
    compares the PTX bodies of the kernels two trees compiled (parameter indices normalised, since a tree
    may add unused parameters): identical bodies mean the default path compiles to the same code.
"""

from __future__ import annotations

import pathlib
import re
import sys

import torch


def _decode_inputs(num_seqs, ctx, kv_dtype, per_token, gen, hq=32, hkv=8, d=128, block=16):
    num_blocks = num_seqs * (ctx // block) + 1
    k = torch.randn(num_blocks, block, hkv, d, device="cuda", generator=gen).to(kv_dtype)
    v = torch.randn(num_blocks, block, hkv, d, device="cuda", generator=gen).to(kv_dtype)
    table = torch.randperm(num_blocks, device="cuda", generator=gen)[: num_seqs * (ctx // block)]
    table = table.view(num_seqs, -1).to(torch.int32)
    rows = (num_blocks, block, hkv) if per_token else (num_seqs, hkv)
    kd = 0.5 + torch.rand(rows, device="cuda", generator=gen)
    vd = 0.25 + torch.rand(rows, device="cuda", generator=gen)
    q = torch.randn(num_seqs, hq, d, device="cuda", generator=gen).to(torch.bfloat16)
    seqused = torch.full((num_seqs,), ctx, dtype=torch.int32, device="cuda")
    return q, k, v, table, seqused, kd, vd


def time_decode() -> None:
    from kvflash.paged_decode import paged_decode_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    for num_seqs, ctx in [(64, 4096), (128, 8192)]:
        for kv_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            ms = {}
            for per_token in (False, True):
                sets = [_decode_inputs(num_seqs, ctx, kv_dtype, per_token, gen) for _ in range(3)]
                outs = [torch.empty_like(s[0]) for s in sets]

                def call(i, sets=sets, outs=outs, ctx=ctx):
                    q, k, v, table, seqused, kd, vd = sets[i]
                    paged_decode_attention(q, k, v, ctx, block_table=table, seqused_k=seqused, causal=True,
                                           k_descale=kd, v_descale=vd, out=outs[i])  # fmt: skip

                for i in range(3):
                    call(i)
                torch.cuda.synchronize()
                times = []
                for rep in range(60):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    call(rep % 3)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                times.sort()
                ms[per_token] = times[len(times) // 2]
            tokens = num_seqs * ctx
            kv_bytes = 2 * tokens * 8 * 128
            scale_bytes = 2 * tokens * 8 * 4
            print(
                f"decode {num_seqs}x{ctx} {str(kv_dtype).split('.')[-1]}: per-head {ms[False]:.4f} ms "
                f"({kv_bytes / ms[False] / 1e6:.0f} GB/s KV), per-token-head {ms[True]:.4f} ms "
                f"({(kv_bytes + scale_bytes) / ms[True] / 1e6:.0f} GB/s KV + scales), ratio {ms[True] / ms[False]:.3f}"
            )


def compile_default() -> None:
    from kvflash.chunk_prefill import chunk_prefill_attention
    from kvflash.paged_decode import paged_decode_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    for kv_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        q, k, v, table, seqused, kd, vd = _decode_inputs(64, 4096, kv_dtype, False, gen)
        paged_decode_attention(q, k, v, 4096, block_table=table, seqused_k=seqused, causal=True, k_descale=kd,
                               v_descale=vd)  # fmt: skip
        paged_decode_attention(q[:1], k, v, 4096, block_table=table[:1], seqused_k=seqused[:1], causal=True,
                               k_descale=kd[:1], v_descale=vd[:1], num_splits=8)  # fmt: skip
        qp = torch.randn(2048, 32, 128, device="cuda", generator=gen).to(torch.bfloat16)
        cu = torch.tensor([0, 1024, 2048], dtype=torch.int32, device="cuda")
        chunk_prefill_attention(qp, k, v, cu, 1024, 4096, block_table=table[:2], seqused_k=seqused[:2], causal=True,
                                k_descale=kd[:2], v_descale=vd[:2])  # fmt: skip
    torch.cuda.synchronize()


def _bodies(cache_dir: str) -> dict[str, list[str]]:
    found = {}
    for path in sorted(pathlib.Path(cache_dir).rglob("*.ptx")):
        text = path.read_text()
        name = path.stem
        body = [
            re.sub(r"_param_\d+", "_param_N", line.strip())
            for line in text.splitlines()
            if line.strip() and ".param" not in line and not line.strip().startswith("//")
        ]
        found.setdefault(name, []).append(sorted(body))
    return found


def compare(dir_a: str, dir_b: str) -> int:
    a, b = _bodies(dir_a), _bodies(dir_b)
    bad = 0
    for name in sorted(set(a) | set(b)):
        va, vb = sorted(a.get(name, [])), sorted(b.get(name, []))
        same = va == vb
        bad += not same
        sizes = [len(x) for x in va], [len(x) for x in vb]
        print(f"{name}: {len(va)} vs {len(vb)} binaries, PTX lines {sizes[0]} vs {sizes[1]}: "
              f"{'identical' if same else 'DIFFERENT'}")  # fmt: skip
    return bad


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "time":
        time_decode()
    elif mode == "compile":
        compile_default()
    else:
        sys.exit(1 if compare(sys.argv[2], sys.argv[3]) else 0)

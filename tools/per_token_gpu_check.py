"""Per-token-head descales on the GPU: decode time against per-head FP8, and the default paths' code unchanged.

From the repository root, with ``packages/*/src`` on ``PYTHONPATH``:

python3 -m tools.per_token_gpu_check time
    decode 64 x 4096 and 128 x 8192 (Hq/Hkv 32/8, D 128, page 16, bf16 q), e4m3 and e5m2: per-(sequence, head)
    vs per-token-head descales, timed as the bench's decode rows (``tools.bench.cases_decode``: rotated caches,
    CUDA events), and the ratio (target <= 1.10, docs/design.md). Bytes per call include the float32 scales.
TRITON_CACHE_DIR=<empty dir> python3 -m tools.per_token_gpu_check compile   (one tree's packages/*/src)
    compile (launch once) the default-path FP8 decode and prefill kernels; then
python3 -m tools.per_token_gpu_check compare DIR_A DIR_B
    compares the PTX bodies of the kernels two trees compiled (parameter indices normalised, since a tree
    may add unused parameters): identical bodies mean the default path compiles to the same code.
"""

from __future__ import annotations

import pathlib
import re
import sys

import torch


def time_decode() -> None:
    from tools.bench.cases_decode import DecodeSpec, measure_decode

    for num_seqs, ctx in [(64, 4096), (128, 8192)]:
        for kv_dtype in ("e4m3", "e5m2"):
            m = {p: measure_decode(DecodeSpec(num_seqs, ctx, kv_dtype=kv_dtype, per_token=p)) for p in (False, True)}
            gbs = {p: m[p].work / m[p].ms / 1e6 for p in m}
            print(
                f"decode {num_seqs}x{ctx} {kv_dtype}: per-head {m[False].ms:.4f} ms ({gbs[False]:.0f} GB/s), "
                f"per-token-head {m[True].ms:.4f} ms ({gbs[True]:.0f} GB/s, scales included), "
                f"ratio {m[True].ms / m[False].ms:.3f}, check {m[False].rel_err or 0:.1e} / {m[True].rel_err or 0:.1e}"
            )


def compile_default() -> None:
    from kvflash.chunk_prefill import chunk_prefill_attention
    from kvflash.paged_decode import paged_decode_attention
    from tools.bench.inputs import make_paged_cache

    gen = torch.Generator(device="cuda").manual_seed(0)
    for kv_dtype in ("e4m3", "e5m2"):
        c = make_paged_cache([4096] * 64, 8, 128, 16, kv_dtype, gen)
        q = torch.randn(64, 32, 128, device="cuda", generator=gen).to(torch.bfloat16)
        table, seqused, kd, vd = c.block_table, c.seqused_k, c.k_descale, c.v_descale
        paged_decode_attention(q, c.k, c.v, 4096, block_table=table, seqused_k=seqused, causal=True, k_descale=kd,
                               v_descale=vd)  # fmt: skip
        paged_decode_attention(q[:1], c.k, c.v, 4096, block_table=table[:1], seqused_k=seqused[:1], causal=True,
                               k_descale=kd[:1], v_descale=vd[:1], num_splits=8)  # fmt: skip
        qp = torch.randn(2048, 32, 128, device="cuda", generator=gen).to(torch.bfloat16)
        cu = torch.tensor([0, 1024, 2048], dtype=torch.int32, device="cuda")
        chunk_prefill_attention(qp, c.k, c.v, cu, 1024, 4096, block_table=table[:2], seqused_k=seqused[:2],
                                causal=True, k_descale=kd[:2], v_descale=vd[:2])  # fmt: skip
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

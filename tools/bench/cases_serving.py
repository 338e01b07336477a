"""Serving-shaped batches through ``flash_attn_varlen_func``: speculative-decode verification and mixed steps.

- ``spec``: every sequence brings ``q_len`` queries (1, 2, 4, 8) over the same paged cache, 64 x 4096 and
  1 x 131072. Work = KV bytes read once + q + out, so the rate is comparable with plain decode; the target
  compares each ``q_len`` with ``q_len = 1`` over the same cache (the K/V read once serves every query).
- ``mixed``: decode rows and prefill chunks in one call (part ``all``), and the same rows split by kind into
  a decode-only call (part ``decode``) and a prefill-only call (part ``prefill``) over the same cache, each
  timed in the same run; the target compares ``all`` with ``decode + prefill``. Work = 4 * Hq * D * visible
  (query, key) pairs.

Hq/Hkv 32/8, D 128, page 16, bf16 q; bf16 and e4m3 caches (full mode), bf16 only for ``--quick``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .case import Case, Measurement, measure
from .inputs import PagedCache, kv_bytes, make_paged_cache, spot_check, visible_pairs
from .timing import rotation_sets

__all__ = ["serving_cases"]

HQ, HKV, D, BLOCK = 32, 8, 128, 16
SPEC_SHAPES = [(64, 4096), (1, 131072)]
SPEC_Q_LENS = [1, 2, 4, 8]
# name -> (decode rows: (count, kv_len), prefill chunks: (count, q_len, kv_len))
MIXED = {
    "mixed 120x2048+8x(1024+512)": ((120, 2048), (8, 512, 1536)),
    "mixed 255x4096+1x8192": ((255, 4096), (1, 8192, 8192)),
}
PARTS = ("all", "decode", "prefill")


@dataclasses.dataclass(frozen=True)
class ServingSpec:
    kind: str  # "spec" or "mixed"
    shape: str  # "64x4096" (spec) or a MIXED key
    kv_dtype: str
    q_len: int = 1  # spec only
    part: str = "all"  # mixed only

    def seqs(self) -> list[tuple[int, int]]:
        """(q_len, kv_len) of every sequence of this call."""
        if self.kind == "spec":
            num_seqs, ctx = (int(x) for x in self.shape.split("x"))
            return [(self.q_len, ctx)] * num_seqs
        (n_dec, dec_k), (n_pre, pre_q, pre_k) = MIXED[self.shape]
        decode, prefill = [(1, dec_k)] * n_dec, [(pre_q, pre_k)] * n_pre
        return {"all": decode + prefill, "decode": decode, "prefill": prefill}[self.part]

    def work(self) -> float:
        seqs = self.seqs()
        if self.kind == "spec":
            q_and_out = 2 * sum(q for q, _ in seqs) * HQ * D * 2
            return kv_bytes(sum(k for _, k in seqs), HKV, D, self.kv_dtype) + q_and_out
        return 4 * HQ * D * sum(visible_pairs(q, k) for q, k in seqs)


def _subset(cache: PagedCache, rows: slice) -> PagedCache:
    """The sequences ``rows`` of ``cache``: same pools, their block-table rows, lengths and descales."""
    pick = lambda t: None if t is None else t[rows]
    return PagedCache(cache.k, cache.v, cache.block_table[rows], cache.seqused_k[rows], pick(cache.k_descale),
                      pick(cache.v_descale))  # fmt: skip


def _run(spec: ServingSpec) -> Measurement:
    from kvflash.flash_attn_interface import flash_attn_varlen_func

    gen = torch.Generator(device="cuda").manual_seed(0)
    whole = dataclasses.replace(spec, part="all")
    all_seqs = whole.seqs()
    seqs = spec.seqs()
    # The part's sequences within the whole call (decode rows first, then the prefill chunks).
    first = len(all_seqs) - len(seqs) if spec.part == "prefill" else 0
    q_lens = [q for q, _ in seqs]
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    cu_q = torch.tensor(cu, dtype=torch.int32, device="cuda")
    max_q, max_k = max(q_lens), max(k for _, k in seqs)
    sets = []
    set_bytes = kv_bytes(sum(k for _, k in all_seqs), HKV, D, spec.kv_dtype)
    for _ in range(rotation_sets(set_bytes)):
        cache = _subset(make_paged_cache([k for _, k in all_seqs], HKV, D, BLOCK, spec.kv_dtype, gen),
                        slice(first, first + len(seqs)))  # fmt: skip
        q = torch.randn(cu[-1], HQ, D, dtype=torch.bfloat16, device="cuda", generator=gen)
        sets.append((cache, q, torch.full_like(q, float("nan"))))

    def call(cache, q, out):
        flash_attn_varlen_func(
            q, cache.k, cache.v, max_q, cu_q, max_k, seqused_k=cache.seqused_k, block_table=cache.block_table,
            causal=True, out=out, k_descale=cache.k_descale, v_descale=cache.v_descale,
        )  # fmt: skip

    calls = [functools.partial(call, *s) for s in sets]
    cache, q, out = sets[0]
    last = len(seqs) - 1
    return measure(
        calls, spec.work(), lambda: spot_check(out, q, cache, [(cu[0], cu[1], 0), (cu[last], cu[last + 1], last)])
    )


def _specs(quick: bool) -> list[ServingSpec]:
    dtypes = ["bf16"] if quick else ["bf16", "e4m3"]
    spec_shapes = SPEC_SHAPES[:1] if quick else SPEC_SHAPES
    mixed = list(MIXED)[:1] if quick else list(MIXED)
    specs = [ServingSpec("spec", f"{n}x{c}", t, q_len=q) for n, c in spec_shapes for t in dtypes for q in SPEC_Q_LENS]
    specs += [ServingSpec("mixed", m, t, part=p) for m in mixed for t in dtypes for p in PARTS]
    return specs


def serving_cases(quick: bool) -> list[Case]:
    cases = []
    for s in _specs(quick):
        labels = {
            "group": "serving",
            "impl": "kvflash",
            "shape": s.shape,
            "kv_dtype": s.kv_dtype,
            "hq": HQ,
            "hkv": HKV,
            "d": D,
            "block": BLOCK,
            "primary": True,
            "metric": "bytes" if s.kind == "spec" else "flops",
            "kind": s.kind,
            "q_len": s.q_len if s.kind == "spec" else None,
            "part": s.part if s.kind == "mixed" else None,
        }
        detail = f"q_len {s.q_len}" if s.kind == "spec" else s.part
        name = f"{'spec ' * (s.kind == 'spec')}{s.shape} {s.kv_dtype} {detail}"
        cases.append(Case(name, labels, functools.partial(_run, s)))
    return cases

"""One prefill case of the bench as a zero-argument call, and the rewritten copies of ``kvflash.chunk_prefill`` it runs
on, for the probes (``tools/prefill_timeline_probe.py``, ``tools/prefill_isolation.py``).

A probe writes its copy with :func:`copy_package`, puts it first on ``sys.path`` with :func:`use_copy` (which checks
that the copy is what Python then imports) and imports the package only through :func:`prefill_case`, so the op,
its launch settings and the bench's inputs (``tools.bench.cases_prefill`` shapes,
``tools.bench.inputs.make_paged_cache``) are the real ones.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
from collections.abc import Callable

from tools.source_edits import apply_anchor_edits

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "packages" / "chunk-prefill" / "src" / "kvflash" / "chunk_prefill"
for _pkg in ("attn-common", "paged-decode", "fp8-utils", "kvflash"):
    sys.path.insert(0, str(ROOT / "packages" / _pkg / "src"))

KV_KINDS = ("bf16", "e4m3", "e4m3-q")  # bf16 cache; e4m3 cache with a bf16 query; e4m3 cache with an fp8 query


def copy_package(dest: pathlib.Path, rewrites: dict[str, Callable[[str], tuple]]) -> pathlib.Path:
    """Copy ``kvflash.chunk_prefill`` to ``dest/kvflash/chunk_prefill``, each file named in ``rewrites`` rewritten by
    the ``(anchor, replacement)`` pairs its function returns for the file's text (``tools/source_edits.py``: an anchor
    that moved is an error); returns ``dest``, the folder to put first on ``sys.path``."""
    target = dest / "kvflash" / "chunk_prefill"
    shutil.copytree(PACKAGE, target)
    for name, edits in rewrites.items():
        path = target / name
        text = path.read_text()
        path.write_text(apply_anchor_edits(text, edits(text), name))
    return dest


def use_copy(folder: pathlib.Path) -> None:
    """Put ``folder`` (from :func:`copy_package`) first on ``sys.path``, import ``kvflash.chunk_prefill`` and exit
    with a message unless it came from ``folder``. Call it before anything imports the package."""
    sys.path.insert(0, str(folder))
    import kvflash.chunk_prefill.hopper_key_tiles as key_tiles

    if not pathlib.Path(key_tiles.__file__).is_relative_to(folder):
        raise SystemExit(f"kvflash.chunk_prefill was imported from {key_tiles.__file__}, not from the probe's copy")


def prefill_case(shape: str, kv: str, page: int, gen) -> tuple[Callable[[], object], int]:
    """``(call, flops)`` for the bench's prefill ``shape`` (``"4x(2048+2048)"``, ``"1x16384"``) over a paged cache of
    ``page``-token pages, causal, Hq/Hkv/D as the bench's: ``call()`` runs ``chunk_prefill_attention`` on inputs made
    once from ``gen`` (a CUDA ``torch.Generator``); ``kv`` is one of :data:`KV_KINDS` (``"e4m3-q"``: the query
    quantised per (sequence, KV head) with ``quantize_query``). ``flops`` counts ``4 * Hq * D`` per visible
    (query, key) pair, as the bench does."""
    import torch

    from kvflash.chunk_prefill import chunk_prefill_attention
    from kvflash.fp8_utils import quantize_query
    from tools.bench.cases_prefill import HKV, HQ, D, prefill_seqs
    from tools.bench.inputs import cu_seqlens, make_paged_cache, visible_pairs

    if kv not in KV_KINDS:
        raise ValueError(f"kv: expected one of {KV_KINDS}, got {kv!r}")
    seqs = prefill_seqs(shape)
    q_lens = [q for q, _ in seqs]
    cu = cu_seqlens(q_lens, "cuda")
    cache = make_paged_cache([k for _, k in seqs], HKV, D, page, kv.removesuffix("-q"), gen)
    q = torch.randn(sum(q_lens), HQ, D, dtype=torch.bfloat16, device="cuda", generator=gen)
    q_descale = None
    if kv.endswith("-q"):
        q, q_descale = quantize_query(q, HKV, granularity="per_sequence_kv_head", cu_seqlens_q=cu)
    max_q, max_k = max(q_lens), max(k for _, k in seqs)

    def call():
        return chunk_prefill_attention(q, cache.k, cache.v, cu, max_q, max_k, block_table=cache.block_table,
                                       seqused_k=cache.seqused_k, causal=True, k_descale=cache.k_descale,
                                       v_descale=cache.v_descale, q_descale=q_descale)

    return call, 4 * HQ * D * sum(visible_pairs(q_len, kv_len) for q_len, kv_len in seqs)

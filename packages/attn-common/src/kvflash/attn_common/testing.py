"""Helpers for tests of kvflash kernels (used by kvflash's own tests; useful to engine builders too):
random paged caches, FP8 encoding with per-head scales, output poisoning, and FlashAttention's
tolerance rule. Plain PyTorch; nothing here is on a kernel's path.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from kvflash.attn_common.dtypes import saturate_to_fp8

__all__ = [
    "PagedKV",
    "make_paged_kv",
    "encode_fp8",
    "encode_fp8_per_token_head",
    "scatter_token_scales",
    "PerTokenKV",
    "make_fp8_per_token_kv",
    "poison",
    "assert_close_fa_rule",
    "error_vs",
]


@dataclasses.dataclass
class PagedKV:
    """A random paged cache: ``k_cache, v_cache [num_blocks, block_size, Hkv, D]``,
    ``block_table [num_seqs, max_blocks]`` int32, ``seqused_k [num_seqs]`` int32."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    seqused_k: torch.Tensor


def make_paged_kv(
    k_seqs: list[torch.Tensor],
    v_seqs: list[torch.Tensor],
    block_size: int,
    *,
    generator: torch.Generator | None = None,
    spare_blocks: int = 3,
    joint_layout: bool = False,
) -> PagedKV:
    """Scatter per-sequence ``[kv_len, Hkv, D]`` keys/values into pages at random block ids.

    Unused pages and table entries are filled with garbage (large values, random ids inside the pool)
    so a kernel that reads past a sequence's length gives a visibly wrong answer. With ``joint_layout``
    the caches are ``[:, 0]`` and ``[:, 1]`` slices of one ``[num_blocks, 2, block_size, Hkv, D]``
    tensor (a strided view, as engines store them).
    """
    num_kv_heads, head_size = k_seqs[0].shape[1:]
    dtype, device = k_seqs[0].dtype, k_seqs[0].device
    blocks_per_seq = [max(1, triton.cdiv(k.shape[0], block_size)) for k in k_seqs]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    max_blocks = max(blocks_per_seq) + 1
    perm = torch.randperm(num_blocks, generator=generator).tolist()
    shape = (num_blocks, 2, block_size, num_kv_heads, head_size)
    garbage = (torch.rand(shape, generator=generator) * 200 - 100).to(dtype).to(device)
    k_cache, v_cache = (
        (garbage[:, 0], garbage[:, 1]) if joint_layout else (garbage[:, 0].clone(), garbage[:, 1].clone())
    )
    table = torch.randint(0, num_blocks, (len(k_seqs), max_blocks), generator=generator, dtype=torch.int32)
    cursor = 0
    for s, (ks, vs) in enumerate(zip(k_seqs, v_seqs)):
        for b in range(blocks_per_seq[s]):
            block = perm[cursor]
            cursor += 1
            table[s, b] = block
            rows = slice(b * block_size, min((b + 1) * block_size, ks.shape[0]))
            n = rows.stop - rows.start
            if n > 0:
                k_cache[block, :n] = ks[rows]
                v_cache[block, :n] = vs[rows]
    seqused = torch.tensor([k.shape[0] for k in k_seqs], dtype=torch.int32)
    return PagedKV(k_cache, v_cache, table.to(device), seqused.to(device))


def encode_fp8(x: torch.Tensor, descale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """Store ``x [..., Hkv, D]`` in FP8 so that ``stored * descale`` approximates ``x``.

    ``descale`` is a float or a ``[Hkv]`` tensor (per KV head). Values are clamped to the format's
    finite range.
    """
    if isinstance(descale, torch.Tensor):
        descale = descale.to(x.device, torch.float32)[:, None]
    return saturate_to_fp8(x, descale, dtype)


def encode_fp8_per_token_head(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Store ``x [..., Hkv, D]`` in FP8 with one dynamic scale per (token, KV head), as the cache writer does.

    Returns ``(stored [..., Hkv, D] dtype, scale [..., Hkv] float32)`` with
    ``scale = max(amax_d |x| / fp8_max, 1 / (fp8_max * 512))`` and ``stored = saturate(x / scale)``.
    """
    fmax = torch.finfo(dtype).max
    amax = x.float().abs().amax(-1)
    # A tensor divisor: torch's CUDA division by a Python number multiplies by its reciprocal (not IEEE).
    scale = (amax / amax.new_tensor(fmax)).clamp_min(1.0 / (fmax * 512.0))
    return saturate_to_fp8(x, scale[..., None], dtype), scale


def scatter_token_scales(
    scales: list[torch.Tensor], block_table: torch.Tensor, num_blocks: int, block_size: int,
    fill: float = float("nan"),
) -> torch.Tensor:  # fmt: skip
    """Per-sequence ``[kv_len, Hkv]`` scales placed like the cache: ``[num_blocks, block_size, Hkv]`` float32.

    Token ``p`` of sequence ``s`` goes to ``block_table[s, p // block_size]``, slot ``p % block_size`` (the pages
    :func:`make_paged_kv` chose). Every other slot holds ``fill`` (NaN by default: a kernel that reads a scale
    it should not shows it).
    """
    num_kv_heads = scales[0].shape[1]
    out = torch.full((num_blocks, block_size, num_kv_heads), fill, dtype=torch.float32)
    table = block_table.cpu().long()
    for s, sc in enumerate(scales):
        pos = torch.arange(sc.shape[0])
        out[table[s, pos // block_size], pos % block_size] = sc.float().cpu()
    return out.to(block_table.device)


@dataclasses.dataclass
class PerTokenKV:
    """An FP8 cache with per-token-head descales: ``k``, ``v`` (paged ``[num_blocks, block_size, Hkv, D]`` or
    contiguous ``[total_k, Hkv, D]``), ``k_descale``, ``v_descale`` (``[num_blocks, block_size, Hkv]`` or
    ``[total_k, Hkv]`` float32) and ``kv_args`` (``block_table`` + ``seqused_k``, or ``cu_seqlens_k``)."""

    k: torch.Tensor
    v: torch.Tensor
    k_descale: torch.Tensor
    v_descale: torch.Tensor
    kv_args: dict


def make_fp8_per_token_kv(
    k_seqs: list[torch.Tensor],
    v_seqs: list[torch.Tensor],
    dtype: torch.dtype,
    block_size: int | None,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> PerTokenKV:
    """Quantise per-sequence ``[kv_len, Hkv, D]`` keys/values with :func:`encode_fp8_per_token_head` and lay
    them out paged (``block_size``; random pages, garbage in unused cache slots, NaN in unused scale slots) or
    contiguous (``block_size=None``)."""
    k_enc = [encode_fp8_per_token_head(x, dtype) for x in k_seqs]
    v_enc = [encode_fp8_per_token_head(x, dtype) for x in v_seqs]
    if block_size is None:
        lens = [x.shape[0] for x in k_seqs]
        cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)
        cat = [torch.cat([e[i] for e in enc]).to(device) for enc in (k_enc, v_enc) for i in (0, 1)]
        return PerTokenKV(cat[0], cat[2], cat[1], cat[3], {"cu_seqlens_k": cu.to(device)})
    kv = make_paged_kv([e[0] for e in k_enc], [e[0] for e in v_enc], block_size, generator=generator)
    num_blocks = kv.k_cache.shape[0]
    k_scale = scatter_token_scales([e[1] for e in k_enc], kv.block_table, num_blocks, block_size)
    v_scale = scatter_token_scales([e[1] for e in v_enc], kv.block_table, num_blocks, block_size)
    return PerTokenKV(
        kv.k_cache.to(device), kv.v_cache.to(device), k_scale.to(device), v_scale.to(device),
        {"block_table": kv.block_table.to(device), "seqused_k": kv.seqused_k.to(device)},
    )  # fmt: skip


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN in place (so unwritten output elements show) and return it."""
    return t.fill_(float("nan"))


def error_vs(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute difference in float64; NaN anywhere gives ``inf``."""
    diff = (out.double() - ref.double()).abs()
    if torch.isnan(diff).any():
        return float("inf")
    return float(diff.max()) if diff.numel() else 0.0


def assert_close_fa_rule(
    out: torch.Tensor,
    ref_exact: torch.Tensor,
    ref_low_precision: torch.Tensor,
    *,
    atol: float = 1e-3,
    what: str = "output",
) -> None:
    """FlashAttention's tolerance rule.

    The kernel's error against the exact reference (fp32/fp64) must be at most twice the error of the
    same computation done by PyTorch in the input precision, plus ``atol``. NaN never passes.
    """
    err = error_vs(out, ref_exact)
    base = error_vs(ref_low_precision, ref_exact)
    assert err <= 2 * base + atol, (
        f"{what}: max error {err:.3e} > 2 x {base:.3e} (PyTorch in low precision) + {atol:.1e}"
    )

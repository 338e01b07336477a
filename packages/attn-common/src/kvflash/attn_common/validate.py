"""``KVFLASH_VALIDATE=1``: a debug mode that reads the index tensors' values and names the first bad one.

By default no launcher reads a tensor value on the host (that would synchronise, and break CUDA-graph capture);
the kernels instead clamp every index so that a bad value cannot make them touch memory outside their
tensors. A wrong value then gives wrong numbers, silently. With ``KVFLASH_VALIDATE=1`` in the environment
(read once, at the first call), every attention call first copies its index tensors to the host and checks:

- ``cu_seqlens_q`` starts at 0, never decreases and ends at ``total_q``; no sequence has more than
  ``max_seqlen_q`` queries;
- the block-table entries a sequence uses (its first ``cdiv(seqused_k, block_size)``) are in ``[0, num_blocks)``;
- ``0 <= seqused_k <= max_seqlen_k`` (``max_seqlen_k`` itself was checked against the table's capacity);
- ``cu_seqlens_k`` starts at 0 or more, never decreases and ends at ``total_k`` or less, and every
  sequence's KV length (capped by ``seqused_k``) is at most ``max_seqlen_k``.

A failure raises ``ValueError`` naming the argument and the first bad index. Calls traced by
``torch.compile`` or captured into a CUDA graph are not checked (the values do not exist yet there).
"""

from __future__ import annotations

import functools
import os

import torch

from kvflash.attn_common.platform import stream_capturing

__all__ = ["VALIDATE_ENV", "validation_enabled", "validate_index_tensors"]

VALIDATE_ENV = "KVFLASH_VALIDATE"


@functools.cache
def validation_enabled() -> bool:
    """True when ``KVFLASH_VALIDATE`` is set to a true value; read once, so the default path costs one cached
    call (tests that change the variable call ``validation_enabled.cache_clear()``)."""
    return os.environ.get(VALIDATE_ENV, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _first(mask: torch.Tensor) -> int | None:
    """The first index where ``mask`` (1-D bool, on the host) is True, or None."""
    hits = torch.nonzero(mask)
    return int(hits[0, 0]) if hits.numel() else None


def _check_offsets(name: str, offsets: torch.Tensor, total: int, *, exact_ends: bool) -> list[int]:
    """``offsets [num_seqs + 1]``: from 0 (or >= 0) up to ``total`` (or <= total), never decreasing."""
    values = offsets.tolist()
    if exact_ends and values[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {name}[0] = {values[0]}")
    if values[0] < 0:
        raise ValueError(f"{name}: must start at 0 or more, got {name}[0] = {values[0]}")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(
                f"{name}: must not decrease, got {name}[{i}] = {values[i]} < {name}[{i - 1}] = {values[i - 1]}"
            )
    last = len(values) - 1
    if exact_ends and values[-1] != total:
        raise ValueError(f"{name}: must end at total_q = {total}, got {name}[{last}] = {values[-1]}")
    if values[-1] > total:
        raise ValueError(f"{name}: must end at most at {total} (the rows of k), got {name}[{last}] = {values[-1]}")
    return values


def validate_index_tensors(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None,
    block_table: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int,
) -> None:
    """Check the index tensors' values when :func:`validation_enabled` (else return at once).

    Parameters
    ----------
    q : torch.Tensor
        ``[total_q, Hq, D]``.
    k : torch.Tensor
        ``[num_blocks, block_size, Hkv, D]`` (with ``block_table``) or ``[total_k, Hkv, D]``.
    cu_seqlens_q : torch.Tensor, optional
        ``[num_seqs + 1]`` int32 (``None`` on the decode path: one query per sequence by shape).
    block_table, seqused_k, cu_seqlens_k : torch.Tensor, optional
        ``[num_seqs, max_blocks]``, ``[num_seqs]``, ``[num_seqs + 1]`` int32, already shape-checked.
    max_seqlen_q : int, optional
        The caller's bound on the queries per sequence (``None``: not checked).
    max_seqlen_k : int
        The caller's bound on the keys per sequence.

    Raises
    ------
    ValueError
        Naming the argument and the first bad index.
    """
    # is_compiling first: torch.compile traces nothing past it (the values do not exist while tracing).
    if torch.compiler.is_compiling() or not validation_enabled() or stream_capturing(q.device):
        return
    if cu_seqlens_q is not None:
        q_offsets = _check_offsets("cu_seqlens_q", cu_seqlens_q.cpu(), q.shape[0], exact_ends=True)
        if max_seqlen_q is not None:
            for s in range(len(q_offsets) - 1):
                if q_offsets[s + 1] - q_offsets[s] > max_seqlen_q:
                    raise ValueError(
                        f"max_seqlen_q: sequence {s} has {q_offsets[s + 1] - q_offsets[s]} queries "
                        f"(cu_seqlens_q[{s}:{s + 2}] = {q_offsets[s : s + 2]}), more than max_seqlen_q = {max_seqlen_q}"
                    )
    kv_lens = None
    if seqused_k is not None:
        used = seqused_k.cpu()
        bad = _first((used < 0) | (used > max_seqlen_k))
        if bad is not None:
            raise ValueError(
                f"seqused_k: expected values in [0, max_seqlen_k = {max_seqlen_k}], "
                f"got seqused_k[{bad}] = {int(used[bad])}"
            )
        kv_lens = used.long()
    if block_table is not None:
        num_blocks, block_size = k.shape[0], k.shape[1]
        table = block_table.cpu()
        pages_used = (kv_lens + block_size - 1) // block_size  # seqused_k is required with a block table
        in_use = torch.arange(table.shape[1])[None, :] < pages_used[:, None]
        out_of_range = in_use & ((table < 0) | (table >= num_blocks))
        bad = torch.nonzero(out_of_range)
        if bad.numel():
            s, b = (int(x) for x in bad[0])
            raise ValueError(
                f"block_table: page ids must be in [0, num_blocks = {num_blocks}), got block_table[{s}, {b}] = "
                f"{int(table[s, b])} (sequence {s} uses its first {int(pages_used[s])} entries)"
            )
    if cu_seqlens_k is not None:
        k_offsets = torch.tensor(_check_offsets("cu_seqlens_k", cu_seqlens_k.cpu(), k.shape[0], exact_ends=False))
        lens = k_offsets[1:] - k_offsets[:-1]
        if kv_lens is not None:
            lens = torch.minimum(lens, kv_lens)
        bad = _first(lens > max_seqlen_k)
        if bad is not None:
            raise ValueError(
                f"max_seqlen_k: sequence {bad} has {int(lens[bad])} keys (cu_seqlens_k, capped by seqused_k), "
                f"more than max_seqlen_k = {max_seqlen_k}"
            )

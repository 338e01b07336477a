"""Anchor-based rewrites of a package's source, for the probes that stamp a copy of a kernel
(``tools/decode_phase_probe.py``, ``tools/prefill_timeline_probe.py``)."""

from __future__ import annotations


def apply_anchor_edits(text: str, edits: tuple, name: str) -> str:
    """``text`` with each ``(anchor, replacement)`` of ``edits`` applied in turn. Every anchor must occur exactly
    once in the text as it stands then; otherwise a ``RuntimeError`` names the file (``name``) and the anchor, so a
    probe fails loudly when the kernel it stamps has changed."""
    for anchor, replacement in edits:
        count = text.count(anchor)
        if count != 1:
            raise RuntimeError(f"{name}: the probe's anchor occurs {count} times (expected once): {anchor.strip()!r}")
        text = text.replace(anchor, replacement)
    return text

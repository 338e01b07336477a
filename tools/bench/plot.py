"""The benchmark plot: decode as a fraction of copy bandwidth per shape (bf16 / e4m3 / e5m2 KV) beside
prefill TFLOP/s (kvflash bf16 and e4m3 KV, SDPA cuDNN and flash), primary configuration, from derived rows."""

from __future__ import annotations

from pathlib import Path

from .analysis import best_cudnn, derive

__all__ = ["plot"]

DECODE_SHAPES = ("64x4096", "128x8192", "1x131072", "4x32768")
DENSE_FIRST = ("4x(2048+2048)", "1x16384")
DECODE_LINES = ((0.90, "bf16 target 90 %", "--"), (0.85, "FP8 target 85 %", "-."), (0.80, "small batch 80 %", ":"))


def _value(rows: list[dict], field: str, **labels) -> float | None:
    for r in rows:
        if all(r.get(k) == v for k, v in labels.items()) and r.get("primary") and r.get(field) is not None:
            return r[field]
    return None


def _bars(ax, groups: list[str], series: dict, fmt: str) -> None:
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(groups))]
        bars = ax.bar(xs, [v or 0.0 for v in values], width, label=label)
        ax.bar_label(bars, labels=[format(v, fmt) if v else "" for v in values], fontsize=6, padding=1)
    ax.set_xticks(range(len(groups)), [g.replace(" ", "\n", 1) for g in groups], fontsize=8)


def plot(data: dict, path: Path) -> None:
    """Write the two-panel PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in derive(data) if r["rate"] is not None]
    fig, (ax_d, ax_p) = plt.subplots(1, 2, figsize=(14, 5))

    decode = {
        f"{t} KV": [_value(rows, "frac", group="decode", impl="kvflash", shape=s, kv_dtype=t) for s in DECODE_SHAPES]
        for t in ("bf16", "e4m3", "e5m2")
    }
    _bars(ax_d, list(DECODE_SHAPES), decode, ".2f")
    for y, label, style in DECODE_LINES:
        ax_d.axhline(y, linestyle=style, linewidth=0.8, color="gray", label=label)
    ax_d.set_ylabel("fraction of measured copy bandwidth")
    ax_d.set_title("paged decode, Hq/Hkv 32/8, D 128, block 16", fontsize=10)
    ax_d.set_ylim(0, 1.35)
    ax_d.legend(fontsize=7, ncol=3, loc="upper left")

    shapes = {r["shape"] for r in rows if r["group"] == "prefill"}
    shapes = [s for s in DENSE_FIRST if s in shapes] + sorted(shapes - set(DENSE_FIRST))
    prefill = {
        f"kvflash {t} KV": [_value(rows, "rate", group="prefill", impl="kvflash", shape=s, kv_dtype=t) for s in shapes]
        for t in ("bf16", "e4m3")
    }
    prefill["SDPA cuDNN (faster variant)"] = [(best_cudnn(rows, s) or {}).get("rate") for s in shapes]
    prefill["SDPA flash"] = [_value(rows, "rate", group="prefill", impl="sdpa-flash", shape=s) for s in shapes]
    _bars(ax_p, shapes, prefill, ".0f")
    ax_p.set_ylabel("TFLOP/s (4 * Hq * D * visible pairs)")
    ax_p.set_title("chunked prefill (causal), Hq/Hkv 32/8, D 128, block 16", fontsize=10)
    ax_p.margins(y=0.25)
    ax_p.legend(fontsize=7, ncol=2, loc="upper right")

    meta = data["meta"]
    fig.suptitle(f"kvflash on {meta.get('device')} ({meta.get('date')}, {str(meta.get('commit'))[:12]})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

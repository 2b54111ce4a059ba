"""One table and one bar chart of the same metrics for several models (teacher, student, distilled student,
quantized student, ...): ``table`` (markdown), ``table_json`` and ``plot`` (PNG) take the evaluate stage's
per-model entries, each ``{'name': ..., 'path': ..., 'metrics': {'lm/perplexity': ..., ...}}``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

COUNTS = ("tokens", "bytes", "rows", "examples")  # sizes of what was scored: in the table, not in the chart
LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte")


def columns(entries: list[dict[str, Any]], counts: bool = True) -> list[str]:
    """Metric names in order of first appearance (a model without one shows '-')."""
    seen: dict[str, None] = {}
    for e in entries:
        for k in e["metrics"]:
            if counts or k.rsplit("/", 1)[-1] not in COUNTS:
                seen.setdefault(k, None)
    return list(seen)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
        return f"{int(v)}"
    return f"{v:.4g}" if abs(v) >= 1000 or abs(v) < 1e-3 and v != 0 else f"{v:.4f}"


def table(entries: list[dict[str, Any]]) -> str:
    """Markdown: a row per model, a column per metric."""
    cols = columns(entries)
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for e in entries:
        lines.append(f"| {e['name']} | " + " | ".join(_fmt(e["metrics"].get(c)) for c in cols) + " |")
    return "\n".join(lines)


def table_json(entries: list[dict[str, Any]]) -> dict[str, Any]:
    cols = columns(entries)
    return {"columns": ["model", "path", *cols],
            "rows": [{"model": e["name"], "path": e["path"], **{c: e["metrics"].get(c) for c in cols}} for e in entries]}


def plot(entries: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """A panel per metric (counts left out), a bar per model; None when there is no metric to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = columns(entries, counts=False)
    if not cols:
        return None
    n_cols = min(4, len(cols))
    n_rows = math.ceil(len(cols) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.6 * n_cols + 0.4 * len(entries), 3.3 * n_rows), squeeze=False)
    names = [e["name"] for e in entries]
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(entries))]
    for ax, col in zip(axes.flat, cols):
        values = [e["metrics"].get(col) for e in entries]
        ax.bar(range(len(entries)), [v if v is not None else 0 for v in values], color=colors)
        for i, v in enumerate(values):
            ax.annotate(_fmt(v), (i, v or 0), ha="center", va="bottom", fontsize=7)
        top = max((v for v in values if v is not None), default=0)
        ax.set_ylim(0, top * 1.15 if top > 0 else 1)  # every bar starts at 0 (an all-zero panel too)
        ax.set_xticks(range(len(entries)), names, rotation=30 if len(entries) > 2 else 0, ha="right" if len(entries) > 2 else "center",
                      fontsize=8)
        better = " (lower is better)" if col.rsplit("/", 1)[-1] in LOWER_IS_BETTER else ""
        ax.set_title(col + better, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)

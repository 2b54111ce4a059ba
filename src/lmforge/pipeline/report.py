"""The data stage's report: ``report.json`` (machine), ``report.md`` (person), ``lengths.png``, ``drops.png``.

Per-block counts come from datatrove's own per-task stats files (``logs/<executor>/stats/<rank>.json``,
summed over tasks), so they are the same whichever executor ran the blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _total(v) -> float:
    return float(v.get("total", 0)) if isinstance(v, dict) else float(v or 0)


def summed_stats(logs_dir: Path) -> list[dict]:
    """[{name, time_s, stats: {label: total}}] per pipeline step, summed over every task's stats file."""
    files = sorted((logs_dir / "stats").glob("*.json"))
    steps: list[dict] = []
    for f in files:
        for i, step in enumerate(json.loads(f.read_text(encoding="utf-8"))):
            if i == len(steps):
                steps.append({"name": step["name"], "time_s": 0.0, "stats": {}})
            steps[i]["time_s"] += _total(step.get("time_stats"))
            for label, v in (step.get("stats") or {}).items():
                steps[i]["stats"][label] = steps[i]["stats"].get(label, 0) + _total(v)
    return steps


def block_rows(steps: list[dict]) -> list[dict]:
    """Docs in / out / dropped-by-reason for each block that sees documents."""
    rows = []
    for s in steps:
        st = s["stats"]
        reasons = {k.removeprefix("dropped_"): int(v) for k, v in st.items() if k.startswith("dropped_")}
        n_in = st.get("total")
        if n_in is None:  # readers count per source
            n_in = sum(v for k, v in st.items() if k.startswith("read_"))
        n_out = st.get("forwarded", n_in - sum(reasons.values()))
        rows.append({"block": s["name"].split(": ", 1)[-1], "docs_in": int(n_in), "docs_out": int(n_out),
                     "dropped": reasons, "time_s": round(s["time_s"], 3)})
    return rows


def plots(out_dir: Path, before: np.ndarray, after: np.ndarray, drops: dict[str, int]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    both = np.concatenate([before, after]) if len(before) + len(after) else np.array([1])
    bins = np.logspace(0, np.log10(max(10, both.max() + 1)), 40)
    ax.hist(before, bins=bins, alpha=0.5, label=f"read ({len(before)} docs)")
    ax.hist(after, bins=bins, alpha=0.6, label=f"kept ({len(after)} docs)")
    ax.set_xscale("log")
    ax.set_xlabel("document length (characters)")
    ax.set_ylabel("documents")
    ax.set_title("Document lengths before and after cleaning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "lengths.png", dpi=100)
    plt.close(fig)
    written.append("lengths.png")

    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.35 * len(drops) + 1)))
    items = sorted(drops.items(), key=lambda kv: kv[1])
    ax.barh([k for k, _ in items] or ["(none)"], [v for _, v in items] or [0])
    ax.set_xlabel("documents dropped")
    ax.set_title("Drops by reason")
    fig.tight_layout()
    fig.savefig(out_dir / "drops.png", dpi=100)
    plt.close(fig)
    written.append("drops.png")
    return written


def markdown(report: dict) -> str:
    lines = [f"# Data report: {report['output_dir']}", "",
             f"Documents: {report['documents']['read']} read -> {report['documents']['kept']} kept "
             f"({report['documents']['train']} train / {report['documents']['validation']} validation). "
             f"Tokens: {report['tokens']['train']:,} train / {report['tokens']['validation']:,} validation "
             f"in blocks of {report['tokens']['block_size']} ({report['tokens']['train_blocks']} + "
             f"{report['tokens']['validation_blocks']} blocks). Total time {report['time_s']['total']:.1f} s.", "",
             "## Sources", "", "| source | documents read | kept by weight |", "|---|---:|---:|"]
    for name, s in report["sources"].items():
        lines.append(f"| {name} | {s['read']} | {s['kept']} |")
    lines += ["", "## Blocks", "", "| block | docs in | docs out | dropped (by reason) | time (s) |", "|---|---:|---:|---|---:|"]
    for b in report["blocks"]:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(b["dropped"].items(), key=lambda kv: -kv[1])) or "-"
        lines.append(f"| {b['block']} | {b['docs_in']} | {b['docs_out']} | {why} | {b['time_s']:.2f} |")
    lines += ["", "## PII replaced", ""]
    pii = report["pii"]
    if pii:
        lines += ["| kind | replacements |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in sorted(pii.items())]
    else:
        lines.append("none found (or scrubbing disabled)")
    d = report["dedup"]
    lines += ["", "## Deduplication", "",
              f"{d.get('exact_duplicates', 0)} exact duplicates, {d.get('near_duplicates', 0)} near duplicates removed; "
              f"{d.get('clusters', 0)} near-duplicate clusters (LSH {d.get('bands')} bands x {d.get('rows')} rows).", ""]
    if d.get("cluster_sizes"):
        lines.append("Cluster sizes: " + ", ".join(f"{k} docs: {v}" for k, v in d["cluster_sizes"].items()))
    for ex in d.get("examples", [])[:5]:
        lines.append(f"- cluster: {', '.join(ex)}")
    t = report["tokenizer"]
    lines += ["", "## Tokenizer", "", f"{t['source']}: {t['type']}, vocabulary {t['vocab_size']}, "
              f"{t['chars_per_token']:.2f} characters per token on the validation split.", "",
              "## Outputs", ""] + [f"- `{k}`: {v}" for k, v in report["outputs"].items()] + [
              "", "![lengths](lengths.png)", "", "![drops](drops.png)", ""]
    return "\n".join(lines)

"""What an evaluate run writes besides the numbers: the environment, the confusion-matrix PNG, report.md."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from lmforge import cards
from lmforge.evaluation import compare

PACKAGES = ("torch", "transformers", "datasets", "accelerate", "peft", "tokenizers", "lm_eval", "scikit-learn",
            "rouge_score", "sacrebleu", "torchao", "optimum-quanto", "bitsandbytes")


def environment() -> dict[str, Any]:
    env = cards.environment(PACKAGES)
    packages = {k: v for k, v in env["versions"].items() if v}
    return {"python": env["python"], "platform": env["platform"], "packages": packages, "device": env["hardware"]}


def row_name(path: str) -> str:
    """outputs/tiny/pretrain/final -> pretrain; outputs/tiny/quantize/compare/bnb_nf4 -> bnb_nf4."""
    p = Path(path.rstrip("/"))
    return p.parent.name if p.name == "final" and p.parent.name else p.name


def plain(obj: Any) -> Any:
    """lm-eval results hold numpy scalars; JSON wants plain numbers."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def command() -> str:
    argv = list(sys.argv)
    prog = Path(argv[0]).name if argv else "lmforge"
    return shlex.join(["lmforge" if prog in ("lmforge", "__main__.py") else prog, *argv[1:]])


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def plot_confusion(matrix: list[list[int]], names: list[str], path: str | Path, title: str = "") -> Path:
    """Counts with gold classes as rows and predicted classes as columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2.5, 1.0 * len(names) + 2))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def markdown(result: dict[str, Any], recipe: dict[str, Any]) -> str:
    """report.md: the command, models, metrics table, charts, per-model details, environment, recipe."""
    env = result["environment"]
    entries = result["models"]
    md = ["# Evaluation report", "",
          f"Command: `{result['command']}`  ", f"Wall time: {result['wall_seconds']:.1f} s  ",
          f"Device: {env['device']}", "", "## Models", "", "| model | folder | kind | base | seconds |", "|---|---|---|---|---|"]
    md += [f"| {e['name']} | `{e['path']}` | {e['kind']} | {e['base'] or '-'} | {e['seconds']:.1f} |" for e in entries]
    md += ["", "## Metrics", "", compare.table(entries), ""]
    if result.get("plots", {}).get("comparison"):
        md += [f"![metrics]({result['plots']['comparison']})", ""]
    for e in entries:
        md += [f"## {e['name']}", ""]
        if "lm" in e:
            md += [f"Language modelling on {e['lm_data']}: {e['lm']['tokens']} tokens, {e['lm']['bytes']} bytes, "
                   f"{e['lm']['rows']} rows.", ""]
        if "classification" in e:
            c = e["classification"]
            md += [f"Classification: {c['examples']} records, accuracy {c['accuracy']:.4f}, macro-F1 {c['macro_f1']:.4f}.", "",
                   "| gold \\ predicted | " + " | ".join(c["label_names"]) + " |", "|---|" + "---|" * len(c["label_names"])]
            md += [f"| {name} | " + " | ".join(str(v) for v in row) + " |" for name, row in zip(c["label_names"], c["confusion_matrix"])]
            md += [""]
            if e.get("confusion_png"):
                md += [f"![confusion matrix]({e['confusion_png']})", ""]
        if "generation" in e:
            g = e["generation"]
            md += [f"Generation: {g['metrics']['examples']} prompts, greedy.", ""]
            if g["examples"]:
                md += ["| prompt | reference | prediction |", "|---|---|---|"]
                md += [f"| {_cell(x['prompt'])} | {_cell(x['reference'])} | {_cell(x['prediction'])} |" for x in g["examples"]]
                md += [""]
        if "harness" in e:
            h = e["harness"]
            md += ["lm-evaluation-harness (lm_eval " + env["packages"].get("lm_eval", "?") + "):", ""]
            for task, scores in h["results"].items():
                shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()
                                  if "," in k and isinstance(v, (int, float)))
                md.append(f"- {task} ({h['n-shot'].get(task, 0)}-shot, {scores.get('sample_len', '?')} items): {shown}")
            md += [""]
    md += ["## Environment", "", f"Python {env['python']} on {env['platform']}; "
           + ", ".join(f"{k} {v}" for k, v in env["packages"].items()), "",
           "## Recipe (resolved)", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(md)

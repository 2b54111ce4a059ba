"""`lmforge runs DIR [DIR ...]`: one table of finished stage outputs — what each stage wrote, its key
metric and where its report is. ``make demo`` ends with ``lmforge runs outputs/tiny``.

Each folder is recognised by what its stage leaves (``.lmforge`` marker, ``summary.json`` of a training
stage, ``report.json`` of data/quantize, ``metrics.json`` of evaluate); a folder that holds stage
folders (``outputs/tiny``) is expanded one level. Nothing is recomputed: the numbers are the ones the
stages wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lmforge.config import UserError


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stage(folder: Path) -> str | None:
    recipe = folder / "recipe.yaml"
    if recipe.is_file():
        import yaml

        try:
            stage = (yaml.safe_load(recipe.read_text()) or {}).get("stage")
        except yaml.YAMLError:
            stage = None
        if stage:
            return str(stage)
    if (folder / "summary.json").is_file():
        return "train"
    return None


def describe(folder: Path) -> dict[str, str] | None:
    """{'stage', 'output', 'metric', 'report'} of one stage folder, or None when it is not one."""
    stage = _stage(folder)
    if stage is None:
        return None
    row = {"stage": stage, "output": str(folder), "metric": "-", "report": "-"}
    if (folder / "report.md").is_file():
        row["report"] = str(folder / "report.md")
    s = _read(folder / "summary.json")
    if stage == "data":
        r = _read(folder / "report.json") or {}
        docs, tokens = r.get("documents", {}), r.get("tokens", {})
        row["output"] = str(folder / "dataset")
        row["metric"] = (f"{docs.get('kept', '?')} of {docs.get('read', '?')} documents kept, "
                         f"{tokens.get('train', 0):,} train tokens in {tokens.get('train_blocks', '?')} blocks")
    elif stage == "quantize":
        r = _read(folder / "report.json") or {}
        rows = {x.get("name"): x for x in r.get("rows", [])}
        fp32, final = rows.get("float32"), next((x for x in r.get("rows", []) if str(x.get("folder") or "").endswith("final")), None)
        row["output"] = str(folder / "final")
        if final and fp32:
            ratio = final["quantized_bytes"] / final["quantized_fp32_bytes"] if final.get("quantized_fp32_bytes") else None
            row["metric"] = (f"{final['name']}: ppl {final['perplexity']:.2f} (fp32 {fp32['perplexity']:.2f})"
                             + (f", quantized layers {ratio:.2f}x their fp32 bytes" if ratio else ""))
    elif stage == "evaluate":
        r = _read(folder / "metrics.json") or {}
        table = r.get("table", {})
        parts = [f"{x['model']} ppl {x['lm/perplexity']:.2f}" for x in table.get("rows", []) if "lm/perplexity" in x]
        row["output"] = str(folder / "metrics.json")
        row["metric"] = ", ".join(parts) or "-"
    elif s is not None:
        ev = s.get("eval") or {}
        final = s.get("final_dir")
        row["output"] = final or str(folder)
        bits = [f"step {s.get('step')}/{s.get('max_steps')}"]
        if ev.get("loss") is not None:
            bits.append(f"val loss {ev['loss']:.4f} (ppl {ev.get('perplexity', float('nan')):.2f})")
        if ev.get("macro_f1") is not None:
            bits.append(f"macro-F1 {ev['macro_f1']:.3f}")
        if s.get("wall_time_s") is not None:
            bits.append(f"{s['wall_time_s']:.0f} s")
        row["metric"] = ", ".join(bits)
    return row


def collect(paths: list[Path]) -> list[dict[str, str]]:
    rows = []
    for p in paths:
        if not p.is_dir():
            raise UserError(f"{p}: not a folder; give stage output folders or a folder holding them (outputs/tiny)")
        one = describe(p)
        if one is not None:
            rows.append(one)
            continue
        for child in sorted(c for c in p.iterdir() if c.is_dir()):
            one = describe(child)
            if one is not None:
                rows.append(one)
    return rows


ORDER = ("data", "pretrain", "finetune", "distill", "quantize", "evaluate")


def table(rows: list[dict[str, str]]) -> str:
    rows = sorted(rows, key=lambda r: (ORDER.index(r["stage"]) if r["stage"] in ORDER else len(ORDER), r["output"]))
    lines = ["| stage | output | key metric | report |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['output']} | {r['metric']} | {r['report']} |" for r in rows]
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lmforge runs DIR [DIR ...]\nOne table of stage outputs: output, key metric, report.")
        return 0 if argv else 2
    rows = collect([Path(a) for a in argv])
    if not rows:
        raise UserError(f"{' '.join(argv)}: no stage output found (a folder with recipe.yaml and summary.json, "
                        "report.json or metrics.json)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))

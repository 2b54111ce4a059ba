"""Every recipe under recipes/tiny/ run once, as a user runs it, and one table of what it cost and gave.

    .venv/bin/python bench/recipes.py [--out docs/benchmarks.md] [--only pretrain,finetune_lora]

Each recipe runs as ``python -m lmforge <stage> recipes/tiny/<name>.yaml`` in a fresh process with its
outputs in a temporary folder; the recipes that start from a trained model (finetune, distill,
quantize, evaluate) get the ``pretrain`` recipe's ``final/`` from the same run. Columns:

- wall time of the process (imports, data, training, saving: what a user waits for),
- tokens/s (training stages: the median of the logged rows),
- peak memory: the process's peak RSS,
- the final training loss and the validation loss (perplexity for quantize/evaluate).

The table (with the machine, CPU capability, torch and thread count) is printed, and written to
``--out`` — docs/benchmarks.md is this script's output, never edited by hand. The baseline of the
"vs pretrain" column is the pretrain recipe measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"


def needs_base(stage: str) -> str | None:
    """The key that points a recipe at a trained model, per stage."""
    return {"finetune": "model.name_or_path", "distill": "teacher.name_or_path", "quantize": "model.name_or_path",
            "evaluate": "model.path"}.get(stage)


def child(argv: list[str]) -> int:
    """Run lmforge with argv in this process; write its peak RSS to $LMFORGE_BENCH_RSS at exit."""
    import atexit

    from lmforge.train.loop import peak_rss_mb  # VmHWM: not the parent's inherited peak

    def report() -> None:
        Path(os.environ["LMFORGE_BENCH_RSS"]).write_text(str(peak_rss_mb()))

    atexit.register(report)
    from lmforge.cli import main

    sys.argv = ["lmforge", *argv]
    return int(main(argv) or 0)


def run_recipe(name: str, tmp: Path, base: Path | None) -> dict:
    recipe = TINY / f"{name}.yaml"
    stage = (yaml.safe_load(recipe.read_text()) or {}).get("stage", name)
    out = tmp / name
    args = [stage, str(recipe), f"output_dir={out}", "overwrite=true"]
    key = needs_base(stage)
    if key and base is not None:
        args.append(f"{key}={base}")
    # folders a recipe writes besides output_dir (teacher sequences, logit caches) go to the run's temp folder too
    extra_dirs = (yaml.safe_load(recipe.read_text()) or {}).get("distill") or {}
    for k in ("sequence_dir", "cache_dir"):
        if extra_dirs.get(k):
            args.append(f"distill.{k}={tmp / (name + '_' + k)}")
    rss_file = tmp / f"{name}.rss"
    env = {**os.environ, "LMFORGE_BENCH_RSS": str(rss_file), "PYTHONPATH": str(ROOT / "src")}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    row = {"recipe": name, "stage": stage, "wall_s": wall, "ok": r.returncode == 0,
           "rss_mb": float(rss_file.read_text()) if rss_file.exists() else None}
    if r.returncode != 0:
        row["error"] = (r.stderr.strip().splitlines() or ["?"])[-1][:200]
        return row
    summary = out / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        ev = s.get("eval") or {}
        row.update(train_loss=s.get("train_loss"), val_loss=ev.get("loss"), val_ppl=ev.get("perplexity"))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        tps = [x["tokens_per_s"] for x in rows if x.get("split") == "train" and "tokens_per_s" in x]
        row["tokens_per_s"] = statistics.median(tps) if tps else None
    elif (out / "report.json").exists() and stage == "quantize":
        q = json.loads((out / "report.json").read_text())
        final = next((x for x in q["rows"] if str(x.get("folder") or "").endswith("final")), None)
        row["val_ppl"] = final["perplexity"] if final else None
    elif (out / "metrics.json").exists():
        m = json.loads((out / "metrics.json").read_text())
        rows = m.get("table", {}).get("rows", [])
        row["val_ppl"] = rows[0].get("lm/perplexity") if rows else None
        row["val_loss"] = rows[0].get("lm/loss") if rows else None
    return row


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    base = next((r["wall_s"] for r in rows if r["recipe"] == "pretrain" and r["ok"]), None)
    lines = ["| recipe | stage | wall time (s) | vs pretrain | tokens/s | peak RSS (MB) | train loss | val loss | val ppl |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['recipe']} | {r['stage']} | {r['wall_s']:.1f} | failed: {r.get('error', '')} | | | | | |")
            continue
        rel = f"{r['wall_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['recipe']} | {r['stage']} | {r['wall_s']:.1f} | {rel} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
                     f"{fmt(r.get('rss_mb'), '.0f')} | {fmt(r.get('train_loss'), '.4f')} | {fmt(r.get('val_loss'), '.4f')} | "
                     f"{fmt(r.get('val_ppl'), '.2f')} |")
    return "\n".join(lines)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}, GPU {gpu}, Python {platform.python_version()}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the Markdown page here (docs/benchmarks.md)")
    ap.add_argument("--only", help="comma-separated recipe names (default: every recipe under recipes/tiny/)")
    args = ap.parse_args()
    names = sorted(p.stem for p in TINY.glob("*.yaml"))
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    order = ["data", "pretrain"] + [n for n in names if n not in ("data", "pretrain")]
    names = [n for n in order if n in names or n == "pretrain"]
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-bench-recipes-"))
    rows, base = [], None
    started = time.perf_counter()
    for name in names:
        row = run_recipe(name, tmp, base)
        rows.append(row)
        if name == "pretrain" and row["ok"]:
            base = tmp / "pretrain" / "final"
        status = "ok" if row["ok"] else f"FAILED ({row.get('error')})"
        print(f"  {name:<20} {row['wall_s']:7.1f} s  {status}", flush=True)
    text = table(rows)
    total = time.perf_counter() - started
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    page = (f"# Benchmarks: every tiny recipe\n\nGenerated by `make bench-recipes` (`bench/recipes.py`); do not edit by "
            f"hand. Each recipe ran once, as `python -m lmforge <stage> recipes/tiny/<name>.yaml`, in a fresh process; "
            f"the recipes that start from a trained model used the pretrain recipe's `final/` of the same run.\n\n"
            f"Machine: {machine()}. Load average at the end {load} (other jobs on the same cores slow every row alike). Total {total:.0f} s. Wall times include imports, data preparation and saving; "
            f"tokens/s is the median of the logged training rows; peak RSS is the process's.\n\n{text}\n")
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(page)
        print(f"\nwritten: {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""`lmforge sweep RECIPE.yaml [key=value ...] --grid KEY=V1,V2 ... | --random N KEY=SPEC ...`

Runs one training per trial, one after another, each as its own ``python -m lmforge <stage>`` process
in ``<sweep dir>/trial_NNN`` (default sweep dir: the recipe's ``output_dir`` + ``_sweep``), then
writes ``summary.csv`` and ``summary.md`` sorted by validation loss and ``loss_curves.png``.

    lmforge sweep recipes/tiny/pretrain.yaml --grid optim.learning_rate=1e-4,3e-4,1e-3 schedule.warmup_steps=20,50
    lmforge sweep recipes/tiny/pretrain.yaml train.max_steps=50 --random 8 optim.learning_rate=1e-4:1e-2 \\
        schedule.warmup_steps=0:30 optim.name=adamw,lion

``--accelerate-config accelerate_configs/X.yaml`` runs each trial under ``accelerate launch`` with it.
``--grid``: every combination of the comma-separated values. ``--random N``: N trials, each key drawn
independently: ``a,b,c`` uniformly from the list; ``lo:hi`` uniformly, integers when both ends are
integers, log-uniformly for learning rates (keys ending in ``learning_rate`` or ``lr``) and for
``log:lo:hi``. Draws come from ``--seed`` (default 0), so rerunning the same command gives the same
trials. Key=value arguments before the flag apply to every trial.

Resumable: a trial with a ``summary.json`` is done and skipped; one with checkpoints continues
(``resume=auto``); a trial that fails or diverges is recorded as such and the sweep goes on.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from lmforge.config import UserError, parse_override

USAGE = __doc__


def _is_lr(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf.endswith("learning_rate") or leaf == "lr" or leaf.endswith("_lr")


def _num(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def grid_trials(specs: list[str]) -> list[dict[str, str]]:
    """['a=1,2', 'b=x,y'] -> [{'a': '1', 'b': 'x'}, {'a': '1', 'b': 'y'}, ...] (every combination)."""
    axes = []
    for spec in specs:
        key, _, values = spec.partition("=")
        if not _ or not values:
            raise UserError(f"--grid {spec!r}: expected key.path=v1,v2,...")
        axes.append([(key.strip(), v.strip()) for v in values.split(",") if v.strip()])
    return [dict(combo) for combo in itertools.product(*axes)]


def random_trials(specs: list[str], n: int, seed: int) -> list[dict[str, str]]:
    """N trials with each key drawn from its spec (list, lo:hi, log:lo:hi; learning rates log-uniform)."""
    rng = random.Random(seed)
    trials: list[dict[str, str]] = [{} for _ in range(n)]
    for spec in specs:
        key, _, values = spec.partition("=")
        key = key.strip()
        if not _ or not values:
            raise UserError(f"--random {spec!r}: expected key.path=lo:hi, key.path=log:lo:hi or key.path=a,b,c")
        log_scale = values.startswith("log:") or _is_lr(key)
        values = values.removeprefix("log:")
        for t in trials:
            if ":" in values:
                lo_s, hi_s = values.split(":", 1)
                try:
                    lo, hi = _num(lo_s), _num(hi_s)
                except ValueError:
                    raise UserError(f"--random {spec!r}: range ends must be numbers") from None
                if lo >= hi or (log_scale and lo <= 0):
                    raise UserError(f"--random {spec!r}: need lo < hi" + (" and lo > 0 (log-uniform)" if log_scale else ""))
                if log_scale:
                    value: Any = math.exp(rng.uniform(math.log(lo), math.log(hi)))
                    value = int(round(value)) if isinstance(lo, int) and isinstance(hi, int) and not _is_lr(key) else f"{value:.4g}"
                elif isinstance(lo, int) and isinstance(hi, int):
                    value = rng.randint(lo, hi)
                else:
                    value = f"{rng.uniform(lo, hi):.4g}"
            else:
                value = rng.choice([v.strip() for v in values.split(",") if v.strip()])
            t[key] = str(value)
    return trials


def parse_args(argv: list[str]) -> dict[str, Any]:
    if not argv or argv[0] in ("-h", "--help"):
        return {"help": True}
    recipe, rest = argv[0], argv[1:]
    fixed: list[str] = []
    mode, n, specs, out, seed, launch = None, 0, [], None, 0, None
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "--grid":
            mode = "grid"
        elif a == "--random":
            if i + 1 >= len(rest) or not rest[i + 1].isdigit() or int(rest[i + 1]) < 1:
                raise UserError("--random: give the number of trials, e.g. --random 8 optim.learning_rate=1e-4:1e-2")
            mode, n = "random", int(rest[i + 1])
            i += 1
        elif a in ("--out", "--seed", "--accelerate-config"):
            if i + 1 >= len(rest):
                raise UserError(f"{a}: needs a value")
            if a == "--out":
                out = rest[i + 1]
            elif a == "--seed":
                seed = int(rest[i + 1])
            else:
                if not Path(rest[i + 1]).is_file():
                    raise UserError(f"--accelerate-config: {rest[i + 1]} does not exist (see accelerate_configs/)")
                launch = rest[i + 1]
            i += 1
        elif a.startswith("--"):
            raise UserError(f"unknown option {a}; use --grid, --random N, --out DIR, --seed S, --accelerate-config YAML")
        elif mode is None:
            parse_override(a)  # a fixed override: check its shape now
            fixed.append(a)
        else:
            specs.append(a)
        i += 1
    if mode is None or not specs:
        raise UserError("sweep: give --grid KEY=V1,V2 ... or --random N KEY=LO:HI ...")
    trials = grid_trials(specs) if mode == "grid" else random_trials(specs, n, seed)
    return {"recipe": recipe, "fixed": fixed, "trials": trials, "out": out, "mode": mode, "launch": launch}


# ---------------------------------------------------------------------------------------------


def _trial_state(folder: Path) -> str:
    if (folder / "summary.json").exists():
        return "done"
    ckpts = folder / "checkpoints"
    if ckpts.is_dir() and any(p.name.startswith("step_") and not p.name.endswith(".tmp") for p in ckpts.iterdir()):
        return "partial"
    return "new"


def run_trial(stage: str, recipe: str, folder: Path, overrides: list[str], accelerate_config: str | None = None
              ) -> tuple[str, str]:
    """(status, last stderr line) after running one trial as its own process."""
    state = _trial_state(folder)
    if state == "done":
        return "done", "(already finished)"
    extra = ["resume=auto"] if state == "partial" else ["overwrite=true"]
    launcher = [sys.executable, "-m", "lmforge"]
    if accelerate_config:  # each trial in the hardware layout the accelerate config names
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config, "-m", "lmforge"]
    cmd = [*launcher, stage, recipe, *overrides, f"output_dir={folder}", *extra]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.log", "w", encoding="utf-8") as log_file:
        proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=os.environ.copy())
    tail = (folder.parent / f"{folder.name}.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
    if proc.returncode == 0:
        return "done", ""
    return ("diverged" if "diverged" in tail[0] else "failed"), tail[0]


def collect(folder: Path) -> dict[str, Any]:
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {}
    ev = summary.get("eval") or {}
    return {"val_loss": ev.get("loss"), "best_val_loss": summary.get("best_eval_loss"),
            "train_loss": summary.get("train_loss"), "steps": summary.get("step")}


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Sort by validation loss (train loss when a trial has no validation), failed trials last."""
    def sort_key(r):
        v = r["val_loss"] if r["val_loss"] is not None else r["train_loss"]
        return (r["status"] != "done" or v is None or not math.isfinite(v), v if v is not None else math.inf)

    rows = sorted(rows, key=sort_key)
    cols = ["trial", *keys, "val_loss", "best_val_loss", "train_loss", "steps", "status"]
    with open(sweep_dir / "summary.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| rank | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    lines += [f"| {i + 1} | " + " | ".join(cell(r.get(c)) for c in cols) + " |" for i, r in enumerate(rows)]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


def plot_curves(sweep_dir: Path, rows: list[dict[str, Any]], keys: list[str]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.train.metrics import read_metrics

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = False
    for r in rows:
        m = read_metrics(sweep_dir / r["trial"] / "metrics.jsonl")
        label = f"{r['trial']}: " + ", ".join(f"{k.rsplit('.', 1)[-1]}={r[k]}" for k in keys)
        for ax, split in ((ax_t, "train"), (ax_v, "eval")):
            pts = [(x["step"], x["loss"]) for x in m if x.get("split") == split and "loss" in x]
            if pts:
                ax.plot(*zip(*pts), marker="o" if split == "eval" else None, ms=3, lw=1.2, label=label)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, title in ((ax_t, "train loss"), (ax_v, "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_v.legend(fontsize=7)
    fig.tight_layout()
    path = sweep_dir / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _check_trial(cfg, trial: dict[str, str]) -> None:
    """Cross-group rules checked only when training starts (e.g. schedule.min_lr below the swept lr)."""
    from lmforge.optim.schedules import make_schedule

    sched = getattr(cfg, "schedule", None)
    if sched is None or not hasattr(cfg, "optim") or (sched.name == "noam" and sched.d_model is None):
        return
    try:
        make_schedule(sched, cfg.optim.learning_rate, cfg.train.max_steps)
    except UserError as e:
        raise UserError([f"trial {trial}: {p}" for p in e.problems]) from None


def cli(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.get("help"):
        print(USAGE)
        return 0 if argv else 2
    from lmforge.config import load
    from lmforge.recipe import import_stage, load_recipe

    recipe = args["recipe"]
    stage, base = load_recipe(recipe, args["fixed"])  # fail fast on a bad recipe or fixed override
    module = import_stage(stage)  # fail fast on a bad recipe or fixed override
    for t in args["trials"]:  # ... and on a bad swept key or value, before any training
        _check_trial(load(module.Config, recipe, [*args["fixed"], *(f"{k}={v}" for k, v in t.items())]), t)
    sweep_dir = Path(args["out"] or f"{str(base.output_dir).rstrip('/')}_sweep")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for t in args["trials"] for k in t))
    plan = {"recipe": recipe, "fixed": args["fixed"], "mode": args["mode"], "trials": args["trials"]}
    plan_path = sweep_dir / "sweep.json"
    if plan_path.exists() and json.loads(plan_path.read_text()) != plan:
        raise UserError(f"--out: {sweep_dir} holds a different sweep (see its sweep.json); choose another --out")
    plan_path.write_text(json.dumps(plan, indent=1))

    rows = []
    for i, trial in enumerate(args["trials"]):
        name = f"trial_{i:03d}"
        overrides = [*args["fixed"], *(f"{k}={v}" for k, v in trial.items())]
        print(f"[{i + 1}/{len(args['trials'])}] {name}: {' '.join(f'{k}={v}' for k, v in trial.items())}", flush=True)
        status, why = run_trial(stage, recipe, sweep_dir / name, overrides, args["launch"])
        row = {"trial": name, **trial, **collect(sweep_dir / name), "status": status}
        if status != "done":
            print(f"    {status}: {why} (log: {sweep_dir / (name + '.log')})")
        else:
            print(f"    val_loss {row['val_loss']}  train_loss {row['train_loss']}")
        rows.append(row)
        write_summary(sweep_dir, rows, keys)  # partial results are readable while the sweep runs
    rows = write_summary(sweep_dir, rows, keys)
    png = plot_curves(sweep_dir, rows, keys)
    print((sweep_dir / "summary.md").read_text())
    print(f"summary: {sweep_dir / 'summary.csv'}, {sweep_dir / 'summary.md'}" + (f"; curves: {png}" if png else ""))
    return 0 if any(r["status"] == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))

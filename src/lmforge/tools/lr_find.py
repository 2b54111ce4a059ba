"""`lmforge lr-find RECIPE.yaml [key=value ...] [--min 1e-7] [--max 1] [--steps 100] [--out DIR]`

The learning-rate range test (Smith 2017, "Cyclical Learning Rates"; fastai's lr_find): build the
recipe's model, data, loss and optimizer (parameter groups and their ``lr_scale`` included), then
take ``--steps`` updates with the lr growing exponentially, ``lr_i = min·(max/min)^(i/(steps-1))``,
recording the loss of each batch. The curve is smoothed by an exponential average (β = 0.9, with
bias correction; fastai's 0.98 lags too far behind on short tests); the test stops early once the smoothed loss exceeds 4x its minimum or turns
NaN/inf (divergence). Nothing is saved but the curve: ``lr_find.png``, ``lr_find.csv`` and
``lr_find.json`` in ``--out`` (default: the recipe's ``output_dir`` + ``_lr_find``).

Suggestion: the lr of the steepest descent of the smoothed loss against log(lr), between the first
10% of the points (skipped: noise) and the minimum; also printed: the lr at the minimum / 10 (the "one order below the valley" rule).
Use it as ``optim.learning_rate`` with the schedule of your choice.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from lmforge.config import UserError, read_yaml


def lr_at(i: int, steps: int, lo: float, hi: float) -> float:
    """lr of step i: lo·(hi/lo)^(i/(steps-1))."""
    return lo * (hi / lo) ** (i / max(1, steps - 1))


def smooth(losses: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average: s_i = avg_i / (1 - β^(i+1)), avg_i = β·avg + (1-β)·loss_i."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> dict[str, float | None]:
    """{'steepest': lr where d(smoothed)/d(log lr) is most negative before the minimum, 'min_div_10': ...}."""
    if len(lrs) < 3:
        return {"steepest": None, "min_div_10": None, "min_loss_lr": None}
    k_min = min(range(len(smoothed)), key=smoothed.__getitem__)
    logs = [math.log(x) for x in lrs]
    start = max(1, len(lrs) // 10)  # the first points are noise around the starting loss (fastai skips them too)
    grads = {i: (smoothed[i + 1] - smoothed[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(start, k_min)}
    steepest = lrs[min(grads, key=grads.__getitem__)] if grads else None
    return {"steepest": steepest, "min_div_10": lrs[k_min] / 10, "min_loss_lr": lrs[k_min]}


def range_test(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, loss_fn, count_tokens,
               steps: int, lo: float, hi: float, device: torch.device, max_grad_norm: float | None = None,
               diverge_factor: float = 4.0) -> dict[str, Any]:
    """Run the test; returns {'lr': [...], 'loss': [...], 'smoothed': [...], 'stopped': reason}."""
    from lmforge.optim.schedules import apply_lr

    model.train()
    lrs, losses, smoothed, stopped = [], [], [], "max lr reached"
    best = math.inf
    for i in range(steps):
        lr = lr_at(i, steps, lo, hi)
        apply_lr(optimizer, lr)
        batch = {k: v.to(device) for k, v in batches.get(i).items()}
        res = loss_fn(model, batch)
        n = count_tokens(batch).clamp_min(1)
        loss = res["loss_sum"] / n
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            stopped = f"loss became {value} at lr {lr:.3g}"
            break
        lrs.append(lr)
        losses.append(value)
        smoothed = smooth(losses)
        best = min(best, smoothed[-1])
        if i > 5 and smoothed[-1] > diverge_factor * best:
            stopped = f"diverged at lr {lr:.3g} (smoothed loss > {diverge_factor:g}x its minimum)"
            break
    return {"lr": lrs, "loss": losses, "smoothed": smooth(losses), "stopped": stopped}


def plot(result: dict[str, Any], tips: dict[str, float | None], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(result["lr"], result["loss"], color="0.75", lw=1, label="loss")
    ax.plot(result["lr"], result["smoothed"], color="tab:blue", lw=1.5, label="smoothed")
    for key, color in (("steepest", "tab:red"), ("min_div_10", "tab:green")):
        if tips.get(key):
            ax.axvline(tips[key], color=color, ls="--", lw=1, label=f"{key}: {tips[key]:.2g}")
    ax.set_xscale("log")
    if result["smoothed"]:  # the divergence spike would flatten the interesting part of the curve
        start = max(result["smoothed"][: max(1, len(result["smoothed"]) // 10)])
        ax.set_ylim(min(result["smoothed"]) * 0.9, start * 1.25)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _parse(argv: list[str]) -> tuple[str, list[str], dict[str, Any]]:
    opts: dict[str, Any] = {"min": 1e-7, "max": 1.0, "steps": 100, "out": None}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--min", "--max", "--steps", "--out"):
            if i + 1 >= len(argv):
                raise UserError(f"{a}: needs a value")
            key = a[2:]
            try:
                opts[key] = argv[i + 1] if key == "out" else (int(argv[i + 1]) if key == "steps" else float(argv[i + 1]))
            except ValueError:
                raise UserError(f"{a}: expected a number, got {argv[i + 1]!r}") from None
            i += 2
            continue
        if a.startswith("--"):
            raise UserError(f"unknown option {a}; use --min, --max, --steps, --out")
        rest.append(a)
        i += 1
    if not 0 < opts["min"] < opts["max"]:
        raise UserError("--min / --max: need 0 < min < max")
    if opts["steps"] < 3:
        raise UserError("--steps: need at least 3")
    return rest[0], rest[1:], opts


def cli(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    recipe, overrides, opts = _parse(argv)
    from accelerate.utils import set_seed

    from lmforge.datasets.batching import RankBatches
    from lmforge.datasets.lm import build_lm_datasets
    from lmforge.datasets.mlm import ensure_mask_token
    from lmforge.models import build_model_config, load_causal_lm, load_masked_lm, load_tokenizer
    from lmforge.optim.optimizers import build_optimizer
    from lmforge.optim.param_groups import build_param_groups
    from lmforge.recipe import load_recipe
    from lmforge.train.regularize import dropout_overrides
    from lmforge.train.tasks import pretrain_task

    if read_yaml(recipe).get("stage") != "pretrain":
        raise UserError(f"{recipe}: lr-find runs pretrain recipes (stage: pretrain)")
    _, cfg = load_recipe(recipe, overrides, stage="pretrain")
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    if cfg.train.objective == "mlm":
        ensure_mask_token(tokenizer, cfg.train.mask_token)
    train_ds, _ = build_lm_datasets(cfg.data, tokenizer, cfg.seed)
    load_model = load_masked_lm if cfg.train.objective == "mlm" else load_causal_lm
    model = load_model(cfg.model, tokenizer, **dropout_overrides(cfg.train.dropout, build_model_config(cfg.model)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    optimizer = build_optimizer(cfg.optim, build_param_groups(model, cfg.optim))

    task, batches = pretrain_task(cfg, tokenizer, train_ds)  # MLM masking, label smoothing, curriculum as in training
    batches = batches or RankBatches(train_ds, cfg.train.per_device_train_batch_size, task.collate, cfg.seed, 0, 1)
    result = range_test(model, optimizer, batches, task.loss, task.count_tokens, opts["steps"], opts["min"], opts["max"],
                        device, cfg.optim.max_grad_norm)
    tips = suggest(result["lr"], result["smoothed"])

    out = Path(opts["out"] or f"{str(cfg.output_dir).rstrip('/')}_lr_find")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "lr_find.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["step", "lr", "loss", "smoothed"])
        w.writerows([i, lr, loss, s] for i, (lr, loss, s) in enumerate(zip(result["lr"], result["loss"], result["smoothed"])))
    (out / "lr_find.json").write_text(json.dumps({**tips, "stopped": result["stopped"], "steps": len(result["lr"]),
                                                  "optimizer": cfg.optim.name}, indent=1))
    png = plot(result, tips, out / "lr_find.png", f"{Path(recipe).name}: {cfg.optim.name}")
    print(f"lr range test: {len(result['lr'])} steps from {opts['min']:g} to {opts['max']:g}; stopped: {result['stopped']}")
    if tips["steepest"] is None:
        print("  too few steps before divergence to suggest a learning rate; lower --min or raise --steps")
    else:
        print(f"  suggested optim.learning_rate: {tips['steepest']:.3g} (steepest descent); "
              f"minimum loss at {tips['min_loss_lr']:.3g}, /10 = {tips['min_div_10']:.3g}")
    print(f"  plot: {png}\n  data: {out / 'lr_find.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))

"""`lmforge schedule RECIPE.yaml [key=value ...] [--out PNG]`: print a recipe's learning-rate schedule at
its key points and plot the whole curve, without training."""

from __future__ import annotations

import sys
from pathlib import Path

from lmforge.config import UserError
from lmforge.optim.optimizers import scaled_learning_rate
from lmforge.optim.schedules import key_points, make_schedule
from lmforge.recipe import load_recipe

# ---------------------------------------------------------------------------------------------
# `lmforge schedule RECIPE.yaml [key=value ...] [--out PNG]`


def cli(argv: list[str]) -> int:
    """Print a recipe's schedule at its key points and draw the curve, without training."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lmforge schedule RECIPE.yaml [key.path=value ...] [--out schedule.png] [--processes N]\n"
              "Prints the learning rate at the key steps and writes a PNG of the whole curve; --processes (default 1)\n"
              "is the number of ranks the run will have, for optim.lr_scaling.")
        return 0 if argv else 2
    processes = 1
    if "--processes" in argv:
        i = argv.index("--processes")
        if i + 1 >= len(argv) or not argv[i + 1].isdigit() or int(argv[i + 1]) < 1:
            raise UserError("--processes: give the number of ranks (a positive integer)")
        processes = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    out_png = None
    if "--out" in argv:
        i = argv.index("--out")
        if i + 1 >= len(argv):
            raise UserError("--out: give a PNG path")
        out_png = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    recipe, overrides = argv[0], argv[1:]
    stage, cfg = load_recipe(recipe, overrides)
    if not hasattr(cfg, "schedule"):
        raise UserError(f"{recipe}: the {stage} stage has no schedule")
    model_config = None
    if cfg.schedule.name == "noam" and cfg.schedule.d_model is None:
        from lmforge.models import build_model_config

        model_config = build_model_config(cfg.model)
    T = cfg.train.max_steps
    global_batch = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps * processes
    peak, rule = scaled_learning_rate(cfg.optim, global_batch)
    if cfg.optim.lr_scaling != "none":
        print(rule)
    lr_at = make_schedule(cfg.schedule, peak, T, model_config)
    lrs = [lr_at(s) for s in range(T)]
    print(f"schedule '{cfg.schedule.name}' over {T} steps, warmup {cfg.schedule.warmup(T)}, peak learning rate {peak:g}")
    print(" ".join((lr_at.__doc__ or "").split()))
    for label, s in key_points(cfg.schedule, T):
        print(f"  {label:<11} step {s:>7}  lr {lr_at(s):.6g}")
    top = max(range(T), key=lrs.__getitem__)
    print(f"  {'max':<11} step {top:>7}  lr {lrs[top]:.6g}")
    path = Path(out_png or Path("outputs") / "schedules" / f"{Path(recipe).stem}.png")
    plot_schedule(lrs, path, title=f"{Path(recipe).name}: {cfg.schedule.name}")
    print(f"  plot: {path}")
    return 0


def plot_schedule(lrs: list[float], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(len(lrs)), lrs, color="tab:green")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))

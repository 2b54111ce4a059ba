"""PNG curves a person can look at: loss (train and validation) and learning rate against step."""

from __future__ import annotations

from pathlib import Path

from lmforge.train.metrics import read_metrics


def plot_training(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("split") == "train" and "loss" in r]
    evals = [r for r in rows if r.get("split") == "eval" and "loss" in r]
    if not train and not evals:
        return None
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1.2)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation", lw=1.2)
        # multi-task runs: one dashed validation curve per task (keys loss/<task>)
        for key in sorted({k for r in evals for k in r if k.startswith("loss/")}):
            pts = [(r["step"], r[key]) for r in evals if key in r]
            ax_loss.plot([s for s, _ in pts], [v for _, v in pts], "--", marker=".", lw=1.0,
                         label=f"validation {key.split('/', 1)[1]}")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    lr = [r for r in train if "lr" in r]
    if lr:
        ax_lr.plot([r["step"] for r in lr], [r["lr"] for r in lr], color="tab:green")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("learning rate")
    ax_lr.grid(alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

"""``log.grad_flow_every: N`` — what each transformer block does during training, every N steps:

- ``grad_norm``     the L2 norm of the block's parameter gradients (before clipping),
- ``update_ratio``  ‖Δw‖ / ‖w‖ of the block's parameters over the optimizer step (the learning rate
                    actually felt: ~1e-3 is healthy for Adam, ≪1e-4 frozen, ≫1e-2 thrashing),
- ``act_rms``       the RMS of the block's output hidden states (forward hooks; mean over the step's
                    micro-batches).

Rows go to ``metrics.jsonl`` with split ``grad_flow`` (keys ``block_<i>/<quantity>``), and
:func:`plot_grad_flow` draws them as heatmaps (block × step, log colour scale) in
``grad_flow.png`` beside the training curves: vanishing or exploding blocks show at a glance.

Hand-written: TensorBoard's histograms and wandb's ``watch`` log per-tensor statistics, but neither
groups them by block, measures the update ratio, or draws the block-by-step picture.
Under DeepSpeed (the engine owns the gradients' partitions) and FSDP it is refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


class GradFlow:
    """Measures the blocks of ``model`` (the unwrapped model) on the steps :meth:`wants` says."""

    def __init__(self, model: torch.nn.Module, every: int):
        from lmforge.train.robust import decoder_blocks

        _, self.blocks = decoder_blocks(model, "log.grad_flow_every", "set log.grad_flow_every: 0")
        self.every = every
        self.params = [[p for p in b.parameters() if p.requires_grad] for b in self.blocks]
        self.armed = False
        self._rms: list[list[float]] = [[] for _ in self.blocks]
        self._before: list[list[torch.Tensor]] | None = None
        for i, block in enumerate(self.blocks):
            block.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def keep_rms(module, args, output) -> None:
            if self.armed and module.training:
                h = output[0] if isinstance(output, tuple) else output
                self._rms[i].append(float(h.detach().float().pow(2).mean().sqrt()))
        return keep_rms

    def wants(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based, the one about to run) is measured."""
        return self.every > 0 and step % self.every == 0

    def start(self, step: int) -> None:
        """Before the step's forwards."""
        self.armed = self.wants(step)
        self._rms = [[] for _ in self.blocks]

    def before_optimizer(self) -> dict[str, float]:
        """After backward (gradients complete, before clipping): the gradient norms; keeps w for the ratio."""
        if not self.armed:
            return {}
        row = {}
        for i, params in enumerate(self.params):
            sq = sum(float(p.grad.detach().float().pow(2).sum()) for p in params if p.grad is not None)
            row[f"block_{i}/grad_norm"] = math.sqrt(sq)
        self._before = [[p.detach().clone() for p in params] for params in self.params]
        return row

    def after_optimizer(self, row: dict[str, float]) -> dict[str, float]:
        """After the optimizer step: the update ratios and activation RMS; the row is complete."""
        if not self.armed or self._before is None:
            return {}
        for i, (params, before) in enumerate(zip(self.params, self._before, strict=True)):
            delta = sum(float((p.detach() - w).float().pow(2).sum()) for p, w in zip(params, before, strict=True))
            norm = sum(float(w.float().pow(2).sum()) for w in before)
            row[f"block_{i}/update_ratio"] = math.sqrt(delta) / max(math.sqrt(norm), 1e-30)
            rms = self._rms[i]
            row[f"block_{i}/act_rms"] = sum(rms) / len(rms) if rms else float("nan")
        self._before, self.armed = None, False
        return row


QUANTITIES = (("grad_norm", "gradient norm"), ("update_ratio", "update / weight"), ("act_rms", "activation RMS"))


def plot_grad_flow(metrics_path: Path, png: Path, title: str = "") -> Path | None:
    """Heatmaps block × step of each quantity from ``metrics.jsonl`` (log10 colour scale); None without rows."""
    from lmforge.train.metrics import read_metrics

    rows = [r for r in read_metrics(metrics_path) if r.get("split") == "grad_flow"]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_blocks = 1 + max(int(k.split("/")[0].split("_")[1]) for r in rows for k in r if k.startswith("block_"))
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, len(QUANTITIES), figsize=(4.2 * len(QUANTITIES), 0.35 * n_blocks + 2.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], QUANTITIES, strict=True):
        grid = np.array([[r.get(f"block_{i}/{key}", float("nan")) for r in rows] for i in range(n_blocks)], dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            shown = np.log10(np.where(grid > 0, grid, np.nan))
        im = ax.imshow(shown, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, n_blocks - 0.5))
        ax.set_title(f"log10 {label}")
        ax.set_xlabel("step")
        ax.set_ylabel("block")
        ax.set_yticks(range(n_blocks) if n_blocks <= 16 else range(0, n_blocks, max(1, n_blocks // 8)))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png

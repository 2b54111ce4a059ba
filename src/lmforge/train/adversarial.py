"""``train.adversarial``: adversarial training on the input embeddings, for fine-tuning.

- **FGM** (fast gradient method; Miyato et al. 2017, "Adversarial Training Methods for
  Semi-Supervised Text Classification"): after the clean forward/backward, each example's embedding
  output is pushed by ``r = ε·g/‖g‖`` (g: the loss gradient w.r.t. that example's embeddings) and a
  second forward/backward adds the adversarial loss's gradient. The update follows clean + adversarial.
- **FreeLB** (Zhu et al. 2020, "FreeLB: Enhanced Adversarial Training for Natural Language
  Understanding"): ``steps`` = K ascent steps from δ = 0; each runs forward/backward on loss/K (so
  the parameter gradient is the mean over the K perturbed batches), then δ ← δ + α·g/‖g‖, projected
  back into the ball ‖δ‖ ≤ ε per example. α = ``step_size`` (default ε/K).

The perturbation is added to the output of the model's input embedding (a forward hook), never to the
weights, so it works for frozen embeddings (LoRA and the other adapters) as well as full fine-tuning.
Each loss keeps the task's token normalisation; the logged training loss is the clean one. No
randomness: resume stays exact. Hand-written: no well-kept library offers these for transformers
models (the papers' own code patches one model's embedding layer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import torch

from lmforge.config import UserError, help_field


@dataclasses.dataclass
class AdversarialConfig:
    method: Literal["none", "fgm", "freelb"] = help_field(
        "none", help="Adversarial perturbation of the input embeddings: fgm (one extra pass) or freelb (steps passes).")
    epsilon: float = help_field(1.0, help="fgm: the perturbation norm per example; freelb: the ball it is projected into.")
    steps: int = help_field(3, help="freelb: ascent steps K (forward/backward passes per micro-batch).")
    step_size: float | None = help_field(None, help="freelb: ascent step α (null: epsilon / steps).")

    def problems(self) -> list[str]:
        out = []
        if not self.epsilon > 0:
            out.append(f"epsilon: must be > 0, got {self.epsilon}")
        if self.steps < 1:
            out.append(f"steps: must be >= 1, got {self.steps}")
        if self.step_size is not None and not self.step_size > 0:
            out.append(f"step_size: must be > 0 (or null for epsilon / steps), got {self.step_size}")
        if self.method == "fgm" and (self.steps != 3 or self.step_size is not None):
            out.append("steps / step_size: only read by method freelb, not 'fgm'; remove them")
        return out


def _unit(g: torch.Tensor) -> torch.Tensor:
    """g / ‖g‖ per example (over all but the batch dimension)."""
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / norm.view(-1, *([1] * (g.dim() - 1)))


class Adversarial:
    """The perturbation hook on ``model``'s input embedding and the multi-pass step."""

    def __init__(self, model: torch.nn.Module, cfg: AdversarialConfig):
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embed is None:
            raise UserError(f"train.adversarial: {type(model).__name__} has no input embedding (get_input_embeddings); "
                            "set train.adversarial.method: none")
        self.cfg = cfg
        self.delta: torch.Tensor | None = None  # the perturbation the next forward adds (None: none)
        self.probe = False  # the next forward adds delta (or zeros) as a leaf, to read d loss / d delta
        self.leaf: torch.Tensor | None = None
        embed.register_forward_hook(self._perturb)

    def _perturb(self, module, args, output):
        if self.probe:
            base = torch.zeros_like(output) if self.delta is None else self.delta.to(output.dtype)
            self.leaf = base.detach().requires_grad_(True)
            return output + self.leaf
        if self.delta is not None:
            return output + self.delta.to(output.dtype)
        return None

    def _pass(self, loss_fn: Callable[[], dict], delta: torch.Tensor | None, probe: bool) -> dict:
        self.delta, self.probe = delta, probe
        try:
            return loss_fn()
        finally:
            self.delta, self.probe = None, False

    def _grad(self) -> torch.Tensor:
        leaf, self.leaf = self.leaf, None
        return leaf.grad.detach().float() if leaf is not None and leaf.grad is not None else None

    def step(self, loss_fn: Callable[[], dict], backward: Callable[[torch.Tensor], None]) -> dict:
        """Run the method's passes for one micro-batch: ``loss_fn()`` forwards and returns the task's
        loss dict, ``backward(loss)`` backpropagates a loss (the loop's normalised ``acc.backward``).
        Returns the clean pass's loss dict (what the loop logs), with ``adv_loss_sum`` added."""
        if self.cfg.method == "fgm":
            clean = self._pass(loss_fn, None, probe=True)
            backward(clean["loss_sum"])
            g = self._grad()
            if g is None:  # nothing reached the embeddings (all labels masked): no adversarial pass
                return clean
            adv = self._pass(loss_fn, self.cfg.epsilon * _unit(g), probe=False)
            backward(adv["loss_sum"])
            clean["adv_loss_sum"] = adv["loss_sum"].detach()
            return clean
        K, eps = self.cfg.steps, self.cfg.epsilon
        alpha = self.cfg.step_size or eps / K
        delta, first, last = None, None, None
        for _ in range(K):
            res = self._pass(loss_fn, delta, probe=True)
            backward(res["loss_sum"] / K)  # the parameter gradient: the mean over the K perturbed passes
            first, last = first or res, res
            g = self._grad()
            if g is None:
                break
            delta = alpha * _unit(g) if delta is None else delta.float() + alpha * _unit(g)
            norm = delta.flatten(1).norm(dim=1).view(-1, *([1] * (delta.dim() - 1)))
            delta = delta * torch.clamp(eps / norm.clamp_min(1e-12), max=1.0)  # project into ||delta|| <= eps
        first["adv_loss_sum"] = last["loss_sum"].detach()
        return first

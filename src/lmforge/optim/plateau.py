"""Reduce the learning rate when the validation loss stops improving (recipe group ``schedule.plateau``).

A :class:`Plateau` is fed each evaluation's metric and keeps a multiplier ``scale`` (1 at the start)
on top of the schedule: the loop uses ``lr = plateau.lr(lr_at(step))``, i.e. ``lr_at(step)·scale``
floored as below, so warmup and the schedule's own decay still apply.

The decisions are those of ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (each ``step`` is one of
its epochs), rule for rule:

1) improvement: ``mode=min``: ``m < best·(1 - threshold)`` (rel) or ``m < best - threshold`` (abs);
   ``mode=max``: ``m > best·(1 + threshold)`` (rel) or ``m > best + threshold`` (abs).
   An improvement sets ``best = m`` and ``num_bad_evals = 0``, anything else (a tie within the
   threshold, NaN) adds one bad evaluation.
2) during a cooldown (``cooldown_counter > 0``) the counter ticks down and bad evaluations are ignored.
3) more than ``patience`` bad evaluations in a row: reduce, start a cooldown of ``cooldown``
   evaluations, reset the bad count.

A reduction with base lr ``b`` (the schedule's lr for the next update) takes the lr ``old = b·scale``
to ``new = max(old·factor, min_lr)`` and applies it (``scale = new / b``) only when
``old - new > eps`` (torch's rule, eps = 1e-8): exactly torch's lr sequence when the base is
constant. Between evaluations the base keeps moving, so the floor is also applied per step:
``lr(b) = max(b·scale, min(b, min_lr))`` — the plateau cuts never take the lr below ``min_lr``, while
the schedule alone (warmup from 0, its own decay) may.

Why not torch's class itself: it owns the optimizer's lr (it multiplies ``param_group["lr"]`` in
place), which would fight :func:`~lmforge.optim.schedules.apply_lr` setting the lr from the pure
``lr_at(step)`` every step, and its ``state_dict`` is not the plain JSON the loop's checkpoint
``state`` holds. The test replays random and hand-made loss sequences through both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from lmforge.config import help_field

EPS = 1e-8  # torch ReduceLROnPlateau's default eps: a reduction smaller than this is skipped


@dataclasses.dataclass
class PlateauConfig:
    factor: float = help_field(0.1, help="Multiply the lr by this at each reduction (torch ReduceLROnPlateau's factor).")
    patience: int = help_field(10, help="Reduce after more than this many evaluations in a row without improvement.")
    threshold: float = help_field(1e-4, help="An evaluation improves on the best by more than this (see threshold_mode).")
    threshold_mode: Literal["rel", "abs"] = help_field(
        "rel", help="rel: improve when better than best·(1 ∓ threshold); abs: better than best ∓ threshold.")
    cooldown: int = help_field(0, help="Evaluations to wait after a reduction before counting bad ones again.")
    min_lr: float = help_field(0.0, help="Reductions never take the lr below this (absolute lr).")
    mode: Literal["min", "max"] = help_field("min", help="min: the metric should fall (a loss); max: rise (an accuracy).")

    def problems(self) -> list[str]:
        out = []
        if not 0 < self.factor < 1:
            out.append(f"factor: must be in (0, 1), got {self.factor}")
        if self.patience < 0:
            out.append(f"patience: must be >= 0, got {self.patience}")
        if not self.threshold >= 0:
            out.append(f"threshold: must be >= 0, got {self.threshold}")
        if self.threshold_mode not in ("rel", "abs"):
            out.append(f"threshold_mode: must be 'rel' or 'abs', got '{self.threshold_mode}'")
        if self.cooldown < 0:
            out.append(f"cooldown: must be >= 0, got {self.cooldown}")
        if not self.min_lr >= 0:
            out.append(f"min_lr: must be >= 0, got {self.min_lr}")
        if self.mode not in ("min", "max"):
            out.append(f"mode: must be 'min' or 'max', got '{self.mode}'")
        return out


class Plateau:
    """ReduceLROnPlateau as a multiplier on a pure schedule; its state is plain JSON (see the module doc)."""

    def __init__(self, cfg: PlateauConfig, eps: float = EPS):
        self.cfg, self.eps = cfg, eps
        self.scale = 1.0
        self.best = self._worse  # torch's mode_worse
        self.num_bad_evals = 0
        self.cooldown_counter = 0
        self.evals = 0
        self.reductions = 0

    @property
    def _worse(self) -> float:
        return math.inf if self.cfg.mode == "min" else -math.inf

    @classmethod
    def maybe(cls, schedule) -> Plateau | None:
        """The controller of ``schedule.name: plateau`` (its ``schedule.plateau`` group), else None."""
        return cls(schedule.plateau) if schedule.name == "plateau" else None

    def _is_better(self, m: float) -> bool:
        c = self.cfg
        if c.mode == "min":
            return m < self.best * (1 - c.threshold) if c.threshold_mode == "rel" else m < self.best - c.threshold
        return m > self.best * (1 + c.threshold) if c.threshold_mode == "rel" else m > self.best + c.threshold

    def step(self, metric: float, base_lr: float) -> bool:
        """Record one evaluation's ``metric``; ``base_lr`` is the schedule's lr for the next update.
        Return whether the lr was reduced."""
        c, m = self.cfg, float(metric)
        self.evals += 1
        # 1) improvement or a bad evaluation
        if self._is_better(m):
            self.best, self.num_bad_evals = m, 0
        else:
            self.num_bad_evals += 1
        # 2) cooldown: bad evaluations do not count
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_evals = 0
        # 3) patience exhausted: reduce (unless min_lr leaves less than eps to take off)
        if self.num_bad_evals <= c.patience:
            return False
        self.cooldown_counter, self.num_bad_evals = c.cooldown, 0
        old = base_lr * self.scale
        new = max(old * c.factor, c.min_lr)
        if not old - new > self.eps:
            return False
        self.scale = new / base_lr
        self.reductions += 1
        return True

    def lr(self, base_lr: float) -> float:
        """The lr to use: ``max(base_lr·scale, min(base_lr, min_lr))``."""
        return max(base_lr * self.scale, min(base_lr, self.cfg.min_lr))

    def state_dict(self) -> dict[str, Any]:
        """Plain floats and ints; ``best`` is None before the first improvement (strict JSON has no inf)."""
        return {"scale": self.scale, "best": None if self.best == self._worse else self.best,
                "num_bad_evals": self.num_bad_evals, "cooldown_counter": self.cooldown_counter,
                "evals": self.evals, "reductions": self.reductions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.best = self._worse if state["best"] is None else float(state["best"])
        self.num_bad_evals, self.cooldown_counter = int(state["num_bad_evals"]), int(state["cooldown_counter"])
        self.evals, self.reductions = int(state.get("evals", 0)), int(state.get("reductions", 0))

"""Learning-rate schedules as pure functions ``lr_at(step) -> float``.

``step`` counts optimizer updates already taken (0 for the first update), the convention of
``transformers.get_scheduler``'s lambdas, so the two agree value for value. The training loop sets
each parameter group's lr to ``lr_at(step) * group_multiplier`` before every update, which keeps
the schedule stateless: resuming at step k needs nothing but k.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

from lmforge.config import help_field

ScheduleName = Literal["constant", "constant_with_warmup", "linear", "cosine"]


@dataclasses.dataclass
class ScheduleConfig:
    name: ScheduleName = help_field("cosine", help="Learning-rate schedule (see README's schedule table).")
    warmup_steps: int | None = help_field(None, help="Linear warmup length in optimizer steps.")
    warmup_ratio: float | None = help_field(None, help="Warmup as a fraction of max_steps (instead of warmup_steps).")
    min_lr: float = help_field(0.0, help="Floor the decay ends at (absolute learning rate).")

    def problems(self) -> list[str]:
        out = []
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            out.append("warmup_steps / warmup_ratio: give one, not both")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            out.append("warmup_steps: must be >= 0")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            out.append("warmup_ratio: must be in [0, 1)")
        if self.min_lr < 0:
            out.append("min_lr: must be >= 0")
        return out

    def warmup(self, max_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.warmup_ratio is not None:
            return math.ceil(self.warmup_ratio * max_steps)
        return 0


def _warmup(step: int, warmup: int, peak: float) -> float:
    return peak * step / max(1, warmup)


def make_schedule(cfg: ScheduleConfig, peak_lr: float, max_steps: int) -> Callable[[int], float]:
    """Return ``lr_at(step)`` for the recipe's schedule."""
    W, T, lo = cfg.warmup(max_steps), max_steps, cfg.min_lr

    def constant(step: int) -> float:
        """lr = peak."""
        return peak_lr

    def constant_with_warmup(step: int) -> float:
        """1) linear warmup peak·step/W  2) constant peak."""
        return _warmup(step, W, peak_lr) if step < W else peak_lr

    def linear(step: int) -> float:
        """1) linear warmup  2) linear decay: min_lr + (peak - min_lr)·(T - step)/(T - W)."""
        if step < W:
            return _warmup(step, W, peak_lr)
        frac = max(0.0, (T - step) / max(1, T - W))
        return lo + (peak_lr - lo) * frac

    def cosine(step: int) -> float:
        """1) linear warmup  2) cosine decay: min_lr + (peak - min_lr)·½(1 + cos(π·progress)),
        progress = (step - W)/(T - W), clamped to [0, 1]."""
        if step < W:
            return _warmup(step, W, peak_lr)
        progress = min(1.0, (step - W) / max(1, T - W))
        return lo + (peak_lr - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return {"constant": constant, "constant_with_warmup": constant_with_warmup, "linear": linear, "cosine": cosine}[
        cfg.name
    ]

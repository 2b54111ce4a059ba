"""Learning-rate schedules as pure functions ``lr_at(step) -> float`` (recipe group ``schedule``).

``step`` counts optimizer updates already taken (0 for the first update), the convention of
``transformers.get_scheduler``'s lambdas, so the two agree value for value. The training loop calls
:func:`apply_lr` before every update, which sets each parameter group's lr to
``lr_at(step) * group["lr_scale"]``; the schedule is stateless, so resuming at step k needs only k.

Where ``transformers`` has the schedule, ``lr_at`` *is* its lambda (taken from the ``LambdaLR``
that ``transformers.get_scheduler`` builds on a one-parameter dummy optimizer) times the peak lr.
``noam``, ``step`` and ``one_cycle`` are written here. Each function's docstring gives its
formula; ``docs/optim.md`` has the table. ``W`` = warmup steps, ``T`` = ``train.max_steps``,
``progress`` = (step - W) / (T - W).

``lmforge schedule RECIPE.yaml`` prints the key points and writes a PNG of the curve.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import torch

from lmforge.config import UserError, help_field, nested, only_for
from lmforge.optim.plateau import PlateauConfig

log = logging.getLogger(__name__)

ScheduleName = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    "inverse_sqrt", "noam", "step", "one_cycle", "wsd", "plateau",
]

# Keys that only some schedules read: setting one for another schedule is an error, not a no-op.
_ONLY_FOR = {
    "num_cycles": ("cosine_with_restarts",),
    "power": ("polynomial",),
    "d_model": ("noam",), "scale": ("noam",),
    "step_size": ("step",), "milestones": ("step",), "gamma": ("step",),
    "decay_fraction": ("wsd",), "decay_shape": ("wsd",),
    "pct_start": ("one_cycle",), "div_factor": ("one_cycle",), "final_div_factor": ("one_cycle",),
    "anneal_strategy": ("one_cycle",), "three_phase": ("one_cycle",),
    "plateau": ("plateau",),
}
_NO_WARMUP = ("constant", "one_cycle")  # constant: use constant_with_warmup; one_cycle: use pct_start
_NO_MIN_LR = ("constant", "constant_with_warmup", "cosine_with_restarts", "inverse_sqrt", "noam", "step", "one_cycle",
              "plateau")  # plateau: schedule.plateau.min_lr
_NEED_WARMUP = ("inverse_sqrt", "noam")


@dataclasses.dataclass
class ScheduleConfig:
    name: ScheduleName = help_field("cosine", help="Learning-rate schedule (table in docs/optim.md).")
    warmup_steps: int | None = help_field(None, help="Linear warmup length in optimizer steps.")
    warmup_ratio: float | None = help_field(None, help="Warmup as a fraction of max_steps (instead of warmup_steps).")
    min_lr: float = help_field(0.0, help="Floor the decay ends at (absolute lr): linear, cosine, polynomial, wsd.")
    num_cycles: int = help_field(1, help="cosine_with_restarts: number of hard restarts (cosine cycles).")
    power: float = help_field(1.0, help="polynomial: exponent of (1 - progress).")
    d_model: int | None = help_field(None, help="noam: model width (null: the model config's hidden_size).")
    scale: float = help_field(1.0, help="noam: overall factor; the peak lr is scale·(d_model·W)^-0.5.")
    step_size: int | None = help_field(None, help="step: multiply the lr by gamma every step_size steps.")
    milestones: list[int] = help_field([], help="step: ... or at these steps (instead of step_size).")
    gamma: float = help_field(0.1, help="step: the factor applied at each milestone.")
    decay_fraction: float = help_field(0.2, help="wsd: fraction of max_steps spent in the final decay.")
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = help_field("linear", help="wsd: shape of the final decay.")
    pct_start: float = help_field(0.3, help="one_cycle: fraction of the steps spent rising (torch OneCycleLR).")
    div_factor: float = help_field(25.0, help="one_cycle: initial lr = peak / div_factor.")
    final_div_factor: float = help_field(1e4, help="one_cycle: final lr = initial lr / final_div_factor.")
    anneal_strategy: Literal["cos", "linear"] = help_field("cos", help="one_cycle: annealing shape.")
    three_phase: bool = help_field(False, help="one_cycle: rise, fall back to the initial lr, then anneal to the final lr.")
    plateau: PlateauConfig = nested(PlateauConfig)  # plateau: reduce on a stalled validation loss

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
        out += only_for(self, self.name, _ONLY_FOR, "schedule")
        has_warmup = bool(self.warmup_steps) or bool(self.warmup_ratio)
        if self.name in _NO_WARMUP and has_warmup:
            fix = "use name: constant_with_warmup" if self.name == "constant" else "one_cycle warms up for pct_start of the steps"
            out.append(f"warmup_steps / warmup_ratio: schedule '{self.name}' has no separate warmup; {fix}")
        if self.name in _NEED_WARMUP and not has_warmup:
            out.append(f"warmup_steps: schedule '{self.name}' needs a warmup > 0 (it sets the decay's time scale)")
        if self.name in _NO_MIN_LR and self.min_lr:
            out.append(f"min_lr: schedule '{self.name}' has no floor; use linear, cosine, polynomial or wsd for min_lr")
        if self.name == "step" and (self.step_size is None) == (not self.milestones):
            out.append("step_size / milestones: give exactly one for schedule 'step'")
        if self.step_size is not None and self.step_size <= 0:
            out.append("step_size: must be > 0")
        if self.milestones and sorted(self.milestones) != self.milestones:
            out.append("milestones: must be increasing")
        if not 0 < self.gamma <= 1:
            out.append("gamma: must be in (0, 1]")
        if self.power <= 0:
            out.append("power: must be > 0")
        if self.num_cycles < 1:
            out.append("num_cycles: must be >= 1")
        if not 0 < self.decay_fraction <= 1:
            out.append("decay_fraction: must be in (0, 1]")
        if not 0 < self.pct_start < 1:
            out.append("pct_start: must be in (0, 1)")
        if self.div_factor <= 0 or self.final_div_factor <= 0:
            out.append("div_factor / final_div_factor: must be > 0")
        if self.scale <= 0:
            out.append("scale: must be > 0")
        return out

    def warmup(self, max_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.warmup_ratio is not None:
            return math.ceil(self.warmup_ratio * max_steps)
        return 0


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group ``lr * group['lr_scale']`` (layer-wise decay and per-module
    multipliers live in ``lr_scale``, set by ``param_groups.build_param_groups``)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def _hf_lambda(name: str, peak_lr: float, W: int, T: int, **kw: Any) -> Callable[[int], float]:
    """The multiplier ``transformers.get_scheduler(name, ...)`` applies at each step (a pure function)."""
    from transformers import get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak_lr)
    sched = get_scheduler(name, dummy, num_warmup_steps=W, num_training_steps=T, scheduler_specific_kwargs=kw or None)
    return sched.lr_lambdas[0]


def _d_model(cfg: ScheduleConfig, model_config: Any) -> int:
    if cfg.d_model is not None:
        return cfg.d_model
    for attr in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(model_config, attr, None) if model_config is not None else None
        if isinstance(value, int) and value > 0:
            return value
    raise UserError("schedule.d_model: noam needs the model width; set schedule.d_model (no hidden_size in the model config)")


def make_schedule(cfg: ScheduleConfig, peak_lr: float, max_steps: int, model_config: Any = None) -> Callable[[int], float]:
    """Return ``lr_at(step)`` for the recipe's schedule; ``model_config`` gives noam its d_model."""
    W, T, lo = cfg.warmup(max_steps), max_steps, cfg.min_lr
    if W > T:  # allowed for quick smoke runs (max_steps=5 on a real recipe), but never what a real run wants
        log.warning("schedule: %d warmup steps exceed train.max_steps=%d; the lr never reaches its peak", W, T)
    if lo >= peak_lr and cfg.name in ("linear", "cosine", "polynomial", "wsd"):
        raise UserError(f"schedule.min_lr: {lo} must be below optim.learning_rate={peak_lr}")

    if cfg.name in ("constant", "constant_with_warmup", "inverse_sqrt", "cosine_with_restarts", "plateau"):
        kw = {"num_cycles": cfg.num_cycles} if cfg.name == "cosine_with_restarts" else {}
        # plateau: this is its base; the loop multiplies it by lmforge.optim.plateau.Plateau's scale
        lam = _hf_lambda("constant_with_warmup" if cfg.name == "plateau" else cfg.name, peak_lr, W, T, **kw)
        doc = {
            "constant": "lr = peak.",
            "constant_with_warmup": "1) warmup peak·step/W  2) peak.",
            "inverse_sqrt": "peak·min(step/W, sqrt(W/step)): 1) warmup peak·step/W  2) peak·sqrt(W/step).",
            "cosine_with_restarts": "1) warmup peak·step/W  2) num_cycles hard restarts of "
                                    "peak·½(1 + cos(π·((num_cycles·progress) mod 1))).",
            "plateau": "1) warmup peak·step/W  2) peak·factor^k, k = reductions so far: one each time the validation "
                       "loss has not improved for more than patience evaluations (torch ReduceLROnPlateau), "
                       "never below plateau.min_lr.",
        }[cfg.name]
    elif cfg.name == "linear" and lo == 0:
        lam = _hf_lambda("linear", peak_lr, W, T)
        doc = "1) warmup peak·step/W  2) linear decay peak·(T - step)/(T - W)."
    elif cfg.name in ("linear", "polynomial"):
        # transformers' polynomial decay with power 1 is exactly linear decay to min_lr.
        power = cfg.power if cfg.name == "polynomial" else 1.0
        lam = _hf_lambda("polynomial", peak_lr, W, T, lr_end=lo, power=power)
        doc = "1) warmup peak·step/W  2) min_lr + (peak - min_lr)·(1 - progress)^power (power 1 for linear)."
    elif cfg.name == "cosine":
        lam = _hf_lambda("cosine_with_min_lr", peak_lr, W, T, min_lr=lo)
        doc = "1) warmup peak·step/W  2) min_lr + (peak - min_lr)·½(1 + cos(π·progress))."
    elif cfg.name == "wsd":
        decay = max(1, round(cfg.decay_fraction * T))
        if W + decay > T:
            raise UserError(f"schedule: warmup ({W}) + decay ({decay} = decay_fraction·max_steps) exceed max_steps={T}")
        lam = _hf_lambda("warmup_stable_decay", peak_lr, W, T, num_decay_steps=decay, decay_type=cfg.decay_shape,
                         min_lr_ratio=lo / peak_lr)
        doc = ("r = min_lr/peak. 1) warmup peak·(r + (1-r)·step/W)  2) stable peak until T - D, D = decay_fraction·T  "
               "3) decay peak·(r + (1-r)·f(p)), p = (step - (T - D))/D, f = 1-p (linear), ½(1+cos(πp)) (cosine), "
               "1-sqrt(p) (1-sqrt).")
    else:
        return _by_hand(cfg, peak_lr, W, T, model_config)

    def lr_at(step: int) -> float:
        return peak_lr * lam(step)

    lr_at.__doc__ = doc
    return lr_at


def _by_hand(cfg: ScheduleConfig, peak_lr: float, W: int, T: int, model_config: Any) -> Callable[[int], float]:
    """The schedules transformers lacks: noam, step, one_cycle."""
    if cfg.name == "noam":
        d = _d_model(cfg, model_config)

        def noam(step: int) -> float:
            """scale·d_model^-0.5·min(step^-0.5, step·W^-1.5) (Vaswani et al. 2017; optim.learning_rate unused).
            Peak scale·(d_model·W)^-0.5 at step W; 0 at step 0, like every warmup here."""
            if step == 0:
                return 0.0
            return cfg.scale * d ** -0.5 * min(step ** -0.5, step * W ** -1.5)

        return noam

    if cfg.name == "step":
        marks = list(cfg.milestones)

        def step_decay(step: int) -> float:
            """1) warmup peak·step/W  2) peak·gamma^k, k = step // step_size, or the number of milestones <= step
            (torch StepLR / MultiStepLR)."""
            if step < W:
                return peak_lr * step / max(1, W)
            k = step // cfg.step_size if cfg.step_size else sum(m <= step for m in marks)
            return peak_lr * cfg.gamma ** k

        return step_decay

    # one_cycle: torch.optim.lr_scheduler.OneCycleLR's lr (momentum is not cycled here).
    initial = peak_lr / cfg.div_factor
    final = initial / cfg.final_div_factor
    up = float(cfg.pct_start * T) - 1
    if cfg.three_phase:
        phases = [(up, initial, peak_lr), (float(2 * cfg.pct_start * T) - 2, peak_lr, initial), (T - 1, initial, final)]
    else:
        phases = [(up, initial, peak_lr), (T - 1, peak_lr, final)]

    def anneal(start: float, end: float, pct: float) -> float:
        if cfg.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def one_cycle(step: int) -> float:
        """torch OneCycleLR: 1) anneal initial → peak over pct_start·T steps (initial = peak/div_factor)
        2) anneal peak → initial/final_div_factor by step T-1; anneal = cos: end + (start-end)·½(1+cos(π·pct))."""
        start_step = 0.0
        for i, (end_step, a, b) in enumerate(phases):
            if step <= end_step or i == len(phases) - 1:
                return anneal(a, b, (step - start_step) / (end_step - start_step))
            start_step = end_step
        raise AssertionError("unreachable")

    return one_cycle


def key_points(cfg: ScheduleConfig, max_steps: int) -> list[tuple[str, int]]:
    """(label, step) pairs worth printing and testing: start, mid-warmup, warmup end, mid-decay, last step."""
    W, T = cfg.warmup(max_steps), max_steps
    pts = [("start", 0)]
    if W > 1:
        pts.append(("mid-warmup", W // 2))
    if W > 0:
        pts.append(("warmup end", W))
    pts += [("mid-decay", W + (T - W) // 2), ("last step", T - 1)]
    return pts

"""Exponential moving average of the weights (recipe group ``train.ema``).

Every ``every`` optimizer steps: ``shadow = d·shadow + (1 - d)·weight`` for each trainable
parameter, with ``d = decay`` or, with ``warmup: true``, ``d = min(decay, (1 + n)/(10 + n))`` after n
updates (TensorFlow's ExponentialMovingAverage with num_updates), so that a short run's average is
not dominated by the initial weights. The shadow is fp32, lives on the parameters' device, is
registered with ``accelerator.register_for_checkpointing`` (saved in and restored from every
checkpoint, so resume stays exact), is swapped in for evaluation when ``use_for_eval`` is set, and is
saved next to the model as ``output_dir/final_ema`` (a ``from_pretrained``-loadable folder).
ZeRO-3 and FSDP shard the parameters, which this simple version does not follow: it refuses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from lmforge.config import UserError, help_field


@dataclasses.dataclass
class EMAConfig:
    decay: float | None = help_field(None, help="EMA decay, e.g. 0.999 (null: no EMA).")
    every: int = help_field(1, help="Update the average every N optimizer steps.")
    warmup: bool = help_field(True, help="Use min(decay, (1+n)/(10+n)) after n updates (TF-style EMA warmup).")
    use_for_eval: bool = help_field(False, help="Evaluate with the averaged weights instead of the raw ones.")

    def problems(self) -> list[str]:
        out = []
        if self.decay is not None and not 0 < self.decay < 1:
            out.append("decay: must be in (0, 1), e.g. 0.999, or null to disable")
        if self.every < 1:
            out.append("every: must be >= 1")
        if self.decay is None and self.use_for_eval:
            out.append("use_for_eval: needs train.ema.decay")
        return out


class EMA:
    def __init__(self, model: torch.nn.Module, cfg: EMAConfig):
        self.cfg = cfg
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for _, p in self._params(model)]
        self.updates = 0

    @classmethod
    def maybe(cls, cfg: EMAConfig, acc, model: torch.nn.Module) -> EMA | None:
        """An EMA of the prepared ``model`` registered for checkpointing, or None when the recipe has none."""
        if cfg.decay is None:
            return None
        from lmforge.train.accel import is_sharded

        if is_sharded(acc):
            raise UserError("train.ema: not supported when parameters are sharded (ZeRO-3, FSDP); "
                            "use ZeRO-1/2 or DDP, or remove train.ema")
        ema = cls(acc.unwrap_model(model), cfg)
        acc.register_for_checkpointing(ema)
        return ema

    @staticmethod
    def eval_weights(ema: EMA | None, acc, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """The averaged weights for evaluation when ``train.ema.use_for_eval``, else a no-op."""
        if ema is None or not ema.cfg.use_for_eval:
            return contextlib.nullcontext()
        return ema.swapped_in(acc.unwrap_model(model))

    def _params(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        named = dict(model.named_parameters())
        return [(n, named[n]) for n in self.names]

    def current_decay(self) -> float:
        d = self.cfg.decay
        return min(d, (1 + self.updates) / (10 + self.updates)) if self.cfg.warmup else d

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Call after optimizer step number ``step`` (1-based) with the unwrapped model."""
        if step % self.cfg.every:
            return
        d = self.current_decay()
        weights = [p.detach().float() for _, p in self._params(model)]
        torch._foreach_lerp_(self.shadow, weights, 1.0 - d)  # shadow += (1-d)·(w - shadow)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        """Temporarily load the averaged weights into ``model`` (unwrapped)."""
        params = self._params(model)
        backup = [p.detach().clone() for _, p in params]
        with torch.no_grad():
            for (_, p), s in zip(params, self.shadow):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), b in zip(params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"shadow": {n: s.cpu() for n, s in zip(self.names, self.shadow)}, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if list(state["shadow"]) != self.names:
            raise UserError("train.ema: the checkpoint's EMA covers other parameters than this model's trainable ones")
        self.shadow = [state["shadow"][n].to(s.device) for n, s in zip(self.names, self.shadow)]
        self.updates = state["updates"]

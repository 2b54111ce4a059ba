"""Regularisation and training-health pieces the loop and the stages plug in (recipe group ``train``):

- dropout knobs (``train.dropout``) mapped onto the architecture's config attribute names;
- a sequence-length curriculum (``train.curriculum``) that re-cuts each packed micro-batch into
  shorter rows early in training (same tokens per step);
- early stopping on validation loss (``train.early_stopping``) and the non-finite loss guard.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from lmforge.config import UserError, help_field

log = logging.getLogger("lmforge")
Batch = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Dropout knobs -> the architecture's config attributes


@dataclasses.dataclass
class DropoutConfig:
    embedding: float | None = help_field(None, help="Dropout on the embeddings (null: the model config's value).")
    attention: float | None = help_field(None, help="Dropout on attention probabilities (null: keep).")
    hidden: float | None = help_field(None, help="Dropout on residual / hidden outputs (null: keep).")

    def problems(self) -> list[str]:
        return [f"{k}: must be in [0, 1)" for k in ("embedding", "attention", "hidden")
                if getattr(self, k) is not None and not 0 <= getattr(self, k) < 1]


# Each knob's attribute names across transformers configs, tried in order; all present ones are set.
DROPOUT_ATTRS = {
    "embedding": ("embd_pdrop", "embed_dropout", "emb_dropout", "embedding_dropout"),
    "attention": ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "attn_dropout"),
    "hidden": ("resid_pdrop", "hidden_dropout", "hidden_dropout_prob", "resid_dropout", "dropout"),
}


def dropout_overrides(cfg: DropoutConfig, hf_config: Any) -> dict[str, float]:
    """{config attribute: value} for the knobs the recipe sets; UserError when the model has no such knob.

    BERT-style configs use one value (hidden_dropout_prob) for embeddings and hidden states: setting
    ``embedding`` and ``hidden`` differently there is an error rather than a silent pick."""
    out: dict[str, float] = {}
    missing: list[str] = []
    if all(getattr(cfg, k) is None for k in DROPOUT_ATTRS):
        return out
    model_type = getattr(hf_config, "model_type", type(hf_config).__name__)
    for knob, attrs in DROPOUT_ATTRS.items():
        value = getattr(cfg, knob)
        if value is None:
            continue
        present = [a for a in attrs if hasattr(hf_config, a)]
        if knob == "embedding" and not present and hasattr(hf_config, "hidden_dropout_prob"):
            present = ["hidden_dropout_prob"]  # BERT/RoBERTa: the embeddings' dropout is hidden_dropout_prob
        if not present:
            missing.append(f"train.dropout.{knob}: model_type '{model_type}' has no {knob} dropout "
                           f"(its config has none of {', '.join(attrs)}); remove the key")
            continue
        for a in present:
            if a in out and out[a] != value:
                missing.append(f"train.dropout: model_type '{model_type}' uses one knob ({a}) for embeddings and "
                               f"hidden states; give train.dropout.embedding and .hidden the same value")
            out[a] = value
    if missing:
        raise UserError(missing)
    return out


# ---------------------------------------------------------------------------------------------
# Sequence-length curriculum


@dataclasses.dataclass
class CurriculumConfig:
    min_length: int | None = help_field(None, help="Start with rows of this many tokens (null: no curriculum).")
    steps: int = help_field(0, help="Grow the row length linearly from min_length to the block size over these steps.")

    def problems(self) -> list[str]:
        out = []
        if self.min_length is not None and self.min_length < 2:
            out.append("min_length: must be >= 2")
        if self.min_length is not None and self.steps <= 0:
            out.append("steps: must be > 0 when min_length is set")
        return out


def curriculum_length(step: int, min_length: int, max_length: int, steps: int) -> int:
    """Row length at ``step``: the largest divisor of max_length that is <= min + (max - min)·step/steps."""
    target = min_length + (max_length - min_length) * min(1.0, step / steps)
    return max(d for d in range(1, max_length + 1) if max_length % d == 0 and d <= max(target, min_length))


class CurriculumBatches:
    """Wraps any ``get(k)`` batch source: micro-batch k of step s = k // gas is re-cut from
    (B, block) into (B·block/len, len) rows, so every step sees the same tokens, in shorter
    contexts early on (sequence-length warmup, Li et al. 2022). Deterministic in k: resume stays exact."""

    def __init__(self, inner, cfg: CurriculumConfig, block_size: int, gradient_accumulation_steps: int):
        if cfg.min_length is None or block_size % cfg.min_length:
            raise UserError(f"train.curriculum.min_length: {cfg.min_length} must divide data.block_size={block_size} "
                            "(rows are re-cut from packed blocks)")
        self.inner, self.cfg, self.block, self.gas = inner, cfg, block_size, gradient_accumulation_steps

    def length(self, step: int) -> int:
        return curriculum_length(step, self.cfg.min_length, self.block, self.cfg.steps)

    def get(self, k: int) -> Batch:
        batch = self.inner.get(k)
        n = self.length(k // self.gas)
        if n == self.block:
            return batch
        return {key: v.reshape(-1, n) if v.dim() == 2 and v.size(1) == self.block else v for key, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Early stopping and the non-finite guard


@dataclasses.dataclass
class EarlyStoppingConfig:
    patience: int | None = help_field(None, help="Stop after this many evaluations without improvement (null: off).")
    min_delta: float = help_field(0.0, help="An improvement must lower the validation loss by more than this.")

    def problems(self) -> list[str]:
        out = []
        if self.patience is not None and self.patience < 1:
            out.append("patience: must be >= 1, or null to disable")
        if self.min_delta < 0:
            out.append("min_delta: must be >= 0")
        return out


def early_stop(cfg: EarlyStoppingConfig, state: dict, eval_loss: float) -> bool:
    """Update ``state`` (saved in every checkpoint, so resume keeps counting) and say whether to stop.

    An evaluation improves when eval_loss < best - min_delta; ``patience`` evaluations in a row
    without improvement stop the run."""
    if cfg.patience is None:
        return False
    best = state.get("early_stopping_best")
    if best is None or eval_loss < best - cfg.min_delta:
        state["early_stopping_best"], state["early_stopping_bad_evals"] = eval_loss, 0
        return False
    state["early_stopping_bad_evals"] = state.get("early_stopping_bad_evals", 0) + 1
    if state["early_stopping_bad_evals"] >= cfg.patience:
        state["stopped_early"] = True
        log.warning("early stopping: validation loss %.4f has not improved on %.4f (by > %g) for %d evaluations",
                    eval_loss, best, cfg.min_delta, cfg.patience)
        return True
    return False


class Diverged(UserError):
    """The training loss became NaN/inf; the run stopped without saving over the good checkpoints."""


def check_finite(acc, step_loss: torch.Tensor, step: int, ckpt_root: Path) -> None:
    """Raise :class:`Diverged` on every rank when any rank's loss for ``step`` is NaN/inf.

    Called before the optimizer step and before any checkpoint of that step, so the weights and the
    checkpoints on disk are the last good ones. (The gradient norm is not checked: under fp16 loss
    scaling an inf norm is a normal, skipped step.)"""
    bad = (~torch.isfinite(step_loss.detach())).float()
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="sum")
    if float(bad) == 0:
        return
    from lmforge.train import checkpoint

    last = checkpoint.latest(ckpt_root)
    where = (f"the last good checkpoint is {last} (resume=auto continues from it)" if last is not None
             else "no checkpoint had been saved")
    raise Diverged(f"training diverged: the loss became NaN/inf at step {step}; stopped before updating or saving; "
                   f"{where}. Lower optim.learning_rate, lengthen the warmup, set optim.max_grad_norm, or check the data")


"""The optimizer a recipe names (``optim.name``), built over explicit parameter groups."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from lmforge.config import help_field

OptimizerName = Literal["adamw"]


@dataclasses.dataclass
class OptimConfig:
    name: OptimizerName = help_field("adamw", help="Optimizer (see README's optimizer table).")
    learning_rate: float = help_field(3e-4, help="Peak learning rate.")
    weight_decay: float = help_field(0.1, help="Decoupled weight decay (not applied to biases, norms, embeddings).")
    adam_beta1: float = help_field(0.9, help="AdamW beta1.")
    adam_beta2: float = help_field(0.95, help="AdamW beta2.")
    adam_epsilon: float = help_field(1e-8, help="AdamW epsilon.")
    max_grad_norm: float | None = help_field(1.0, help="Clip the global gradient norm to this (null: no clipping).")

    def problems(self) -> list[str]:
        out = []
        if self.learning_rate <= 0:
            out.append("learning_rate: must be > 0")
        if self.weight_decay < 0:
            out.append("weight_decay: must be >= 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            out.append("adam_beta1 / adam_beta2: must be in [0, 1)")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            out.append("max_grad_norm: must be > 0, or null to disable clipping")
        return out


def build_optimizer(cfg: OptimConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """``groups`` come from ``param_groups.build_param_groups``; extra keys (name, lr_scale) ride along."""
    for g in groups:
        g.setdefault("lr", cfg.learning_rate * g.get("lr_scale", 1.0))
    if cfg.name == "adamw":
        # foreach is the fast path on CPU and GPU alike; fused needs every param on CUDA.
        return torch.optim.AdamW(
            groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay, foreach=True,
        )
    raise ValueError(f"unknown optimizer {cfg.name}")

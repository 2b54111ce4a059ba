"""Every optimizer parameter group comes from :func:`build_param_groups`.

Decoupled weight decay (AdamW) should not shrink biases, normalisation weights or embeddings:
they are moved to a group with ``weight_decay=0``. Each group carries ``lr_scale``, the factor the
loop multiplies the scheduled learning rate by (1.0 here; layer-wise decay sets others). The
function checks that every trainable parameter landed in exactly one group.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)


def _is_norm(module: torch.nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, _NORM_TYPES) or "norm" in name


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that get no weight decay: biases, norm weights, embeddings."""
    out: set[str] = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "bias" or _is_norm(module) or isinstance(module, torch.nn.Embedding):
                out.add(full)
    return out


def build_param_groups(model: torch.nn.Module, optim_cfg) -> list[dict]:
    """Two groups (decay / no decay) of the trainable parameters, each with ``lr_scale`` 1.0.

    ``optim_cfg`` is the recipe's ``optim`` group (``OptimConfig``)."""
    weight_decay = optim_cfg.weight_decay
    skip = no_decay_names(model)
    decay, no_decay = [], []
    decay_names, no_decay_names_ = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip else decay).append(p)
        (no_decay_names_ if name in skip else decay_names).append(name)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    groups = [g for g in groups if g["params"]]
    check_groups(model, groups)
    for g in groups:
        log.info("param group %-10s %10d params  wd=%g", g["name"], sum(p.numel() for p in g["params"]), g["weight_decay"])
    return groups


def check_groups(model: torch.nn.Module, groups: list[dict]) -> None:
    """Raise if a trainable parameter is in no group or in more than one (a silent-bug classic)."""
    seen: dict[int, int] = {}
    for g in groups:
        for p in g["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for i, n in trainable.items() if i not in seen]
    doubled = [trainable.get(i, "?") for i, c in seen.items() if c > 1]
    if missing or doubled:
        raise RuntimeError(f"parameter groups are wrong: missing {missing[:5]}, in two groups {doubled[:5]}")

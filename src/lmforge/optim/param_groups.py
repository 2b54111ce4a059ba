"""Every optimizer parameter group comes from :func:`build_param_groups` (recipe group ``optim``).

Three things decide a parameter's group, and each group carries them as keys:

- ``weight_decay``: decoupled weight decay should not shrink biases, normalisation weights, token
  embeddings or learned positional embeddings; each exclusion has a switch (``optim.no_decay_*``).
- ``lr_scale`` from layer-wise LR decay (``optim.layerwise_lr_decay = d``, the BEiT/ELECTRA rule):
  with L transformer blocks, block i (0-based) gets ``d^(L-i)``, everything before the blocks
  (embeddings) ``d^(L+1)``, the lowest, and everything after them (final norm, LM/classifier head)
  ``1``, the highest. The block list is discovered: the one ``nn.ModuleList`` holding
  ``num_hidden_layers`` modules (``model.layers`` in Llama/Mistral, ``transformer.h`` in GPT-2,
  ``bert.encoder.layer`` in BERT, ``gpt_neox.layers`` in GPT-NeoX, ...).
- ``lr_scale`` times the per-module multipliers (``optim.lr_multipliers``: name pattern -> factor,
  fnmatch wildcards or a plain substring; a parameter matching several gets their product).

The loop sets each group's lr to ``lr_at(step) * lr_scale``. The function logs a table of the
groups and raises if any trainable parameter is in no group or in two.
"""

from __future__ import annotations

import fnmatch
import logging
import re

import torch

from lmforge.config import UserError

log = logging.getLogger(__name__)

_NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
_POSITIONAL = re.compile(r"(^|\.)(wpe|position_embeddings|embed_positions|pos_emb\w*|positional\w*)(\.|$)")


def _is_norm(module: torch.nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, _NORM_TYPES) or "norm" in name


def _kinds(model: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> 'bias' | 'norm' | 'positions' | 'embeddings' | 'weight'."""
    out: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if full in out:
                continue
            if _POSITIONAL.search(full):
                out[full] = "positions"
            elif p_name == "bias":
                out[full] = "bias"
            elif _is_norm(module):
                out[full] = "norm"
            elif isinstance(module, torch.nn.Embedding):
                out[full] = "embeddings"
            else:
                out[full] = "weight"
    return out


def no_decay_names(model: torch.nn.Module, optim_cfg=None) -> set[str]:
    """Names of parameters that get no weight decay (biases, norm weights, embeddings, positions by default)."""
    flags = {"bias": True, "norm": True, "embeddings": True, "positions": True}
    if optim_cfg is not None:
        flags = {k: getattr(optim_cfg, f"no_decay_{k}", True) for k in flags}
    return {name for name, kind in _kinds(model).items() if flags.get(kind, False)}


def find_layers(model: torch.nn.Module, key: str = "optim.layerwise_lr_decay",
                fix: str = "use optim.lr_multipliers with name patterns instead, or set optim.layerwise_lr_decay: null",
                ) -> tuple[str, torch.nn.ModuleList]:
    """(dotted name, the ModuleList of transformer blocks); a UserError naming the model when not found,
    led by ``key`` (the recipe key that needed the blocks) and ending with ``fix``."""
    config = getattr(model, "config", None)
    n = None
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(config, attr, None) if config is not None else None
        if isinstance(n, int):
            break
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    found = [(name, m) for name, m in lists if n is None or len(m) == n]
    if len(found) == 1:
        return found[0]
    what = f"{type(model).__name__}" + (f" (model_type '{config.model_type}')" if getattr(config, "model_type", None) else "")
    seen = ", ".join(f"{name} [{len(m)}]" for name, m in lists) or "none"
    why = "several candidate" if found else "no"
    raise UserError(
        f"{key}: {why} list of {n if n is not None else '?'} transformer blocks found in {what}; "
        f"ModuleLists seen: {seen}. It needs exactly one; {fix}"
    )


def layer_ids(model: torch.nn.Module) -> tuple[dict[str, int], int]:
    """Parameter name -> depth id: 0 before the blocks (embeddings), i+1 in block i, L+1 after (head)."""
    prefix, layers = find_layers(model)
    L = len(layers)
    block_of = {}
    for i, block in enumerate(layers):
        for p_name, _ in block.named_parameters():
            block_of[f"{prefix}.{i}.{p_name}"] = i + 1
    ids, after = {}, False
    for name, _ in model.named_parameters():  # registration order: embeddings, blocks, then head
        if name in block_of:
            ids[name] = block_of[name]
            after = True
        else:
            ids[name] = L + 1 if after else 0
    return ids, L


def build_param_groups(model: torch.nn.Module, optim_cfg) -> list[dict]:
    """Groups of the trainable parameters with ``name``, ``weight_decay`` and ``lr_scale``.

    ``optim_cfg`` is the recipe's ``optim`` group (``OptimConfig``)."""
    decay_rate = getattr(optim_cfg, "layerwise_lr_decay", None)
    multipliers: dict[str, float] = dict(getattr(optim_cfg, "lr_multipliers", {}) or {})
    skip = no_decay_names(model, optim_cfg)
    ids, L = layer_ids(model) if decay_rate is not None else ({}, 0)
    used = dict.fromkeys(multipliers, 0)

    buckets: dict[tuple[str, float, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        label, scale = "all", 1.0
        if decay_rate is not None:
            depth = ids[name]
            label = "embeddings" if depth == 0 else "head" if depth == L + 1 else f"layer_{depth - 1:02d}"
            scale = decay_rate ** (L + 1 - depth)
        for pattern, mult in multipliers.items():
            if _matches(pattern, name):
                scale *= mult
                used[pattern] += 1
                label += f"*{pattern}"
        buckets.setdefault((label, scale, name not in skip), []).append(p)
    unused = [p for p, c in used.items() if c == 0]
    if unused:
        raise UserError(f"optim.lr_multipliers: pattern(s) {unused} match no trainable parameter of "
                        f"{type(model).__name__}; parameter names look like {_example_names(model)}")

    groups = [
        {"name": f"{label}.{'decay' if decay else 'no_decay'}", "params": params,
         "weight_decay": optim_cfg.weight_decay if decay else 0.0, "lr_scale": scale}
        for (label, scale, decay), params in buckets.items()
    ]
    check_groups(model, groups)
    log_groups(groups, optim_cfg.learning_rate)
    return groups


def _matches(pattern: str, name: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def _example_names(model: torch.nn.Module) -> str:
    names = [n for n, _ in model.named_parameters()]
    return ", ".join(names[:3] + names[-2:])


def group_table(groups: list[dict], peak_lr: float) -> str:
    """The groups as a fixed-width table: name, #params, peak lr, weight decay."""
    lines = [f"{'group':<36} {'params':>12} {'peak lr':>10} {'wd':>6}"]
    for g in groups:
        n = sum(getattr(p, "ds_numel", p.numel()) for p in g["params"])  # ZeRO-3: full size
        lines.append(f"{g['name']:<36} {n:>12,d} {peak_lr * g['lr_scale']:>10.3g} {g['weight_decay']:>6g}")
    return "\n".join(lines)


def log_groups(groups: list[dict], peak_lr: float) -> None:
    log.info("optimizer parameter groups:\n%s", group_table(groups, peak_lr))


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

"""Post-training pruning of the linear layers: magnitude, Wanda, and 2:4 semi-structured.

    from lmforge.quant import prune
    report = prune.prune(model, prune.PruneSettings(method="wanda", sparsity=0.5), calibration=batches)
    report.overall, report.layers["model.layers.0.mlp.up_proj"]

| method      | score of weight W_ij                | which weights go                                       |
|-------------|-------------------------------------|--------------------------------------------------------|
| `magnitude` | abs(W_ij)                           | the `sparsity` fraction with the smallest score, in each layer (`scope: per_layer`) or over all layers together (`scope: global`) |
| `wanda`     | abs(W_ij) * norm(X_j)               | in each output row, the `sparsity` fraction of its inputs with the smallest score (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs") |
| `2:4`       | `score: magnitude` or `score: wanda` | in each row, of every 4 consecutive input weights the 2 with the smallest score (sparsity 0.5) |

``norm(X_j)`` is the L2 norm of input feature j of the layer over every calibration token, gathered
by forward pre-hooks on the dense model in one pass (the reference Wanda code instead recomputes
each block's inputs after pruning the blocks before it). Wanda's point: a large-norm input feature
makes its small weights matter, and magnitude pruning would drop them.

Exactly ``round(sparsity * n)`` weights are zeroed in each comparison group (layer, all layers, or
row), chosen by index so ties cannot change the count. The masks are made permanent: the weights
are zeroed in place, and no hook or parametrization is left on the model. Training it afterwards
will regrow them.

Unstructured zeros save no time or memory on CPU: dense kernels multiply the zeros too, and the
weights are stored dense. 2:4 can be fast only with sparse kernels (``torch.sparse``
semi-structured, CUDA Ampere and newer); on CPU it too is a dense matrix with zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lmforge.config import UserError
from lmforge.quant.layers import linear_layers

METHODS = ("magnitude", "wanda", "2:4")
SCOPES = ("per_layer", "global")
SCORES = ("magnitude", "wanda")


@dataclasses.dataclass
class PruneSettings:
    method: str = "magnitude"  # magnitude | wanda | 2:4
    sparsity: float = 0.5  # fraction of weights zeroed, in [0, 1); 2:4 is always 0.5
    scope: str = "per_layer"  # magnitude only: per_layer | global
    score: str = "magnitude"  # 2:4 only: magnitude | wanda
    skip_modules: list[str] = dataclasses.field(default_factory=lambda: ["lm_head"])

    def problems(self) -> list[str]:
        out = []
        if self.method not in METHODS:
            out.append(f"method: {self.method!r} is not one of {list(METHODS)}")
        if not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            out.append(f"sparsity: must be in [0, 1), got {self.sparsity!r}")
        elif self.method == "2:4" and self.sparsity != 0.5:
            out.append(f"sparsity: 2:4 keeps 2 of every 4 weights, so it is 0.5; got {self.sparsity}")
        if self.scope not in SCOPES:
            out.append(f"scope: {self.scope!r} is not one of {list(SCOPES)}")
        elif self.scope == "global" and self.method != "magnitude":
            out.append(f"scope: global applies to magnitude pruning only, not {self.method}")
        if self.score not in SCORES:
            out.append(f"score: {self.score!r} is not one of {list(SCORES)}")
        return out

    @property
    def needs_calibration(self) -> bool:
        return self.method == "wanda" or (self.method == "2:4" and self.score == "wanda")


@dataclasses.dataclass
class SparsityReport:
    layers: dict[str, float]  # fraction of zero weights per pruned layer
    zeros: int
    total: int

    @property
    def overall(self) -> float:
        return self.zeros / self.total if self.total else 0.0


def prune(model: nn.Module, settings: PruneSettings, calibration: Iterable[Any] | None = None) -> SparsityReport:
    """Zero weights of the model's linear layers in place; returns the resulting sparsity.

    ``calibration`` (wanda scores only): ``input_ids`` tensors, ``(input_ids, labels)`` pairs or dicts
    with ``input_ids`` (and optionally ``attention_mask``), run through the model once.
    """
    problems = settings.problems()
    if settings.needs_calibration and calibration is None:
        problems.append(f"calibration: {settings.method} (score: wanda) needs calibration batches")
    layers = linear_layers(model, settings.skip_modules)
    if settings.method == "2:4":
        problems += [f"2:4: input width of {name} ({layer.in_features}) is not a multiple of 4"
                     for name, layer in layers.items() if layer.in_features % 4]
    if problems:
        raise UserError(problems)

    with torch.no_grad():
        if settings.needs_calibration:
            norms = input_norms(model, layers, calibration)
            scores = {n: layer.weight.abs() * norms[n].to(layer.weight.dtype) for n, layer in layers.items()}
        else:
            scores = {n: layer.weight.abs() for n, layer in layers.items()}

        if settings.method == "2:4":
            masks = {n: _n_of_m_mask(s, 2, 4) for n, s in scores.items()}
        elif settings.method == "wanda":
            masks = {n: _row_mask(s, settings.sparsity) for n, s in scores.items()}
        elif settings.scope == "global":
            masks = _global_mask(scores, settings.sparsity)
        else:
            masks = {n: _layer_mask(s, settings.sparsity) for n, s in scores.items()}

        for name, layer in layers.items():
            layer.weight.masked_fill_(masks[name], 0)
    return sparsity_report(model, settings.skip_modules)


def sparsity_report(model: nn.Module, skip_modules: Iterable[str] = ("lm_head",)) -> SparsityReport:
    """Fraction of exact zeros in each linear layer's weight (minus ``skip_modules``) and over all of them."""
    layers, zeros, total = {}, 0, 0
    for name, layer in linear_layers(model, list(skip_modules)).items():
        z = int((layer.weight == 0).sum())
        layers[name] = z / layer.weight.numel()
        zeros += z
        total += layer.weight.numel()
    return SparsityReport(layers=layers, zeros=zeros, total=total)


@torch.no_grad()
def input_norms(model: nn.Module, layers: dict[str, nn.Linear], calibration: Iterable[Any]) -> dict[str, torch.Tensor]:
    """``{name: (in_features,)}`` L2 norm of each input feature over all calibration tokens."""
    sums = {name: torch.zeros(layer.in_features, dtype=torch.float64) for name, layer in layers.items()}

    def hook(name: str):
        def accumulate(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # (tokens, in_features)
            sums[name] += x.double().pow(2).sum(0).cpu()

        return accumulate

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    device = next(model.parameters()).device
    try:
        batches = 0
        for batch in calibration:
            if isinstance(batch, Mapping):
                kwargs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask") if k in batch}
            else:
                ids = batch if isinstance(batch, torch.Tensor) else batch[0]
                kwargs = {"input_ids": ids.to(device)}
            model(**kwargs)
            batches += 1
    finally:
        for handle in handles:
            handle.remove()
    if batches == 0:
        raise UserError("calibration: no batches were given")
    return {name: s.sqrt().float() for name, s in sums.items()}


# --------------------------------------------------------------------------------------------
# Masks: True where a weight is pruned; exactly round(sparsity * n) per comparison group


def _smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat.float(), k, largest=False, sorted=False).indices] = True
    return mask


def _layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    return _smallest(score.flatten(), round(sparsity * score.numel())).view_as(score)


def _row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(out, in) score -> mask pruning round(sparsity * in) inputs of every output row."""
    k = round(sparsity * score.shape[1])
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(score.float(), k, dim=1, largest=False, sorted=False).indices, True)
    return mask


def _n_of_m_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest of every m consecutive input weights of each row (prune the m - n smallest)."""
    out_f, in_f = score.shape
    groups = score.float().reshape(out_f, in_f // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False, sorted=False).indices, True)
    return mask.reshape(out_f, in_f)


def _global_mask(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    flat = torch.cat([s.flatten().float() for s in scores.values()])  # every weight's score, one vector
    mask = _smallest(flat, round(sparsity * flat.numel()))
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = mask[start:start + s.numel()].view_as(s)
        start += s.numel()
    return out

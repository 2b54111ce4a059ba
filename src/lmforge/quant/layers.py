"""Which linear layers a quantizer or pruner touches: every ``nn.Linear`` minus ``skip_modules``.

Embeddings are never touched (they are not ``nn.Linear``); ``lm_head`` is skipped by default because
the output projection is the layer most sensitive to rounding, and in small models it and the
embedding hold most of the parameters anyway.

A ``skip_modules`` entry matches a module whose qualified name equals it, ends with ``.<entry>``, or
matches it as a shell pattern (``model.layers.0.*``). An entry that matches no module is an error,
so a typo (``lm_haed``) does not silently quantize the layer it meant to keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

from lmforge.config import UserError


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatchcase(name, p) for p in patterns)


def linear_layers(model: nn.Module, skip_modules: Sequence[str] = ("lm_head",)) -> dict[str, nn.Linear]:
    """``{qualified name: layer}`` of the model's ``nn.Linear`` layers not named by ``skip_modules``."""
    names = [name for name, _ in model.named_modules()]
    unknown = [p for p in skip_modules if not any(matches(n, [p]) for n in names)]
    if unknown:
        raise UserError([f"skip_modules: {p!r} matches no module of the model" for p in unknown])
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not matches(name, skip_modules)
    }

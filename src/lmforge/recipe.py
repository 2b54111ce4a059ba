"""The one recipe dispatch: a recipe file (its ``stage:`` key, or the stage the user named) -> the stage
module's ``Config``, parsed strictly with the overrides. Every tool that takes a recipe goes through
:func:`load_recipe`; only ``cli.py`` knows the command table, and nothing imports ``cli.py``."""

from __future__ import annotations

import difflib
import importlib
import os
from types import ModuleType
from typing import Any

from lmforge.config import UserError, load, read_yaml

# stage name -> module with `Config` and `main(cfg)`
STAGES: dict[str, str] = {
    "data": "lmforge.stages.data",
    "pretrain": "lmforge.stages.pretrain",
    "finetune": "lmforge.stages.finetune",
    "distill": "lmforge.stages.distill",
    "quantize": "lmforge.stages.quantize",
    "evaluate": "lmforge.stages.evaluate",
}


def import_stage(name: str) -> ModuleType:
    """The stage's module; a one-line error for a stage this version does not have."""
    try:
        return importlib.import_module(STAGES[name])
    except ModuleNotFoundError as e:
        if e.name and STAGES[name].startswith(e.name):
            raise UserError(f"stage '{name}' is not available in this version of lmforge") from None
        raise


def recipe_stage(path: str | os.PathLike) -> str:
    """The stage a recipe file declares with its top-level ``stage:`` key (one-line error otherwise)."""
    stage = read_yaml(path).get("stage")
    if stage not in STAGES:
        hint = difflib.get_close_matches(str(stage), list(STAGES), n=1)
        raise UserError(
            f"{path}: stage: {stage!r} is not a stage"
            + (f"; did you mean '{hint[0]}'?" if hint else f"; add `stage: <one of {', '.join(STAGES)}>`")
        )
    return stage


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, stage: str | None = None) -> tuple[str, Any]:
    """(stage, typed config). ``stage`` given (``lmforge pretrain RECIPE``): a recipe whose ``stage:`` key
    names another stage is refused with the command that runs it, instead of a list of unknown keys."""
    declared = read_yaml(path).get("stage")
    if stage is None:
        stage = recipe_stage(path)
    elif declared is not None and declared != stage and declared in STAGES:
        raise UserError(f"{path}: this is a '{declared}' recipe (stage: {declared}); run `lmforge {declared} {path}`")
    return stage, load(import_stage(stage).Config, path, overrides)

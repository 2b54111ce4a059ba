"""`lmforge check RECIPE.yaml [overrides]`: validate a recipe without running it (the recipe's
``stage:`` key picks the schema; a stage may add deeper checks that need no training)."""

from __future__ import annotations

from lmforge.config import UserError
from lmforge.recipe import import_stage, load_recipe


def cli(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lmforge check RECIPE.yaml [key.path=value ...]   (the recipe's `stage:` key picks the schema)")
        return 0 if argv else 2
    recipe, overrides = argv[0], argv[1:]
    stage, cfg = load_recipe(recipe, overrides)
    if hasattr(cfg, "schedule") and cfg.train.max_steps > 0 and cfg.schedule.warmup(cfg.train.max_steps) > cfg.train.max_steps:
        # a run only warns (a shortened test run may want it); a recipe meant to be kept should not
        raise UserError(f"{recipe}: schedule.warmup_steps: {cfg.schedule.warmup(cfg.train.max_steps)} warmup steps exceed "
                        f"train.max_steps={cfg.train.max_steps}, so the lr never reaches optim.learning_rate; "
                        "shorten the warmup or train longer")
    extra = getattr(import_stage(stage), "check", None)  # optional deeper checks that need no training
    if callable(extra):
        extra(cfg)
    print(f"{recipe}: OK ({stage} recipe)")
    return 0

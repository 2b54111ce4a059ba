"""`lmforge export FINETUNE_RECIPE.yaml [key=value ...]`: merge a finished fine-tune's adapter into its
base and save a plain model (see ``lmforge.peft.merge``)."""

from __future__ import annotations

from lmforge.peft.merge import export
from lmforge.recipe import load_recipe


def cli(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lmforge export FINETUNE_RECIPE.yaml [key.path=value ...]\n\n"
              "Merges output_dir/final (lora, dora, qlora, ia3, ...) into model.name_or_path and writes a plain\n"
              "model to export.output_dir (default: <output_dir>/merged).")
        return 0 if argv else 2
    _, cfg = load_recipe(argv[0], argv[1:], stage="finetune")
    export(cfg)
    return 0

"""`lmforge launch [accelerate launch options] STAGE RECIPE.yaml [key=value ...]`: check the recipe and the
accelerate config first, then hand over to ``accelerate launch -m lmforge STAGE ...`` (like torchtune's
``tune run``). A mistake in either is one line and exit code 2 before any rank is spawned, instead of
one error per rank followed by the launcher's traceback.

    lmforge launch --config_file accelerate_configs/deepspeed_zero3.yaml pretrain recipes/tiny/pretrain.yaml
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lmforge.config import UserError
from lmforge.recipe import STAGES, load_recipe

# accelerate launch options that take no value (every other --option takes the next argument)
_FLAGS = {"--cpu", "--multi_gpu", "--use_deepspeed", "--use_fsdp", "--use_megatron_lm", "--debug", "-q", "--quiet",
          "--no_python", "--same_network", "--use_cpu"}


def split(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(accelerate options, stage, the stage's arguments)."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in STAGES:
            return argv[:i], a, argv[i + 1:]
        i += 1 if (a in _FLAGS or "=" in a or not a.startswith("-")) else 2
    raise UserError(f"lmforge launch: name a stage ({', '.join(STAGES)}) after the accelerate options")


def config_file(opts: list[str]) -> str | None:
    for i, a in enumerate(opts):
        if a.startswith("--config_file="):
            return a.split("=", 1)[1]
        if a == "--config_file" and i + 1 < len(opts):
            return opts[i + 1]
    return None


def cli(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    opts, stage, rest = split(argv)
    cf = config_file(opts)
    if cf is not None and not Path(cf).is_file():
        raise UserError(f"--config_file: '{cf}' does not exist; the layouts are in accelerate_configs/ "
                        "(cpu, multi_cpu, ddp, fsdp, deepspeed_zero1/2/3, ...)")
    if cf is not None:
        import yaml

        try:
            yaml.safe_load(Path(cf).read_text())
        except yaml.YAMLError as e:
            raise UserError(f"--config_file: '{cf}' is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not rest:
        raise UserError(f"lmforge launch {stage}: give the recipe, e.g. recipes/tiny/{stage}.yaml")
    load_recipe(rest[0], rest[1:], stage=stage)  # every recipe problem, before a rank exists
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *opts, "-m", "lmforge", stage, *rest]
    sys.stdout.flush()
    os.execv(sys.executable, cmd)
    return 0  # not reached

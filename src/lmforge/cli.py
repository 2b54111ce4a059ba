"""`lmforge <command> ...`: one entry point for every stage and tool; the command table lives here and
nothing but ``__main__`` imports this module (the library's recipe dispatch is ``lmforge.recipe``).

Stages take a recipe and overrides: ``lmforge pretrain recipes/tiny/pretrain.yaml optim.learning_rate=1e-3``.
Their modules define a root recipe dataclass ``Config`` and ``main(cfg)``. Tools (``check``, ``plan``,
``schedule``, ...) parse their own arguments: their modules define ``cli(argv) -> int | None``.

A user mistake (``UserError``) prints its lines on stderr and exits with code 2, no traceback.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import sys
from collections.abc import Callable

from lmforge import outputs
from lmforge.config import UserError, describe
from lmforge.recipe import STAGES, import_stage, load_recipe

# tool name -> "module:function" taking argv
TOOLS: dict[str, str] = {
    "check": "lmforge.tools.check:cli",
    "plan": "lmforge.tools.plan:cli",
    "schedule": "lmforge.tools.schedule:cli",
    "sweep": "lmforge.tools.sweep:cli",
    "lr-find": "lmforge.tools.lr_find:cli",
    "export": "lmforge.tools.export:cli",
    "generate": "lmforge.tools.generate:cli",
    "launch": "lmforge.tools.launch:cli",
    "inspect": "lmforge.tools.inspect:cli",
    "runs": "lmforge.tools.runs:cli",
}

USAGE = """usage: lmforge <command> [args]

stages (lmforge <stage> RECIPE.yaml [key.path=value ...]):
  {stages}
tools:
  {tools}

`lmforge <command> --help` describes one command (for a stage: every recipe key)."""


def _usage() -> str:
    return USAGE.format(stages=", ".join(STAGES), tools=", ".join(TOOLS))


def _import_tool(name: str) -> Callable[[list[str]], int | None]:
    module, _, func = TOOLS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), func)
    except (ModuleNotFoundError, AttributeError) as e:
        if isinstance(e, AttributeError) or (e.name and module.startswith(e.name)):
            raise UserError(f"command '{name}' is not available in this version of lmforge") from None
        raise


def run_stage(name: str, argv: list[str]) -> int:
    module = import_stage(name)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: lmforge {name} RECIPE.yaml [key.path=value ...]\n\nrecipe keys:")
        print("\n".join(describe(module.Config)))
        return 0 if argv else 2
    # a stage may turn flags of its own into recipe keys (evaluate: --compare DIR [DIR ...] -> compare=[...])
    argv = getattr(module, "cli_overrides", lambda a: a)(argv)
    _, cfg = load_recipe(argv[0], argv[1:], stage=name)
    try:
        module.main(cfg)
    except outputs.NothingToDo as e:
        print(e)
    except BaseException:
        outputs.restore_pending()  # a folder that overwrite=true set aside comes back as it was
        raise
    return 0


def _leave_distributed(code: int) -> None:
    """End a multi-process run so that no rank dies at interpreter exit.

    A 2-rank DeepSpeed run on CPU finished training and then aborted on rank 1 at exit
    ("terminate called without an active exception", SIGABRT) under load: the process group was
    destroyed while another rank still wrote its summary, and gloo's/DeepSpeed's C++ threads met
    Python's finalisation in no fixed order. So: every rank waits for the others, the process group
    is destroyed once, output is flushed, and the process exits without running C++ static
    destructors (``os._exit``). Single-process runs exit normally."""
    import os

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    try:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except Exception:  # a peer already gone: nothing left to coordinate with
        pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-v", "--verbose"):  # keep third-party detail (see lmforge.quiet_third_party)
        import os

        os.environ["LMFORGE_VERBOSE"] = "1"
        logging.getLogger("torchao").setLevel(logging.NOTSET)
        argv = argv[1:]
        if not argv:
            print(_usage())
            return 2
    command, rest = argv[0], argv[1:]
    try:
        if command in STAGES:
            code = run_stage(command, rest)
            _leave_distributed(code)
            return code
        if command in TOOLS:
            return int(_import_tool(command)(rest) or 0)
        close = difflib.get_close_matches(command, [*STAGES, *TOOLS], n=1)
        raise UserError(f"unknown command '{command}'" + (f"; did you mean '{close[0]}'?" if close else "") +
                        f"; commands: {', '.join([*STAGES, *TOOLS])}")
    except UserError as e:
        for line in e.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Resumable checkpoints: ``output_dir/checkpoints/step_N``.

Each holds ``accelerator.save_state`` (model, optimizer, RNG states of every rank, DeepSpeed/FSDP
shards when those layouts are used), ``loop_state.json`` (step, tokens seen, data position, best
eval) and the resolved ``recipe.yaml``. It is written to ``step_N.tmp`` and renamed once complete,
so a kill during a save never leaves a broken newest checkpoint: folders without the ``.tmp``
suffix are complete by construction. Only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

_STEP = re.compile(r"^step_(\d+)$")
LOOP_STATE = "loop_state.json"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))
             and (p / LOOP_STATE).exists()]
    return [p for _, p in sorted(found)]


def latest(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def save(accelerator, root: str | Path, step: int, loop_state: dict[str, Any], recipe: dict, keep_last: int) -> Path:
    """Collective: every rank must call it (DeepSpeed/FSDP write per-rank shards)."""
    root = Path(root)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed mid-save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        # Written last: its presence marks the folder complete even before the rename.
        (tmp / LOOP_STATE).write_text(json.dumps(loop_state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: str | Path) -> dict[str, Any]:
    """Restore model/optimizer/RNG state into the prepared objects; return the loop state."""
    path = Path(path)
    accelerator.load_state(str(path))
    return json.loads((path / LOOP_STATE).read_text())

"""Resumable checkpoints: ``output_dir/checkpoints/step_N``.

Each holds ``accelerator.save_state`` (model, optimizer, RNG states of every rank, DeepSpeed/FSDP
shards when those layouts are used), ``loop_state.json`` (step, tokens seen, data position, best
eval) and the resolved ``recipe.yaml``. It is written to ``step_N.tmp`` and renamed once complete,
so a kill during a save never leaves a broken newest checkpoint: folders without the ``.tmp``
suffix are complete by construction. Only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from lmforge.config import UserError

log = logging.getLogger("lmforge")

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


def missing_files(path: Path) -> list[str]:
    """Files the checkpoint's manifest lists that are gone or changed size (checkpoints older than the
    manifest: nothing to check)."""
    files = json.loads((path / LOOP_STATE).read_text()).get("files") or {}
    return [f for f, size in files.items() if not (path / f).is_file() or (path / f).stat().st_size != size]


def latest(root: str | Path) -> Path | None:
    """The newest *complete* checkpoint: one whose files all match its manifest. A broken newer one is
    skipped with a warning that names it; when every checkpoint is broken, a one-line error."""
    ckpts = list_checkpoints(root)
    broken = []
    for path in reversed(ckpts):
        gone = missing_files(path)
        if not gone:
            if broken:
                log.warning("checkpoint %s is incomplete (%s missing or changed); resuming from %s instead",
                            broken[0][0], ", ".join(broken[0][1][:3]), path)
            return path
        broken.append((path, gone))
    if broken:
        raise UserError(f"resume: every checkpoint in '{root}' is incomplete (newest: {broken[0][0].name} lacks "
                        f"{', '.join(broken[0][1][:3])}); delete the broken checkpoints, or start over with overwrite=true")
    return None


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
        # Written last: its presence marks the folder complete even before the rename; its manifest
        # (every file and its size) lets resume tell a checkpoint that lost a file since.
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / LOOP_STATE).write_text(json.dumps({**loop_state, "files": files}, indent=1))
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
    state = json.loads((path / LOOP_STATE).read_text())
    state.pop("files", None)
    return state

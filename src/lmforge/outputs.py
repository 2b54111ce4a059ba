"""Output folders that never lose work: what ``overwrite``, ``resume`` and a second run may do to them.

- A run marks its folder (``.lmforge-run``); ``overwrite=true`` replaces only a marked folder (or an
  empty one) and names what it refuses to delete in any other.
- The folder being replaced is set aside (renamed to ``<dir>.replaced``), not deleted: the new run's
  late checks (model build, data, layout) may still fail, and then the old folder comes back as it
  was (:func:`restore_pending`, called by the CLI on any failure). It is deleted once the new run has
  written its result (:func:`discard_pending`).
- ``resume=auto`` refuses a recipe whose keys differ from the saved one (other than the few a
  continued run may change), and says so when there is nothing to do.
- One run at a time per folder: a lock file held with ``flock`` for the life of the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from lmforge.config import UserError

log = logging.getLogger("lmforge")

MARKER = ".lmforge-run"
LOCK = ".lmforge.lock"
# keys a continued run (resume=auto) may change: how long it runs and how it reports, not what it trains
RESUMABLE_CHANGES = ("resume", "overwrite", "output_dir", "train.max_steps", "train.stop_at_step", "log.", "eval.",
                     "checkpoint.")

_pending: dict[Path, Path] = {}  # output_dir -> the set-aside folder it replaced
_locks: dict[Path, Any] = {}


class NothingToDo(Exception):
    """The run asked for is complete already; the CLI prints the message and exits 0."""


# ---------------------------------------------------------------------------------------------
# Marking, replacing


def is_run_dir(path: Path) -> bool:
    """Made by an lmforge run: marked, or (runs older than the marker) holding a recipe and a summary/report."""
    return (path / MARKER).exists() or ((path / "recipe.yaml").exists()
                                        and any((path / f).exists() for f in ("summary.json", "report.json")))


def mark(path: Path, stage: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(json.dumps({"stage": stage, "pid": os.getpid()}) + "\n")


def _listing(path: Path, n: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def refuse_foreign(path: Path) -> None:
    """UserError unless ``path`` is empty or a folder an lmforge run made."""
    if path.is_dir() and any(path.iterdir()) and not is_run_dir(path):
        raise UserError(f"output_dir: '{path}' holds files no lmforge run made ({_listing(path)}); overwrite=true only "
                        "replaces a run's own folder. Move them away or choose another output_dir")


def set_aside(path: Path) -> Path:
    """Rename ``path`` to ``<path>.replaced`` (restored if the new run fails, deleted when it succeeds)."""
    aside = path.with_name(path.name + ".replaced")
    if aside.exists():
        shutil.rmtree(aside)  # left by a run that was killed after replacing it
    path.rename(aside)
    _pending[path.resolve()] = aside
    log.info("overwrite=true: %s set aside as %s until the new run has written its result", path, aside)
    return aside


def discard_pending(path: Path) -> None:
    aside = _pending.pop(path.resolve(), None)
    if aside is not None and aside.exists():
        shutil.rmtree(aside, ignore_errors=True)


def restore_pending() -> None:
    """Put every set-aside folder back (the run that replaced it failed). Safe to call anywhere."""
    for path, aside in list(_pending.items()):
        release(path)
        if aside.exists():
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
            aside.rename(path)
            print(f"the run failed: '{path}' is back as it was", flush=True)
        _pending.pop(path, None)


# ---------------------------------------------------------------------------------------------
# One run per folder


def acquire(path: Path) -> str | None:
    """Hold ``path/.lmforge.lock`` for this process; the pid of the holder when another run has it."""
    if path.resolve() in _locks:
        return None  # this process holds it already (an earlier in-process run that raised)
    path.mkdir(parents=True, exist_ok=True)
    f = open(path / LOCK, "a+")  # noqa: SIM115  (held open for the life of the run)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        return holder
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _locks[path.resolve()] = f
    return None


def release(path: Path) -> None:
    f = _locks.pop(Path(path).resolve(), None)
    if f is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


# ---------------------------------------------------------------------------------------------
# Resume


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(saved: dict, now: dict, allowed: tuple[str, ...] = RESUMABLE_CHANGES,
                 defaults: dict | None = None) -> list[str]:
    """Recipe keys whose value differs between a saved recipe and the current one (``allowed`` prefixes aside).
    With ``defaults`` (the recipe class's own), a key the saved recipe lacks (a run made by an older lmforge,
    before the key existed) counts as unchanged while it keeps its default."""
    a, b, d = flat(saved), flat(now), flat(defaults or {})
    keys = sorted(set(a) | set(b))

    def same(k: str) -> bool:
        if k not in a and k in d and b.get(k) == d[k]:
            return True
        return a.get(k) == b.get(k)

    return [k for k in keys if not same(k) and not any(k == p or (p.endswith(".") and k.startswith(p))
                                                       for p in allowed)]


def read_recipe(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}

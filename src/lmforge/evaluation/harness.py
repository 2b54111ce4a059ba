"""lm-evaluation-harness on a model in memory: ``HFLM(pretrained=model, tokenizer=...)`` + ``simple_evaluate``.

    from lmforge.evaluation.harness import run_harness
    scores = run_harness(model, tokenizer, ["lmforge_fixture_mc"], include_path="tests/fixtures/harness", limit=20)
    # {'lmforge_fixture_mc/acc': 0.45, 'lmforge_fixture_mc/acc_norm': 0.4}

``model`` is any unwrapped causal LM (a ``PreTrainedModel``, a ``PeftModel``, a quantized model); the harness
puts it in eval mode and :func:`run_harness` puts back the mode it had, so the training loop can call it
between steps (on one process: lm-eval's in-memory path is single-process).

Tasks are any lm-eval task, group or tag name: those under ``include_path`` (task YAMLs of your own) first,
then lm-eval's ~15k built-in ones (indexing those takes ~20 s, so it is done only when a name is not found
locally). Built-in tasks download their data from the Hugging Face Hub; offline (``HF_HUB_OFFLINE=1``) only
local tasks run. A local task reads local files with ``dataset_path: json`` (or csv, parquet, text) and
``dataset_kwargs: {data_files: {test: items.jsonl}}``; lmforge resolves a relative data_files path against
the task YAML's folder (lm-eval itself resolves it against the working directory), so an include_path
folder works from anywhere. ``tests/fixtures/harness/`` holds two such tasks.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.config import UserError
from lmforge.evaluation.metrics import need

log = logging.getLogger("lmforge")


def _quiet() -> None:
    """lm-eval logs a warning per in-memory model and an info line per task and request type."""
    if os.environ.get("LMFORGE_VERBOSE", "").lower() not in ("1", "true", "yes"):
        for name in ("lm_eval", "lm-eval"):
            logging.getLogger(name).setLevel(logging.ERROR)


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: tuple[str, ...], defaults: bool):
    need("lm_eval", "harness.tasks")
    _quiet()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(Path(p).resolve()) for p in include_path] or None, include_defaults=defaults)


def _paths(include_path: str | Sequence[str] | None) -> tuple[str, ...]:
    if include_path is None:
        return ()
    return (include_path,) if isinstance(include_path, (str, os.PathLike)) else tuple(str(p) for p in include_path)


def task_manager(tasks: Sequence[str], include_path: str | Sequence[str] | None = None):
    """A TaskManager that knows every name in ``tasks`` (lm-eval's built-in index only when needed), or a
    one-line error naming the unknown task and the closest known names."""
    paths = _paths(include_path)
    for p in paths:
        if not Path(p).is_dir():
            raise UserError(f"harness.include_path: '{p}' is not a folder of task YAMLs")
    tm = _task_manager(paths, False) if paths else None
    if tm is None or any(t not in tm.all_tasks for t in tasks):
        tm = _task_manager(paths, True)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        lines = []
        for t in unknown:
            close = difflib.get_close_matches(t, tm.all_tasks, n=3)
            lines.append(f"harness.tasks: {t!r} is not an lm-eval task, group or tag"
                         + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else "")
                         + (f"; local tasks in {', '.join(paths)}: "
                            f"{', '.join(sorted(_task_manager(paths, False).all_tasks)) or 'none'}" if paths else ""))
        raise UserError(lines)
    return tm


def _spec(tm, name: str, paths: tuple[str, ...]) -> str | dict[str, Any]:
    """A task name, or, for a task YAML under include_path, its config with relative data_files resolved
    against the YAML's folder (lm-eval's own loader reads it: includes and !function tags as usual)."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = tm.task_index.get(name)
    roots = [Path(p).resolve() for p in paths]
    if entry is None or entry.kind != Kind.TASK or entry.yaml_path is None or not any(
            Path(entry.yaml_path).is_relative_to(r) for r in roots):
        return name
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return cfg
    here = Path(entry.yaml_path).parent

    def resolve(f: str) -> str:
        return str(here / f) if not Path(f).is_absolute() and (here / f).exists() else f

    if isinstance(files, str):
        resolved: Any = resolve(files)
    elif isinstance(files, list):
        resolved = [resolve(f) for f in files]
    else:
        resolved = {k: [resolve(f) for f in v] if isinstance(v, list) else resolve(v) for k, v in files.items()}
    cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": resolved}
    return cfg


def load_tasks(tasks: Sequence[str], include_path: str | Sequence[str] | None = None) -> list:
    """lm-eval Task/Group objects for ``tasks``, their data loaded (one-line error when a task's data cannot be
    had, e.g. a Hub dataset offline). Fresh objects each call: lm-eval keeps per-run state on them."""
    tm = task_manager(tasks, include_path)
    specs = [_spec(tm, t, _paths(include_path)) for t in tasks]
    out = []
    for name, spec in zip(tasks, specs):
        try:
            loaded = tm.load([spec])
        except Exception as e:  # datasets / lm-eval raise many types for missing data or a broken YAML
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            offline = " (HF_HUB_OFFLINE=1: only tasks whose data are local files run)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
            raise UserError(f"harness.tasks: cannot load task {name!r}{offline}: {first[:300]}") from None
        top = loaded["groups"].get(name)
        out += [top] if top is not None else list(loaded["tasks"].values())
    return out


def check_tasks(tasks: Sequence[str], include_path: str | Sequence[str] | None = None) -> None:
    """Every task known and its data loadable: what a run would refuse, said before it writes anything."""
    load_tasks(tasks, include_path)


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], include_path: str | Sequence[str] | None = None,
                   limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                   bootstrap_iters: int = 0, seed: int = 0, log_samples: bool = False) -> dict[str, Any]:
    """lm-eval's full result dict (``results``, ``configs``, ``n-shot``, ``samples`` when ``log_samples``)."""
    need("lm_eval", "harness.tasks")
    _quiet()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    objects = load_tasks(tasks, include_path)
    was_training = getattr(model, "training", False)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        if limit is not None and float(limit).is_integer() and limit >= 1:
            limit = int(limit)  # lm-eval: an int is a count, a float below 1 a fraction of each task
        results = simple_evaluate(model=lm, tasks=objects, task_manager=task_manager(tasks, include_path),
                                  num_fewshot=num_fewshot, limit=limit, bootstrap_iters=bootstrap_iters,
                                  log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    return results


def flatten(results: dict[str, Any]) -> dict[str, float]:
    """{'task/metric': value} from lm-eval's ``results``; a metric reported under several filters keeps the
    filter's name (``task/exact_match,strict``). Standard errors are left out."""
    out: dict[str, float] = {}
    for task, scores in results["results"].items():
        metrics = [(k.partition(",")[0], k.partition(",")[2], v) for k, v in scores.items()
                   if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
        for metric, filt, value in metrics:
            several = sum(m == metric for m, _, _ in metrics) > 1
            out[f"{task}/{metric}" + (f",{filt}" if several else "")] = float(value)
    return out


def run_harness(model, tokenizer, tasks: Sequence[str], include_path: str | Sequence[str] | None = None,
                limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                bootstrap_iters: int = 0, seed: int = 0) -> dict[str, float]:
    """Run lm-eval ``tasks`` on an in-memory model: {'task/metric': value}."""
    return flatten(evaluate_tasks(model, tokenizer, tasks, include_path, limit, num_fewshot, batch_size,
                                  bootstrap_iters, seed))

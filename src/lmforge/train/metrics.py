"""Metrics: one JSON object per line in ``output_dir/metrics.jsonl`` (main process), mirrored to the
accelerate trackers the recipe names (TensorBoard when installed)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "trackio": "trackio"}


def available_trackers(names: list[str]) -> list[str]:
    """Keep the trackers whose package is installed; say which were skipped and how to get them."""
    out = []
    for name in names:
        module = _TRACKER_MODULES.get(name, name)
        if importlib.util.find_spec(module) is None and not (name == "tensorboard" and importlib.util.find_spec("tensorboardX")):
            log.warning("tracker '%s' skipped: not installed (pip install %s)", name, module)
            continue
        out.append(name)
    return out


def flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested recipe -> {'optim.learning_rate': 3e-4, ...} with scalars only (what trackers accept)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


class MetricsLog:
    """Append-only JSONL on the main process; every record has ``step`` and a ``split`` tag."""

    def __init__(self, path: Path, accelerator, resume_step: int | None = None):
        self.path = Path(path)
        self.acc = accelerator
        if self.acc.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.exists():
                # Drop records written after the checkpoint we resume from: they will be redone.
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resume_step]
                self.path.write_text("".join(line + "\n" for line in kept))
            elif resume_step is None and self.path.exists():
                self.path.unlink()

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        record = {"step": step, "split": split, **{k: float(v) for k, v in values.items()}}
        if self.acc.is_main_process:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.acc.trackers:
            self.acc.log({f"{split}/{k}": float(v) for k, v in values.items()}, step=step)


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

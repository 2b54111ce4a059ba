"""Model cards (``README.md`` in the Hugging Face format) and the environment block of run reports.

Every folder a stage hands on (``final/``, ``merged/``, a distilled student, each quantized result) gets
a ``README.md`` written with ``huggingface_hub.ModelCard``: YAML metadata (``library_name``,
``base_model``, ``datasets``, ``tags``, ``pipeline_tag`` and the metrics as ``model-index`` eval
results), then a body with what made it, its metrics and the resolved recipe. ``ModelCard.load`` reads
it back, and the hub renders it, as for a card ``transformers.Trainer`` writes.
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
import sys
from pathlib import Path
from typing import Any

import yaml

CARD = "README.md"
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "peft", "deepspeed", "torchao", "lmforge")


def environment(packages: tuple[str, ...] = PACKAGES) -> dict[str, Any]:
    """Versions of the stack, the Python, and what the hardware is (CPU capability or the GPU)."""
    import torch

    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    hw = (f"GPU {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}" if torch.cuda.is_available()
          else f"CPU ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)")
    return {"python": platform.python_version(), "platform": platform.platform(), "hardware": hw, "versions": versions}


def environment_md(env: dict[str, Any] | None = None) -> str:
    env = env or environment()
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    return f"- hardware: {env['hardware']}\n- python {env['python']} on {env['platform']}\n- {versions}\n"


def command_line() -> str:
    """How this process was started, as a person would retype it."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("lmforge", "__main__.py"):
        argv[0] = "lmforge"
    return " ".join(argv)


def _datasets(recipe: dict) -> list[str]:
    data = recipe.get("data") or {}
    out = [data["path"]] if data.get("path") else []
    out += [str(f) for f in data.get("train_files") or []]
    return out


def _base_model(recipe: dict) -> str | None:
    for group in ("model", "teacher"):
        name = (recipe.get(group) or {}).get("name_or_path")
        if name:
            return str(name)
    return None


def _is_hub_id(name: str) -> bool:
    """``org/name`` or ``name`` that is not a local path (the hub's ``base_model`` takes only ids)."""
    return not Path(name).exists() and not name.startswith((".", "/", "~")) and name.count("/") <= 1


def write_card(folder: str | Path, *, stage: str, recipe: dict, metrics: dict[str, float] | None = None,
               library_name: str = "transformers", summary: str = "", base_model: str | None = None,
               tags: list[str] | None = None, shown: str | Path | None = None) -> Path:
    """Write ``folder/README.md``; ``metrics`` (validation loss, perplexity, ...) go into the metadata too.
    ``shown``: the folder's final path, when it is being written under a temporary name (``atomic_dir``)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    target = Path(folder)
    folder = Path(shown) if shown is not None else target
    metrics = {k: float(v) for k, v in (metrics or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    base = base_model if base_model is not None else _base_model(recipe)
    datasets = _datasets(recipe)
    dataset_name = datasets[0] if datasets else "local data"
    results = [EvalResult(task_type="text-generation", dataset_type="local", dataset_name=dataset_name,
                          dataset_split="validation", metric_type=name, metric_value=value)
               for name, value in metrics.items()]
    data = ModelCardData(
        library_name=library_name, base_model=base if base and _is_hub_id(base) else None,
        datasets=None, tags=["lmforge", stage, *(tags or [])], pipeline_tag="text-generation",
        model_name=(folder.parent.name if folder.name in ("final", "merged") else folder.name) if results else None,
        eval_results=results or None)
    body_metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()) or "| (none) | |"
    if library_name == "peft":
        load = f'from peft import PeftModel  # the adapter alone: load its base model first\nmodel = PeftModel.from_pretrained(base_model, "{folder}")'
    elif "quantized" in (tags or []):
        load = f'from lmforge.quant import methods\nmodel = methods.load("{folder}")'
    else:
        load = f'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("{folder}")'
    title = folder.parent.name if folder.name in ("final", "merged") else folder.name
    made = f"Made by `lmforge {stage}`" + (f" from `{base}`" if base else "")
    if datasets:
        made += " on " + ", ".join(f"`{d}`" for d in datasets)
    content = (
        f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{made}. {summary}\n\n"
        f"## Metrics\n\n| metric | value |\n|---|---|\n{body_metrics}\n\n"
        f"## Use\n\n```python\n{load}\n```\n\n"
        f"## Recipe\n\n```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```\n\n"
        f"## Environment\n\n{environment_md()}"
    )
    ModelCard(content).save(target / CARD)
    return target / CARD

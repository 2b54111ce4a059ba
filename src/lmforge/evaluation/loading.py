"""Any model folder an lmforge stage writes, recognised from its files and loaded for evaluation.

    kind        the folder holds                                 loaded with
    causal      config.json + weights (pretrain, distill, merged  lmforge.models.load_for_generation
                export, a pruned quantize result)
    adapter     adapter_config.json (finetune final/)             load_for_generation: PeftModel on its base
                                                                  (``base``, else the base the adapter names)
    quantized   quant.json (lmforge quantize)                      lmforge.quant.methods.load
    classifier  a sequence-classification model or adapter        lmforge.models.load_pretrained(task=classification)
                (finetune task: classification), labels.json      (+ PeftModel for an adapter)

:func:`folder_problems` says what is wrong with a folder without loading anything (recipe checks);
:func:`load` loads it, in eval mode with gradients off.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lmforge.config import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
QUANT_JSON = "quant.json"  # lmforge.quant.methods.QUANT_JSON (not imported here: it would pull torchao into checks)


@dataclasses.dataclass
class Loaded:
    model: Any
    tokenizer: Any
    kind: str  # causal | adapter | quantized | classifier
    path: str
    base: str | None = None
    label_names: list[str] | None = None

    @property
    def is_classifier(self) -> bool:
        return self.kind == "classifier"


def _adapter_config(path: Path) -> dict | None:
    f = path / "adapter_config.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _architectures(path: Path) -> list[str]:
    f = path / "config.json"
    return list(json.loads(f.read_text()).get("architectures") or []) if f.is_file() else []


def base_of(path: str | Path, base: str | None = None) -> str | None:
    """The base model of an adapter folder: ``base`` when given, else what its adapter_config.json names."""
    cfg = _adapter_config(Path(path))
    if cfg is None:
        return None
    return base or cfg.get("base_model_name_or_path")


def kind_of(path: str | Path) -> str:
    """causal | adapter | quantized | classifier (the folder is assumed valid: see folder_problems)."""
    path = Path(path)
    adapter = _adapter_config(path)
    if adapter is not None:
        return "classifier" if adapter.get("task_type") == "SEQ_CLS" else "adapter"
    if (path / QUANT_JSON).is_file():
        return "quantized"
    if any(a.endswith("ForSequenceClassification") for a in _architectures(path)):
        return "classifier"
    return "causal"


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def folder_problems(name: str, base: str | None = None, key: str = "model.path") -> list[str]:
    """One line per problem with a model folder (nothing is loaded): missing, empty, an adapter without its base."""
    path = Path(name)
    if not name:
        return [f"{key}: required: a model folder (e.g. outputs/tiny/pretrain/final)"]
    if not path.is_dir():
        return [f"{key}: '{name}' does not exist; give a model folder another stage wrote (e.g. outputs/tiny/pretrain/final)"]
    adapter = _adapter_config(path)
    if adapter is not None:
        b = base or adapter.get("base_model_name_or_path")
        if not b:
            return [f"{key}: '{name}' is a PEFT adapter that names no base model; set model.base to the base model folder"]
        if _looks_local(b) and not Path(b).is_dir():
            return [f"model.base: the adapter in '{name}' needs its base model '{b}', which does not exist; "
                    "set model.base to the base model folder"]
        return []
    if base:
        return [f"model.base: '{name}' is not an adapter folder (no adapter_config.json); remove model.base"]
    if not (path / "config.json").is_file():
        return [f"{key}: '{name}' holds neither a model (config.json) nor an adapter (adapter_config.json)"]
    if not any(f.suffix in WEIGHT_SUFFIXES for f in path.iterdir()):
        return [f"{key}: '{name}' has a config but no weights (*.safetensors / *.bin / model.pt); was the save interrupted?"]
    return []


def label_names(path: str | Path) -> list[str] | None:
    """A classifier's class names: labels.json (finetune writes it beside the adapter), else config.id2label."""
    path = Path(path)
    if (path / "labels.json").is_file():
        return list(json.loads((path / "labels.json").read_text())["label_names"])
    f = path / "config.json"
    if f.is_file():
        id2label = json.loads(f.read_text()).get("id2label") or {}
        if id2label:
            return [id2label[k] for k in sorted(id2label, key=int)]
    return None


def _tokenizer(folder: Path, fallback: str | None, tokenizer: str | None):
    from lmforge.models import ModelConfig, load_tokenizer

    if tokenizer:
        name = tokenizer
    elif (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        name = str(folder)
    elif fallback:
        name = fallback
    else:
        raise UserError(f"model.tokenizer: '{folder}' holds no tokenizer; set model.tokenizer")
    return load_tokenizer(ModelConfig(name_or_path=name))


def load(path: str, base: str | None = None, tokenizer: str | None = None, dtype: str = "float32",
         device: str = "auto") -> Loaded:
    """The model of a folder (any kind above) and its tokenizer, in eval mode, on ``device`` (auto: CUDA when
    there is one; quantized folders stay where their method put them)."""
    import torch

    problems = folder_problems(path, base)
    if problems:
        raise UserError(problems)
    folder, kind = Path(path), kind_of(path)
    names = None
    if kind == "quantized":
        from lmforge.quant import methods

        model = methods.load(folder)
        tok = _tokenizer(folder, None, tokenizer)
    elif kind == "classifier":
        model, tok, names = _load_classifier(folder, base_of(folder, base), tokenizer, dtype)
    else:
        from lmforge.models import load_for_generation

        model, tok = load_for_generation(folder, base_of(folder, base), dtype=dtype)
        if tokenizer:
            tok = _tokenizer(folder, None, tokenizer)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    if kind != "quantized":
        target = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        model = model.to(target)
    model.eval().requires_grad_(False)
    return Loaded(model=model, tokenizer=tok, kind=kind, path=str(path), base=base_of(folder, base), label_names=names)


def _load_classifier(folder: Path, base: str | None, tokenizer: str | None, dtype: str):
    from lmforge.models import ModelConfig, load_pretrained

    names = label_names(folder) or (label_names(base) if base else None)
    if not names:
        raise UserError(f"model.path: '{folder}' is a sequence classifier without class names (no labels.json, no "
                        "config.id2label); finetune task: classification writes labels.json beside the adapter")
    tok = _tokenizer(folder, base, tokenizer)
    model = load_pretrained(ModelConfig(name_or_path=base or str(folder), dtype=dtype), tok, task="classification",
                            label_names=names)
    if base:  # an adapter: LoRA weights plus the trained head (peft's modules_to_save)
        from peft import PeftModel

        import lmforge.peft  # noqa: F401  (registers bottleneck adapters)

        model = PeftModel.from_pretrained(model, str(folder))
    return model, tok, names

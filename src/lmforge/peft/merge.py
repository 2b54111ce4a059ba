"""Merging a finished fine-tune's adapter (LoRA/DoRA/QLoRA/IA3/...) into a full-precision copy of its
base: a plain model that ``AutoModelForCausalLM.from_pretrained`` loads. Used by ``lmforge export``
and by ``export.merge=true`` at the end of ``lmforge finetune``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from lmforge.cards import write_card
from lmforge.config import UserError, to_dict
from lmforge.models import load_pretrained, load_tokenizer
from lmforge.peft.methods import MERGEABLE_HINT, method_for
from lmforge.train.save import atomic_dir, write_extras


def export(cfg) -> Path:
    """Merge ``output_dir/final`` into the base named by ``model.name_or_path``; return the merged folder."""
    from peft import PeftModel

    import lmforge.peft  # noqa: F401  (registers bottleneck adapters)

    m = method_for(cfg.peft.method)
    if m.peft_type is None:
        raise UserError("peft.method: full fine-tuning already saved a plain model in output_dir/final; nothing to merge")
    if not m.mergeable:
        raise UserError(f"peft.method: {cfg.peft.method} cannot be merged into the base weights (it adds "
                        f"{'virtual tokens' if m.prompt_learning else 'non-linear modules'}); merge works for {MERGEABLE_HINT}. "
                        "Ship the adapter folder and load it with PeftModel.from_pretrained")
    final = Path(cfg.output_dir) / "final"
    if not (final / "adapter_config.json").is_file():
        raise UserError(f"output_dir: no adapter in '{final}'; run `lmforge finetune` with this recipe first")
    tokenizer = load_tokenizer(dataclasses.replace(cfg.model, tokenizer=str(final)))
    labels = json.loads((final / "labels.json").read_text())["label_names"] if (final / "labels.json").exists() else None
    # QLoRA: merge into the full-precision base (merging into 4-bit weights would round the update away)
    base = load_pretrained(cfg.model, tokenizer, task=cfg.task, label_names=labels, dtype="float32")
    merged = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
    merged = merged.to(getattr(torch, cfg.export.dtype))
    out = Path(cfg.export.output_dir or Path(cfg.output_dir) / "merged")
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        write_extras(tmp, tokenizer, cfg, {"labels.json": json.dumps({"label_names": labels})} if labels else None)
        summary = Path(cfg.output_dir) / "summary.json"
        ev = (json.loads(summary.read_text()).get("eval") or {}) if summary.is_file() else {}
        write_card(tmp, stage="finetune", recipe=to_dict(cfg), metrics={f"eval_{k}": v for k, v in ev.items()},
                   summary=f"The {cfg.peft.method} adapter of `{final}` merged into its base ({cfg.export.dtype}).", shown=out)
    print(f"merged {cfg.peft.method} adapter into the base: {out}")
    return out

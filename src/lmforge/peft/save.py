"""Saving a PeftModel's adapter alone, with real weights under DeepSpeed ZeRO-3.

Under ZeRO-3 each rank holds a shard of every parameter, so a bare ``save_pretrained`` writes empty
tensors (the classic 40-byte adapter: shapes ``(0,)``). ``accelerate.get_state_dict`` consolidates the
whole model instead (the frozen base included, and only when ``stage3_gather_16bit_weights_on_model_save``
is on). :func:`save_adapter` gathers the trainable parameters alone and saves them.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from lmforge.config import dump
from lmforge.train.accel import is_deepspeed, is_sharded


def save_adapter(acc, model, path: Path, tokenizer=None, recipe=None, extra_files: dict[str, str] | None = None) -> Path:
    """``PeftModel.save_pretrained`` of the trainable weights only. Collective: call on every rank.

    Under ZeRO-3 each rank holds a shard of every parameter (a bare ``save_pretrained`` writes empty
    tensors: the classic 40-byte adapter), so the trainable parameters alone are gathered first; the
    frozen base is never gathered."""
    unwrapped = acc.unwrap_model(model)
    acc.wait_for_everyone()
    ctx = _gathered([p for p in unwrapped.parameters() if p.requires_grad]) if is_sharded(acc) and is_deepspeed(acc) else None
    with ctx if ctx is not None else contextlib.nullcontext():
        if acc.is_main_process:
            tmp = path.with_name(path.name + ".tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            state = {n: p.detach().cpu().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
            unwrapped.save_pretrained(tmp, state_dict=state if ctx is not None else None, safe_serialization=True)
            finish_dir(tmp, path, tokenizer, recipe, extra_files)
    acc.wait_for_everyone()
    return path


def _gathered(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def finish_dir(tmp: Path, path: Path, tokenizer, recipe, extra_files: dict[str, str] | None) -> None:
    """Add tokenizer, resolved recipe and extra files to the ``.tmp`` folder, then rename it into place."""
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if recipe is not None:
        dump(recipe, tmp / "recipe.yaml")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)

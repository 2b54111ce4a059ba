"""Saving what a run produces: the final model (or a PeftModel's adapter alone) and one atomic-folder
helper that every writer of a finished folder uses.

Under DeepSpeed ZeRO-3 each rank holds a shard of every parameter, so a bare ``save_pretrained``
writes empty tensors (the classic 40-byte adapter: shapes ``(0,)``). :func:`save_model` consolidates
a full model through accelerate; :func:`save_adapter` gathers only the trainable parameters.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from lmforge.config import dump
from lmforge.train.accel import is_deepspeed, is_sharded


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield ``path.tmp`` to write into; on success it replaces ``path`` in one rename, so a reader
    (or a kill mid-write) never sees a half-written folder. A stale ``.tmp`` from a killed run is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def write_extras(folder: Path, tokenizer=None, recipe=None, extra_files: dict[str, str] | None = None) -> None:
    """The tokenizer, the resolved recipe and small text files beside the weights."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if recipe is not None:
        dump(recipe, folder / "recipe.yaml")
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)


def save_model(acc, model, path: Path, tokenizer=None, recipe=None, extra_files: dict[str, str] | None = None) -> Path:
    """``save_pretrained`` (safetensors) of the unwrapped model, consolidated from shards under
    ZeRO-3/FSDP; plus the tokenizer and the resolved recipe. Collective: call on every rank.
    A PeftModel saves its adapter alone (:func:`save_adapter`)."""
    if hasattr(acc.unwrap_model(model), "peft_config"):
        return save_adapter(acc, model, path, tokenizer, recipe, extra_files)
    acc.wait_for_everyone()
    state_dict = acc.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards
    unwrapped = acc.unwrap_model(model)
    if acc.is_main_process:
        with atomic_dir(path) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            write_extras(tmp, tokenizer, recipe, extra_files)
    acc.wait_for_everyone()
    return path


def save_adapter(acc, model, path: Path, tokenizer=None, recipe=None, extra_files: dict[str, str] | None = None) -> Path:
    """``PeftModel.save_pretrained`` of the trainable weights only. Collective: call on every rank.

    Under ZeRO-3 the trainable parameters alone are gathered first; the frozen base never is."""
    unwrapped = acc.unwrap_model(model)
    acc.wait_for_everyone()
    ctx = gathered_parameters([p for p in unwrapped.parameters() if p.requires_grad]) if is_sharded(acc) and is_deepspeed(acc) else None
    with ctx if ctx is not None else contextlib.nullcontext():
        if acc.is_main_process:
            with atomic_dir(path) as tmp:
                state = {n: p.detach().cpu().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
                unwrapped.save_pretrained(tmp, state_dict=state if ctx is not None else None, safe_serialization=True)
                write_extras(tmp, tokenizer, recipe, extra_files)
    acc.wait_for_everyone()
    return path


def gathered_parameters(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

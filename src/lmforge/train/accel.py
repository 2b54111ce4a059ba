"""The one place that builds the ``accelerate.Accelerator``: the hardware layout comes from the
accelerate config (``accelerate launch --config_file ...``), never from lmforge code.

Two fixes for machines without a GPU, both found by running accelerate 1.15 here:
- DDP launched with ``--multi_gpu`` (our ``multi_cpu.yaml``) starts N processes that each train
  alone unless the Accelerator is created with ``cpu=True``, which then gives real DDP over gloo.
- DeepSpeed leaves the process-group backend unset, so accelerate believes it has one process and
  ``deepspeed.initialize`` fails on the batch-size check; passing ``backend="gloo"`` fixes it.
  (``cpu=True`` must not be used there: it silently replaces DeepSpeed by DDP.)
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from lmforge.config import UserError


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def launched_layout() -> str:
    """'deepspeed', 'fsdp', 'multi' (several processes) or 'single', as `accelerate launch` set it up."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "multi" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def make_accelerator(
    *, gradient_accumulation_steps: int, mixed_precision: str | None, project_dir: str,
    log_with: list[str] | None = None, micro_batch_size: int | None = None,
):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    has_gpu = torch.cuda.is_available()
    layout = launched_layout()
    kwargs: dict = {}
    handlers = []
    if not has_gpu:
        if layout == "fsdp":
            raise UserError(
                "accelerate config: FSDP needs a GPU and this machine has none (accelerate does not support FSDP "
                "on CPU); use accelerate_configs/multi_cpu.yaml or a deepspeed_zero*.yaml layout instead"
            )
        if layout == "deepspeed":
            handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=30)))
        elif layout == "multi" or _env_true("ACCELERATE_USE_CPU"):
            kwargs["cpu"] = True
    if mixed_precision is not None:
        kwargs["mixed_precision"] = mixed_precision
    acc = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps, project_dir=project_dir,
        log_with=log_with or None, kwargs_handlers=handlers, **kwargs,
    )
    ds = acc.state.deepspeed_plugin
    if ds is not None and micro_batch_size is not None:
        # We feed batches ourselves (no prepared DataLoader), so tell DeepSpeed the micro-batch size
        # that accelerate would otherwise read off the DataLoader.
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    return acc


def is_deepspeed(acc) -> bool:
    return acc.state.deepspeed_plugin is not None


def is_sharded(acc) -> bool:
    """Parameters live sharded across ranks (ZeRO-3 or FSDP): per-rank checksums are meaningless."""
    ds = acc.state.deepspeed_plugin
    if ds is not None:
        return ds.zero_stage == 3
    return getattr(acc.state, "fsdp_plugin", None) is not None

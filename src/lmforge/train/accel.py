"""The one place that builds the ``accelerate.Accelerator``: the hardware layout comes from the
accelerate config (``accelerate launch --config_file ...``), never from lmforge code.

Two fixes for machines without a GPU, both found by running accelerate 1.15 here:
- DDP launched with ``--multi_gpu`` (our ``multi_cpu.yaml``) starts N processes that each train
  alone unless the Accelerator is created with ``cpu=True``, which then gives real DDP over gloo.
- DeepSpeed leaves the process-group backend unset, so accelerate believes it has one process and
  ``deepspeed.initialize`` fails on the batch-size check; passing ``backend="gloo"`` fixes it.
  (``cpu=True`` must not be used there: it silently replaces DeepSpeed by DDP.)

The recipe is the single source of what it decides: DeepSpeed's ``gradient_clipping`` is filled from
``optim.max_grad_norm`` (accelerate would otherwise put 1.0 in every ``"auto"``), and a DeepSpeed JSON
that states a different value, or an ``optimizer``/``scheduler`` block (lmforge builds its own parameter
groups and schedule), is refused with a message that names the fix.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from lmforge.config import UserError


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def tp_size() -> int:
    """The tensor-parallel degree `accelerate launch` exported (accelerate_configs/tp.yaml), 1 without TP."""
    if not _env_true("ACCELERATE_USE_PARALLELISM_CONFIG"):
        return 1
    return int(os.environ.get("PARALLELISM_CONFIG_TP_SIZE", "1") or 1)


def launched_layout() -> str:
    """'deepspeed', 'tp', 'fsdp', 'multi' (several processes) or 'single', as `accelerate launch` set it up."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if tp_size() > 1:
        return "tp"
    if _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "multi" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def make_accelerator(
    *, gradient_accumulation_steps: int, mixed_precision: str | None, project_dir: str,
    max_grad_norm: float | None, log_with: list[str] | None = None, micro_batch_size: int | None = None,
    find_unused_parameters: bool = False,
):
    """The Accelerator for the launched layout. ``find_unused_parameters``: DDP tolerates parameters that
    get no gradient in a step (stochastic depth skips whole blocks)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    has_gpu = torch.cuda.is_available()
    layout = launched_layout()
    kwargs: dict = {}
    handlers = []
    if not has_gpu:
        if layout == "tp":
            raise UserError(
                f"accelerate config: tensor parallelism (parallelism_config_tp_size={tp_size()}) needs GPUs and this machine "
                "has none; use accelerate_configs/multi_cpu.yaml or a deepspeed_zero*.yaml layout instead"
            )
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
    if find_unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    acc = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps, project_dir=project_dir,
        log_with=log_with or None, kwargs_handlers=handlers, **kwargs,
    )
    ds = acc.state.deepspeed_plugin
    if ds is not None and micro_batch_size is not None:
        # We feed batches ourselves (no prepared DataLoader), so tell DeepSpeed the micro-batch size
        # that accelerate would otherwise read off the DataLoader.
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    if ds is not None:
        _check_deepspeed_config(ds, max_grad_norm)
    return acc


def _check_deepspeed_config(ds, max_grad_norm: float | None) -> None:
    """Fill the DeepSpeed values the recipe owns; refuse what would contradict or replace the recipe."""
    cfg = ds.deepspeed_config
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "the accelerate config's deepspeed_config"
    problems = [
        f"{source}: remove the '{block}' block; lmforge builds the {what} from the recipe ({where})"
        for block, what, where in (("optimizer", "optimizer and its parameter groups", "optim.*"),
                                   ("scheduler", "learning-rate schedule", "schedule.*"))
        if block in cfg
    ]
    # DeepSpeed clips inside engine.step(); 0 disables clipping there.
    want = float(max_grad_norm) if max_grad_norm is not None else 0.0
    have = cfg.get("gradient_clipping", "auto")
    if have in ("auto", None):
        cfg["gradient_clipping"] = want
    elif float(have) != want:
        problems.append(
            f"{source}: gradient_clipping is {have} but the recipe's optim.max_grad_norm is {max_grad_norm}; "
            'set it to "auto" in the DeepSpeed JSON (or drop gradient_clipping from the accelerate YAML) so the '
            "recipe decides"
        )
    if problems:
        raise UserError(problems)


def layout_info(acc) -> dict:
    """What actually ran, for summary.json: tests assert on it (a DEEPSPEED YAML launched with ``--cpu``
    runs silently as DDP, so "the run finished" proves nothing)."""
    ds = acc.state.deepspeed_plugin
    fsdp = getattr(acc.state, "fsdp_plugin", None)
    info: dict = {"zero_stage": None, "offload_optimizer": None, "offload_param": None, "fsdp_sharding": None}
    if ds is not None:
        z = ds.deepspeed_config.get("zero_optimization", {})
        info.update(zero_stage=int(z.get("stage", 0)),
                    offload_optimizer=z.get("offload_optimizer", {}).get("device", "none"),
                    offload_param=z.get("offload_param", {}).get("device", "none"))
    elif fsdp is not None:
        strategy = getattr(fsdp, "sharding_strategy", None)  # FSDP1; FSDP2 says reshard_after_forward
        if strategy is None:
            strategy = "FULL_SHARD" if getattr(fsdp, "reshard_after_forward", True) else "SHARD_GRAD_OP"
        info["fsdp_sharding"] = str(getattr(strategy, "name", strategy))
    return info


def full_numel(p: torch.Tensor) -> int:
    """A parameter's full element count: under ZeRO-3 (and zero.Init) ``p.numel()`` is 0 on every rank and
    DeepSpeed keeps the real size in ``p.ds_numel``."""
    return int(getattr(p, "ds_numel", p.numel()))


def set_train_mode(model: torch.nn.Module, mode: bool) -> None:
    """``model.train(mode)``, and the wrapper's own ``training`` flag with it: ``DeepSpeedEngine.train`` and
    ``.eval`` switch only the wrapped module, so ``engine.training`` stayed True in evaluation and every task
    that reads ``model.training`` (label smoothing, accuracy, KD's validation CE) took its training path."""
    model.train(mode)
    model.training = mode


def is_deepspeed(acc) -> bool:
    return acc.state.deepspeed_plugin is not None


def is_sharded(acc) -> bool:
    """Parameters live sharded across ranks (ZeRO-3 or FSDP): per-rank checksums are meaningless."""
    ds = acc.state.deepspeed_plugin
    if ds is not None:
        return ds.zero_stage == 3
    return getattr(acc.state, "fsdp_plugin", None) is not None


def prebuild_deepspeed_ops() -> list[str]:
    """JIT-build, once per machine, the DeepSpeed C++ ops the layouts need (cached in TORCH_EXTENSIONS_DIR):
    on a GPU-less machine ``deepspeed_shm_comm`` (loaded at every DeepSpeed start, ~2 min to build) and
    ``cpu_adam`` (ZeRO offload, ~1.5 min). For `make setup`; a no-op when DeepSpeed is not installed."""
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return []
    names = ["CPUAdamBuilder"] + (["ShareMemCommBuilder"] if get_accelerator().device_name() == "cpu" else [])
    built = []
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)
            built.append(builder.NAME)
    return built

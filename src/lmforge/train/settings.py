"""Recipe groups shared by every training stage (pretrain, finetune, distill): train, eval, checkpoint, log,
and :class:`TrainingRecipe`, the top level every training stage's recipe starts from."""

from __future__ import annotations

import dataclasses
from typing import Literal

from lmforge.config import RunConfig, help_field, nested
from lmforge.optim.optimizers import OptimConfig
from lmforge.optim.schedules import ScheduleConfig
from lmforge.train.ema import EMAConfig
from lmforge.train.regularize import CurriculumConfig, DropoutConfig, EarlyStoppingConfig


@dataclasses.dataclass
class TrainConfig:
    per_device_train_batch_size: int = help_field(8, help="Micro-batch size on each device.")
    gradient_accumulation_steps: int = help_field(1, help="Micro-batches per optimizer step (loss normalised over all their tokens).")
    max_steps: int = help_field(100, help="Optimizer steps in the whole run (the schedule spans these).")
    stop_at_step: int | None = help_field(
        None, help="Stop after this step (checkpointing first) but keep the max_steps schedule: for time-boxed jobs; resume=auto continues."
    )
    gradient_checkpointing: bool = help_field(False, help="Recompute activations in backward to save memory.")
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] | None = help_field(
        None, help="Override the accelerate config's mixed precision (null: the accelerate config decides; auto: bf16 "
                   "where a cached probe finds it faster on this device, fp16 on GPUs without bf16, else fp32)."
    )
    peak_flops: float | None = help_field(
        None, help="Device peak FLOP/s for MFU (null: measured once by a matmul probe and cached)."
    )
    # Objectives and regularisation (docs/optim.md)
    objective: Literal["causal", "mlm"] = help_field(
        "causal", help="causal: next-token LM; mlm: masked LM for encoder configs (BERT/RoBERTa), 80/10/10 masking.")
    mlm_probability: float = help_field(0.15, help="mlm: fraction of non-special tokens chosen for prediction.")
    mask_token: str = help_field("[MASK]", help="mlm: added as a special token when the tokenizer has no mask token.")
    label_smoothing: float = help_field(0.0, help="Label smoothing ε of the training loss (validation loss stays plain CE).")
    dropout: DropoutConfig = nested(DropoutConfig)
    ema: EMAConfig = nested(EMAConfig)
    curriculum: CurriculumConfig = nested(CurriculumConfig)
    early_stopping: EarlyStoppingConfig = nested(EarlyStoppingConfig)

    def problems(self) -> list[str]:
        out = []
        if self.max_steps <= 0:
            out.append(f"max_steps: must be > 0, got {self.max_steps}")
        if self.per_device_train_batch_size <= 0:
            out.append("per_device_train_batch_size: must be > 0")
        if self.gradient_accumulation_steps <= 0:
            out.append("gradient_accumulation_steps: must be > 0")
        if self.stop_at_step is not None and not 0 < self.stop_at_step <= self.max_steps:
            out.append("stop_at_step: must be in (0, max_steps]")
        if not 0 <= self.label_smoothing < 1:
            out.append("label_smoothing: must be in [0, 1)")
        if not 0 < self.mlm_probability < 1:
            out.append("mlm_probability: must be in (0, 1)")
        return out


@dataclasses.dataclass
class EvalConfig:
    eval_every: int = help_field(50, help="Evaluate every N optimizer steps (and at the end); 0: only at the end.")
    per_device_eval_batch_size: int = help_field(8, help="Eval micro-batch size on each device.")
    max_eval_batches: int | None = help_field(None, help="Cap on eval batches per device (null: the whole validation set).")

    def problems(self) -> list[str]:
        out = ["eval_every: must be >= 0"] if self.eval_every < 0 else []
        if self.per_device_eval_batch_size < 1:
            out.append("per_device_eval_batch_size: must be >= 1")
        if self.max_eval_batches is not None and self.max_eval_batches < 1:
            out.append("max_eval_batches: must be >= 1, or null for the whole validation set")
        return out


@dataclasses.dataclass
class CheckpointConfig:
    save_every: int = help_field(100, help="Save a resumable checkpoint every N steps (0: only the final model).")
    keep_last: int = help_field(2, help="Keep the newest K checkpoints; older ones are deleted.")

    def problems(self) -> list[str]:
        out = []
        if self.save_every < 0:
            out.append("save_every: must be >= 0")
        if self.keep_last < 1:
            out.append("keep_last: must be >= 1")
        return out


@dataclasses.dataclass
class LogConfig:
    log_every: int = help_field(10, help="Log train metrics every N optimizer steps.")
    trackers: list[str] = help_field(["tensorboard"], help="accelerate trackers (tensorboard, wandb, ...); skipped when not installed.")
    project_name: str = help_field("lmforge", help="Tracker project / run name.")

    def problems(self) -> list[str]:
        return ["log_every: must be > 0"] if self.log_every <= 0 else []


@dataclasses.dataclass
class TrainingRecipe(RunConfig):
    """The groups ``train.loop.run`` reads; each training stage's ``Config`` adds its own (model, data, ...)."""

    optim: OptimConfig = nested(OptimConfig)
    schedule: ScheduleConfig = nested(ScheduleConfig)
    train: TrainConfig = nested(TrainConfig)
    eval: EvalConfig = nested(EvalConfig)
    checkpoint: CheckpointConfig = nested(CheckpointConfig)
    log: LogConfig = nested(LogConfig)

    def pretrain_only_problems(self) -> list[str]:
        """For stages other than pretrain: the ``train.*`` keys only the pretraining objective reads, refused
        when set (a stage that ignored them would silently train something else)."""
        tc = self.train
        pretrain_only = {
            "train.objective": tc.objective != "causal", "train.label_smoothing": tc.label_smoothing != 0,
            "train.curriculum.min_length": tc.curriculum.min_length is not None,
            "train.dropout": any(v is not None for v in (tc.dropout.embedding, tc.dropout.attention, tc.dropout.hidden)),
        }
        return [f"{key}: not used by {self.STAGE} (a pretrain setting); remove it from the recipe"
                for key, is_set in pretrain_only.items() if is_set]

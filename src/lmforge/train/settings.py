"""Recipe groups shared by every training stage (pretrain, finetune, distill): train, eval, checkpoint, log,
and :class:`TrainingRecipe`, the top level every training stage's recipe starts from."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from lmforge.config import RunConfig, help_field, nested
from lmforge.optim.optimizers import OptimConfig
from lmforge.optim.schedules import ScheduleConfig
from lmforge.train.adversarial import AdversarialConfig
from lmforge.train.ema import EMAConfig
from lmforge.train.malloc import MAX_KB as MAX_MMAP_THRESHOLD_KB
from lmforge.train.regularize import CurriculumConfig, DropoutConfig, EarlyStoppingConfig
from lmforge.train.robust import GradNoiseConfig, StochasticDepthConfig


@dataclasses.dataclass
class TrainConfig:
    per_device_train_batch_size: int = help_field(8, help="Micro-batch size on each device.")
    gradient_accumulation_steps: int = help_field(1, help="Micro-batches per optimizer step (loss normalised over all their tokens).")
    max_tokens_per_batch: int | None = help_field(
        None, help="finetune (SFT, classification): fill each micro-batch to this many padded tokens instead of "
                   "per_device_train_batch_size examples (length-grouped; the loss stays normalised over real tokens).")
    max_steps: int = help_field(100, help="Optimizer steps in the whole run (the schedule spans these).")
    stop_at_step: int | None = help_field(
        None, help="Stop after this step (checkpointing first) but keep the max_steps schedule: for time-boxed jobs; resume=auto continues."
    )
    gradient_checkpointing: bool = help_field(False, help="Recompute activations in backward to save memory.")
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] | None = help_field(
        "auto", help="auto: bf16 where a cached probe finds it faster on this device (CUDA with bf16, a CPU with "
                     "AVX512-BF16/AMX), fp16 on GPUs without bf16, else fp32; bf16/fp16 named by the accelerate "
                     "config win over the probe. no/bf16/fp16: exactly that. null: the accelerate config decides."
    )
    peak_flops: float | None = help_field(
        None, help="Device peak FLOP/s for MFU (null: measured once by a matmul probe, for the dtype used, and cached)."
    )
    # Speed (docs/performance.md)
    compile: bool = help_field(False, help="torch.compile the model (in place: checkpoint keys stay as saved by plain "
                                           "transformers); the first steps pay the compilation.")
    loss_impl: Literal["logits", "fused_linear_ce"] = help_field(
        "logits", help="fused_linear_ce: the LM head and cross-entropy computed chunk by chunk in training, so the "
                       "(tokens x vocab) logits never exist whole (large vocabularies); causal pretrain and SFT.")
    loss_chunk_tokens: int | None = help_field(
        None, help="fused_linear_ce: tokens per chunk (null: as many as fit a 64 MiB fp32 (chunk x vocab) buffer).")
    malloc_mmap_threshold_kb: int | None = help_field(
        None, help="Linux/glibc: fix the allocator's mmap threshold (KiB; 128 = glibc's start value) so freed large "
                   "tensors go back to the system: lower peak RSS on CPU, a few % slower. null: glibc's own "
                   "(dynamic) threshold. Same as MALLOC_MMAP_THRESHOLD_ in the environment.")
    profile: bool = help_field(False, help="Write a torch.profiler trace of a few steps to output_dir/profile "
                                           "(TensorBoard / chrome://tracing), and a CUDA memory snapshot on GPUs.")
    profile_steps: int = help_field(3, help="profile: steps recorded (after 1 skipped and 1 warm-up step).")
    activation_offload: bool = help_field(
        False, help="Keep the activations saved for backward in CPU memory during the forward "
                    "(torch.autograd.graph.save_on_cpu): GPU memory for transfer time. No effect on a CPU-only run.")
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
    grad_noise: GradNoiseConfig = nested(GradNoiseConfig)
    stochastic_depth: StochasticDepthConfig = nested(StochasticDepthConfig)
    adversarial: AdversarialConfig = nested(AdversarialConfig)

    def problems(self) -> list[str]:
        out = []
        if self.max_steps <= 0:
            out.append(f"max_steps: must be > 0, got {self.max_steps}")
        if self.per_device_train_batch_size <= 0:
            out.append("per_device_train_batch_size: must be > 0")
        if self.gradient_accumulation_steps <= 0:
            out.append("gradient_accumulation_steps: must be > 0")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 8:
            out.append("max_tokens_per_batch: must be >= 8 (padded tokens per micro-batch), or null for fixed-size batches")
        if self.stop_at_step is not None and not 0 < self.stop_at_step <= self.max_steps:
            out.append("stop_at_step: must be in (0, max_steps]")
        if not 0 <= self.label_smoothing < 1:
            out.append("label_smoothing: must be in [0, 1)")
        if not 0 < self.mlm_probability < 1:
            out.append("mlm_probability: must be in (0, 1)")
        if self.loss_impl == "fused_linear_ce" and self.objective == "mlm":
            out.append("loss_impl: fused_linear_ce is for causal LMs (a masked-LM head transforms the hidden states "
                       "before its decoder); use loss_impl: logits with objective: mlm")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 1:
            out.append("loss_chunk_tokens: must be >= 1, or null to size chunks automatically")
        if self.malloc_mmap_threshold_kb is not None and not 0 <= self.malloc_mmap_threshold_kb <= MAX_MMAP_THRESHOLD_KB:
            out.append(f"malloc_mmap_threshold_kb: must be in [0, {MAX_MMAP_THRESHOLD_KB}] (glibc's limit is 32 MiB), got "
                       f"{self.malloc_mmap_threshold_kb}; or null to leave the allocator alone")
        if self.profile_steps < 1:
            out.append("profile_steps: must be >= 1")
        return out


@dataclasses.dataclass
class EvalConfig:
    eval_every: int = help_field(50, help="Evaluate every N optimizer steps (and at the end); 0: only at the end.")
    per_device_eval_batch_size: int = help_field(8, help="Eval micro-batch size on each device.")
    max_eval_batches: int | None = help_field(None, help="Cap on eval batches per device (null: the whole validation set).")
    harness_tasks: list[str] = help_field(
        [], help="lm-evaluation-harness tasks run at every evaluation (main process, the unwrapped model); their "
                 "scores join the eval rows as harness/<task>/<metric>. Local task YAMLs: harness_include_path.")
    harness_include_path: str | None = help_field(None, help="harness_tasks: a folder of lm-eval task YAMLs of your own.")
    harness_limit: float | None = help_field(None, help="harness_tasks: examples per task (an int) or a fraction (< 1).")
    harness_num_fewshot: int | None = help_field(None, help="harness_tasks: few-shot examples (null: each task's own).")

    def problems(self) -> list[str]:
        out = ["eval_every: must be >= 0"] if self.eval_every < 0 else []
        if self.harness_include_path and not Path(self.harness_include_path).is_dir():
            out.append(f"harness_include_path: '{self.harness_include_path}' is not a folder of lm-eval task YAMLs")
        if self.harness_limit is not None and not self.harness_limit > 0:
            out.append("harness_limit: must be > 0 (a count, or a fraction below 1), or null for every example")
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
    grad_flow_every: int = help_field(0, help="Every N steps log each block's gradient norm, update/weight ratio and "
                                               "activation RMS (metrics.jsonl, grad_flow.png heatmaps); 0: off.")
    trackers: list[str] = help_field(["tensorboard"], help="accelerate trackers (tensorboard, wandb, ...); skipped when not installed.")
    project_name: str = help_field("lmforge", help="Tracker project / run name.")

    def problems(self) -> list[str]:
        out = ["log_every: must be > 0"] if self.log_every <= 0 else []
        if self.grad_flow_every < 0:
            out.append("grad_flow_every: must be >= 0 (0: off)")
        return out


@dataclasses.dataclass
class TrainingRecipe(RunConfig):
    """The groups ``train.loop.run`` reads; each training stage's ``Config`` adds its own (model, data, ...)."""

    optim: OptimConfig = nested(OptimConfig)
    schedule: ScheduleConfig = nested(ScheduleConfig)
    train: TrainConfig = nested(TrainConfig)
    eval: EvalConfig = nested(EvalConfig)
    checkpoint: CheckpointConfig = nested(CheckpointConfig)
    log: LogConfig = nested(LogConfig)

    def problems(self) -> list[str]:
        out = super().problems()
        if self.train.max_tokens_per_batch is not None and getattr(self, "STAGE", None) != "finetune":
            out.append(f"train.max_tokens_per_batch: only read by finetune (SFT and classification batches), not "
                       f"{getattr(self, 'STAGE', 'this stage')}; remove it")
        if self.schedule.name == "plateau" and self.eval.eval_every <= 0:
            out.append("schedule.name: plateau reduces the lr on the validation loss, so it needs eval.eval_every > 0 "
                       "(patience counts evaluations)")
        return out

    def pretrain_only_problems(self) -> list[str]:
        """For stages other than pretrain: the ``train.*`` keys only the pretraining objective reads, refused
        when set (a stage that ignored them would silently train something else)."""
        tc = self.train
        pretrain_only = {
            "train.objective": tc.objective != "causal", "train.label_smoothing": tc.label_smoothing != 0,
            "train.curriculum.min_length": tc.curriculum.min_length is not None,
            "train.dropout": any(v is not None for v in (tc.dropout.embedding, tc.dropout.attention, tc.dropout.hidden)),
        }
        out = [f"{key}: not used by {self.STAGE} (a pretrain setting); remove it from the recipe"
               for key, is_set in pretrain_only.items() if is_set]
        if tc.loss_impl != "logits" and self.STAGE in self.NO_FUSED_LOSS:
            out.append(f"train.loss_impl: {tc.loss_impl} is not used by {self.STAGE} ({self.NO_FUSED_LOSS[self.STAGE]}); "
                       "remove it from the recipe")
        return out

    # stages whose losses do not go through the model's own LM head + cross-entropy
    NO_FUSED_LOSS = {"quantize": "QAT fake-quantizes the head"}

"""`lmforge distill RECIPE.yaml`: train a smaller causal LM (the student) to match a frozen teacher.

    recipe -> tokenizer (the teacher's) -> packed blocks or SFT records -> teacher (frozen) -> student
           -> [sequence: the teacher's completions] -> KD task -> train.loop.run -> output_dir/final (a plain student)

The loss per loss token is ``alpha_ce * CE(labels) + weight_kd * KD(teacher || student)
[+ hidden_weight * hidden-state distance]`` (``lmforge.train.kd_task.KD``; the divergences are
``lmforge.train.kd``). Validation reports the student's plain CE on the real labels, so its loss and
perplexity compare directly with a pretrain run or a CE-only control (``distill.weight_kd=0``).

``data.kind``:
  blocks  packed pretraining blocks (``data.path`` or ``data.train_files`` + ``block_size``, as pretrain reads
          them); every token is a loss token.
  sft     prompt/completion or chat records with the keys finetune's ``data`` has (``train_files``,
          ``chat_template``, ``max_seq_length``, ...): padded rows whose labels are -100 on the prompt, so the
          CE and the KD terms are both taken on completion tokens only and normalised by their count over the
          global batch, as the SFT task is. (``packing`` is refused for now.)

``distill.mode``:
  live       the teacher runs beside the student on every micro-batch (any ``distill.kl``, hidden states).
  cached     one pass of the teacher over the training blocks first writes its top-k log-probabilities
             (+ the log-mass of the rest) to ``distill.cache_dir`` as a ``datasets`` folder; training then
             reads them with the blocks and never loads the teacher (forward KL, ``kd.sparse_forward_kl``).
             The cache is fingerprinted (teacher files, training blocks, top_k, temperature, vocab) and a
             cache made for anything else is refused. Blocks only.
  sequence   sequence-level KD (Kim & Rush, 2016), SFT data: the teacher first writes its own completions
             of the training prompts (``distill.sampling``: max_new_tokens, do_sample, temperature, top_p,
             num_return_sequences, batch_size; seeded by ``seed``) to ``distill.sequence_dir`` (default
             ``<output_dir>/kd_sequences``), a ``datasets.load_from_disk`` folder with columns prompt,
             completion, prompt_ids, completion_ids, source_row, sample. It is generated on the main process
             (the other ranks wait and read it), fingerprinted (teacher files, prompts, sampling settings,
             vocab), reused when it matches and refused when made for anything else. The student then trains
             on prompt + teacher completion with the SFT loss (``alpha_ce``) plus, when ``weight_kd`` > 0 or
             ``hidden`` is set, KD to the live teacher on the same completion tokens; with neither the teacher
             is let go once the completions exist. Validation stays on the data's own completions.
  on_policy  on-policy KD as GKD (Agarwal et al., 2023), SFT data: on a fraction lambda
             (``distill.on_policy_fraction``) of the optimizer steps, chosen by a coin seeded with (seed, step)
             so reruns and resumes pick the same steps, the student samples completions for the batch's
             prompts (``train.kd_generate.OnPolicyBatches``: the unwrapped student, eval mode, no_grad, then
             back to train), the teacher scores prompt + those completions and the loss is ``weight_kd`` * KD on
             the student's tokens (no CE on its own samples); the other steps train on the data's completions
             (``alpha_ce`` * CE + ``weight_kd`` * KD). The batch is built before the loop counts its loss tokens,
             so the normalisation counts the generated tokens. ``summary.json`` lists the on-policy steps.

``student``: ``init: teacher_layers`` (every ``every_k``-th teacher block, DistilBERT style), or
``config: {model_type: ...}`` (fresh), or ``name_or_path`` (pretrained). Its tokenizer defaults to the
teacher's; another one must map every id to the same token (``kd.check_same_tokenizer``). Logits are
compared over the vocabulary rows both models have (``kd.shared_vocab_size``, padded rows trimmed), and
generation never emits an id past them.

The teacher is frozen (``requires_grad=False``), in eval mode, on the accelerator's device and never
given to ``acc.prepare`` (so it is never in a checkpoint): under DDP / ZeRO-1/2 each rank holds a replica.
Under ZeRO-3 it gets a DeepSpeed engine of its own (``shard_teacher``: stage 3, no optimizer), so its
parameters are partitioned across ranks like the student's and gathered block by block in its forward;
it is loaded already partitioned (``deepspeed.zero.Init``) unless something needs its full weights first
(``student.init: teacher_layers``, a cache or sequence pass on the main process), in which case each rank
loads it whole once and the engine then partitions it. Under FSDP it is wrapped in FSDP per decoder block
(inference only). On-policy mode, whose student generates in its own process, is refused there.

Hidden-state loss (``distill.hidden: mse | cosine``): when the widths differ a learned projection
(student width -> teacher width) trains with the student. It is a submodule of the student named
``kd_projection`` so that DDP syncs it and the optimizer, clipping and checkpoints include it, and it
is listed in ``_keys_to_ignore_on_save`` so ``final/`` stays a plain student; it is saved beside it as
``output_dir/kd_projection.safetensors``.

Outputs in ``output_dir``: ``final/`` (``AutoModelForCausalLM.from_pretrained``-loadable, tokenizer,
recipe, ``distill.json``), ``metrics.jsonl`` (train rows: the combined loss), ``distill_metrics.jsonl``
(per logged step: ce per token it was taken on, kd and hidden per loss token; on_policy: the on-policy
tokens too), ``summary.json`` (plus a ``distill`` section: settings, the last parts, the teacher's
validation loss when it trained live, the SFT data counts, the sequence folder, the on-policy steps),
``checkpoints/``, ``training_curves.png``; mode sequence: ``kd_sequences/`` unless ``sequence_dir`` is set.
Bad input is one line each (``UserError``, exit 2), before any training: a generating mode on blocks, a
folder made for another teacher / data / settings, sampling settings out of range (or prompts + max_new_tokens
past the generating model's positions), ``on_policy_fraction`` outside [0, 1], a key only another mode reads.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import hashlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from lmforge.config import UserError, help_field, nested, only_for
from lmforge.datasets.batching import IGNORE_INDEX, LengthGroupedBatches, RankBatches
from lmforge.datasets.lm import LMDataConfig, build_lm_datasets
from lmforge.datasets.sft import SFTCollator, SFTDataConfig, build_sft_datasets, describe_stats
from lmforge.models import ModelConfig, load_causal_lm, torch_dtype
from lmforge.train import checkpoint, loop
from lmforge.train.accel import is_deepspeed, is_sharded, set_train_mode
from lmforge.train.evaluate import evaluate
from lmforge.train.kd import (
    SOFT_TARGET_KINDS,
    check_same_tokenizer,
    layer_map,
    make_projection,
    shared_vocab_size,
    student_from_teacher_layers,
    topk_logprobs,
)
from lmforge.train.kd_generate import (
    SEQUENCE_META,
    OnPolicyBatches,
    SamplingConfig,
    build_sequences,
    prompt_ids,
    prompts_fingerprint,
    sequence_rows,
)
from lmforge.train.kd_task import CACHE_COLUMNS, KD, KDParts
from lmforge.train.save import gathered_parameters
from lmforge.train.settings import TrainingRecipe
from lmforge.train.tasks import fused_head

log = logging.getLogger("lmforge")

PROJECTION = "kd_projection"  # the student submodule holding the hidden-state projection (never in final/)
CACHE_META = "kd_cache.json"  # the fingerprint file inside a top-k cache folder
DEFAULT_BETA, DEFAULT_SKEW_ALPHA, DEFAULT_TOP_K, DEFAULT_ON_POLICY_FRACTION = 0.5, 0.1, 32, 0.5
GENERATING_MODES = ("sequence", "on_policy")  # the modes that generate completions for the data's prompts


# ---------------------------------------------------------------------------------------------
# Recipe


def _looks_local(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (./x, /x, a/b/c, ~) is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


@dataclasses.dataclass
class TeacherConfig:
    name_or_path: str | None = help_field(None, help="The teacher: a model folder (e.g. outputs/tiny/pretrain/final) or hub id (required).")
    tokenizer: str | None = help_field(None, help="Its tokenizer (default: name_or_path); the student's defaults to this one.")
    dtype: Literal["float32", "bfloat16"] = help_field("float32", help="dtype the teacher is loaded in (it only runs forwards).")
    trust_remote_code: bool = help_field(False, help="Allow model code from the hub; only for models you trust.")
    attn_implementation: str | None = help_field(None, help="'sdpa', 'eager', ... (default: transformers' choice).")

    def problems(self) -> list[str]:
        out = []
        if not self.name_or_path:
            out.append("name_or_path: required: the teacher model folder (e.g. outputs/tiny/pretrain/final) or hub id")
        elif _looks_local(self.name_or_path) and not Path(self.name_or_path).exists():
            out.append(f"name_or_path: '{self.name_or_path}' does not exist; give an existing model folder (make pretrain "
                       "writes outputs/tiny/pretrain/final) or a hub id")
        if self.tokenizer and _looks_local(self.tokenizer) and not Path(self.tokenizer).exists():
            out.append(f"tokenizer: '{self.tokenizer}' does not exist; give a tokenizer folder or a hub id")
        return out


@dataclasses.dataclass
class StudentConfig:
    init: Literal["teacher_layers"] | None = help_field(
        None, help="teacher_layers: a copy of the teacher keeping every every_k-th block (null: config or name_or_path).")
    every_k: int | None = help_field(None, help="init teacher_layers: keep teacher blocks 0, k, 2k, ... (default 2).")
    config: dict[str, Any] = help_field({}, help="Build a fresh student: {model_type: llama, hidden_size: ..., ...}.")
    name_or_path: str | None = help_field(None, help="A pretrained student: model folder or hub id.")
    tokenizer: str | None = help_field(None, help="Tokenizer (default: name_or_path's, else the teacher's); must equal the teacher's.")
    dtype: Literal["float32", "bfloat16", "float16"] = help_field("float32", help="The student's weights' dtype.")
    trust_remote_code: bool = help_field(False, help="Allow model code from the hub; only for models you trust.")
    attn_implementation: str | None = help_field(None, help="'sdpa', 'eager', ... (default: transformers' choice).")

    def problems(self) -> list[str]:
        out = []
        given = [k for k, v in (("init", self.init), ("config", self.config), ("name_or_path", self.name_or_path)) if v]
        if len(given) != 1:
            out.append("init / config / name_or_path: give exactly one (init: teacher_layers, a config to build from, "
                       f"or a model to load){'; got ' + ', '.join(given) if given else ''}")
        if self.every_k is not None and self.init != "teacher_layers":
            out.append("every_k: only read by init teacher_layers; remove it")
        if self.every_k is not None and self.every_k < 1:
            out.append(f"every_k: must be >= 1, got {self.every_k}")
        if self.config and "model_type" not in self.config:
            out.append("config.model_type: required when building from a config (e.g. llama)")
        if self.name_or_path and _looks_local(self.name_or_path) and not Path(self.name_or_path).exists():
            out.append(f"name_or_path: '{self.name_or_path}' does not exist; give an existing model folder or a hub id")
        if self.tokenizer and _looks_local(self.tokenizer) and not Path(self.tokenizer).exists():
            out.append(f"tokenizer: '{self.tokenizer}' does not exist; give a tokenizer folder or a hub id")
        return out


KLKind = Literal["forward", "reverse", "symmetric", "jsd", "skew", "skew_reverse"]
assert set(KLKind.__args__) == set(SOFT_TARGET_KINDS)  # the recipe offers exactly what kd.py computes


@dataclasses.dataclass
class DistillConfig:
    mode: Literal["live", "cached", "sequence", "on_policy"] = help_field(
        "live", help="live: the teacher runs every step; cached: its top-k log-probs are written once and read back; "
                     "sequence: the student learns the teacher's own completions; on_policy: KD on the student's samples.")
    kl: KLKind = help_field("forward", help="Soft-target divergence: forward, reverse, symmetric, jsd, skew, skew_reverse (cached: forward).")
    temperature: float = help_field(1.0, help="Softmax temperature T of both sides; the KD term is scaled by T**2.")
    alpha_ce: float = help_field(0.5, help="Weight of the hard-label cross-entropy (0: pure distillation).")
    weight_kd: float = help_field(0.5, help="Weight of the soft-target divergence (0: a CE-only control run, no teacher forward).")
    beta: float | None = help_field(None, help=f"kl jsd: the mixture weight beta in [0, 1] (default {DEFAULT_BETA}).")
    skew_alpha: float | None = help_field(None, help=f"kl skew / skew_reverse: the skew alpha in [0, 1] (default {DEFAULT_SKEW_ALPHA}).")
    hidden: Literal["mse", "cosine"] | None = help_field(None, help="Hidden-state loss between mapped layers (live mode; null: none).")
    hidden_weight: float | None = help_field(None, help="hidden: its weight (default 1.0).")
    layer_map: list[list[int]] | None = help_field(
        None, help="hidden: [[student, teacher], ...] indices into hidden_states (0 = embeddings, i = block i); null: uniform map.")
    top_k: int | None = help_field(None, help=f"mode cached: teacher tokens kept per position (default {DEFAULT_TOP_K}).")
    cache_dir: str | None = help_field(None, help="mode cached: the top-k cache folder (default <output_dir>/kd_cache; reused when it matches).")
    sequence_dir: str | None = help_field(
        None, help="mode sequence: the teacher's completions (default <output_dir>/kd_sequences; reused when it matches).")
    on_policy_fraction: float | None = help_field(
        None, help=f"mode on_policy: the fraction lambda in [0, 1] of steps trained on the student's own samples "
                   f"(default {DEFAULT_ON_POLICY_FRACTION}).")
    sampling: SamplingConfig = nested(SamplingConfig)

    def problems(self) -> list[str]:
        out = []
        if not self.temperature > 0:
            out.append(f"temperature: must be > 0, got {self.temperature}")
        for key in ("alpha_ce", "weight_kd", "hidden_weight"):
            v = getattr(self, key)
            if v is not None and v < 0:
                out.append(f"{key}: must be >= 0, got {v}")
        if self.alpha_ce == 0 and self.weight_kd == 0 and self.hidden is None:
            out.append("alpha_ce / weight_kd: both 0 leaves nothing to train; set one > 0")
        if self.beta is not None:
            if self.kl != "jsd":
                out.append(f"beta: only read by kl jsd, not '{self.kl}'; remove it")
            elif not 0 <= self.beta <= 1:
                out.append(f"beta: must be in [0, 1], got {self.beta}")
        if self.skew_alpha is not None:
            if self.kl not in ("skew", "skew_reverse"):
                out.append(f"skew_alpha: only read by kl skew / skew_reverse, not '{self.kl}'; remove it")
            elif not 0 <= self.skew_alpha <= 1:
                out.append(f"skew_alpha: must be in [0, 1], got {self.skew_alpha}")
        if self.hidden is None:
            out += [f"{key}: only read with hidden mse / cosine, not null; remove it or set distill.hidden"
                    for key in ("hidden_weight", "layer_map") if getattr(self, key) is not None]
        for pair in self.layer_map or []:
            if len(pair) != 2:
                out.append(f"layer_map: {pair} is not a [student, teacher] pair")
        if self.mode == "cached":
            if self.kl != "forward":
                out.append(f"kl: mode cached trains forward KL against the top-k targets, not '{self.kl}'; "
                           "set distill.kl=forward or distill.mode=live")
            if self.hidden is not None:
                out.append("hidden: needs the teacher's hidden states, which mode cached does not keep; use distill.mode=live")
            if self.top_k is not None and self.top_k < 1:
                out.append(f"top_k: must be >= 1, got {self.top_k}")
        out += only_for(self, self.mode, {"top_k": ("cached",), "cache_dir": ("cached",), "sequence_dir": ("sequence",),
                                          "on_policy_fraction": ("on_policy",)}, "mode")
        out += ["sampling." + p for p in only_for(
            self.sampling, self.mode, {"max_new_tokens": GENERATING_MODES, "do_sample": GENERATING_MODES,
                                       "temperature": GENERATING_MODES, "top_p": GENERATING_MODES,
                                       "num_return_sequences": ("sequence",), "batch_size": ("sequence",)}, "mode")]
        if self.on_policy_fraction is not None and not 0 <= self.on_policy_fraction <= 1:
            out.append(f"on_policy_fraction: must be in [0, 1], got {self.on_policy_fraction}")
        if self.mode == "on_policy" and self.weight_kd == 0:
            out.append("weight_kd: mode on_policy trains the KD term on the student's own samples (no CE there); "
                       "set distill.weight_kd > 0")
        return out


@dataclasses.dataclass
class DistillDataConfig(LMDataConfig, SFTDataConfig):
    """``data``: packed pretraining blocks (kind blocks, the keys of ``datasets.lm``) or SFT records (kind sft,
    the keys of finetune's ``data``: prompt/completion or chat records, loss on the completions only)."""

    train_files: list[str] = help_field([], help="Local files or globs: raw text/JSONL/Parquet/CSV (kind blocks) or JSONL records (kind sft).")
    validation_files: list[str] = help_field([], help="Held-out files; default: validation_ratio of the documents (blocks) or records (sft).")
    validation_ratio: float = help_field(0.05, help="Fraction of documents / records held out when validation_files is empty.")
    kind: Literal["blocks", "sft"] = help_field(
        "blocks", help="blocks: packed pretraining blocks (path or train_files + block_size); sft: prompt/completion or "
                       "chat records as finetune reads them (loss on completions only; needed by sequence and on_policy).")

    # keys one kind reads and the other does not (the rest -- files, validation split, num_proc -- both read)
    READERS: ClassVar[dict[str, tuple[str, ...]]] = {
        "path": ("blocks",), "block_size": ("blocks",),
        **{key: ("sft",) for key in ("prompt_key", "completion_key", "messages_key", "label_key", "chat_template",
                                     "max_seq_length", "completion_only_loss", "packing", "group_by_length")}}

    def problems(self) -> list[str]:
        out = LMDataConfig.problems(self) if self.kind == "blocks" else SFTDataConfig.problems(self)
        out += only_for(self, self.kind, self.READERS, "kind")
        if self.kind == "sft" and self.packing:
            out.append("packing: not supported by distill yet (the teacher would need the block-diagonal masks finetune "
                       "checks); set data.packing=false (length-grouped batches are used)")
        return out

    @property
    def seq_len(self) -> int:
        """Tokens per training row at most (FLOPs per token)."""
        return self.block_size if self.kind == "blocks" else self.max_seq_length


@dataclasses.dataclass
class Config(TrainingRecipe):
    STAGE: ClassVar[str] = "distill"
    teacher: TeacherConfig = nested(TeacherConfig)
    student: StudentConfig = nested(StudentConfig)
    data: DistillDataConfig = nested(DistillDataConfig)
    distill: DistillConfig = nested(DistillConfig)

    def problems(self) -> list[str]:
        out = super().problems()
        out += self.pretrain_only_problems()
        mode, kind = self.distill.mode, self.data.kind
        if mode in GENERATING_MODES and kind != "sft":
            out.append(f"distill.mode: {mode} generates completions for the data's prompts, and data.kind {kind} "
                       "(packed pretraining blocks) has no prompts; set data.kind=sft with prompt/completion or chat records")
        if mode in GENERATING_MODES and kind == "sft" and not self.data.completion_only_loss:
            out.append(f"data.completion_only_loss: mode {mode} splits each record into prompt and completion at its "
                       "first trained token; set data.completion_only_loss=true")
        if mode == "cached" and kind != "blocks":
            out.append(f"distill.mode: cached stores top-k targets for packed blocks, not data.kind {kind}; "
                       "use distill.mode live, sequence or on_policy for SFT data")
        return out


# ---------------------------------------------------------------------------------------------
# Loading


def _load_tokenizer(name: str, trust_remote_code: bool, key: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{key}: cannot load a tokenizer from '{name}' ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _from_pretrained(name: str, key: str, dtype: str, trust_remote_code: bool, attn: str | None):
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn:
        kw["attn_implementation"] = attn
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"{key}: cannot load '{name}' as a causal LM ({str(e).splitlines()[0]})") from None


def load_teacher(cfg: TeacherConfig, device) -> torch.nn.Module:
    """The frozen teacher: eval mode, no gradients, on ``device``; never prepared by accelerate."""
    teacher = _from_pretrained(cfg.name_or_path, "teacher.name_or_path", cfg.dtype, cfg.trust_remote_code,
                               cfg.attn_implementation)
    teacher.requires_grad_(False)
    return teacher.eval().to(device)


@contextlib.contextmanager
def _whole_model_loading(acc, whole: bool):
    """Under ZeRO-3 with ``zero3_init_flag``, ``from_pretrained`` creates partitioned parameters; ``whole``
    switches that off for one load (the model's full weights are read before it is sharded).

    accelerate's ``zero3_init_context_manager(enable=False)`` re-registers a stage-3 ``HfDeepSpeedConfig``,
    which transformers still reads as "ZeRO-3 on", so the global that transformers checks is unset here and
    put back afterwards."""
    plugin = acc.state.deepspeed_plugin
    if not (whole and plugin is not None and plugin.zero_stage == 3):
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if ref is not None and ref() is not None:
            hf_deepspeed.set_hf_deepspeed_config(ref())


def shard_teacher(acc, teacher: torch.nn.Module, micro_batch: int) -> torch.nn.Module:
    """The frozen teacher sharded like the student, for inference only.

    ZeRO-3: a DeepSpeed engine of its own from the layout's ZeRO settings (stage 3, parameter offload kept,
    no optimizer, no optimizer offload; the "auto" bucket sizes filled from the width as accelerate does
    for the student), so every rank holds 1/N of it and gathers each block for its forward. All ranks
    run the teacher on every micro-batch, as ZeRO-3's collective gathers require. FSDP: one FSDP unit
    per decoder block (FSDP2's ``fully_shard`` when the layout asks for version 2). Neither is given to
    ``acc.prepare``, so checkpoints never hold the teacher.
    """
    ds_plugin = acc.state.deepspeed_plugin
    if ds_plugin is not None:
        import deepspeed

        zero = {k: v for k, v in copy.deepcopy(ds_plugin.deepspeed_config.get("zero_optimization", {})).items()
                if k != "offload_optimizer"}
        width = hidden_width(teacher.config)
        for key, value in (("reduce_bucket_size", width * width), ("stage3_prefetch_bucket_size", int(0.9 * width * width)),
                           ("stage3_param_persistence_threshold", 10 * width)):
            if zero.get(key, "auto") == "auto":
                zero[key] = value
        bf16 = next(teacher.parameters()).dtype == torch.bfloat16
        config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
                  "zero_optimization": {**zero, "stage": 3}, "bf16": {"enabled": bf16}, "fp16": {"enabled": False},
                  "wall_clock_breakdown": False}
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        set_train_mode(engine, False)  # DeepSpeedEngine.eval returns None and leaves engine.training True
        return engine
    from lmforge.train.kd import _find_layers

    _, blocks = _find_layers(teacher)
    fsdp = acc.state.fsdp_plugin
    if getattr(fsdp, "fsdp_version", 1) == 2:
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(teacher)
        return teacher.eval()
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FullyShardedDataParallel(teacher, auto_wrap_policy=ModuleWrapPolicy({type(blocks[0])}),
                                    sharding_strategy=fsdp.sharding_strategy, device_id=acc.device,
                                    use_orig_params=True).eval()


def _fraction_held(teacher: torch.nn.Module | None) -> float | None:
    """The share of the teacher's parameter elements this rank stores: 1.0 for a replica, ~1/N for ZeRO-3."""
    if teacher is None:
        return None
    held = full = 0
    for p in teacher.parameters():
        full += int(getattr(p, "ds_numel", p.numel()))
        held += int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
    return round(held / max(full, 1), 4)


def _teacher_hf_config(cfg: TeacherConfig):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"teacher.name_or_path: cannot read a model config from '{cfg.name_or_path}' "
                        f"({str(e).splitlines()[0]})") from None


def _text_config(hf_config):
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def n_layers(hf_config) -> int:
    c = _text_config(hf_config)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(c, attr, None), int):
            return getattr(c, attr)
    raise UserError(f"distill: cannot tell how many layers a {type(c).__name__} has")


def hidden_width(hf_config) -> int:
    c = _text_config(hf_config)
    for attr in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(c, attr, None), int):
            return getattr(c, attr)
    raise UserError(f"distill: cannot tell the hidden width of a {type(c).__name__}")


def vocab_rows(model: torch.nn.Module) -> int:
    """Columns of the model's logits (the LM head's rows, padding included)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return getattr(head.weight, "ds_shape", head.weight.shape)[0]  # ZeRO-3 partitioned: the full shape
    return _text_config(model.config).vocab_size


def build_student(cfg: StudentConfig, tokenizer, teacher: torch.nn.Module | None) -> torch.nn.Module:
    if cfg.init == "teacher_layers":
        student = student_from_teacher_layers(teacher, cfg.every_k or 2)
        student.to(torch_dtype(cfg.dtype))
    elif cfg.config:
        mc = ModelConfig(config=cfg.config, tokenizer="-", dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                         attn_implementation=cfg.attn_implementation)
        try:
            student = load_causal_lm(mc, tokenizer)
        except UserError as e:
            raise UserError([p.replace("model.", "student.", 1) for p in e.problems]) from None
    else:
        student = _from_pretrained(cfg.name_or_path, "student.name_or_path", cfg.dtype, cfg.trust_remote_code,
                                   cfg.attn_implementation)
    student.requires_grad_(True)
    return student.train()


def attach_projection(student: torch.nn.Module, projection: torch.nn.Module) -> None:
    """Make the projection a student submodule (optimized, synced, checkpointed) that save_pretrained skips."""
    p = next(student.parameters())
    student.add_module(PROJECTION, projection.to(device=p.device, dtype=p.dtype))
    keys = set(getattr(student, "_keys_to_ignore_on_save", None) or ())
    keys.update(f"{PROJECTION}.{name}" for name, _ in projection.named_parameters())
    student._keys_to_ignore_on_save = keys


# ---------------------------------------------------------------------------------------------
# The top-k cache


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)


def teacher_fingerprint(cfg: TeacherConfig) -> dict[str, str]:
    """{'path', 'hash'}: sha256 over the teacher's config.json and every weight file (contents), and its dtype."""
    path = Path(cfg.name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(cfg.name_or_path, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    files = sorted(p for p in path.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise UserError(f"teacher.name_or_path: '{path}' holds no weight files (*.safetensors, *.bin)")
    h = hashlib.sha256(f"dtype={cfg.dtype}".encode())
    for p in files:
        h.update(p.name.encode())
        _hash_file(h, p)
    return {"path": str(path.resolve()), "hash": h.hexdigest()}


def data_fingerprint(train_ds) -> str:
    """sha256 of the training blocks' token ids, in order (the cache rows are aligned with them)."""
    import numpy as np

    table = train_ds.with_format(None).flatten_indices().data if getattr(train_ds, "_indices", None) is not None \
        else train_ds.data
    col = table.column("input_ids")
    h = hashlib.sha256(f"rows={len(train_ds)}".encode())
    for chunk in col.chunks:
        h.update(np.ascontiguousarray(chunk.flatten().to_numpy(zero_copy_only=False).astype(np.int64)).tobytes())
    return h.hexdigest()


def cache_fingerprint(cfg: Config, train_ds, vocab: int) -> dict[str, Any]:
    return {"teacher": teacher_fingerprint(cfg.teacher), "data": data_fingerprint(train_ds),
            "top_k": cfg.distill.top_k or DEFAULT_TOP_K, "temperature": cfg.distill.temperature, "vocab": vocab,
            "rows": len(train_ds), "block_size": len(train_ds[0]["input_ids"])}


def cache_path(cfg: Config) -> Path:
    return Path(cfg.distill.cache_dir) if cfg.distill.cache_dir else Path(cfg.output_dir) / "kd_cache"


CACHE_NAMES = {"teacher": "teacher", "data": "training data", "rows": "training data", "block_size": "data.block_size",
               "top_k": "distill.top_k", "temperature": "distill.temperature", "vocab": "vocabulary"}


def cache_state(folder: Path, fingerprint: dict[str, Any]) -> str:
    """'ok' (a matching top-k cache), 'absent' (build it); a one-line UserError for any other folder."""
    return folder_state(folder, fingerprint, "distill.cache_dir", CACHE_META, "top-k cache", CACHE_NAMES, "blocks")


def folder_state(folder: Path, fingerprint: dict[str, Any], key: str, meta: str, holds: str, names: dict[str, str],
                 rows: str) -> str:
    """'ok' when ``folder`` was made for ``fingerprint``, 'absent' when missing or empty; otherwise a one-line
    UserError naming what differs (``names``: fingerprint key -> the recipe key or thing it comes from;
    ``rows``: what the data rows are, for the message)."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return "absent"
    meta_file = folder / meta
    if not meta_file.is_file():
        raise UserError(f"{key}: '{folder}' exists but holds no {holds} ({meta}); remove it or point {key} at another folder")
    made = json.loads(meta_file.read_text()).get("fingerprint", {})
    diff, seen = [], set()
    for name, what in names.items():
        if made.get(name) != fingerprint[name] and what not in seen:
            seen.add(what)
            mine, theirs = fingerprint[name], made.get(name)
            if name == "teacher":
                mine, theirs = mine["path"], (theirs or {}).get("path")
                if mine == theirs:
                    mine, theirs = "these weights", "other weights"
            elif name in ("data", "rows"):
                mine, theirs = f"these {rows}", f"other {rows}"
            diff.append(f"{what} ({theirs} there, {mine} here)")
    if diff:
        raise UserError(f"{key}: '{folder}' was made for another {'; '.join(diff)}; delete it or set {key} to a new folder")
    return "ok"


@torch.inference_mode()
def build_cache(folder: Path, teacher, train_ds, fingerprint: dict[str, Any], batch_size: int, device) -> None:
    """One teacher pass over the training blocks in order: top-k log-probs per position -> ``folder``
    (a ``save_to_disk`` dataset with columns kd_values, kd_indices, kd_rest, and ``kd_cache.json``).
    Written to ``folder.tmp`` and renamed when complete."""
    import datasets
    import numpy as np
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    k, temperature, vocab = fingerprint["top_k"], fingerprint["temperature"], fingerprint["vocab"]
    tmp, scratch = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".scratch")
    for p in (tmp, scratch):
        if p.exists():
            shutil.rmtree(p)
    scratch.mkdir(parents=True)

    def fixed(arr: np.ndarray) -> pa.Array:  # (rows, d1, ..., dn) -> nested fixed-size lists
        out = pa.array(np.ascontiguousarray(arr).reshape(-1))
        for width in reversed(arr.shape[1:]):
            out = pa.FixedSizeListArray.from_arrays(out, width)
        return out

    writer = ArrowWriter(path=str(scratch / "rows.arrow"))
    ids_all = train_ds.with_format("torch")
    for start in tqdm(range(0, len(train_ds), batch_size), desc="teacher top-k cache"):
        ids = ids_all[start:start + batch_size]["input_ids"].to(device)  # (b, seq)
        logits = teacher(input_ids=ids, use_cache=False).logits[..., :vocab]  # (b, seq, vocab)
        values, indices, rest = topk_logprobs(logits, k, temperature)  # (b, seq, k) x2, (b, seq)
        writer.write_table(pa.Table.from_arrays(
            [fixed(values.cpu().numpy()), fixed(indices.int().cpu().numpy()), fixed(rest.cpu().numpy())],
            names=list(CACHE_COLUMNS)))
    writer.finalize()
    ds = datasets.Dataset.from_file(str(scratch / "rows.arrow"))
    ds.save_to_disk(str(tmp))
    del ds
    (tmp / CACHE_META).write_text(json.dumps({"fingerprint": fingerprint}, indent=1))
    shutil.rmtree(scratch)
    if folder.exists():
        shutil.rmtree(folder)  # only an empty folder reaches here (cache_state)
    tmp.rename(folder)


def load_cache(folder: Path):
    import datasets

    return datasets.load_from_disk(str(folder))


def with_cache(train_ds, cache):
    """The training blocks with their cached targets as extra columns (row i <-> block i)."""
    import datasets

    if len(cache) != len(train_ds):
        raise UserError(f"distill.cache_dir: the cache has {len(cache)} rows for {len(train_ds)} training blocks; delete it")
    blocks = train_ds.with_format(None).select_columns(["input_ids"])
    return datasets.concatenate_datasets([blocks, cache.select_columns(list(CACHE_COLUMNS))], axis=1).with_format("torch")


# ---------------------------------------------------------------------------------------------
# SFT data, sequence-level KD, on-policy batches


def load_data(cfg: Config, tokenizer) -> tuple[Any, Any, dict[str, Any] | None]:
    """(train, validation, stats): packed blocks (kind blocks, no stats) or SFT rows with completion-only
    labels (kind sft); the generating modes keep only rows with a prompt to generate from."""
    if cfg.data.kind == "blocks":
        return (*build_lm_datasets(cfg.data, tokenizer, cfg.seed), None)
    train_ds, val_ds, stats = build_sft_datasets(cfg.data, tokenizer, cfg.seed)
    if cfg.distill.mode in GENERATING_MODES:
        keep = [i for i, labels in enumerate(train_ds["labels"]) if labels and labels[0] == IGNORE_INDEX]  # a prompt first
        stats["train"]["dropped_no_prompt"] = len(train_ds) - len(keep)
        if not keep:
            raise UserError(f"data.train_files: no training record has a prompt before its completion, and distill.mode "
                            f"{cfg.distill.mode} generates completions for prompts; give prompt/completion or chat records")
        if len(keep) < len(train_ds):
            log.warning("distill: %d training records have no prompt tokens; mode %s skips them",
                        len(train_ds) - len(keep), cfg.distill.mode)
            train_ds = train_ds.select(keep)
    return train_ds, val_ds, stats


SEQUENCE_NAMES = {"teacher": "teacher", "data": "training data", "rows": "training data",
                  **{k: f"distill.sampling.{k}" for k in ("max_new_tokens", "do_sample", "temperature", "top_p",
                                                          "num_return_sequences", "batch_size")},
                  "seed": "seed", "vocab": "vocabulary"}


def sequence_fingerprint(cfg: Config, prompts: list[list[int]], vocab: int) -> dict[str, Any]:
    """What the teacher's completions depend on: its weights, the prompts, the sampling settings (with
    do_sample: the seed and the generate batch size too, which the draws depend on) and the vocabulary."""
    sp = cfg.distill.sampling
    sampled = sp.do_sample
    return {"teacher": teacher_fingerprint(cfg.teacher), "data": prompts_fingerprint(prompts), "rows": len(prompts),
            "max_new_tokens": sp.max_new_tokens, "do_sample": sampled, "temperature": sp.temperature if sampled else None,
            "top_p": sp.top_p if sampled else None, "num_return_sequences": sp.num_return_sequences,
            "batch_size": sp.batch_size if sampled else None, "seed": cfg.seed if sampled else None, "vocab": vocab}


def sequence_path(cfg: Config) -> Path:
    return Path(cfg.distill.sequence_dir) if cfg.distill.sequence_dir else Path(cfg.output_dir) / "kd_sequences"


def sequence_state(folder: Path, fingerprint: dict[str, Any]) -> str:
    return folder_state(folder, fingerprint, "distill.sequence_dir", SEQUENCE_META, "teacher completions", SEQUENCE_NAMES,
                        "prompts")


def teacher_sequences(cfg: Config, acc, teacher, train_ds, tokenizer, vocab: int):
    """Sequence-level KD data: the teacher's completions of the training prompts, generated once on the main
    process (the others wait, then read the folder), reused when the folder matches. Returns (the rows to
    train on, provenance)."""
    import datasets

    folder = sequence_path(cfg)
    prompts = [prompt_ids(r) for r in train_ds.with_format(None)]
    with acc.main_process_first():
        fingerprint = sequence_fingerprint(cfg, prompts, vocab)
        state = sequence_state(folder, fingerprint)
        if state == "absent":
            gen = teacher if teacher is not None else load_teacher(cfg.teacher, acc.device)
            log.info("distill: writing the teacher's completions of %d prompts to %s", len(prompts), folder)
            build_sequences(folder, gen, prompts, tokenizer, cfg.distill.sampling, fingerprint, cfg.seed, vocab,
                            progress=acc.is_local_main_process)
            del gen
        sequences = datasets.load_from_disk(str(folder))
    rows = sequence_rows(sequences, cfg.data.max_seq_length)
    info = {"sequence_dir": str(folder), "reused": state == "ok", "rows": len(rows), "prompts": len(prompts),
            "teacher_hash": fingerprint["teacher"]["hash"], "data_hash": fingerprint["data"]}
    return rows, info


def check_generation_fits(cfg: Config, train_ds, hf_config, who: str) -> None:
    """One line when the longest prompt plus max_new_tokens passes the generating model's positions (GPT-2
    fails with an IndexError there, RoPE models generate past the range they were trained on)."""
    c = _text_config(hf_config)
    limit = next((getattr(c, k) for k in ("max_position_embeddings", "n_positions", "max_seq_len") if getattr(c, k, None)),
                 None)
    longest = max((next(i for i, t in enumerate(labels) if t != IGNORE_INDEX) for labels in train_ds["labels"]), default=0)
    new = cfg.distill.sampling.max_new_tokens
    if limit is not None and longest + new > limit:
        raise UserError(f"distill.sampling.max_new_tokens: the longest prompt ({longest} tokens) plus {new} new tokens passes "
                        f"the {who}'s {limit} positions; lower distill.sampling.max_new_tokens or data.max_seq_length")


def sft_batches(cfg: Config, acc, train_ds, collate, student, tokenizer, vocab: int):
    """The batch source for SFT rows: length-grouped (data.group_by_length) or the loop's default (None);
    mode on_policy wraps it so that a seeded fraction of the steps samples the student's own completions."""
    tc = cfg.train
    grouped = cfg.data.group_by_length
    if cfg.distill.mode != "on_policy":
        return LengthGroupedBatches(train_ds, tc.per_device_train_batch_size, collate, cfg.seed, acc.process_index,
                                    acc.num_processes) if grouped else None
    base = (LengthGroupedBatches if grouped else RankBatches)(
        train_ds, tc.per_device_train_batch_size, collate, cfg.seed, acc.process_index, acc.num_processes)
    fraction = cfg.distill.on_policy_fraction
    return OnPolicyBatches(base, student, collate, fraction=DEFAULT_ON_POLICY_FRACTION if fraction is None else fraction,
                           seed=cfg.seed, gradient_accumulation_steps=tc.gradient_accumulation_steps,
                           sampling=cfg.distill.sampling, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                           max_length=cfg.data.max_seq_length, vocab=vocab, rank=acc.process_index)


# ---------------------------------------------------------------------------------------------
# The stage


def _resume_step(cfg: Config) -> int:
    """The step loop.run will resume from (the same rule as the loop), for the per-part log."""
    root = Path(cfg.output_dir) / "checkpoints"
    path = checkpoint.latest(root) if cfg.resume == "auto" else None if cfg.resume == "none" else Path(cfg.resume)
    if path is None or not (path / checkpoint.LOOP_STATE).is_file():
        return 0
    return int(json.loads((path / checkpoint.LOOP_STATE).read_text())["step"])


def main(cfg: Config) -> loop.RunResult:
    return train(cfg)[0]


def train(cfg: Config) -> tuple[loop.RunResult, torch.nn.Module, Any]:
    """The whole stage; returns (result, trained student, tokenizer) for tests."""
    acc = loop.setup(cfg)
    d, t, s = cfg.distill, cfg.teacher, cfg.student
    sharded = is_sharded(acc)
    if sharded and d.mode == "on_policy":
        raise UserError("distill.mode: on_policy generates with the student in each process, which ZeRO-3 / FSDP shard; "
                        "use mode live or sequence there, or a ddp / multi_cpu / deepspeed_zero1/2 layout")

    # ---- tokenizer: the teacher's; the student's own must be identical ----
    t_tok_name = t.tokenizer or t.name_or_path
    tokenizer = _load_tokenizer(t_tok_name, t.trust_remote_code, "teacher.tokenizer" if t.tokenizer else "teacher.name_or_path")
    s_tok_name = s.tokenizer or s.name_or_path or t_tok_name
    if s_tok_name != t_tok_name:
        student_tok = _load_tokenizer(s_tok_name, s.trust_remote_code, "student.tokenizer" if s.tokenizer else "student.name_or_path")
        check_same_tokenizer(student_tok, tokenizer)

    # ---- data: packed blocks or SFT records (completion-only labels) ----
    with acc.main_process_first():
        train_ds, val_ds, data_stats = load_data(cfg, tokenizer)
    if data_stats is not None and acc.is_main_process:
        print(f"data: {describe_stats(data_stats)}")

    # ---- teacher (whenever training or the student's init reads it) and student ----
    # sequence mode reads the teacher for its completions (loaded then, unless kept) and trains with it only for KD
    teacher_trains = d.mode in ("live", "on_policy") or (d.mode == "sequence" and (d.weight_kd > 0 or d.hidden is not None))
    t_config = _teacher_hf_config(t)
    # under ZeRO-3 the teacher loads already partitioned unless its full weights are read before training
    whole = s.init == "teacher_layers" or d.mode in ("cached", "sequence")
    with _whole_model_loading(acc, whole):
        teacher = load_teacher(t, acc.device) if teacher_trains or s.init == "teacher_layers" else None
    student = build_student(s, tokenizer, teacher)
    n_student, n_teacher = n_layers(student.config), n_layers(t_config)
    t_rows = vocab_rows(teacher) if teacher is not None else _text_config(t_config).vocab_size
    vocab = shared_vocab_size(vocab_rows(student), t_rows, len(tokenizer))
    pairs = layer_map(n_student, n_teacher, [tuple(p) for p in d.layer_map] if d.layer_map else None) if d.hidden else []
    projection = None
    if d.hidden:
        projection = make_projection(hidden_width(student.config), hidden_width(t_config))
        if projection is not None:
            attach_projection(student, projection)

    # ---- cached mode: the teacher's top-k targets, built once, then no teacher ----
    cache_info = None
    if d.mode == "cached":
        folder = cache_path(cfg)
        with acc.main_process_first():
            fingerprint = cache_fingerprint(cfg, train_ds, vocab)
            state = cache_state(folder, fingerprint)
            if state == "absent":
                if teacher is None:
                    with _whole_model_loading(acc, True):
                        teacher = load_teacher(t, acc.device)
                log.info("distill: writing the teacher's top-%d cache to %s", fingerprint["top_k"], folder)
                build_cache(folder, teacher, train_ds, fingerprint, cfg.eval.per_device_eval_batch_size, acc.device)
            cache = load_cache(folder)
        train_ds = with_cache(train_ds, cache)
        cache_info = {"cache_dir": str(folder), "reused": state == "ok", "top_k": fingerprint["top_k"],
                      "teacher_hash": fingerprint["teacher"]["hash"], "data_hash": fingerprint["data"]}

    # ---- sequence mode: the teacher's own completions of the prompts, generated once ----
    sequence_info = None
    if d.mode in GENERATING_MODES:
        check_generation_fits(cfg, train_ds, t_config if d.mode == "sequence" else student.config,
                              "teacher" if d.mode == "sequence" else "student")
    if d.mode == "sequence":
        train_ds, sequence_info = teacher_sequences(cfg, acc, teacher, train_ds, tokenizer, vocab)
    if not teacher_trains and teacher is not None:
        teacher = None  # training never touches it
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if sharded and teacher is not None:
        teacher = shard_teacher(acc, teacher, cfg.train.per_device_train_batch_size)
    if acc.is_main_process:
        print(f"distill ({d.mode}, kl {d.kl}, T={d.temperature}, data {cfg.data.kind}): teacher {n_teacher} layers -> "
              f"student {n_student} layers; vocab {vocab}" + (f"; hidden {d.hidden} on {len(pairs)} layer pairs" if d.hidden else "")
              + (", with a projection" if projection is not None else ""))

    # ---- the task, the batches and the loop ----
    parts = KDParts(cfg.train.gradient_accumulation_steps, cfg.log.log_every, cfg.train.stop_at_step or cfg.train.max_steps,
                    _resume_step(cfg))
    sft = cfg.data.kind == "sft"
    collate = SFTCollator(tokenizer.pad_token_id) if sft else None
    task = KD(teacher, seq_len=cfg.data.seq_len, vocab=vocab, kind=d.kl, temperature=d.temperature,
              alpha_ce=d.alpha_ce, weight_kd=d.weight_kd, beta=DEFAULT_BETA if d.beta is None else d.beta,
              skew_alpha=DEFAULT_SKEW_ALPHA if d.skew_alpha is None else d.skew_alpha, hidden=d.hidden,
              hidden_weight=1.0 if d.hidden_weight is None else d.hidden_weight, layer_pairs=pairs,
              projection=projection, cached=d.mode == "cached", parts=parts, fused=fused_head(cfg.train),
              **({"collate": collate, "eval_collate": collate} if sft else {}))
    batches = sft_batches(cfg, acc, train_ds, collate, student, tokenizer, vocab) if sft else None
    provenance = {"teacher": t.name_or_path, "teacher_layers": n_teacher, "student_layers": n_student,
                  "student_init": s.init or ("config" if s.config else "pretrained"), "vocab": vocab,
                  "data_kind": cfg.data.kind, **dataclasses.asdict(d), "layer_pairs": pairs, "cache": cache_info,
                  "sequences": sequence_info,
                  "teacher_engine": type(teacher).__name__ if teacher is not None else None,
                  "teacher_fraction_held": _fraction_held(teacher)}
    result = loop.run(acc, cfg, student, task, train_ds, val_ds, tokenizer=tokenizer, batches=batches, end_training=False,
                      extra_files={"distill.json": json.dumps(provenance, indent=1)})

    # ---- the parts of the loss, the teacher's own validation loss, the projection ----
    rows = _part_rows(acc, parts, on_policy=d.mode == "on_policy")
    teacher_eval = None
    if teacher is not None and val_ds is not None:
        teacher_eval = evaluate(acc, teacher, val_ds, task, cfg.eval.per_device_eval_batch_size, cfg.eval.max_eval_batches)
    on_policy = None
    if isinstance(batches, OnPolicyBatches):
        start = parts.start_step
        on_policy = {"fraction": batches.fraction, "steps": batches.generated, "count": len(batches.generated),
                     "of": result.step - start, "first_step": start + 1}
    out = result.output_dir
    projection_weight = None
    if projection is not None:  # ZeRO-3 partitions it with the student: gather it (collective) before saving
        with gathered_parameters([projection.weight]) if sharded and is_deepspeed(acc) else contextlib.nullcontext():
            projection_weight = projection.weight.detach().float().cpu().clone()
    if acc.is_main_process:
        _write_part_rows(out / "distill_metrics.jsonl", rows, parts.start_step)
        if projection is not None:
            from safetensors.torch import save_file

            save_file({"weight": projection_weight.contiguous()}, str(out / "kd_projection.safetensors"),
                      metadata={"student_width": str(projection.in_features), "teacher_width": str(projection.out_features)})
        summary_path = out / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        summary["distill"] = {**provenance, "last": rows[-1] if rows else None, "teacher_eval": teacher_eval,
                              "projection": "kd_projection.safetensors" if projection is not None else None,
                              "data": data_stats, "on_policy": on_policy}
        summary_path.write_text(json.dumps(summary, indent=1))
    acc.wait_for_everyone()
    acc.end_training()

    if acc.is_main_process:
        last = rows[-1] if rows else {}
        print(f"\ndistill done: {result.step} steps, train loss {result.train_loss:.4f}"
              + (f" (ce {last['ce']:.4f}, kd {last['kd']:.4f}" + (f", hidden {last['hidden']:.4f}" if d.hidden else "") + ")"
                 if last else "")
              + (f", eval CE {result.eval['loss']:.4f} (ppl {result.eval['perplexity']:.2f})" if result.eval else "")
              + (f"; teacher eval CE {teacher_eval['loss']:.4f}" if teacher_eval else "")
              + (f"; on-policy steps {on_policy['count']} of {on_policy['of']}" if on_policy else ""))
        print(f"  student: {result.final_dir}")
        print(f"  metrics: {out / 'metrics.jsonl'}, {out / 'distill_metrics.jsonl'}")
    return result, student, tokenizer


def _part_rows(acc, parts: KDParts, on_policy: bool = False) -> list[dict[str, float]]:
    """Per logged step: kd, hidden per loss token and ce per token it was taken on (all but on-policy
    tokens; NaN when none) over the whole global batch window (all ranks); on_policy: its token count."""
    if not parts.rows:
        return []
    sums = acc.reduce(torch.stack([r for _, r in parts.rows]).to(acc.device), reduction="sum").cpu()  # (rows, 5)
    out = []
    for (step, _), v in zip(parts.rows, sums):
        row = {"step": step, "ce": float(v[0] / v[4]) if v[4] > 0 else float("nan"), "kd": float(v[1] / v[3].clamp_min(1)),
               "hidden": float(v[2] / v[3].clamp_min(1)), "tokens": float(v[3])}
        if on_policy:
            row["on_policy_tokens"] = float(v[3] - v[4])
        out.append(row)
    return out


def _write_part_rows(path: Path, rows: list[dict[str, float]], start_step: int) -> None:
    kept = []
    if start_step and path.exists():  # a resumed run: keep the rows up to the checkpoint
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
    lines = kept + [json.dumps({k: (v if math.isfinite(v) else None) if isinstance(v, float) else v for k, v in r.items()})
                    for r in rows]
    path.write_text("\n".join(lines) + ("\n" if lines else ""))

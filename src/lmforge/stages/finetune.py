"""`lmforge finetune RECIPE.yaml`: adapt a pretrained model with one PEFT method (or fully).

    recipe -> tokenizer -> SFT / classification data -> base model -> peft method -> train.loop.run -> final/

``task: sft`` trains a causal LM on prompt/completion or chat records, loss on the completion (assistant)
tokens only; ``task: classification`` trains ``AutoModelForSequenceClassification`` on text/label
records and reports accuracy and macro-F1 on the validation split. ``peft.method`` picks a row of the
method table in ``lmforge.peft.methods`` (lora, dora, qlora, prefix, prompt, ia3, adapter, full, or
any peft method by name).

Outputs in ``output_dir``: ``final/`` (the adapter alone: ``adapter_model.safetensors`` +
``adapter_config.json``, loadable with ``PeftModel.from_pretrained(base, final)``; the whole model for
``full``), the tokenizer and recipe beside it, ``metrics.jsonl``, ``summary.json`` (trainable vs total
parameters, data counts, classification metrics), ``training_curves.png``.
``lmforge export RECIPE.yaml`` (or ``export.merge=true``) merges LoRA/DoRA/IA3 into the base and saves a
plain model; ``lmforge generate DIR --prompt ...`` samples from either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, ClassVar, Literal

import torch

from lmforge.config import ConfigError, UserError, help_field, nested
from lmforge.datasets.batching import LengthGroupedBatches, MixtureBatches, TokenBudgetBatches
from lmforge.datasets.sft import (
    ClassificationCollator,
    SFTCollator,
    SFTDataConfig,
    build_classification_datasets,
    build_sft_datasets,
    describe_stats,
    mixing_probabilities,
    pack_examples,
)
from lmforge.models import ModelConfig, bnb_4bit_config, load_pretrained, load_tokenizer
from lmforge.peft.merge import export
from lmforge.peft.methods import (
    MERGEABLE_HINT,
    PeftSettings,
    apply_method,
    method_for,
    param_groups,
    parameter_counts,
    peft_config_for,
)
from lmforge.train import loop
from lmforge.train.accel import is_deepspeed, is_sharded
from lmforge.train.evaluate import evaluate
from lmforge.train.settings import TrainingRecipe
from lmforge.train.tasks import SFT, Classification, fused_head

log = logging.getLogger("lmforge")


# ---------------------------------------------------------------------------------------------
# Recipe


@dataclasses.dataclass
class ExportConfig:
    merge: bool = help_field(False, help="After training, merge the adapter into the base and save a plain model (lora, dora, qlora, ia3, ...).")
    output_dir: str | None = help_field(None, help="Where the merged model goes (default: <output_dir>/merged).")
    dtype: Literal["float32", "bfloat16", "float16"] = help_field("float32", help="dtype of the merged model's weights.")


@dataclasses.dataclass
class Config(TrainingRecipe):
    STAGE: ClassVar[str] = "finetune"
    task: Literal["sft", "classification"] = help_field("sft", help="sft (causal LM on completions) or classification (sequence classification).")
    model: ModelConfig = nested(ModelConfig)
    data: SFTDataConfig = nested(SFTDataConfig)
    peft: PeftSettings = nested(PeftSettings)
    export: ExportConfig = nested(ExportConfig)

    def problems(self) -> list[str]:
        out = super().problems()
        if not self.model.name_or_path:
            out.append("model.name_or_path: required for finetune: the base model folder (e.g. outputs/tiny/pretrain/final) or hub id")
        m = method_for(self.peft.method)
        if self.data.tasks and (self.task == "classification" or self.data.packing or self.train.max_tokens_per_batch):
            what = ("task: classification (each source has its own label set)" if self.task == "classification"
                    else "data.packing" if self.data.packing else "train.max_tokens_per_batch")
            out.append(f"data.tasks: multi-task mixing is for SFT with fixed-size batches; not with {what}")
        if self.train.max_tokens_per_batch is not None and self.data.packing:
            out.append("train.max_tokens_per_batch: packed rows are already full; set data.packing=false to batch by "
                       "a token budget, or remove max_tokens_per_batch")
        if self.data.packing and self.task == "classification":
            out.append("data.packing: only for task: sft; set data.packing=false")
        if self.data.packing and m.prompt_learning:
            out.append(f"data.packing: peft.method={self.peft.method} prepends virtual tokens to every row, which packed "
                       "examples cannot share; set data.packing=false (length-grouped batching is used instead)")
        if self.train.loss_impl == "fused_linear_ce" and (self.task == "classification" or m.prompt_learning):
            what = "task: classification has no LM head" if self.task == "classification" else \
                f"peft.method={self.peft.method} prepends virtual tokens the head must see"
            out.append(f"train.loss_impl: fused_linear_ce is for SFT through the model's own LM head ({what}); "
                       "use train.loss_impl: logits")
        # train.* keys the pretraining objective reads but fine-tuning does not: refuse rather than ignore.
        out += self.pretrain_only_problems()
        if self.export.merge and not m.mergeable:
            out.append(f"export.merge: peft.method={self.peft.method} has nothing to merge into the base weights; "
                       f"merge works for {MERGEABLE_HINT}")
        return out


# ---------------------------------------------------------------------------------------------
# The stage


def main(cfg: Config) -> loop.RunResult:
    return train(cfg)[0]


def train(cfg: Config) -> tuple[loop.RunResult, torch.nn.Module, Any]:
    """The whole stage; returns (result, trained model, tokenizer) for tests and benchmarks."""
    # ---- setup: accelerator first (ZeRO-3 must exist before weights are created) ----
    acc = loop.setup(cfg)
    method = method_for(cfg.peft.method)
    if method.kbit and is_deepspeed(acc):
        raise UserError("peft.method: qlora is not supported under DeepSpeed here; use accelerate_configs/ddp.yaml "
                        "or multi_cpu.yaml (the 4-bit base already fits where ZeRO would be needed)")
    tokenizer = load_tokenizer(cfg.model)

    # ---- data: tokenized records with completion-only labels (or class ids) ----
    label_names, mixture, eval_parts = None, None, None
    with acc.main_process_first():
        if cfg.task == "classification":
            train_ds, val_ds, label_names, stats = build_classification_datasets(cfg.data, tokenizer, cfg.seed)
            task = Classification(len(label_names), cfg.data.max_seq_length, collate=ClassificationCollator(tokenizer.pad_token_id))
        elif cfg.data.tasks:  # multi-task SFT: one model or adapter for all, rows mixed per task
            from datasets import concatenate_datasets

            parts = [(name, weight, *build_sft_datasets(tcfg, tokenizer, cfg.seed))
                     for name, weight, tcfg in cfg.data.task_configs()]
            mixture = [p[2] for p in parts]
            probs = mixing_probabilities([len(d) for d in mixture], [p[1] for p in parts], cfg.data.mixing_temperature)
            train_ds = concatenate_datasets(mixture)
            eval_parts = {name: va for name, _, _, va, _ in parts if va is not None and len(va)}
            val_ds = concatenate_datasets(list(eval_parts.values())) if eval_parts else None
            stats = parts[0][4]
            log.info("data.tasks: %s", ", ".join(f"{name} {len(d)} examples, p={pr:.3f}"
                                                 for (name, *_), d, pr in zip(parts, mixture, probs, strict=True)))
            task = SFT(tokenizer.pad_token_id, cfg.data.max_seq_length, collate=SFTCollator(tokenizer.pad_token_id),
                       fused=fused_head(cfg.train))
        else:
            train_ds, val_ds, stats = build_sft_datasets(cfg.data, tokenizer, cfg.seed)
            task = SFT(tokenizer.pad_token_id, cfg.data.max_seq_length, collate=SFTCollator(tokenizer.pad_token_id),
                       fused=fused_head(cfg.train))
    if acc.is_main_process:
        print(f"data: {describe_stats(stats)}")

    # ---- model: pretrained base (4-bit for qlora) + the PEFT method ----
    p = cfg.peft
    quant = bnb_4bit_config(p.bnb_4bit_quant_type, p.bnb_4bit_use_double_quant, p.bnb_4bit_compute_dtype) if method.kbit else None
    model = load_pretrained(cfg.model, tokenizer, task=cfg.task, label_names=label_names, quantization_config=quant,
                            device=acc.device)
    model = apply_method(cfg, model, tokenizer)
    counts = parameter_counts(model)
    log.info("peft.method=%s: %d trainable of %d parameters (%.4f%%)", method.name, counts["trainable"], counts["total"],
             counts["trainable_percent"])
    if acc.is_main_process:
        print(f"{method.name}: trainable params {counts['trainable']:,} of {counts['total']:,} ({counts['trainable_percent']:.4f}%)")

    # ---- batches: packed rows, length-grouped, or fixed order ----
    batches, batching = None, "fixed"
    packing = cfg.task == "sft" and cfg.data.packing
    if packing and not packing_supported(model, acc):
        packing = False
        log.warning("data.packing: this %s model attends across packed examples (it ignores restarting position_ids); "
                    "using length-grouped batches instead", model.config.model_type)
    if packing:
        train_ds = pack_examples(train_ds, cfg.data.max_seq_length)
        batching = f"packed ({len(train_ds)} rows of <= {cfg.data.max_seq_length} tokens)"
        log.info("packing: %s", batching)
    elif mixture is not None:
        batches = MixtureBatches(mixture, probs, cfg.train.per_device_train_batch_size, task.collate, cfg.seed,
                                 acc.process_index)
        batching = "multi-task mixture"
    elif cfg.train.max_tokens_per_batch:
        batches = TokenBudgetBatches(train_ds, cfg.train.max_tokens_per_batch, task.collate, cfg.seed,
                                     acc.process_index, acc.num_processes)
        batching = f"token budget ({cfg.train.max_tokens_per_batch} padded tokens per micro-batch)"
        log.info("batches: %s, %d per epoch per rank", batching, batches.per_epoch)
    elif cfg.data.group_by_length or cfg.data.packing:
        batching = "length-grouped"
        batches = LengthGroupedBatches(train_ds, cfg.train.per_device_train_batch_size, task.collate, cfg.seed,
                                       acc.process_index, acc.num_processes)

    # ---- train: the loop saves final/ (the adapter alone for a PeftModel) when the run completes or stops early ----
    # end_training=False: the classification metrics below are a collective and still need the process group.
    extra = {"labels.json": json.dumps({"label_names": label_names}, indent=1)} if label_names else None
    result = loop.run(acc, cfg, model, task, train_ds, val_ds, tokenizer=tokenizer, param_groups=param_groups(cfg, model),
                      batches=batches, extra_files=extra, end_training=False, eval_parts=eval_parts)

    # ---- classification metrics over the whole validation set; summary ----
    cls_metrics = None
    if cfg.task == "classification" and val_ds is not None:
        full = evaluate(acc, model, val_ds, task, cfg.eval.per_device_eval_batch_size)
        cls_metrics = {k: full[k] for k in ("accuracy", "macro_f1", "examples")}
    if acc.is_main_process:
        summary_path = result.output_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        summary.update(task=cfg.task, method=method.name, parameter_counts=counts, data=stats, batching=batching)
        if cls_metrics is not None:
            summary["classification"] = cls_metrics
            result.eval.update({"macro_f1": cls_metrics["macro_f1"], "class_accuracy": cls_metrics["accuracy"]})
        summary_path.write_text(json.dumps(summary, indent=1))
    acc.wait_for_everyone()
    acc.end_training()

    if acc.is_main_process:
        print(f"\nfinetune ({method.name}, {cfg.task}) done: {result.step} steps, train loss {result.train_loss:.4f}"
              + (f", eval loss {result.eval['loss']:.4f}" if result.eval else "")
              + (f", accuracy {cls_metrics['accuracy']:.3f}, macro-F1 {cls_metrics['macro_f1']:.3f}" if cls_metrics else ""))
        print(f"  {'adapter' if method.peft_type else 'model'}: {result.final_dir}")
        print(f"  summary: {result.output_dir / 'summary.json'}")
    if cfg.export.merge and result.final_dir is not None and acc.is_main_process:
        export(cfg)
    return result, model, tokenizer


def packing_supported(model, acc) -> bool:
    """Packing relies on the model building a block-diagonal mask from restarting position_ids (transformers'
    masking utilities do, for most decoder models, when no KV cache is built): check it on two short
    sequences (a packed forward must equal the second sequence alone)."""
    if is_sharded(acc):
        return True  # parameters are sharded before prepare; trust the model family
    torch.manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    a, b = torch.randint(0, vocab, (1, 5)), torch.randint(0, vocab, (1, 7))
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        packed = model(input_ids=torch.cat([a, b], 1).to(dev),
                       position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None].to(dev), use_cache=False).logits
        alone = model(input_ids=b.to(dev)).logits
    model.train(was_training)
    return torch.allclose(packed[:, 5:].float(), alone.float(), atol=1e-3, rtol=1e-3)


def check(cfg: Config) -> None:
    """`lmforge check`: build the peft config (catches bad peft.options) without loading a model."""
    try:
        peft_config_for(cfg)
    except UserError as e:
        raise ConfigError(e.problems) from None

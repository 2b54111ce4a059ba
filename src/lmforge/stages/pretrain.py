"""`lmforge pretrain RECIPE.yaml`: train a causal language model from a config (or continue one).

    recipe -> model + tokenizer -> packed blocks -> train.loop.run -> output_dir/final

Outputs in ``output_dir``: ``final/`` (``AutoModelForCausalLM.from_pretrained``-loadable, with the
tokenizer and recipe), ``checkpoints/step_N`` (resumable), ``metrics.jsonl``,
``training_curves.png``, ``summary.json``, ``recipe.yaml`` and TensorBoard logs when installed.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from lmforge.config import nested
from lmforge.datasets.lm import LMDataConfig, build_lm_datasets, check_model_fits
from lmforge.datasets.mlm import ensure_mask_token
from lmforge.models import ModelConfig, build_model_config, load_causal_lm, load_masked_lm, load_tokenizer
from lmforge.train import loop
from lmforge.train.regularize import dropout_overrides
from lmforge.train.settings import TrainingRecipe
from lmforge.train.tasks import pretrain_task


@dataclasses.dataclass
class Config(TrainingRecipe):
    STAGE: ClassVar[str] = "pretrain"
    model: ModelConfig = nested(ModelConfig)
    data: LMDataConfig = nested(LMDataConfig)


def main(cfg: Config) -> loop.RunResult:
    # ---- setup: accelerator first (ZeRO-3 must exist before weights are created) ----
    acc = loop.setup(cfg)
    tokenizer = load_tokenizer(cfg.model)
    if cfg.train.objective == "mlm":
        ensure_mask_token(tokenizer, cfg.train.mask_token)  # causal-LM tokenizers have none: add it

    # ---- data: packed blocks (tokenized once on the main process, then read from the cache) ----
    with acc.main_process_first():
        train_ds, val_ds = build_lm_datasets(cfg.data, tokenizer, cfg.seed)

    # ---- model: fresh from config (seeded) or loaded; a masked LM for train.objective=mlm ----
    dropout = dropout_overrides(cfg.train.dropout, build_model_config(cfg.model))  # train.dropout -> config keys
    load_model = load_masked_lm if cfg.train.objective == "mlm" else load_causal_lm
    model = load_model(cfg.model, tokenizer, **dropout)
    check_model_fits(model.config, cfg.data.block_size, [train_ds, val_ds])  # positions and vocabulary

    # ---- train: the task is the objective (causal or masked LM, label smoothing); batches: MLM masks, curriculum ----
    task, batches = pretrain_task(cfg, tokenizer, train_ds, acc.process_index, acc.num_processes)
    result = loop.run(acc, cfg, model, task, train_ds, val_ds, tokenizer=tokenizer, batches=batches)
    if acc.is_main_process:
        print(f"\npretrain done: {result.step} steps, train loss {result.train_loss:.4f}"
              + (f", eval loss {result.eval['loss']:.4f} (ppl {result.eval['perplexity']:.2f})" if result.eval else ""))
        print(f"  model:   {result.final_dir}")
        print(f"  metrics: {result.output_dir / 'metrics.jsonl'}")
        print(f"  plots:   {result.output_dir / 'training_curves.png'}")
    return result


def check(cfg: Config) -> None:
    """`lmforge check RECIPE`: rules across recipe groups, without training (the schedule against the lr)."""
    from lmforge.optim.schedules import make_schedule

    noam = cfg.schedule.name == "noam" and cfg.schedule.d_model is None
    make_schedule(cfg.schedule, cfg.optim.learning_rate, cfg.train.max_steps, build_model_config(cfg.model) if noam else None)

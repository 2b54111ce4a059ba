"""Our training loop vs `transformers.Trainer`: same model, same packed data, same cores, one process.

    .venv/bin/python bench/train_throughput.py [--steps 60] [--layers 4] [--hidden 256] [--seq 256]

Both train a fresh Llama-style model (same seed, same init) for the same number of optimizer steps
with AdamW, cosine schedule and clipping, no evaluation and no checkpoints; the timer covers the
training call only (model and data are built beforehand). Prints tokens/s for each, the ratio
(ours / Trainer, higher is better) and our MFU against the measured matmul peak.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    import torch
    from accelerate.utils import set_seed
    from transformers import Trainer, TrainingArguments

    from lmforge.config import load
    from lmforge.datasets.lm import build_lm_datasets
    from lmforge.models import load_causal_lm, load_tokenizer
    from lmforge.stages import pretrain
    from lmforge.train import loop
    from lmforge.train.flops import flops_per_token, peak_flops
    from lmforge.train.tasks import CausalLM

    tmp = Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    model_keys = [
        f"model.config.hidden_size={args.hidden}", f"model.config.intermediate_size={args.hidden * 8 // 3}",
        f"model.config.num_hidden_layers={args.layers}", f"model.config.num_attention_heads={args.hidden // 64}",
        f"model.config.num_key_value_heads={args.hidden // 64}", f"model.config.max_position_embeddings={args.seq}",
    ]
    cfg = load(pretrain.Config, ROOT / "recipes/tiny/pretrain.yaml", [
        f"output_dir={tmp / 'ours'}", f"data.block_size={args.seq}", f"train.max_steps={args.steps}",
        f"train.per_device_train_batch_size={args.batch}", "eval.eval_every=0", "checkpoint.save_every=0",
        "log.trackers=[]", f"log.log_every={args.steps}", "schedule.warmup_steps=4", *model_keys,
    ])
    tok = load_tokenizer(cfg.model)
    train_ds, _ = build_lm_datasets(cfg.data, tok, cfg.seed)
    tokens = args.steps * args.batch * args.seq
    print(f"model: llama {args.layers} layers, hidden {args.hidden}, seq {args.seq}; batch {args.batch}; "
          f"{args.steps} steps; {len(train_ds)} blocks; torch threads {torch.get_num_threads()}")

    # ---- transformers.Trainer (baseline) ----
    set_seed(cfg.seed)
    model = load_causal_lm(cfg.model, tok)
    targs = TrainingArguments(
        output_dir=str(tmp / "trainer"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.adam_beta1,
        adam_beta2=cfg.optim.adam_beta2, max_grad_norm=cfg.optim.max_grad_norm, lr_scheduler_type="cosine",
        warmup_steps=4, logging_steps=args.steps, save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=cfg.seed, disable_tqdm=True,
    )
    hf_ds = train_ds.with_format(None).map(lambda b: {"labels": b["input_ids"]}, batched=True)
    trainer = Trainer(model=model, args=targs, train_dataset=hf_ds)
    t = time.perf_counter()
    trainer.train()
    t_trainer = time.perf_counter() - t
    del trainer, model

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

    # ---- lmforge loop ----
    acc = loop.setup(cfg)
    model = load_causal_lm(cfg.model, tok)
    t = time.perf_counter()
    loop.run(acc, cfg, model, CausalLM(args.seq), train_ds, None, tokenizer=tok, save_final=False)
    t_ours = time.perf_counter() - t

    n_params = sum(p.numel() for p in model.parameters())
    n_emb = model.get_input_embeddings().weight.numel()
    fpt = flops_per_token(n_params - n_emb, args.layers, args.hidden, args.seq)
    peak = peak_flops(acc.device, torch.float32)
    ours, theirs = tokens / t_ours, tokens / t_trainer
    print(f"{'':22s}{'tokens/s':>12s}{'MFU':>9s}")
    print(f"{'transformers.Trainer':22s}{theirs:12.0f}{fpt * theirs / peak:9.3f}")
    print(f"{'lmforge loop':22s}{ours:12.0f}{fpt * ours / peak:9.3f}")
    print(f"ratio lmforge/Trainer: {ours / theirs:.3f}   (peak {peak / 1e9:.1f} GFLOP/s measured by matmul probe)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

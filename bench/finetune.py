"""Fine-tuning methods side by side: trainable parameters, step time, peak memory (RSS), validation loss.

    .venv/bin/python bench/finetune.py [--steps 4] [--hidden 1024] [--layers 8] [--methods full,lora,...]
                                       [--loss-impl logits|fused_linear_ce]

Every method runs the real stage (``lmforge.stages.finetune.train`` on ``recipes/tiny/finetune_*.yaml``)
in its own process, so that each peak RSS (``VmHWM``, not ``ru_maxrss``, which a child inherits from this
parent after it built the base model) is that method's alone, on the same base
model and the same SFT fixture data, with the same batch (4 x 64 tokens) and step count. The base is a
randomly initialised Llama of ``--hidden`` x ``--layers`` (about 100M parameters by default), big enough that
full fine-tuning's AdamW state and gradients (12 bytes per parameter beside the 4 of the weights)
dominate its memory; that is the regime where the claim below is about.

Claims: LoRA's peak RSS <= 0.6 x full fine-tuning's (issue 6), and <= 0.5 x with ``--loss-impl
fused_linear_ce`` (issue 13: every method that goes through the model's LM head then uses the fused loss;
prefix and prompt tuning keep the logits). Baseline: ``full`` in the same run.
Writes ``outputs/bench/finetune/finetune_methods.{csv,md,png}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
OUT = ROOT / "outputs" / "bench" / "finetune"

# method -> (tiny recipe, overrides); learning rates as in the recipes
METHODS = {
    "full": ("finetune_full", []),
    "lora": ("finetune_lora", []),
    "dora": ("finetune_lora", ["peft.method=dora"]),
    "qlora": ("finetune_lora", ["peft.method=qlora"]),
    "prefix": ("finetune_prefix", []),
    "prompt": ("finetune_prompt", []),
    "ia3": ("finetune_ia3", []),
    "adapter": ("finetune_adapter", []),
}


def build_base(path: Path, hidden: int, layers: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (path / "config.json").exists():
        cfg = json.loads((path / "config.json").read_text())
        if cfg["hidden_size"] == hidden and cfg["num_hidden_layers"] == layers:
            return path
    import torch

    tok = AutoTokenizer.from_pretrained(str(ROOT / "tests" / "fixtures" / "tokenizer"))
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                               num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                               max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


FUSED_OK = {"full", "lora", "dora", "qlora", "ia3", "adapter"}  # prompt learning prepends virtual tokens


def run_one(method: str, base: Path, steps: int, loss_impl: str = "logits") -> dict:
    """In a child process: train ``method`` for ``steps`` and report its numbers as one JSON line."""
    from lmforge.config import load
    from lmforge.stages import finetune
    from lmforge.train.loop import peak_rss_mb

    recipe, extra = METHODS[method]
    out = OUT / "runs" / method
    cfg = load(finetune.Config, ROOT / "recipes" / "tiny" / f"{recipe}.yaml", [
        f"model.name_or_path={base}", f"output_dir={out}", "overwrite=true", f"train.max_steps={steps}",
        "train.per_device_train_batch_size=4", "data.max_seq_length=64", "data.group_by_length=false",
        "eval.eval_every=0", "eval.max_eval_batches=4", "log.log_every=1", "log.trackers=[]", "schedule.warmup_steps=0",
        *extra, *([f"train.loss_impl={loss_impl}"] if method in FUSED_OK else []),
    ])
    t0 = time.perf_counter()
    result, _, _ = finetune.train(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows if r.get("split") == "train" and r.get("step", 0) > 1 and "tokens_per_s" in r]
    tokens_per_step = 4 * 64
    summary = json.loads((out / "summary.json").read_text())
    return {
        "method": method, "trainable_params": summary["parameter_counts"]["trainable"],
        "total_params": summary["parameter_counts"]["total"],
        "trainable_percent": round(summary["parameter_counts"]["trainable_percent"], 4),
        "step_time_s": round(statistics.median(tokens_per_step / t for t in tps), 4) if tps else None,
        "peak_rss_mb": round(peak_rss_mb(), 1), "loss_impl": loss_impl if method in FUSED_OK else "logits",
        "val_loss": round(result.eval.get("loss", float("nan")), 4), "first_train_loss": result.first_train_loss,
        "wall_s": round(wall, 1),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key, title in zip(axes, ("trainable_params", "step_time_s", "peak_rss_mb", "val_loss"),
                              ("trainable parameters", "step time (s)", "peak RSS (MB)", "validation loss")):
        ax.bar(names, [r[key] or 0 for r in rows], color=["#888" if n == "full" else "#3a7" for n in names])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
        if key == "trainable_params":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--loss-impl", default="logits", choices=["logits", "fused_linear_ce"])
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    base = OUT / f"base_{args.hidden}x{args.layers}"
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, base, args.steps, args.loss_impl)), flush=True)
        return 0

    OUT.mkdir(parents=True, exist_ok=True)
    build_base(base, args.hidden, args.layers)
    rows = []
    for method in args.methods.split(","):
        print(f"== {method}", flush=True)
        r = subprocess.run([sys.executable, __file__, "--one", method, "--steps", str(args.steps), "--hidden", str(args.hidden),
                            "--layers", str(args.layers), "--loss-impl", args.loss_impl], capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if r.returncode != 0 or line is None:
            print(r.stderr[-2000:])
            raise SystemExit(f"{method} failed")
        rows.append(json.loads(line.removeprefix("RESULT ")))
        print("   ", rows[-1], flush=True)

    keys = ["method", "loss_impl", "trainable_params", "trainable_percent", "step_time_s", "peak_rss_mb", "val_loss", "wall_s"]
    with open(OUT / "finetune_methods.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    by = {r["method"]: r for r in rows}
    lines = [f"base: Llama {args.hidden} x {args.layers} layers, {rows[0]['total_params']:,} parameters; "
             f"batch 4 x 64 tokens; {args.steps} steps; CPU; loss_impl {args.loss_impl}"]
    ok = True
    if "full" in by and "lora" in by:
        ratio = by["lora"]["peak_rss_mb"] / by["full"]["peak_rss_mb"]
        target = 0.5 if args.loss_impl == "fused_linear_ce" else 0.6
        ok = ratio <= target
        lines.append(f"LoRA peak RSS / full fine-tuning peak RSS = {ratio:.2f} (claim <= {target:.2f}: {'PASS' if ok else 'FAIL'})")
    (OUT / "finetune_methods.md").write_text("\n".join(lines) + "\n\n" + "\n".join(md) + "\n")
    plot(rows, OUT / "finetune_methods.png")
    print("\n".join(md))
    print("\n".join(lines))
    print(f"written: {OUT}/finetune_methods.{{csv,md,png}}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

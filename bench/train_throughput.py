"""Our training loop vs `transformers.Trainer`: same model, same data, same cores, one process.

    .venv/bin/python bench/train_throughput.py [--steps 30] [--layers 4] [--hidden 512] [--seq 256] [--batch 8]
        [--vocab 32000] [--precision auto|no|bf16] [--compile] [--loss-impl logits|fused_linear_ce]
        [--repeats 2] [--trainer defaults|best] [--no-memory] [--mmap-threshold-kb 128]

Both train a fresh Llama-style model (same seed, same init, same synthetic token blocks: random ids
over the whole vocabulary, so a 32k vocabulary costs what it costs in real training) for the same
optimizer steps with AdamW, cosine schedule and clipping, no evaluation, no checkpoints. The runs
alternate (Trainer, ours, Trainer, ours, ...) because the machine is shared and its speed drifts.

- tokens/s: the median over steady-state steps (the first ``--warmup`` steps, which pay
  torch.compile and allocator warm-up, are left out), per run; the table shows the median of runs.
- loss: the mean training loss of the last 5 steps (the curves must agree to about 1%).
- MFU: against the measured matmul peak of the dtype each side trains in.
- peak memory: each configuration once more in a fresh subprocess, its peak RSS minus the RSS
  after the model and data were built (one process cannot give back memory between runs). Both
  subprocesses first import the same libraries (Trainer's import pulls in peft, bitsandbytes,
  torchao and dynamo; our loop pulls in deepspeed and matplotlib later, lazily), so the figure is
  the training's memory, not ~100 MB of code counted on one side only.

``--trainer best`` (default) gives Trainer its best settings on this machine: bf16 where lmforge's
precision probe finds bf16 faster, and ``torch_compile=True`` when ``--compile`` is given;
``--trainer defaults`` runs it as a user would out of the box (fp32, eager).

``--mmap-threshold-kb K`` gives ours ``train.malloc_mmap_threshold_kb: K`` (glibc's mmap threshold,
which trades a few % of speed for a lower peak RSS). The setting is process-wide, so the
interleaved speed runs all run under it (Trainer too: the speed ratio stays like for like); the
memory table shows Trainer both as shipped and with ``MALLOC_MMAP_THRESHOLD_`` set to the same value.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of tokens/s (compilation, warm-up)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--precision", default="auto", choices=["auto", "no", "bf16", "fp16"], help="ours: train.mixed_precision")
    ap.add_argument("--compile", action="store_true", help="ours: train.compile (and Trainer's torch_compile with --trainer best)")
    ap.add_argument("--loss-impl", default="logits", choices=["logits", "fused_linear_ce"], help="ours: train.loss_impl")
    ap.add_argument("--trainer", default="best", choices=["best", "defaults"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--mmap-threshold-kb", type=int, default=None, help="ours: train.malloc_mmap_threshold_kb")
    ap.add_argument("--only", choices=["ours", "trainer"], help=argparse.SUPPRESS)  # memory subprocess
    return ap.parse_args(argv)


def model_and_data(args):
    import datasets
    import torch
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, LlamaConfig

    g = torch.Generator().manual_seed(0)
    n_blocks = args.steps * args.batch
    ids = torch.randint(0, args.vocab, (n_blocks, args.seq), generator=g)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
                         num_key_value_heads=max(args.hidden // 64, 1), max_position_embeddings=args.seq)
    set_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return model, data


def import_both_sides() -> None:
    """What either side imports on its way, so that neither side's memory growth counts library code."""
    import matplotlib.pyplot  # noqa: F401  (our loop's plots)
    import transformers.trainer  # noqa: F401  (Trainer; also transformers.optimization, which our schedules use)
    from accelerate.utils import is_deepspeed_available

    import lmforge.train.loop  # noqa: F401

    if is_deepspeed_available():  # accelerate's unwrap_model imports it when installed
        import deepspeed  # noqa: F401


def trainer_precision(args) -> str:
    if args.trainer == "defaults":
        return "no"
    import torch

    from lmforge.train.precision import auto_mixed_precision

    return auto_mixed_precision("cuda" if torch.cuda.is_available() else "cpu")[0]


def run_trainer(args, tmp: Path) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, data = model_and_data(args)
    mp = trainer_precision(args)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=str(tmp / "trainer"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=3e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        lr_scheduler_type="cosine", warmup_steps=4, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=0, disable_tqdm=True,
        bf16=mp == "bf16", fp16=mp == "fp16", torch_compile=args.compile and args.trainer == "best",
    )
    hf = data.with_format(None).map(lambda b: {"labels": b["input_ids"]}, batched=True)
    trainer = Trainer(model=model, args=targs, train_dataset=hf, callbacks=[Clock()])
    base_rss = rss_mb()
    start = time.perf_counter()
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    times = [b - a for a, b in zip([start, *stamps], stamps, strict=False)]
    out = summarise(args, times, losses, mp, base_rss)
    del trainer, model
    return out


def run_ours(args, tmp: Path) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    from lmforge.config import load
    from lmforge.stages import pretrain
    from lmforge.train import loop
    from lmforge.train.tasks import CausalLM, fused_head

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    out_dir = tmp / f"ours-{time.time_ns()}"
    cfg = load(pretrain.Config, ROOT / "recipes/tiny/pretrain.yaml", [
        f"output_dir={out_dir}", f"data.block_size={args.seq}", f"train.max_steps={args.steps}",
        f"train.per_device_train_batch_size={args.batch}", "eval.eval_every=0", "checkpoint.save_every=0",
        "log.trackers=[]", "log.log_every=1", "schedule.warmup_steps=4", "schedule.min_lr=0.0", "optim.learning_rate=3e-4",
        "optim.weight_decay=0.1", "optim.max_grad_norm=1.0",
        f"train.mixed_precision={args.precision}", f"train.compile={str(args.compile).lower()}",
        f"train.loss_impl={args.loss_impl}",
        *([f"train.malloc_mmap_threshold_kb={args.mmap_threshold_kb}"] if args.mmap_threshold_kb is not None else []),
    ])
    acc = loop.setup(cfg)
    model, data = model_and_data(args)
    base_rss = rss_mb()
    loop.run(acc, cfg, model, CausalLM(args.seq, fused=fused_head(cfg.train)), data, None, save_final=False)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    times = [args.batch * args.seq / r["tokens_per_s"] for r in train]
    return summarise(args, times, [r["loss"] for r in train], acc.mixed_precision, base_rss)


def summarise(args, step_times: list[float], losses: list[float], precision: str, base_rss: float) -> dict:
    steady = step_times[args.warmup:] or step_times
    return {"tokens_per_s": args.batch * args.seq / statistics.median(steady), "loss": statistics.fmean(losses[-5:]),
            "precision": precision or "no", "rss_mb": rss_mb() - base_rss}


def rss_mb() -> float:
    """Peak RSS of this process so far (VmHWM: a child does not inherit its parent's peak, unlike ru_maxrss)."""
    from lmforge.train.loop import peak_rss_mb

    return peak_rss_mb()


def peak_memory(side: str, argv: list[str], **env: str) -> float | None:
    """Peak RSS growth (MB) of one run in a fresh process."""
    cmd = [sys.executable, __file__, *argv, "--only", side, "--repeats", "1", "--no-memory"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env})
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])["rss_mb"]
    print(f"  (memory run for {side} failed: {r.stderr.strip().splitlines()[-1:]})")
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    import torch

    from lmforge.train.flops import flops_per_token, measure_peak_flops

    tmp = Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    if args.only:  # one run for the memory figure
        import_both_sides()
        res = (run_ours if args.only == "ours" else run_trainer)(args, tmp)
        print("RESULT " + json.dumps(res))
        return 0

    print(f"model: llama {args.layers} x {args.hidden}, vocab {args.vocab}, seq {args.seq}, batch {args.batch}; "
          f"{args.steps} steps ({args.warmup} warm-up left out); torch threads {torch.get_num_threads()}; "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"ours: precision={args.precision} compile={args.compile} loss_impl={args.loss_impl} "
          f"malloc_mmap_threshold_kb={args.mmap_threshold_kb}; Trainer: {args.trainer} settings")
    if args.mmap_threshold_kb is not None:  # process-wide: both sides' speed runs see it
        from lmforge.train.malloc import set_mmap_threshold

        set_mmap_threshold(args.mmap_threshold_kb)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the matmul peak of each dtype, measured now (a cached probe taken on a loaded machine can be far off)
    peaks = {dt: measure_peak_flops(device, dt, seconds=2.0) for dt in (torch.float32, torch.bfloat16)}
    print("matmul peak now: " + ", ".join(f"{str(dt).split('.')[-1]} {v / 1e9:.1f} GFLOP/s" for dt, v in peaks.items()))
    results: dict[str, list[dict]] = {"trainer": [], "ours": []}
    for i in range(args.repeats):  # A B A B: drift on a shared machine hits both sides alike
        results["trainer"].append(run_trainer(args, tmp))
        results["ours"].append(run_ours(args, tmp))
        print(f"  repeat {i + 1}: Trainer {results['trainer'][-1]['tokens_per_s']:.0f} tok/s, "
              f"ours {results['ours'][-1]['tokens_per_s']:.0f} tok/s")
    model, _ = model_and_data(args)
    n_params = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(n_params - model.get_input_embeddings().weight.numel(), args.layers, args.hidden, args.seq)
    memory = {} if args.no_memory else {side: peak_memory(side, argv) for side in results}
    if memory and args.mmap_threshold_kb is not None:
        memory["trainer_same_threshold"] = peak_memory("trainer", argv, MALLOC_MMAP_THRESHOLD_=str(args.mmap_threshold_kb * 1024))
    print(f"\nFLOPs/token {fpt / 1e6:.0f}M (6 x non-embedding parameters + attention)")
    print(f"{'':22s}{'tokens/s':>10s}{'precision':>11s}{'MFU':>8s}{'loss':>9s}{'peak MB':>9s}")
    row = {}
    for side, label in (("trainer", "transformers.Trainer"), ("ours", "lmforge loop")):
        tps = statistics.median(r["tokens_per_s"] for r in results[side])
        prec = results[side][0]["precision"]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)
        mfu = fpt * tps / peaks[dtype] if dtype in peaks else float("nan")
        loss = statistics.fmean(r["loss"] for r in results[side])
        mem = memory.get(side)
        row[side] = (tps, loss, mem)
        print(f"{label:22s}{tps:10.0f}{prec:>11s}{mfu:8.3f}{loss:9.4f}{mem if mem is not None else float('nan'):9.0f}")
    (t_tps, t_loss, t_mem), (o_tps, o_loss, o_mem) = row["trainer"], row["ours"]
    print(f"ratio lmforge/Trainer: tokens/s {o_tps / t_tps:.3f}, final loss {o_loss / t_loss:.4f}"
          + (f", peak memory {o_mem / t_mem:.3f}" if o_mem and t_mem else ""))
    same = memory.get("trainer_same_threshold")
    if same and o_mem:
        print(f"Trainer peak memory with MALLOC_MMAP_THRESHOLD_={args.mmap_threshold_kb * 1024}: {same:.0f} MB; "
              f"ours/that {o_mem / same:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

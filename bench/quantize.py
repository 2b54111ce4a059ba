"""Quantization and pruning on a trained model whose linear layers dominate: bytes, latency, perplexity.

    .venv/bin/python bench/quantize.py [--layers 8] [--hidden 512] [--steps 200] [--qat-steps 50] [--quick]

One process. A Llama of ``--layers`` x ``--hidden`` (vocabulary 512, so the linear layers hold ~95% of the
weights) is pretrained with the real stage on the fixture corpus, then every method is measured with the
quantize stage's own ``Bench`` (each result saved and reloaded first, latency paired with an fp32 timing
taken right after it) on the same validation blocks. Baselines are the fp32 model and a bf16 copy.

QAT is compared fairly: ``--qat-steps`` more steps of training with fake int4 (torchao, the stage's
``quant.method=qat``) against the same steps of plain fp32 training (the pretrain stage continued from
the same model, same data order, same schedule), each then quantized to int4 with the same method:

    recovered = (ppl(PTQ int4 of the fp32-trained) - ppl(QAT int4)) / (ppl(PTQ int4 of the fp32-trained) - ppl(fp32-trained))

Targets (issue 11): dynamic_int8 layers <= 0.3x fp32 bytes, latency <= 0.6x, perplexity <= +2%; int4
weight-only layers <= 0.2x; QAT recovers >= 50% of PTQ int4's gap; Wanda 50% beats magnitude 50%.
Writes ``outputs/bench/quantize/{results.json,results.md,report.png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
OUT = ROOT / "outputs" / "bench" / "quantize"
CORPUS = ROOT / "tests" / "fixtures" / "corpus" / "stdlib_docs.jsonl"
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer"
QUIET = ["log.trackers=[]", "checkpoint.save_every=0", "eval.eval_every=0", "log.log_every=50"]


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def pretrain(out: Path, over: list[str]) -> Path:
    from lmforge.config import load
    from lmforge.stages import pretrain as stage

    cfg = load(stage.Config, ROOT / "recipes" / "tiny" / "pretrain.yaml",
               [f"output_dir={out}", "overwrite=true", f"data.train_files=[{CORPUS}]", *QUIET, *over])
    try:
        stage.main(cfg)
    finally:
        _reset_accelerate()
    return out / "final"


def base_model(args) -> Path:
    h = args.hidden
    inter = (int(h * 8 / 3) + 127) // 128 * 128  # a multiple of 128: every int4 group size divides it
    over = [f"model.config.hidden_size={h}", f"model.config.num_hidden_layers={args.layers}",
            f"model.config.intermediate_size={inter}", f"model.config.num_attention_heads={max(1, h // 64)}",
            f"model.config.num_key_value_heads={max(1, h // 64)}", f"train.max_steps={args.steps}",
            f"optim.learning_rate={args.lr}", f"schedule.warmup_steps={max(1, args.steps // 20)}"]
    return pretrain(OUT / "base", over)


def stage_cfg(model: Path, out: Path, *over: str):
    from lmforge.config import load
    from lmforge.stages import quantize

    return load(quantize.Config, ROOT / "recipes" / "tiny" / "quantize.yaml",
                [f"model.name_or_path={model}", f"output_dir={out}", "overwrite=true", f"data.train_files=[{CORPUS}]",
                 "quant.compare=[]", *over])


def run_stage(cfg) -> dict:
    from lmforge.stages import quantize

    try:
        return quantize.main(cfg)
    finally:
        _reset_accelerate()


# the same optimizer, schedule and batches for QAT and its fp32 control (everything else: the loop's defaults)
QAT_TRAIN = ["optim.name=adamw", "optim.learning_rate={lr}", "optim.weight_decay=0.0", "optim.max_grad_norm=1.0", "schedule.name=cosine", "schedule.warmup_steps=5",
             "schedule.min_lr={min_lr}", "train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=1", "train.max_steps={steps}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--steps", type=int, default=200, help="pretraining steps of the base model")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--qat-steps", type=int, default=50)
    p.add_argument("--qat-lr", type=float, default=3e-4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="2 layers x 128, 30 + 10 steps: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.layers, args.hidden, args.steps, args.qat_steps = 2, 128, 30, 10

    import torch

    from lmforge.quant import measure, methods, prune
    from lmforge.quant.layers import linear_layers
    from lmforge.quant.report import Row, machine, plot, table
    from lmforge.stages import quantize

    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = base_model(args)
    print(f"base model trained in {time.perf_counter() - t0:.0f} s: {model_dir}", flush=True)
    measure_keys = ["measure.repeats=10", "measure.warmup=3", "measure.generate_tokens=16"]
    if args.threads:
        measure_keys.append(f"measure.threads={args.threads}")

    # ---- PTQ: every method the stage offers here, through the stage (saved, reloaded, measured) ----
    ptq = ["dynamic_int8", "int8_weight_only", "int4_weight_only", "quanto_int8", "bnb_int8", "bnb_nf4"]
    ptq = [m for m in ptq if methods.available(m) is None]
    cfg = stage_cfg(model_dir, OUT / "ptq", "quant.method=dynamic_int8", f"quant.compare=[{','.join(ptq[1:])}]",
                    f"quant.group_size={args.group_size}", *measure_keys)
    report = run_stage(cfg)
    rows = [Row(**{k: v for k, v in r.items() if k != "layer_ratio"}) for r in report["rows"]]

    # ---- pruning: magnitude and Wanda at 50%, 2:4 (magnitude and Wanda scores), on the same bench ----
    from lmforge.datasets.lm import build_lm_datasets
    from lmforge.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    train_ds, val_ds = build_lm_datasets(cfg.data, tokenizer, cfg.seed)
    original = load_causal_lm(cfg.model, tokenizer).eval().requires_grad_(False)
    bench = quantize.Bench(cfg, val_ds, original)
    fp32_layers = measure.parameter_bytes(original).layers
    calib = list(torch.stack([train_ds[i]["input_ids"] for i in range(32)]).long().split(4))
    for label, settings in [
        ("prune:magnitude@0.5", prune.PruneSettings("magnitude", 0.5)),
        ("prune:magnitude-global@0.5", prune.PruneSettings("magnitude", 0.5, scope="global")),
        ("prune:wanda@0.5", prune.PruneSettings("wanda", 0.5)),
        ("prune:2:4", prune.PruneSettings("2:4", 0.5)),
        ("prune:2:4-wanda", prune.PruneSettings("2:4", 0.5, score="wanda")),
    ]:
        model = copy.deepcopy(original)
        sparsity = prune.prune(model, settings, calib if settings.needs_calibration else None).overall
        layers = list(linear_layers(model, settings.skip_modules))
        rows.append(bench.row(label, "prune", model, fp32_layers, file_bytes=rows[0].file_bytes,
                              quantized_layers=layers, sparsity=sparsity))
        del model

    # ---- QAT against the same training without fake quantization ----
    fill = {"lr": args.qat_lr, "min_lr": args.qat_lr / 10, "steps": args.qat_steps}
    train_keys = [k.format(**fill) for k in QAT_TRAIN]
    t1 = time.perf_counter()
    control_dir = pretrain(OUT / "fp32_continued", [f"model.name_or_path={model_dir}", "model.config={}",
                                                     f"model.tokenizer={TOKENIZER}", *train_keys])
    control_s = time.perf_counter() - t1
    control = run_stage(stage_cfg(control_dir, OUT / "fp32_continued_int4", "quant.method=int4_weight_only",
                                  f"quant.group_size={args.group_size}", "measure.bf16_baseline=false", *measure_keys))
    t2 = time.perf_counter()
    qat_report = run_stage(stage_cfg(model_dir, OUT / "qat", "quant.method=qat", "quant.qat.scheme=int4_weight_only",
                                     f"quant.qat.group_size={args.group_size}", "measure.bf16_baseline=false",
                                     *QUIET, *train_keys, *measure_keys))
    qat_s = time.perf_counter() - t2
    c = {r["name"]: r for r in control["rows"]}
    q = {r["name"]: r for r in qat_report["rows"]}
    fp32_cont, ptq_cont, qat_int4 = c["float32"]["perplexity"], c["int4_weight_only"]["perplexity"], q["qat:int4_weight_only"]["perplexity"]
    gap = ptq_cont - fp32_cont
    recovered = (ptq_cont - qat_int4) / gap if gap > 0 else float("nan")
    for name, r in ((f"fp32 +{args.qat_steps}", c["float32"]), (f"PTQ int4 of fp32 +{args.qat_steps}", c["int4_weight_only"]),
                    (f"QAT int4 +{args.qat_steps}", q["qat:int4_weight_only"])):
        rows.append(Row(**{**{k: v for k, v in r.items() if k != "layer_ratio"}, "name": name,
                           "kind": "qat" if name.startswith("QAT") else "ptq"}))

    # ---- targets ----
    by = {r.name: r for r in rows}
    base = by["float32"]
    d8 = by["dynamic_int8"]
    checks = [
        ("dynamic_int8 quantized layers <= 0.3x fp32 bytes", d8.layer_ratio, d8.layer_ratio <= 0.3),
        ("dynamic_int8 latency <= 0.6x fp32", d8.latency_ms / d8.fp32_latency_ms, d8.latency_ms / d8.fp32_latency_ms <= 0.6),
        ("dynamic_int8 perplexity <= +2%", d8.perplexity / base.perplexity - 1, d8.perplexity <= 1.02 * base.perplexity),
    ]
    if "int4_weight_only" in by:
        r4 = by["int4_weight_only"]
        checks.append(("int4_weight_only quantized layers <= 0.2x fp32 bytes", r4.layer_ratio, r4.layer_ratio <= 0.2))
    checks.append(("QAT int4 recovers >= 50% of PTQ int4's gap", recovered, recovered >= 0.5))
    w, m = by["prune:wanda@0.5"].perplexity, by["prune:magnitude@0.5"].perplexity
    checks.append(("Wanda 50% perplexity < magnitude 50%", w / m, w < m))

    lines = [f"# bench/quantize.py: {args.layers} layers x {args.hidden}, {args.steps} pretraining steps", "",
             f"Machine: {machine()}; threads {bench.threads}; base trained in {t1 - t0:.0f} s (incl. PTQ); "
             f"QAT {args.qat_steps} steps {qat_s:.0f} s vs fp32 {control_s:.0f} s.", "", table(rows), "",
             "| target | value | met |", "|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {'yes' if ok else 'NO'} |" for name, value, ok in checks]
    lines += ["", f"QAT: fp32 continued {fp32_cont:.3f}, its PTQ int4 {ptq_cont:.3f} (gap {gap:+.3f}), "
              f"QAT int4 {qat_int4:.3f}: recovered {100 * recovered:.0f}% of the gap."]
    text = "\n".join(lines)
    (OUT / "results.md").write_text(text + "\n")
    (OUT / "results.json").write_text(json.dumps({"args": vars(args), "machine": machine(),
                                                  "rows": [r.__dict__ for r in rows],
                                                  "targets": [{"target": n, "value": v, "met": ok} for n, v, ok in checks]},
                                                 indent=2) + "\n")
    plot(rows, OUT / "report.png")
    print("\n" + text)
    print(f"\nwritten: {OUT / 'results.md'}, {OUT / 'report.png'} ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()

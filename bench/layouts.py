"""Claim: the same recipe runs under every CPU layout; what each costs in throughput and memory per rank.

    python bench/layouts.py [--steps 40] [--layouts cpu,multi_cpu,deepspeed_zero1,...] [--out outputs/bench]

Runs the tiny pretraining recipe, unchanged, under `accelerate launch --config_file
accelerate_configs/<layout>.yaml` for cpu, multi_cpu and DeepSpeed ZeRO-1/2/3 (2 ranks each) and prints
one table: global tokens/s (median of the logged windows after the first), its ratio to the one-process
`cpu` baseline of the same invocation, and the peak RSS of each rank. Writes layouts.json and a bar chart
layouts.png to --out. Each rank records its own peak RSS: the script launches itself per rank
(`--rank-entry`), runs `lmforge pretrain` in-process and writes `rss_rank<R>.json` next to the run.

On a GPU-less machine these are CPU numbers: DeepSpeed's value (sharding memory across GPUs) does not
show at this size, where the process baseline (Python, torch, DeepSpeed) dominates each rank's RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ["cpu", "multi_cpu", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"]
RECIPE = "recipes/tiny/pretrain.yaml"


def rank_entry(argv: list[str]) -> int:
    """Per-rank entry under `accelerate launch`: run the stage, then record this rank's peak RSS."""
    from lmforge.cli import main

    rc = main(argv)
    out = next(a.split("=", 1)[1] for a in argv if a.startswith("output_dir="))
    rank = int(os.environ.get("RANK", "0"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    Path(out, f"rss_rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss": peak}))
    return rc


def run_layout(layout: str, out: Path, steps: int) -> dict:
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "accelerate_configs" / f"{layout}.yaml"), str(Path(__file__).resolve()), "--rank-entry",
           "pretrain", RECIPE, f"output_dir={out}", "overwrite=true", f"train.max_steps={steps}", "log.log_every=5",
           "log.trackers=[]", "eval.eval_every=0", "eval.max_eval_batches=1", "checkpoint.save_every=0"]
    # The venv's bin first: DeepSpeed's op builds must always see the same ninja (see docs/layouts.md).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{layout} failed:\n{r.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tps = [r["tokens_per_s"] for r in rows if r["split"] == "train" and r["step"] > 5]  # skip the warm-up window
    rss = [json.loads(p.read_text())["peak_rss"] for p in sorted(out.glob("rss_rank*.json"))]
    return {"layout": layout, "ranks": summary["num_processes"], "wrapper": summary["model_wrapper"],
            "zero_stage": summary.get("zero_stage"), "tokens_per_s": statistics.median(tps),
            "peak_rss_per_rank": rss, "final_train_loss": summary["train_loss"], "wall_s": wall}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["layout"].replace("deepspeed_", "") for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.bar(names, [r["tokens_per_s"] for r in results], color="tab:blue")
    a.set_title("throughput (global tokens/s)")
    b.bar(names, [max(r["peak_rss_per_rank"]) / 2**20 for r in results], color="tab:orange")
    b.set_title("peak RSS per rank (MiB)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("tiny recipe on this CPU: same recipe, layout from the accelerate config")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-entry":
        return rank_entry(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for layout in args.layouts.split(","):
        print(f"running {layout} ...", flush=True)
        results.append(run_layout(layout, out / f"layouts_{layout}", args.steps))
    base = next((r for r in results if r["layout"] == "cpu"), results[0])
    print(f"\n{'layout':<18}{'ranks':>6}{'wrapper':>26}{'tokens/s':>10}{'vs cpu':>8}  peak RSS per rank (MiB)")
    for r in results:
        rss = " / ".join(f"{x / 2**20:.0f}" for x in r["peak_rss_per_rank"])
        print(f"{r['layout']:<18}{r['ranks']:>6}{r['wrapper']:>26}{r['tokens_per_s']:>10.0f}"
              f"{r['tokens_per_s'] / base['tokens_per_s']:>7.2f}x  {rss}")
    print(f"(load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    (out / "layouts.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "layouts.png")
    print(f"wrote {out / 'layouts.json'} and {out / 'layouts.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

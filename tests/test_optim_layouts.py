"""Layer-wise LR decay (and a hand-written optimizer) under DeepSpeed ZeRO-2: parameter groups and
their ``lr_scale`` survive DeepSpeed's optimizer wrapping, so a ZeRO-2 run follows the DDP run of the
same recipe step for step, and both differ from the run without LLRD. 2 CPU ranks each
(``make test-layouts``); see tests/test_layouts.py for how DeepSpeed runs on a machine without a GPU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, ROOT, subprocess_env

pytestmark = pytest.mark.layouts

COMMON = ["train.max_steps=12", "log.log_every=1", "log.trackers=[]", "eval.eval_every=0", "checkpoint.save_every=0",
          "data.block_size=64", "train.per_device_train_batch_size=4", "schedule.warmup_ratio=null",
          "schedule.warmup_steps=2"]
TOL = 1e-4  # ZeRO-2 vs DDP per logged step (tests/test_layouts.py uses the same)


def launch(layout: str, out: Path, *overrides: str) -> dict[int, float]:
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / f"{layout}.yaml"),
           "-m", "lmforge", "pretrain", "recipes/tiny/pretrain_llrd.yaml", f"output_dir={out}", *COMMON, *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=900)
    assert r.returncode == 0, f"{layout} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


# lion under ZeRO-2 is the same proof for a hand-written optimizer: make test-slow (keeps make test under 20 min)
@pytest.mark.parametrize("optim", ["adamw", pytest.param("lion", marks=pytest.mark.slow)])
def test_llrd_groups_survive_zero2(tmp_path, optim):
    extra = [f"optim.name={optim}"] + (["optim.learning_rate=1e-3"] if optim == "lion" else [])
    ddp = launch("multi_cpu", tmp_path / "ddp", *extra)
    zero2 = launch("deepspeed_zero2", tmp_path / "zero2", *extra)
    flat = launch("multi_cpu", tmp_path / "flat", *extra, "optim.layerwise_lr_decay=null", "optim.lr_multipliers={}")
    assert ddp.keys() == zero2.keys()
    for step in ddp:
        assert abs(ddp[step] - zero2[step]) < TOL, (step, ddp[step], zero2[step])
    assert max(abs(ddp[s] - flat[s]) for s in ddp) > 10 * TOL, "LLRD changed nothing: the groups' lr_scale was lost"

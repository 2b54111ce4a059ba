"""Two ranks on the CPU: `accelerate launch` with multi_cpu.yaml gives real DDP (gloo), ranks in sync."""

from __future__ import annotations

import json
import subprocess

from conftest import BIN, ROOT, subprocess_env


def test_two_cpu_ranks_train_as_ddp_in_sync(tmp_path):
    out = tmp_path / "ddp"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / "multi_cpu.yaml"),
           "-m", "lmforge", "pretrain", "recipes/tiny/pretrain.yaml", f"output_dir={out}", "train.max_steps=30",
           "log.trackers=[]", "eval.eval_every=0", "checkpoint.save_every=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["num_processes"] == 2
    assert s["model_wrapper"] == "DistributedDataParallel"
    digests = s["param_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1], "ranks ended with different parameters"
    assert s["train_loss"] < s["first_train_loss"] - 0.5
    # each step consumed 2 ranks x 8 blocks x 128 tokens
    assert s["tokens_seen"] == 30 * 2 * 8 * 128

"""Training across two "nodes" on loopback: two `accelerate launch` processes, one per machine rank
(--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1, 1 process each), rendezvous over
gloo and train the tiny recipe as one job — exactly the commands scripts/slurm_multinode.sh runs on
each node of a cluster (there with the node's address; here both "nodes" share this machine and its
filesystem, as cluster nodes share one). DDP (multi_cpu.yaml's layout) and DeepSpeed ZeRO-2
(multi_node.yaml's launcher, stage switched on the command line).
"""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
from conftest import BIN, ROOT, subprocess_env

pytestmark = pytest.mark.layouts

STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(config: str, out, *extra: str, launch_args: tuple[str, ...] = ()) -> dict:
    port = free_port()
    procs = []
    for rank in (0, 1):
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / config),
               "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), *launch_args,
               "-m", "lmforge", "pretrain", "recipes/tiny/pretrain.yaml", f"output_dir={out}",
               f"train.max_steps={STEPS}", "log.trackers=[]", "eval.eval_every=0", "checkpoint.save_every=0", *extra]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                      env=subprocess_env()))
    results = [p.communicate(timeout=900) for p in procs]
    for rank, (p, (so, se)) in enumerate(zip(procs, results, strict=True)):
        assert p.returncode == 0, f"node {rank} failed:\n{so[-1500:]}\n{se[-3000:]}"
    return json.loads((out / "summary.json").read_text())


def test_ddp_across_two_nodes_trains_in_sync(tmp_path):
    s = two_nodes("multi_cpu.yaml", tmp_path / "ddp")
    assert s["num_processes"] == 2 and s["model_wrapper"] == "DistributedDataParallel"
    d = s["param_digest_per_rank"]
    assert len(d) == 2 and d[0] == d[1], "the two nodes ended with different parameters"
    assert s["tokens_seen"] == STEPS * 2 * 8 * 128  # both nodes fed the global batch
    assert s["train_loss"] < s["first_train_loss"]


@pytest.mark.slow  # DeepSpeed's engine start on two nodes (~1.5 min more)
def test_zero2_across_two_nodes_trains_in_sync(tmp_path):
    s = two_nodes("multi_node.yaml", tmp_path / "zero2", "train.mixed_precision=no",
                  launch_args=("--zero_stage", "2", "--mixed_precision", "no"))
    assert s["num_processes"] == 2 and s["model_wrapper"] == "DeepSpeedEngine" and s["zero_stage"] == 2
    d = s["param_digest_per_rank"]
    assert len(d) == 2 and d[0] == d[1]

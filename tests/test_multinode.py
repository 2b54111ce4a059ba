"""Training across two "nodes" on loopback: two `accelerate launch` processes, one per machine rank
(--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1, 1 process each), rendezvous over
gloo and train the tiny recipe as one job — exactly the commands scripts/slurm_multinode.sh runs on
each node of a cluster (there with the node's address; here both "nodes" share this machine and its
filesystem, as cluster nodes share one). DDP (multi_cpu.yaml's layout) and DeepSpeed ZeRO-2
(multi_node.yaml's launcher, stage switched on the command line). A node killed mid-run (SIGKILL to its whole
launcher process group) leaves the newest complete checkpoint, from which a fresh pair of nodes resumes and
ends bitwise where the uninterrupted pair did.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import pytest
from conftest import BIN, ROOT, subprocess_env

from lmforge.train import checkpoint

pytestmark = pytest.mark.layouts

STEPS = 30  # cheap steps (~0.2 s): the margin the kill test needs between its first checkpoint and the end


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(config: str, out, *extra: str, launch_args: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """Both nodes' launchers, each in its own process group (a node = its launcher and its worker)."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / config),
               "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), *launch_args,
               "-m", "lmforge", "pretrain", "recipes/tiny/pretrain.yaml", f"output_dir={out}",
               f"train.max_steps={STEPS}", "log.trackers=[]", "eval.eval_every=0", "checkpoint.save_every=0", *extra]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                      env=subprocess_env(), start_new_session=True))
    return procs


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts its workers in sessions of their own,
    so killing the launcher's process group would leave the worker training)."""
    import psutil

    root = psutil.Process(pid)
    for p in [*root.children(recursive=True), root]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def two_nodes(config: str, out, *extra: str, launch_args: tuple[str, ...] = ()) -> dict:
    procs = start_nodes(config, out, *extra, launch_args=launch_args)
    results = [p.communicate(timeout=900) for p in procs]
    for rank, (p, (so, se)) in enumerate(zip(procs, results, strict=True)):
        assert p.returncode == 0, f"node {rank} failed:\n{so[-1500:]}\n{se[-3000:]}"
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return two_nodes("multi_cpu.yaml", tmp_path_factory.mktemp("ddp"))


def test_ddp_across_two_nodes_trains_in_sync(ddp_run):
    s = ddp_run
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


def test_a_killed_node_leaves_a_checkpoint_a_fresh_pair_resumes_bitwise(ddp_run, tmp_path):
    out = tmp_path / "killed"
    procs = start_nodes("multi_cpu.yaml", out, "checkpoint.save_every=3", "checkpoint.keep_last=2")
    ckpts = out / "checkpoints"
    deadline = time.monotonic() + 600
    while not (ckpts / "step_3" / "loop_state.json").exists():  # the first complete checkpoint
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint was written"
        time.sleep(0.05)
    kill_tree(procs[1].pid)  # node 1 dies: its launcher and its worker, no clean-up
    try:
        procs[0].communicate(timeout=180)  # node 0 loses its peer in the next collective and exits
    except subprocess.TimeoutExpired:
        kill_tree(procs[0].pid)
        procs[0].communicate()
    procs[1].communicate()
    assert procs[0].returncode != 0, "node 0 finished although its peer was killed"
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    done = [int(p.name.removeprefix("step_")) for p in checkpoint.list_checkpoints(ckpts)]  # complete ones, oldest first
    assert done and done[-1] < STEPS

    s = two_nodes("multi_cpu.yaml", out, "checkpoint.save_every=3", "checkpoint.keep_last=2", "resume=auto")
    assert s["resumed_from_step"] == done[-1]
    assert s["param_digest_per_rank"][0] == s["param_digest_per_rank"][1]
    assert s["param_digest_per_rank"][0] == ddp_run["param_digest_per_rank"][0], "the resumed pair ended elsewhere"

"""The Slurm paths on a real Slurm: `lmforge data` with `executor.kind: slurm` and scripts/slurm_multinode.sh.

Needs a working `sbatch` — on one machine: `bash scripts/slurm_local.sh setup` (root; a single-node Slurm,
partition `debug`, 2 CPUs; `make test-cluster` does both). Its config is found through SLURM_CONF, or
$LMFORGE_SLURM_DIR/slurm.conf (default /tmp/lmforge-slurm) where slurm_local.sh writes it.

1. The tiny data recipe is submitted (datatrove's chained sbatch jobs: clean array -> dedup -> publish, with
   their stats-merge jobs); once the jobs are gone from squeue and all COMPLETED, the same command with
   resume=auto publishes; the output equals the local executor's on the same recipe.
2. The tiny pretrain recipe through `sbatch scripts/slurm_multinode.sh` on one node with two ranks (DDP over
   gloo, accelerate_configs/multi_cpu.yaml): the job completes, both ranks trained in sync, final/ loads.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BIN, ROOT, subprocess_env

from lmforge import cli

pytestmark = pytest.mark.cluster

RECIPE = str(ROOT / "recipes" / "tiny" / "data.yaml")
TASKS = ["executor.tasks=4"]
SLURM_DIR = Path(os.environ.get("LMFORGE_SLURM_DIR", "/tmp/lmforge-slurm"))
SETUP = "bash scripts/slurm_local.sh setup"


def slurm_env() -> dict[str, str]:
    env = subprocess_env()
    if not env.get("SLURM_CONF") and (SLURM_DIR / "slurm.conf").exists():
        env["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    return env


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, env=slurm_env(), cwd=ROOT, timeout=120)
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}"
    return r


@pytest.fixture(scope="module")
def partition() -> str:
    if shutil.which("sbatch") is None:
        pytest.skip(f"no Slurm here (sbatch not on PATH); start a local one: {SETUP}")
    r = sh("sinfo", "-h", "-o", "%P %a %t", check=False)
    if r.returncode or not r.stdout.strip():
        first = (r.stderr.strip().splitlines() or ["no partitions"])[-1]
        pytest.skip(f"Slurm not reachable ({first}); start a local one: {SETUP}")
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()]
    up = [p for p, avail, _ in rows if avail == "up"]
    default = [p.rstrip("*") for p in up if p.endswith("*")]
    return (default or [p.rstrip("*") for p in up])[0]


def queued(names: tuple[str, ...]) -> set[str]:
    """Array-job ids (or job ids) in squeue whose name starts with one of names."""
    out = sh("squeue", "-h", "-o", "%F %j").stdout
    return {jid for jid, name in (line.split(maxsplit=1) for line in out.splitlines() if line.strip())
            if name.startswith(names)}


def wait_gone(ids: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = sh("squeue", "-h", "-o", "%F").stdout.split()
        if not ids & set(out):
            return
        time.sleep(2)
    pytest.fail(f"Slurm jobs {sorted(ids)} still queued after {timeout:.0f} s:\n" + sh("squeue").stdout)


def states(ids: set[str]) -> dict[str, str]:
    """{job id: JobState} of every job (each array task) of ids; kept by slurmctld MinJobAge s after the end."""
    got = {}
    for jid in ids:
        for line in sh("scontrol", "-o", "show", "job", jid).stdout.splitlines():
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            got[f["JobId"]] = f["JobState"]
    return got


def slurm_logs(folder: Path) -> str:
    return "\n".join(f"--- {f}\n" + f.read_text(errors="replace")[-1500:] for f in sorted(folder.rglob("*.out")))


def read_docs(out: Path) -> list[dict]:
    with gzip.open(out / "documents.jsonl.gz", "rt", encoding="utf-8") as f:
        return sorted(map(json.loads, f), key=lambda r: r["id"])


def assert_same_output(a: Path, b: Path) -> None:
    import datasets
    import numpy as np

    da, db = datasets.load_from_disk(str(a / "dataset")), datasets.load_from_disk(str(b / "dataset"))
    for split in ("train", "validation"):
        assert len(da[split]) > 0 and da[split]["input_ids"] == db[split]["input_ids"], split
    assert (a / "tokenizer" / "tokenizer.json").read_bytes() == (b / "tokenizer" / "tokenizer.json").read_bytes()
    files = sorted((a / "dedup" / "remove").glob("*.npy"))
    assert [f.name for f in files] == sorted(f.name for f in (b / "dedup" / "remove").glob("*.npy"))
    for f in files:
        assert np.array_equal(np.load(f), np.load(b / "dedup" / "remove" / f.name)), f.name
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    for key in ("dedup", "documents", "tokens", "sources", "pii"):
        assert ra[key] == rb[key], key
    assert read_docs(a) == read_docs(b)


def test_data_stage_through_sbatch_equals_local(partition, tmp_path):
    from loguru import logger

    out = tmp_path / "slurm_out"
    venv = [f"executor.slurm.venv_path={sys.prefix}"] if sys.prefix != sys.base_prefix else []
    cmd = [str(BIN / "lmforge"), "data", RECIPE, f"output_dir={out}", "executor.kind=slurm", *TASKS,
           f"executor.slurm.partition={partition}", "executor.slurm.time=00:20:00", *venv]
    names = ("lmforge-data-",)
    before = queued(names)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=slurm_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "jobs submitted (slurm)" in r.stdout and "resume=auto" in r.stdout, r.stdout[-2000:]
    work = Path(str(out) + ".partial")
    ids = queued(names) - before
    assert ids, "no lmforge-data-* jobs in squeue after the submission"
    # the jobs run the same Python as this test (the venv's activate, or this interpreter's bin/ first on PATH)
    script = (work / "logs" / "clean" / "launch_script.slurm").read_text()
    assert (f"source {sys.prefix}/bin/activate" if venv else f"export PATH={BIN}") in script, script
    assert f"--partition={partition}" in script

    # the local reference on the same recipe, while the jobs run
    local = tmp_path / "local_out"
    logger.remove()
    assert cli.main(["data", RECIPE, f"output_dir={local}", *TASKS]) == 0

    wait_gone(ids, timeout=900)
    st = states(ids)
    assert st and all(s == "COMPLETED" for s in st.values()), f"{st}\n{slurm_logs(work / 'logs')}"
    assert len(st) >= 4 + 1 + 1  # 4 clean array tasks, dedup, publish (and the stats-merge jobs)
    print(f"slurm jobs done {time.perf_counter() - t0:.1f} s after submission: {len(st)} jobs")
    assert not out.exists() and (work / "report.json").exists()

    r = subprocess.run([*cmd, "resume=auto"], cwd=ROOT, env=slurm_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "data done in" in r.stdout, r.stdout[-2000:]
    assert not queued(names) - before, "resume=auto resubmitted jobs although every task had finished"
    assert not work.exists()
    assert_same_output(local, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slurm_multinode_script_trains_two_ranks_on_one_node(partition, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pretrain"
    steps = 6
    env = {"ACCELERATE_CONFIG": "accelerate_configs/multi_cpu.yaml", "PROCS_PER_NODE": "2",
           "MAIN_PORT": str(free_port())}
    export = "ALL," + ",".join(f"{k}={v}" for k, v in env.items())
    r = sh("sbatch", "--parsable", "--nodes", "1", "--cpus-per-task", "2", f"--partition={partition}",
           "--job-name", "lmforge-multinode-test", "--time", "00:20:00", f"--chdir={ROOT}",
           f"--output={tmp_path}/%x-%j.out", f"--export={export}", "scripts/slurm_multinode.sh",
           "pretrain", "recipes/tiny/pretrain.yaml", f"output_dir={out}", f"train.max_steps={steps}",
           "log.trackers=[]", "eval.eval_every=0", "checkpoint.save_every=0")
    job = r.stdout.strip().split(";")[0]
    wait_gone({job}, timeout=900)
    log = "\n".join(f.read_text(errors="replace")[-4000:] for f in tmp_path.glob("*.out"))
    assert states({job}) == {job: "COMPLETED"}, log

    s = json.loads((out / "summary.json").read_text())
    assert s["num_processes"] == 2 and s["model_wrapper"] == "DistributedDataParallel", s
    d = s["param_digest_per_rank"]
    assert len(d) == 2 and d[0] == d[1], "the two ranks ended with different parameters"
    assert s["train_loss"] < s["first_train_loss"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert any(row.get("step") == steps for row in rows), rows[-3:]
    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()

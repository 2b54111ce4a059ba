"""`lmforge data` with `executor.kind: ray` on a real two-node Ray cluster on this machine (loopback, no network).

Two `ray start --block` processes — a head and a worker node, one CPU each, started in a scratch directory
(not the repo: Ray tasks start where their node's `ray start` ran, and the stage must still resolve the
recipe's relative paths against the driver's directory) — then the tiny recipe with 4 cleaning tasks.
Its dataset, tokenizer and dedup decisions must equal the local executor's on the same recipe.
Marked slow and cluster: `make test-slow` and `make test-cluster` run it (needs `pip install -e '.[ray]'`).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import BIN, ROOT, subprocess_env

try:
    import ray  # noqa: F401
except ImportError:
    pytest.skip("Ray is not installed: pip install -e '.[ray]'", allow_module_level=True)

from lmforge import cli

RECIPE = str(ROOT / "recipes" / "tiny" / "data.yaml")
TASKS = ["executor.tasks=4", "executor.workers=-1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    env = subprocess_env()
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_DISABLE_DOCKER_CPU_WARNING="1", RAY_enable_metrics_collection="0")
    return env


class Cluster:
    """A head and one worker node, each a `ray start --block` process of ours (ended by pid, not `ray stop`,
    which would end every Ray on the machine)."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.temp_dir = scratch / "ray"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        common = ["--num-cpus", "1", "--temp-dir", str(self.temp_dir), "--disable-usage-stats", "--block",
                  "--node-ip-address", "127.0.0.1"]
        self._start(["--head", "--port", str(self.port), "--include-dashboard=false",
                     "--ray-client-server-port", str(free_port()), *common], "head")
        self._wait(1)
        self._start(["--address", self.address, *common], "worker")

    def _start(self, args: list[str], name: str) -> None:
        log = open(self.scratch / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen([str(BIN / "ray"), "start", *args,
                                            "--dashboard-agent-listen-port", str(free_port())],
                                           cwd=self.scratch, env=ray_env(), stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def nodes(self) -> int:
        r = subprocess.run([str(BIN / "ray"), "status", "--address", self.address], capture_output=True, text=True,
                           env=ray_env(), cwd=self.scratch, timeout=60)
        if r.returncode:
            return 0
        active = r.stdout.split("Active:")[1].split("Pending:")[0] if "Active:" in r.stdout else ""
        return sum(1 for line in active.splitlines() if "node_" in line)

    def _wait(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"ray start exited with {p.returncode}; see {self.scratch}/*.log")
            if self.nodes() >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"Ray cluster at {self.address}: fewer than {n} nodes after {timeout:.0f} s")

    def wait_ready(self) -> None:
        self._wait(2)

    def worker_node_ids(self) -> set[str]:
        """Nodes on which Ray started Python workers (from the core workers' logs)."""
        ids = set()
        for f in self.temp_dir.glob("session_*/logs/python-core-worker-*.log"):
            text = f.read_text(errors="replace")
            if "node_id=" in text:
                ids.add(text.split("node_id=")[1][:40])
        return ids

    def stop(self) -> None:
        for p in reversed(self.procs):  # `ray start --block` ends its node's processes on SIGTERM
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            try:  # anything of that node still running (its own session, started by us): gone
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster():
    scratch = Path(tempfile.mkdtemp(prefix="lmf-ray-"))  # short: Ray's socket paths have a length limit
    c = Cluster(scratch)
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, cluster):  # runs while the Ray nodes start
    from loguru import logger

    out = tmp_path_factory.mktemp("local") / "out"
    os.chdir(ROOT)
    logger.remove()
    assert cli.main(["data", RECIPE, f"output_dir={out}", *TASKS]) == 0
    return out


def read_docs(out: Path) -> list[dict]:
    with gzip.open(out / "documents.jsonl.gz", "rt", encoding="utf-8") as f:
        return sorted(map(json.loads, f), key=lambda r: r["id"])


@pytest.mark.slow  # ~2-4 min on 2 busy cores: two Ray nodes start, then the local and the Ray run
@pytest.mark.cluster
def test_data_stage_on_a_two_node_ray_cluster_equals_local(cluster, local_run, tmp_path):
    import datasets
    import numpy as np

    cluster.wait_ready()
    out = tmp_path / "ray_out"
    t0 = time.perf_counter()
    r = subprocess.run([str(BIN / "lmforge"), "data", RECIPE, f"output_dir={out}", "executor.kind=ray", *TASKS,
                        f"executor.ray.address={cluster.address}"],
                       cwd=ROOT, env=ray_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "data done in" in r.stdout, r.stdout[-2000:]
    print(f"ray data stage: {time.perf_counter() - t0:.1f} s")
    # the tasks ran on both nodes (each has one CPU; four tasks at once need two nodes)
    assert len(cluster.worker_node_ids()) == 2, cluster.worker_node_ids()
    assert not Path(str(out) + ".partial").exists()

    # the published dataset: identical blocks
    a, b = datasets.load_from_disk(str(local_run / "dataset")), datasets.load_from_disk(str(out / "dataset"))
    for split in ("train", "validation"):
        assert len(a[split]) > 0 and a[split]["input_ids"] == b[split]["input_ids"], split
    # the tokenizer: the same vocabulary and merges
    assert (local_run / "tokenizer" / "tokenizer.json").read_bytes() == (out / "tokenizer" / "tokenizer.json").read_bytes()
    # the dedup decisions: per-task removal lists, clusters, the report's dedup section, the kept documents
    for f in sorted((local_run / "dedup" / "remove").glob("*.npy")):
        assert np.array_equal(np.load(f), np.load(out / "dedup" / "remove" / f.name)), f.name
    assert len(list((out / "dedup" / "remove").glob("*.npy"))) == 4
    assert json.loads((local_run / "dedup/remove/clusters.json").read_text()) == json.loads(
        (out / "dedup/remove/clusters.json").read_text())
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (local_run, out))
    for key in ("dedup", "documents", "tokens", "sources", "pii"):
        assert ra[key] == rb[key], key
    assert read_docs(local_run) == read_docs(out)


@pytest.mark.slow
@pytest.mark.cluster
def test_a_failed_ray_task_stops_the_run_with_its_error(cluster, tmp_path):
    """datatrove alone logs the failed task at debug level and the next executor waits for it for ever;
    the stage reads the task's log and ends with the task's UserError (exit 2), as the local executor does."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "' + "a fine first line of text " * 20 + '"}\n{"text": broken\n')
    cluster.wait_ready()
    t0 = time.perf_counter()
    r = subprocess.run([str(BIN / "lmforge"), "data", RECIPE, f"output_dir={tmp_path / 'out'}", "executor.kind=ray",
                        f"sources=[{{files: [{bad}], text_key: text}}]", *TASKS,
                        f"executor.ray.address={cluster.address}"],
                       cwd=ROOT, env=ray_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"error: {bad}:2: not valid JSON" in r.stderr, r.stderr[-3000:]
    assert time.perf_counter() - t0 < 120


def test_no_cluster_at_the_address_is_one_line_not_a_hang(tmp_path, capsys, monkeypatch):
    """ray.init waits without end on an address where nothing listens; the stage checks the port first."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = cli.main(["data", RECIPE, f"output_dir={tmp_path / 'out'}", "executor.kind=ray",
                     f"executor.ray.address=127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert code == 2 and "executor.ray.address: no Ray cluster answers at '127.0.0.1:" in err, err

"""bench/distill.py end to end at toy size: a tiny teacher, two seeds of the control, forward KL and one cached
k, the tables and the JSON it writes. A smoke test of the bench's plumbing, not of its numbers."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # a bench's plumbing (33 s): make test-slow


def _bench():
    spec = importlib.util.spec_from_file_location("bench_distill", ROOT / "bench" / "distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_distill_smoke(tmp_path, capsys):
    bench = _bench()
    rc = bench.main(["--seeds", "2", "--steps", "4", "--teacher-steps", "6", "--teacher", "2x64", "--speed-student", "1x32",
                     "--speed-steps", "6", "--max-docs", "60", "--rows", "control,forward", "--top-k", "8",
                     "--out", str(tmp_path)])
    assert rc in (0, 1)  # 1: a claim failed, which toy sizes may do
    text = capsys.readouterr().out
    assert "| control (CE only) |" in text and "| forward KL |" in text and "| cached forward KL, k=8 |" in text
    result = json.loads((tmp_path / "distill_bench.json").read_text())
    rows = {(r["section"], r["row"], r["seed"]) for r in result["runs"]}
    for seed in (1, 2):
        assert {("quality", "control", seed), ("quality", "forward", seed), ("quality", "cached_k8", seed)} <= rows
        assert {("speed", "forward", seed), ("speed", "cached_k8", seed)} <= rows
    cached = [r for r in result["runs"] if r["row"] == "cached_k8"]
    assert all(r["cache_bytes_per_token"] >= 8 * 8 + 4 for r in cached)  # values + int32 indices + the rest bucket
    assert sum(r["cache_reused"] for r in cached) == len(cached) - 1  # built once, then reused
    assert all(r["kl"] >= 0 and r["tokens_per_s"] > 0 for r in result["runs"])
    assert (tmp_path / "distill_bench.md").read_text().startswith("teacher: llama 2x64")

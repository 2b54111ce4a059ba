"""The whole life on the tiny recipes, as a newcomer runs it: `make demo` (make test-slow; ~6 min here).

Its last lines are the `lmforge runs` table: one row per stage, each naming an output that standard
tools load, its key metric and its report."""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import ROOT, subprocess_env


@pytest.mark.slow
def test_make_demo_runs_every_stage_and_ends_with_the_table():
    r = subprocess.run(["make", "demo"], capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if re.match(r"\| (data|pretrain|finetune|distill|quantize|evaluate) \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["data", "pretrain", "finetune", "distill", "quantize", "evaluate"]
    for row in rows:
        report = row.split("|")[4].strip()
        assert (ROOT / report).is_file(), row
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(ROOT / "outputs/tiny/pretrain/final")
    PeftModel.from_pretrained(base, ROOT / "outputs/tiny/finetune_lora/final")
    AutoModelForCausalLM.from_pretrained(ROOT / "outputs/tiny/distill/final")
    import datasets

    assert len(datasets.load_from_disk(str(ROOT / "outputs/tiny/data/dataset"))["train"]) > 0

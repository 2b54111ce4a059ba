"""A 2-rank ZeRO-3 distillation on CPU: the student *and* the frozen teacher are partitioned across the ranks
(the teacher through a DeepSpeed inference engine of its own), the losses fall, and the distilled student, its
validation CE and the teacher's match the same run on one process (same global batch, same init, the same 16
validation rows) up to float reduction order. The validation check also guards ``set_train_mode``: a
DeepSpeedEngine's own ``training`` flag stayed True in evaluation, so KD's validation took its training path."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import BIN, ROOT, subprocess_env
from safetensors.torch import load_file
from test_distill import FAST, RECIPE, _reset_accelerate, teacher_dir  # noqa: F401  (a fixture)

from lmforge.config import load
from lmforge.stages import distill

# global batch 8 on both runs; no dropout in the tiny llama; plain SGD-like steps keep the comparison tight
COMMON = ["train.max_steps=6", "schedule.warmup_steps=0", "eval.max_eval_batches=1", "distill.hidden=mse"]


@pytest.mark.layouts
@pytest.mark.slow  # two DeepSpeed engines on 2 ranks plus the same run on one process: ~3 min of CPU; make test-slow
def test_zero3_two_ranks_shard_the_teacher_and_match_one_process(teacher_dir, tmp_path):  # noqa: F811
    z3 = tmp_path / "z3"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / "deepspeed_zero3.yaml"),
           "-m", "lmforge", "distill", str(RECIPE), f"teacher.name_or_path={teacher_dir}", f"output_dir={z3}",
           "train.per_device_train_batch_size=4", "eval.per_device_eval_batch_size=8", *FAST, *COMMON]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    summary = json.loads((z3 / "summary.json").read_text())
    assert summary["distill"]["teacher_engine"] == "DeepSpeedEngine"  # the teacher was sharded, not replicated:
    assert 0.45 < summary["distill"]["teacher_fraction_held"] < 0.55  # rank 0 holds half of its elements
    parts = [json.loads(line) for line in (z3 / "distill_metrics.jsonl").read_text().splitlines()]
    assert parts[-1]["hidden"] < parts[0]["hidden"] / 2
    train = [row for row in rows_of(z3) if row["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]

    # the same distillation on one process, global batch 8
    one = load(distill.Config, RECIPE, [f"teacher.name_or_path={teacher_dir}", f"output_dir={tmp_path / 'one'}",
                                         "train.per_device_train_batch_size=8", *FAST, *COMMON])
    try:
        distill.train(one)
    finally:
        _reset_accelerate()
    sharded = load_file(z3 / "final" / "model.safetensors")
    single = load_file(tmp_path / "one" / "final" / "model.safetensors")
    assert sorted(sharded) == sorted(single)
    for k, v in single.items():
        assert sharded[k].numel() > 0, f"{k} saved empty under ZeRO-3"
        torch.testing.assert_close(sharded[k], v, atol=2e-4, rtol=1e-3)
    one_parts = [json.loads(line) for line in (tmp_path / "one" / "distill_metrics.jsonl").read_text().splitlines()]
    for a, b in zip(parts, one_parts, strict=True):
        assert a["step"] == b["step"] and a["tokens"] == b["tokens"]
        for key in ("ce", "kd", "hidden"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
    one_summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert one_summary["distill"]["teacher_engine"] == "LlamaForCausalLM"
    assert one_summary["distill"]["teacher_fraction_held"] == 1.0
    (z3_eval,) = [row for row in rows_of(z3) if row["split"] == "eval"]
    (one_eval,) = [row for row in rows_of(tmp_path / "one") if row["split"] == "eval"]
    assert z3_eval["tokens"] == one_eval["tokens"] == 16 * 127
    assert z3_eval["loss"] == pytest.approx(one_eval["loss"], rel=1e-4)
    assert z3_eval["accuracy"] == pytest.approx(one_eval["accuracy"], abs=1e-6) and one_eval["accuracy"] > 0
    assert summary["distill"]["teacher_eval"]["loss"] == pytest.approx(one_summary["distill"]["teacher_eval"]["loss"], rel=1e-4)


def rows_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

"""`lmforge sweep`: trial generation (grid, random with log-uniform learning rates), the summary
sorted by validation loss, and a real two-trial sweep that resumes by skipping finished trials."""

from __future__ import annotations

import csv
import math

import pytest

from lmforge.config import UserError
from lmforge.tools.sweep import grid_trials, parse_args, random_trials, write_summary


def test_grid_is_every_combination():
    trials = grid_trials(["optim.learning_rate=1e-4,3e-4,1e-3", "schedule.warmup_steps=20,50"])
    assert len(trials) == 6
    assert trials[0] == {"optim.learning_rate": "1e-4", "schedule.warmup_steps": "20"}
    assert {(t["optim.learning_rate"], t["schedule.warmup_steps"]) for t in trials} == {
        (lr, w) for lr in ("1e-4", "3e-4", "1e-3") for w in ("20", "50")}


def test_random_draws_log_uniform_lrs_ints_and_choices_reproducibly():
    specs = ["optim.learning_rate=1e-5:1e-1", "schedule.warmup_steps=0:30", "optim.name=adamw,lion",
             "optim.weight_decay=0.0:0.2"]
    trials = random_trials(specs, 400, seed=3)
    assert trials == random_trials(specs, 400, seed=3) and trials != random_trials(specs, 400, seed=4)
    lrs = [float(t["optim.learning_rate"]) for t in trials]
    assert all(1e-5 <= x <= 1e-1 for x in lrs)
    # log-uniform: each decade holds about a quarter of the draws (uniform would put 90% in the top one)
    per_decade = [sum(10 ** -k <= x < 10 ** -(k - 1) for x in lrs) / len(lrs) for k in (5, 4, 3, 2)]
    assert all(abs(p - 0.25) < 0.08 for p in per_decade), per_decade
    warm = [int(t["schedule.warmup_steps"]) for t in trials]
    assert min(warm) >= 0 and max(warm) <= 30 and len(set(warm)) > 20
    assert {t["optim.name"] for t in trials} == {"adamw", "lion"}
    wd = [float(t["optim.weight_decay"]) for t in trials]
    assert 0.07 < sum(wd) / len(wd) < 0.13  # uniform on [0, 0.2]


@pytest.mark.parametrize("argv, expect", [
    (["r.yaml"], "give --grid"),
    (["r.yaml", "--random", "x"], "number of trials"),
    (["r.yaml", "--random", "2", "optim.learning_rate=0:1e-2"], "lo > 0"),
    (["r.yaml", "--grid", "optim.learning_rate"], "expected key.path=v1,v2"),
    (["r.yaml", "--gird", "a=1"], "unknown option --gird"),
    (["r.yaml", "--accelerate-config", "nope.yaml", "--grid", "a=1"], "nope.yaml does not exist"),
])
def test_argument_mistakes_are_named(argv, expect):
    with pytest.raises(UserError, match=expect):
        parse_args(argv)


def test_fixed_overrides_come_before_the_flag():
    args = parse_args(["r.yaml", "train.max_steps=5", "--grid", "optim.learning_rate=1e-3,1e-2", "--out", "o",
                       "--accelerate-config", "accelerate_configs/multi_cpu.yaml"])
    assert args["fixed"] == ["train.max_steps=5"] and len(args["trials"]) == 2 and args["out"] == "o"
    assert args["launch"] == "accelerate_configs/multi_cpu.yaml"


def test_summary_sorted_by_validation_loss_failed_last(tmp_path):
    rows = [
        {"trial": "trial_000", "lr": "1", "val_loss": 3.0, "best_val_loss": 2.9, "train_loss": 3.1, "steps": 5, "status": "done"},
        {"trial": "trial_001", "lr": "2", "val_loss": None, "best_val_loss": None, "train_loss": None, "steps": None,
         "status": "diverged"},
        {"trial": "trial_002", "lr": "3", "val_loss": 2.5, "best_val_loss": 2.5, "train_loss": 2.7, "steps": 5, "status": "done"},
        {"trial": "trial_003", "lr": "4", "val_loss": math.nan, "best_val_loss": None, "train_loss": 9.0, "steps": 5,
         "status": "done"},
    ]
    ordered = write_summary(tmp_path, rows, ["lr"])
    assert [r["trial"] for r in ordered] == ["trial_002", "trial_000", "trial_001", "trial_003"]
    table = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["trial"] for r in table] == ["trial_002", "trial_000", "trial_001", "trial_003"]
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0].startswith("| rank | trial | lr | val_loss") and md[2].startswith("| 1 | trial_002 | 3 | 2.5000")


@pytest.mark.slow
def test_grid_sweep_runs_trials_and_resumes(tmp_path):
    from lmforge.cli import main

    argv = ["sweep", "recipes/tiny/pretrain.yaml", "train.max_steps=4", "data.block_size=32",
            "train.per_device_train_batch_size=4", "eval.eval_every=2", "eval.max_eval_batches=2",
            "checkpoint.save_every=0", "log.trackers=[]", "schedule.warmup_steps=1", "schedule.min_lr=0",
            "--grid", "optim.learning_rate=2e-4,5e-3", "--out", str(tmp_path)]
    assert main(argv) == 0
    table = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["optim.learning_rate"] for r in table] == ["5e-3", "2e-4"]  # the larger lr learns more in 4 steps
    assert float(table[0]["val_loss"]) < float(table[1]["val_loss"])
    assert all(r["status"] == "done" and r["steps"] == "4" for r in table)
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    assert (tmp_path / "trial_000" / "final" / "model.safetensors").exists()
    stamp = (tmp_path / "trial_000.log").stat().st_mtime_ns
    assert main(argv) == 0  # rerun: both trials are finished and skipped
    assert (tmp_path / "trial_000.log").stat().st_mtime_ns == stamp
    from lmforge.tools.sweep import cli

    with pytest.raises(UserError, match="holds a different sweep"):
        cli(argv[1:-4] + ["--grid", "optim.learning_rate=1e-2", "--out", str(tmp_path)])
    with pytest.raises(UserError, match=r"schedule.min_lr: 0.0003 must be below optim.learning_rate=0.0001"):
        cli(["recipes/tiny/pretrain.yaml", "--grid", "optim.learning_rate=1e-4,1e-3", "--out", str(tmp_path / "x")])

"""`lmforge lr-find`: the exponential lr ramp, the smoothing formula, the suggestion, divergence
stopping on a real optimizer, and the command on the tiny recipe."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.tools.lr_find import lr_at, range_test, smooth, suggest


def test_lr_ramp_is_exponential_from_min_to_max():
    lrs = [lr_at(i, 11, 1e-6, 1e-1) for i in range(11)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-1)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([10 ** 0.5] * 10)


def test_smoothing_is_bias_corrected_ema():
    losses = [5.0, 4.0, 6.0, 3.0]
    beta, avg, expect = 0.9, 0.0, []
    for i, x in enumerate(losses):
        avg = beta * avg + (1 - beta) * x
        expect.append(avg / (1 - beta ** (i + 1)))
    assert smooth(losses) == pytest.approx(expect)
    assert smooth([7.0])[0] == pytest.approx(7.0)  # bias correction: the first value is the loss itself


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = [lr_at(i, 200, 1e-6, 1.0) for i in range(200)]
    # a loss that falls fastest (in log lr) at 1e-3 and has its minimum near 1e-1, then rises
    curve = [3 - math.tanh(2 * (math.log10(x) + 3)) + 5 * max(0.0, math.log10(x) + 1) ** 2 for x in lrs]
    tips = suggest(lrs, curve)
    assert tips["steepest"] == pytest.approx(1e-3, rel=0.1)
    assert 1e-2 < tips["min_loss_lr"] < 1.0 and tips["min_div_10"] == pytest.approx(tips["min_loss_lr"] / 10)


def test_range_test_stops_on_divergence_and_the_optimizer_gets_each_lr():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1)
    seen = []

    class Batches:
        def get(self, k):
            idx = torch.arange(k * 16, k * 16 + 16) % 256
            return {"x": x[idx], "y": y[idx]}

    def loss_fn(m, b):
        return {"loss_sum": ((m(b["x"]) - b["y"]) ** 2).sum()}

    opt = torch.optim.SGD([{"params": model.parameters(), "lr_scale": 1.0}], lr=0.0)
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    res = range_test(model, opt, Batches(), loss_fn, lambda b: torch.tensor(b["y"].numel()), steps=100,
                     lo=1e-4, hi=10.0, device=torch.device("cpu"))
    assert "diverged" in res["stopped"] or "loss became" in res["stopped"]
    assert len(res["lr"]) < 100
    assert seen[: len(res["lr"])] == pytest.approx([lr_at(i, 100, 1e-4, 10.0) for i in range(len(res["lr"]))])
    # SGD on a quadratic diverges once lr > 2/λ_max of the loss's Hessian, here (2/n)·XᵀX of the mean squared
    # error: the range test must stop within a few ramp steps after that point (the ramp grows ~1.1x a step),
    # never before it, and the steepest descent it suggests must lie below it
    lam_max = torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max().item()
    critical = 2 / lam_max
    assert critical <= res["lr"][-1] <= 4 * critical, (critical, res["lr"][-1])
    tips = suggest(res["lr"], res["smoothed"])
    assert tips["steepest"] < critical


@pytest.mark.slow
def test_lr_find_command_on_tiny_recipe(tmp_path, capsys):
    from lmforge.cli import main

    rc = main(["lr-find", "recipes/tiny/pretrain.yaml", "data.block_size=32", "train.per_device_train_batch_size=4",
               "--steps", "15", "--min", "1e-4", "--max", "1", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "suggested optim.learning_rate" in out
    info = json.loads((tmp_path / "lr_find.json").read_text())
    lrs = [float(row.split(",")[1]) for row in (tmp_path / "lr_find.csv").read_text().splitlines()[1:]]
    losses = [float(row.split(",")[3]) for row in (tmp_path / "lr_find.csv").read_text().splitlines()[1:]]
    # the suggestion is a tried lr at which the smoothed loss was still falling, before its minimum
    k = min(range(len(lrs)), key=lambda i: abs(lrs[i] - info["steepest"]))
    assert lrs[k] == pytest.approx(info["steepest"], rel=1e-6) and k < losses.index(min(losses))
    assert (tmp_path / "lr_find.png").stat().st_size > 10_000
    assert len((tmp_path / "lr_find.csv").read_text().splitlines()) >= 8

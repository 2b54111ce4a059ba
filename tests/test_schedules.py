"""Every schedule against its closed form (written out here, not imported) at step 0, mid-warmup,
the warmup boundary, mid-decay and the last step; that the optimizer receives those values; the
recipe checks; and `lmforge schedule`."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.config import ConfigError, from_dict
from lmforge.optim.schedules import ScheduleConfig, apply_lr, key_points, make_schedule

PEAK, LO, T, W = 1e-3, 1e-4, 100, 10
STEPS = [0, W // 2, W, W + (T - W) // 2, T - 1]  # start, mid-warmup, boundary, mid-decay, last


def progress(s: int) -> float:
    return (s - W) / (T - W)


def warm(s: int) -> float:
    return PEAK * s / W


CLOSED_FORMS = {
    "constant": ({}, lambda s: PEAK),
    "constant_with_warmup": ({"warmup_steps": W}, lambda s: warm(s) if s < W else PEAK),
    "linear": ({"warmup_steps": W, "min_lr": LO}, lambda s: warm(s) if s < W else LO + (PEAK - LO) * (T - s) / (T - W)),
    "linear_to_zero": ({"warmup_steps": W}, lambda s: warm(s) if s < W else PEAK * (T - s) / (T - W)),
    "cosine": ({"warmup_steps": W, "min_lr": LO},
               lambda s: warm(s) if s < W else LO + (PEAK - LO) * 0.5 * (1 + math.cos(math.pi * progress(s)))),
    "cosine_with_restarts": ({"warmup_steps": W, "num_cycles": 3},
                             lambda s: warm(s) if s < W else PEAK * 0.5 * (1 + math.cos(math.pi * ((3 * progress(s)) % 1)))),
    "polynomial": ({"warmup_steps": W, "min_lr": LO, "power": 2.0},
                   lambda s: warm(s) if s < W else LO + (PEAK - LO) * (1 - progress(s)) ** 2),
    "inverse_sqrt": ({"warmup_steps": W}, lambda s: PEAK * min(s / W, math.sqrt(W / s)) if s else 0.0),
    "noam": ({"warmup_steps": W, "d_model": 64, "scale": 2.0},
             lambda s: 2.0 * 64 ** -0.5 * min(s ** -0.5, s * W ** -1.5) if s else 0.0),
    "step": ({"warmup_steps": W, "step_size": 30, "gamma": 0.5}, lambda s: warm(s) if s < W else PEAK * 0.5 ** (s // 30)),
    "step_milestones": ({"milestones": [10, 55, 90], "gamma": 0.1},
                        lambda s: PEAK * 0.1 ** sum(m <= s for m in (10, 55, 90))),
}
D = round(0.3 * T)  # wsd decay steps
for shape, f in {"linear": lambda p: 1 - p, "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
                 "1-sqrt": lambda p: 1 - math.sqrt(p)}.items():
    CLOSED_FORMS[f"wsd_{shape}"] = (
        {"warmup_steps": W, "min_lr": LO, "decay_fraction": 0.3, "decay_shape": shape},
        lambda s, f=f: (PEAK * (LO / PEAK + (1 - LO / PEAK) * s / W) if s < W else PEAK if s < T - D
                        else PEAK * (LO / PEAK + (1 - LO / PEAK) * f((s - (T - D)) / D))),
    )


def _cfg(key: str, extra: dict) -> ScheduleConfig:
    name = key.removesuffix("_to_zero").removesuffix("_milestones")
    name = "wsd" if name.startswith("wsd_") else name
    cfg = ScheduleConfig(name=name, **extra)
    assert cfg.problems() == []
    return cfg


@pytest.mark.parametrize("key", list(CLOSED_FORMS))
def test_schedule_matches_closed_form_at_key_steps(key):
    extra, closed = CLOSED_FORMS[key]
    lr_at = make_schedule(_cfg(key, extra), PEAK, T)
    steps = STEPS + [s for _, s in key_points(_cfg(key, extra), T)]
    if key.startswith("wsd"):
        steps += [T - D - 1, T - D, T - D // 2]  # the stable→decay boundary and mid-decay of wsd
    for s in steps:
        assert lr_at(s) == pytest.approx(closed(s), rel=1e-9, abs=1e-15), f"{key} at step {s}"
    assert lr_at.__doc__, "every schedule documents its formula"


@pytest.mark.parametrize("extra", [{}, {"anneal_strategy": "linear", "pct_start": 0.25},
                                   {"three_phase": True, "div_factor": 10.0, "final_div_factor": 100.0}])
def test_one_cycle_matches_torch_onecyclelr(extra):
    cfg = ScheduleConfig(name="one_cycle", **extra)
    lr_at = make_schedule(cfg, PEAK, T)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=PEAK)
    ref = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=PEAK, total_steps=T, cycle_momentum=False, pct_start=extra.get("pct_start", 0.3),
        anneal_strategy=extra.get("anneal_strategy", "cos"), three_phase=extra.get("three_phase", False),
        div_factor=extra.get("div_factor", 25.0), final_div_factor=extra.get("final_div_factor", 1e4),
    )
    for s in range(T):
        assert lr_at(s) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), s
        opt.step()
        ref.step()


def test_step_matches_torch_multisteplr():
    cfg = ScheduleConfig(name="step", milestones=[10, 55, 90], gamma=0.1)
    lr_at = make_schedule(cfg, PEAK, T)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=PEAK)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[10, 55, 90], gamma=0.1)
    for s in range(T):
        assert lr_at(s) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), s
        opt.step()
        ref.step()


def test_warmup_ratio_and_noam_d_model_from_model_config():
    cfg = ScheduleConfig(name="linear", warmup_ratio=0.1)
    assert cfg.warmup(T) == 10 and make_schedule(cfg, PEAK, T)(10) == pytest.approx(PEAK)

    class Cfg:
        hidden_size = 256

    noam = make_schedule(ScheduleConfig(name="noam", warmup_steps=W), PEAK, T, model_config=Cfg())
    assert noam(W) == pytest.approx(256 ** -0.5 * W ** -0.5)


@pytest.mark.parametrize("key", list(CLOSED_FORMS))
def test_optimizer_receives_the_scheduled_lr_times_group_scale(key):
    """apply_lr is what the loop calls before each update: check the closed-form value lands in the
    groups and that a real SGD update moves the weight by exactly lr·scale·grad."""
    w1, w2 = (torch.nn.Parameter(torch.ones(3, dtype=torch.float64)) for _ in range(2))
    opt = torch.optim.SGD([{"params": [w1], "lr_scale": 1.0}, {"params": [w2], "lr_scale": 0.25}], lr=1.0)
    extra, closed = CLOSED_FORMS[key]
    lr_at = make_schedule(_cfg(key, extra), PEAK, T)
    for s in STEPS:
        assert lr_at(s) == pytest.approx(closed(s), rel=1e-9, abs=1e-15)
        apply_lr(opt, lr_at(s))
        assert [g["lr"] for g in opt.param_groups] == [pytest.approx(lr_at(s)), pytest.approx(0.25 * lr_at(s))]
        before1, before2 = w1.detach().clone(), w2.detach().clone()
        (w1.sum() + w2.sum()).backward()  # grad 1 everywhere
        opt.step()
        opt.zero_grad()
        assert torch.allclose(before1 - w1.detach(), torch.full((3,), lr_at(s), dtype=torch.float64), rtol=1e-5, atol=0)
        assert torch.allclose(before2 - w2.detach(), torch.full((3,), 0.25 * lr_at(s), dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("raw, expect", [
    ({"name": "cosine", "warmup_steps": 5, "warmup_ratio": 0.1}, "give one, not both"),
    ({"name": "cosine", "power": 2}, "power: only read by schedule polynomial"),
    ({"name": "constant", "warmup_steps": 5}, "constant_with_warmup"),
    ({"name": "noam"}, "needs a warmup"),
    ({"name": "step"}, "step_size / milestones"),
    ({"name": "cosine_with_restarts", "min_lr": 1e-5}, "has no floor"),
    ({"name": "cosin"}, "did you mean 'cosine'"),
])
def test_recipe_mistakes_are_named(raw, expect):
    with pytest.raises(ConfigError, match=expect):
        from_dict(ScheduleConfig, raw)


def test_schedule_cli_prints_key_points_and_writes_png(tmp_path, capsys):
    from lmforge.cli import main

    png = tmp_path / "s.png"
    rc = main(["schedule", "recipes/tiny/pretrain.yaml", "schedule.name=wsd", "schedule.warmup_steps=10",
               "--out", str(png)])
    out = capsys.readouterr().out
    assert rc == 0 and png.stat().st_size > 1000
    assert "warmup end" in out and "last step" in out and "wsd" in out


def test_check_command_catches_min_lr_above_the_lr(capsys):
    from lmforge.cli import main

    assert main(["check", "recipes/tiny/pretrain.yaml", "optim.learning_rate=1e-4"]) == 2
    assert "schedule.min_lr: 0.0003 must be below optim.learning_rate=0.0001" in capsys.readouterr().err

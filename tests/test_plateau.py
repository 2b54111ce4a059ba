"""The plateau controller against torch's ReduceLROnPlateau on a dummy optimizer: random and hand-made
validation-loss sequences (ties within the threshold, cooldown, rel/abs, min/max, min_lr), the
JSON state round-trip mid-sequence, the floor under a moving base lr, and the config's problems."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from lmforge.config import ConfigError, from_dict
from lmforge.optim.plateau import EPS, Plateau, PlateauConfig

BASE = 3e-4


def torch_run(cfg: PlateauConfig, metrics: list[float], base: float = BASE) -> tuple[list[float], list[tuple]]:
    """Torch's lr after each evaluation, and its (best, num_bad_epochs, cooldown_counter)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = ReduceLROnPlateau(opt, mode=cfg.mode, factor=cfg.factor, patience=cfg.patience, threshold=cfg.threshold,
                              threshold_mode=cfg.threshold_mode, cooldown=cfg.cooldown, min_lr=cfg.min_lr, eps=EPS)
    lrs, states = [], []
    for m in metrics:
        sched.step(m)
        lrs.append(opt.param_groups[0]["lr"])
        states.append((sched.best, sched.num_bad_epochs, sched.cooldown_counter))
    return lrs, states


def ours_run(cfg: PlateauConfig, metrics: list[float], base: float = BASE, plateau: Plateau | None = None):
    plateau = plateau or Plateau(cfg)
    lrs, states, reduced = [], [], []
    for m in metrics:
        reduced.append(plateau.step(m, base))
        lrs.append(plateau.lr(base))
        states.append((plateau.best, plateau.num_bad_evals, plateau.cooldown_counter))
    return lrs, states, reduced


def assert_same_as_torch(cfg: PlateauConfig, metrics: list[float], base: float = BASE) -> list[float]:
    want, want_states = torch_run(cfg, metrics, base)
    got, got_states, reduced = ours_run(cfg, metrics, base)
    assert got == pytest.approx(want, rel=1e-12, abs=0), (cfg, metrics)
    for w, g in zip(want_states, got_states):  # the same counters, NaN best never happens (NaN never improves)
        assert g == w, (cfg, metrics)
    assert reduced == [b < a for a, b in zip([base] + want[:-1], want)]  # "reduced?" = torch's lr went down
    return got


def random_metrics(rng: random.Random, n: int, mode: str) -> list[float]:
    """A noisy curve with plateaus: big and tiny improvements, exact ties, regressions, the odd NaN."""
    m, out = rng.choice([3.0, -0.5, 0.0, 1e-3]), []
    for _ in range(n):
        r = rng.random()
        if r < 0.25:
            m -= abs(m) * rng.uniform(0.01, 0.2) + 1e-3  # a real improvement
        elif r < 0.45:
            m -= abs(m) * rng.uniform(0, 2e-4)  # within a typical threshold: a tie
        elif r < 0.6:
            pass  # an exact tie
        elif r < 0.97:
            m += abs(m) * rng.uniform(0, 0.05)  # worse
        else:
            out.append(math.nan)
            continue
        out.append(m if mode == "min" else -m)
    return out


def test_random_sequences_match_torch():
    rng = random.Random(0)
    for _ in range(300):
        cfg = PlateauConfig(
            factor=rng.choice([0.1, 0.5, 0.9]), patience=rng.randint(0, 4),
            threshold=rng.choice([0.0, 1e-4, 1e-2, 0.1]), threshold_mode=rng.choice(["rel", "abs"]),
            cooldown=rng.randint(0, 3), min_lr=rng.choice([0.0, 1e-6, BASE / 20, BASE * 0.95]), mode=rng.choice(["min", "max"]),
        )
        assert_same_as_torch(cfg, random_metrics(rng, rng.randint(1, 60), cfg.mode), base=rng.choice([BASE, 1.0, 2e-5]))


def test_ties_within_the_relative_threshold_are_bad_evaluations():
    cfg = PlateauConfig(patience=2, threshold=1e-2, threshold_mode="rel")
    # 0.995 is within 1% of 1.0: not an improvement; the third bad evaluation (> patience) reduces
    lrs = assert_same_as_torch(cfg, [1.0, 0.995, 0.995, 0.999, 0.98, 0.5])
    assert lrs == pytest.approx([BASE, BASE, BASE, BASE * 0.1, BASE * 0.1, BASE * 0.1])


def test_abs_mode_and_max_mode():
    abs_cfg = PlateauConfig(patience=1, threshold=0.05, threshold_mode="abs")
    lrs = assert_same_as_torch(abs_cfg, [2.0, 1.96, 1.97, 1.90, 1.89, 1.88])
    assert lrs == pytest.approx([BASE, BASE, BASE * 0.1, BASE * 0.1, BASE * 0.1, BASE * 0.01])
    acc = PlateauConfig(patience=0, mode="max", factor=0.5)
    lrs = assert_same_as_torch(acc, [0.5, 0.6, 0.6, 0.7, 0.65])
    assert lrs == pytest.approx([BASE, BASE, BASE * 0.5, BASE * 0.5, BASE * 0.25])


def test_cooldown_ignores_bad_evaluations():
    cfg = PlateauConfig(patience=0, cooldown=2, factor=0.5)
    lrs = assert_same_as_torch(cfg, [1.0] * 8)
    # reduce, two evaluations of cooldown, reduce, ...
    assert lrs == pytest.approx([BASE, BASE / 2, BASE / 2, BASE / 2, BASE / 4, BASE / 4, BASE / 4, BASE / 8])


def test_min_lr_clamps_and_tiny_reductions_are_skipped():
    cfg = PlateauConfig(patience=0, factor=0.1, min_lr=BASE / 50)
    lrs = assert_same_as_torch(cfg, [1.0] * 5)
    assert lrs == pytest.approx([BASE, BASE / 10, BASE / 50, BASE / 50, BASE / 50])
    assert Plateau(cfg).lr(BASE / 100) == BASE / 100  # the schedule alone may go below min_lr
    tiny = PlateauConfig(patience=0, factor=0.9)  # base 5e-8: each cut is < eps = 1e-8 → skipped, as torch does
    assert assert_same_as_torch(tiny, [1.0, 1.0, 1.0], base=5e-8) == pytest.approx([5e-8] * 3)


def test_negative_losses_in_rel_mode_follow_torch():
    # torch compares with best·(1 - threshold) literally, which for a negative best is a *looser* bar
    assert_same_as_torch(PlateauConfig(patience=1, threshold=0.1), [-1.0, -1.05, -1.2, -1.21, -1.22, -1.23])


def test_nan_is_a_bad_evaluation():
    lrs = assert_same_as_torch(PlateauConfig(patience=1), [1.0, math.nan, math.nan, 0.5])
    assert lrs == pytest.approx([BASE, BASE, BASE * 0.1, BASE * 0.1])


def test_state_round_trip_mid_sequence_continues_identically():
    rng = random.Random(1)
    for split, cfg in itertools.product([0, 1, 5, 17, 39], [PlateauConfig(patience=2, cooldown=1, factor=0.5, min_lr=1e-6),
                                                            PlateauConfig(patience=0, mode="max", threshold_mode="abs")]):
        metrics = random_metrics(rng, 40, cfg.mode)
        metrics = [m for m in metrics if not math.isnan(m)]  # NaN would compare unequal below
        uninterrupted = Plateau(cfg)
        whole, whole_states, _ = ours_run(cfg, metrics, plateau=uninterrupted)
        first = Plateau(cfg)
        head, _, _ = ours_run(cfg, metrics[:split], plateau=first)
        saved = json.loads(json.dumps(first.state_dict(), allow_nan=False))  # strict JSON: no inf for "no best yet"
        assert all(isinstance(v, (int, float)) or v is None for v in saved.values())
        resumed = Plateau(cfg)
        resumed.load_state_dict(saved)
        tail, tail_states, _ = ours_run(cfg, metrics[split:], plateau=resumed)
        assert head + tail == whole and tail_states == whole_states[split:]
        assert resumed.state_dict() == uninterrupted.state_dict()


def test_a_moving_base_is_scaled_and_cuts_never_go_below_min_lr():
    cfg = PlateauConfig(patience=0, factor=0.1, min_lr=1e-5)
    p = Plateau(cfg)
    warmup = [BASE * s / 10 for s in range(1, 11)]  # the schedule still applies under the multiplier
    assert [p.lr(b) for b in warmup] == warmup
    assert p.step(1.0, BASE) is False and p.step(1.0, BASE) is True  # first: best; second: bad > patience 0
    assert p.scale == pytest.approx(0.1)
    assert p.lr(BASE / 2) == pytest.approx(BASE / 20)
    for _ in range(5):
        p.step(1.0, BASE)
    assert p.lr(BASE) == pytest.approx(1e-5)  # clamped at min_lr for this base ...
    assert p.lr(BASE * 2) == pytest.approx(2e-5)  # ... the scale stays a multiplier of the schedule
    for base in (BASE / 3, 5e-5, 1.2e-5, 1e-5, 3e-6, 0.0):
        assert p.lr(base) >= min(base, cfg.min_lr) - 1e-18  # ... and a decaying base never drops under min_lr by a cut
        assert p.lr(base) <= base


def test_maybe_and_problems():
    from lmforge.optim.schedules import ScheduleConfig

    assert Plateau.maybe(ScheduleConfig()) is None and isinstance(Plateau.maybe(ScheduleConfig(name="plateau")), Plateau)
    assert PlateauConfig().problems() == []
    bad = PlateauConfig(factor=1.0, patience=-1, threshold=-1e-3, threshold_mode="pct", cooldown=-2, min_lr=-1.0, mode="up")
    assert [p.split(":")[0] for p in bad.problems()] == ["factor", "patience", "threshold", "threshold_mode", "cooldown",
                                                         "min_lr", "mode"]
    assert PlateauConfig(factor=0.0).problems() == ["factor: must be in (0, 1), got 0.0"]
    with pytest.raises(ConfigError) as e:
        from_dict(PlateauConfig, {"factor": 2.0, "patience": -1})
    assert any("factor: must be in (0, 1)" in p for p in e.value.problems)
    assert any("patience: must be >= 0" in p for p in e.value.problems)

"""Optimizers: lion and lamb against a step computed here from the papers' update rules; every
``optim.name`` builds, honours its keys and lowers a loss."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ConfigError, from_dict
from lmforge.optim.optimizers import Lamb, Lion, OptimConfig, build_optimizer


def _two_params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(5, dtype=torch.float64))]


def _grads(step: int, params):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]


def test_lion_matches_paper_rule():
    """Chen et al. 2023, Algorithm 2: c = β1·m + (1-β1)·g; w -= lr·(sign(c) + λ·w); m = β2·m + (1-β2)·g."""
    params = _two_params()
    ref_w = [p.detach().clone() for p in params]
    ref_m = [torch.zeros_like(p) for p in params]
    lr, b1, b2, wd = 0.01, 0.9, 0.99, 0.1
    opt = Lion([{"params": params}], lr=lr, betas=(b1, b2), weight_decay=wd)
    for step in range(3):
        grads = _grads(step, params)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            c = b1 * ref_m[i] + (1 - b1) * g
            ref_w[i] = ref_w[i] - lr * (torch.sign(c) + wd * ref_w[i])
            ref_m[i] = b2 * ref_m[i] + (1 - b2) * g
        for p, w in zip(params, ref_w):
            torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cap", [1.0, None, 0.05])
def test_lamb_matches_paper_rule(cap):
    """You et al. 2019, Algorithm 2 with bias correction; trust = min(cap, ‖w‖/‖u‖) per tensor."""
    params = _two_params()
    ref_w = [p.detach().clone() for p in params]
    ref_m = [torch.zeros_like(p) for p in params]
    ref_v = [torch.zeros_like(p) for p in params]
    lr, b1, b2, eps, wd = 0.05, 0.9, 0.999, 1e-6, 0.01
    opt = Lamb([{"params": params}], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, max_trust_ratio=cap)
    trusts = []
    for step in range(1, 4):
        grads = _grads(step, params)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            ref_m[i] = b1 * ref_m[i] + (1 - b1) * g
            ref_v[i] = b2 * ref_v[i] + (1 - b2) * g * g
            m_hat, v_hat = ref_m[i] / (1 - b1 ** step), ref_v[i] / (1 - b2 ** step)
            u = m_hat / (v_hat.sqrt() + eps) + wd * ref_w[i]
            trust = (ref_w[i].norm() / u.norm()).item()
            trust = trust if cap is None else min(cap, trust)
            trusts.append(trust)
            ref_w[i] = ref_w[i] - lr * trust * u
        for p, w in zip(params, ref_w):
            torch.testing.assert_close(p.detach(), w, rtol=1e-9, atol=1e-12)
    if cap == 0.05:
        assert any(t == 0.05 for t in trusts), "the clamp was exercised"
    if cap is None:
        assert any(t > 1 for t in trusts), "unclamped trust ratios above 1 occur"


def test_lamb_zero_weight_tensor_takes_plain_adam_step():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = Lamb([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    p.grad = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), -0.1 * torch.sign(p.grad), rtol=1e-6, atol=1e-6)  # trust 1, m̂/√v̂ = ±1


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "lamb", "sgd"])
def test_every_optimizer_builds_and_lowers_a_loss(name):
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1)
    model = torch.nn.Linear(8, 1)
    lr = {"adamw": 0.05, "adafactor": 0.05, "lion": 0.01, "lamb": 0.05, "sgd": 0.05}[name]
    cfg = OptimConfig(name=name, learning_rate=lr, weight_decay=0.0)
    groups = [{"name": "all", "params": list(model.parameters()), "weight_decay": 0.0, "lr_scale": 1.0}]
    opt = build_optimizer(cfg, groups)
    first = None
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.5 * first, name
    assert opt.param_groups[0]["lr"] == pytest.approx(lr) and opt.param_groups[0]["name"] == "all"


def test_optimizer_keys_reach_the_optimizer():
    p = [torch.nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer(OptimConfig(name="sgd", momentum=0.8, nesterov=True, weight_decay=0.0), [{"params": p}])
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"] is True
    adamw = build_optimizer(OptimConfig(adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-6), [{"params": p}])
    assert adamw.defaults["betas"] == (0.8, 0.9) and adamw.defaults["eps"] == 1e-6
    assert adamw.defaults["foreach"] or adamw.defaults["fused"]
    ada = build_optimizer(OptimConfig(name="adafactor", learning_rate=1e-3), [{"params": p}])
    assert ada.defaults["relative_step"] is False and ada.defaults["lr"] == 1e-3


@pytest.mark.parametrize("raw, expect", [
    ({"name": "adam"}, "did you mean 'adamw'"),
    ({"name": "adamw", "nesterov": True}, "nesterov: only for name: sgd"),
    ({"name": "lion", "fused": True}, "fused: only for name: adamw"),
    ({"layerwise_lr_decay": 1.5}, "layerwise_lr_decay: must be in"),
])
def test_optim_recipe_mistakes_are_named(raw, expect):
    with pytest.raises(ConfigError, match=expect):
        from_dict(OptimConfig, raw)

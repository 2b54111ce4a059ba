"""lmforge.quant.prune: exact sparsity per method and scope, 2:4 in every group of four, Wanda's
activation-aware choice, permanent masks, and the errors for bad settings."""

from __future__ import annotations

import pytest
import torch
from test_quant_measure import (
    eval_batches,
    markov_batches,
    single_thread,  # noqa: F401  (autouse: torch on one thread)
    tiny_config,
    trained_tiny,
)
from torch import nn
from torch.nn.utils import parametrize
from transformers import LlamaForCausalLM

from lmforge.config import UserError
from lmforge.quant import measure, prune
from lmforge.quant.prune import PruneSettings


def random_tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_magnitude_per_layer_hits_the_target_in_every_layer(sparsity):
    model = random_tiny()
    lm_head, embed = model.lm_head.weight.clone(), model.model.embed_tokens.weight.clone()
    report = prune.prune(model, PruneSettings(method="magnitude", sparsity=sparsity))
    for name, layer in linears(model).items():
        assert zeros(layer.weight) == round(sparsity * layer.weight.numel()), name
        assert report.layers[name] == pytest.approx(sparsity)
    assert report.overall == pytest.approx(sparsity)
    assert torch.equal(model.lm_head.weight, lm_head) and torch.equal(model.model.embed_tokens.weight, embed)
    # the smallest weights went: every kept weight is at least as large as every pruned one
    w = model.model.layers[0].mlp.up_proj.weight
    before = random_tiny().model.layers[0].mlp.up_proj.weight
    assert before[w == 0].abs().max() <= before[w != 0].abs().min()


def test_magnitude_global_hits_the_target_over_all_layers_not_each():
    model = random_tiny()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(4)  # one layer of large weights loses few of them
    report = prune.prune(model, PruneSettings(method="magnitude", sparsity=0.5, scope="global"))
    total = sum(layer.weight.numel() for layer in linears(model).values())
    assert report.zeros == round(0.5 * total) and report.total == total
    assert report.layers["model.layers.0.mlp.up_proj"] < 0.2
    assert min(v for k, v in report.layers.items() if k != "model.layers.0.mlp.up_proj") > 0.5


def test_wanda_prunes_the_target_fraction_of_every_output_row():
    model = random_tiny()
    prune.prune(model, PruneSettings(method="wanda", sparsity=0.5), calibration=markov_batches(2, batch=4))
    for name, layer in linears(model).items():
        per_row = (layer.weight == 0).sum(dim=1)
        assert torch.all(per_row == round(0.5 * layer.in_features)), name


@pytest.mark.parametrize("score", ["magnitude", "wanda"])
def test_2_of_4_in_every_group_of_four(score):
    model = random_tiny()
    report = prune.prune(model, PruneSettings(method="2:4", score=score), calibration=markov_batches(2, batch=4))
    for name, layer in linears(model).items():
        groups = (layer.weight == 0).reshape(layer.out_features, -1, 4).sum(-1)
        assert torch.all(groups == 2), name
    assert report.overall == 0.5


class OneLayer(nn.Module):
    """A single linear layer that takes float features as its `input_ids`, as the calibration loop passes them."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.proj.weight.data.copy_(weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(input_ids)


def test_wanda_keeps_small_weights_on_a_large_input_feature():
    torch.manual_seed(0)
    weight = 1 + torch.rand(4, 8)  # weights in [1, 2) ...
    weight[:, 0] = 0.1  # ... except on input feature 0, which is 100x larger than the others
    features = torch.randn(64, 8)
    features[:, 0] *= 100
    magnitude, wanda = OneLayer(weight), OneLayer(weight)
    prune.prune(magnitude, PruneSettings(method="magnitude", sparsity=0.25, skip_modules=[]))
    prune.prune(wanda, PruneSettings(method="wanda", sparsity=0.25, skip_modules=[]), calibration=[features])
    assert torch.all(magnitude.proj.weight[:, 0] == 0)  # magnitude drops the small weights ...
    assert torch.all(wanda.proj.weight[:, 0] == 0.1)  # ... wanda keeps them, as they carry the signal
    assert zeros(wanda.proj.weight) == zeros(magnitude.proj.weight) == 8
    exact = features @ weight.T
    assert (wanda(features) - exact).norm() < (magnitude(features) - exact).norm()  # wanda's output stays closer


def test_masks_are_permanent_and_no_hook_is_left():
    model = random_tiny()
    prune.prune(model, PruneSettings(method="wanda", sparsity=0.5), calibration=markov_batches(1, batch=4))
    for name, module in model.named_modules():
        assert not module._forward_pre_hooks and not module._forward_hooks, name
        assert not parametrize.is_parametrized(module), name
    for name, param in model.named_parameters():
        assert type(param) is nn.Parameter, name
    assert set(model.state_dict()) == set(random_tiny().state_dict())


def test_pruned_trained_model_keeps_a_sane_perplexity():
    model = trained_tiny()
    dense = measure.perplexity(model, eval_batches())
    prune.prune(model, PruneSettings(method="wanda", sparsity=0.5), calibration=markov_batches(2, batch=8, seed=7))
    assert dense < measure.perplexity(model, eval_batches()) < dense * 1.5
    assert measure.top1_agreement(trained_tiny(), model, eval_batches()) > 0.8


def test_bad_settings_are_all_reported():
    model = random_tiny()
    with pytest.raises(UserError) as err:
        prune.prune(model, PruneSettings(method="wanda", sparsity=1.0, scope="global"))
    assert err.value.problems == [
        "sparsity: must be in [0, 1), got 1.0",
        "scope: global applies to magnitude pruning only, not wanda",
        "calibration: wanda (score: wanda) needs calibration batches",
    ]
    for bad in [-0.1, 1.5]:
        with pytest.raises(UserError, match="sparsity: must be in"):
            prune.prune(model, PruneSettings(sparsity=bad))
    with pytest.raises(UserError, match="2:4 keeps 2 of every 4 weights"):
        prune.prune(model, PruneSettings(method="2:4", sparsity=0.3))
    with pytest.raises(UserError, match="'magnitde' is not one of"):
        prune.prune(model, PruneSettings(method="magnitde"))
    with pytest.raises(UserError, match="'lm_haed' matches no module"):
        prune.prune(model, PruneSettings(skip_modules=["lm_haed"]))
    with pytest.raises(UserError, match=r"input width of proj \(6\) is not a multiple of 4"):
        prune.prune(OneLayer(torch.ones(4, 6)), PruneSettings(method="2:4", skip_modules=[]))
    assert measure.parameter_bytes(model).total == measure.parameter_bytes(random_tiny()).total
    assert prune.sparsity_report(model).zeros == 0  # nothing was pruned by the refused calls

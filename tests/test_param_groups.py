"""Parameter groups: weight-decay exclusions, layer-wise LR decay on five architectures, per-module
multipliers, the group table, and the every-parameter-exactly-once check."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from lmforge.config import UserError
from lmforge.optim.optimizers import OptimConfig, build_optimizer
from lmforge.optim.param_groups import build_param_groups, check_groups, find_layers, no_decay_names

L = 3
TINY = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(n_embd=32, n_layer=L, n_head=4, n_positions=64),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4),
    "bert": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4, max_position_embeddings=64),
}
BLOCKS = {"llama": "model.layers", "mistral": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers",
          "bert": "bert.encoder.layer"}
EMBED = {"llama": "model.embed_tokens.weight", "mistral": "model.embed_tokens.weight", "gpt2": "transformer.wte.weight",
         "gpt_neox": "gpt_neox.embed_in.weight", "bert": "bert.embeddings.word_embeddings.weight"}
HEAD = {"llama": "lm_head.weight", "mistral": "lm_head.weight", "gpt2": "transformer.ln_f.weight",
        "gpt_neox": "lm_head.weight", "bert": "cls.predictions.transform.dense.weight"}


def tiny_model(model_type: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=64, **TINY[model_type])
    cls = AutoModelForMaskedLM if model_type == "bert" else AutoModelForCausalLM
    return cls.from_config(config)


def scale_of(groups: list[dict], model, name: str) -> tuple[float, float]:
    p = dict(model.named_parameters())[name]
    (g,) = [g for g in groups if any(q is p for q in g["params"])]
    return g["lr_scale"], g["weight_decay"]


@pytest.mark.parametrize("model_type", list(TINY))
def test_layerwise_lr_decay_on_each_architecture(model_type):
    model = tiny_model(model_type)
    d = 0.5
    assert find_layers(model)[0] == BLOCKS[model_type]
    groups = build_param_groups(model, OptimConfig(layerwise_lr_decay=d, weight_decay=0.1))
    # block i (0-based) of L: d^(L-i); embeddings d^(L+1), the lowest; head / final norm 1, the highest
    for i in range(L):
        name = next(n for n, p in model.named_parameters() if n.startswith(f"{BLOCKS[model_type]}.{i}.") and p.ndim == 2)
        assert scale_of(groups, model, name) == (pytest.approx(d ** (L - i)), 0.1), name
    assert scale_of(groups, model, EMBED[model_type])[0] == pytest.approx(d ** (L + 1))
    assert scale_of(groups, model, HEAD[model_type])[0] == pytest.approx(1.0)
    scales = [g["lr_scale"] for g in groups]
    assert min(scales) == pytest.approx(d ** (L + 1)) and max(scales) == pytest.approx(1.0)
    check_groups(model, groups)
    # the optimizer gets one group per (depth, decay) with those scales and the loop's lr rule
    opt = build_optimizer(OptimConfig(learning_rate=1e-3), groups)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-3 * s) for s in scales]


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_no_decay_for_bias_norm_embeddings_positions(model_type):
    model = tiny_model(model_type)
    skip = no_decay_names(model)
    pos = {"gpt2": "transformer.wpe.weight", "bert": "bert.embeddings.position_embeddings.weight"}[model_type]
    bias = next(n for n, _ in model.named_parameters() if n.endswith(".bias"))
    norm = {"gpt2": "transformer.h.0.ln_1.weight", "bert": "bert.embeddings.LayerNorm.weight"}[model_type]
    assert {pos, bias, norm, EMBED[model_type]} <= skip
    matmul = {"gpt2": "transformer.h.0.attn.c_attn.weight", "bert": "bert.encoder.layer.0.attention.self.query.weight"}
    assert matmul[model_type] not in skip
    # each exclusion has a switch
    keep = OptimConfig(no_decay_positions=False, no_decay_embeddings=False, no_decay_bias=False, no_decay_norm=True)
    skip2 = no_decay_names(model, keep)
    assert pos not in skip2 and EMBED[model_type] not in skip2 and bias not in skip2 and norm in skip2
    groups = build_param_groups(model, keep)
    assert scale_of(groups, model, pos)[1] == keep.weight_decay


def test_lr_multipliers_by_pattern_and_product_with_llrd(caplog):
    model = tiny_model("llama")
    cfg = OptimConfig(learning_rate=1e-3, lr_multipliers={"embed_tokens": 0.1, "lm_head": 2.0, "*.mlp.*": 0.5})
    with caplog.at_level(logging.INFO, logger="lmforge.optim.param_groups"):
        groups = build_param_groups(model, cfg)
    assert scale_of(groups, model, "model.embed_tokens.weight") == (pytest.approx(0.1), 0.0)
    assert scale_of(groups, model, "lm_head.weight")[0] == pytest.approx(2.0)
    assert scale_of(groups, model, "model.layers.1.mlp.up_proj.weight")[0] == pytest.approx(0.5)
    assert scale_of(groups, model, "model.layers.1.self_attn.q_proj.weight")[0] == pytest.approx(1.0)
    table = caplog.text
    assert "peak lr" in table and "lm_head" in table and "0.002" in table  # name, #params, lr, wd per group
    groups = build_param_groups(model, OptimConfig(layerwise_lr_decay=0.5, lr_multipliers={"lm_head": 2.0}))
    assert scale_of(groups, model, "lm_head.weight")[0] == pytest.approx(2.0)
    assert scale_of(groups, model, "model.layers.0.mlp.up_proj.weight")[0] == pytest.approx(0.5 ** L)


def test_unknown_pattern_and_missing_layers_are_named():
    model = tiny_model("llama")
    with pytest.raises(UserError, match=r"lr_multipliers: pattern\(s\) \['embedings'\] match no trainable parameter"):
        build_param_groups(model, OptimConfig(lr_multipliers={"embedings": 0.1}))

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    with pytest.raises(UserError, match="no list of .* transformer blocks found in Mlp"):
        build_param_groups(Mlp(), OptimConfig(layerwise_lr_decay=0.8))


def test_frozen_parameters_stay_out_and_check_groups_catches_mistakes():
    model = tiny_model("gpt2")
    model.transformer.wte.weight.requires_grad_(False)
    groups = build_param_groups(model, OptimConfig(layerwise_lr_decay=0.9))
    assert all(p is not model.transformer.wte.weight for g in groups for p in g["params"])
    params = list(model.parameters())
    with pytest.raises(RuntimeError, match="missing"):
        check_groups(model, [{"params": [p for p in params if p.requires_grad][1:]}])
    with pytest.raises(RuntimeError, match="in two groups"):
        check_groups(model, [{"params": [p for p in params if p.requires_grad]}, {"params": params[1:2]}])

"""model.init.scheme: each scheme's measured std per tensor family against its formula, on models big
enough (hidden 256, 4 layers, vocab 1000) that the estimate is within ~1% of the truth."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lmforge.config import ConfigError, UserError, from_dict, nested
from lmforge.init_weights import InitConfig, apply_init

LAYERS = 4
TOL = 0.03  # relative; a 256 x 256 tensor's std estimate is off by ~0.3%


def llama(seed: int = 0, **overrides) -> nn.Module:
    """Built with initializer_range 0.1, so a scheme that drew nothing fails the 0.02 checks."""
    kw = dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=64, initializer_range=0.1)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **{**kw, **overrides}))


def std(tensors) -> float:
    return torch.cat([t.detach().float().flatten() for t in tensors]).std().item()


def weights(model: nn.Module, *suffixes: str) -> list[torch.Tensor]:
    return [m.weight for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in suffixes]


def close(measured: float, expected: float) -> bool:
    return abs(measured / expected - 1) < TOL


ATTN_MLP_IN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def test_normal_draws_every_weight_from_std():
    model = llama()
    report = apply_init(model, InitConfig(scheme="normal"))
    for name in (*ATTN_MLP_IN, "o_proj", "down_proj"):
        assert close(std(weights(model, name)), 0.02), name
    assert close(std([model.model.embed_tokens.weight]), 0.02)
    assert close(std([model.lm_head.weight]), 0.02)  # untied: a Linear of its own
    assert all(torch.all(w == 1) for w in weights(model, "input_layernorm", "post_attention_layernorm", "norm"))
    assert set(report) == {"token_embedding", "lm_head", "linear", "norm"}


@pytest.mark.parametrize("scheme", ["xavier_uniform", "xavier_normal"])
def test_xavier_std_is_sqrt_2_over_fans(scheme):
    model = llama()
    apply_init(model, InitConfig(scheme=scheme))
    for name in (*ATTN_MLP_IN, "o_proj", "down_proj"):
        fan_out, fan_in = weights(model, name)[0].shape  # (out, in)
        assert close(std(weights(model, name)), math.sqrt(2 / (fan_in + fan_out))), name
    gate = model.model.layers[0].mlp.gate_proj.weight
    bound = math.sqrt(6 / sum(gate.shape))
    if scheme == "xavier_uniform":  # uniform on [-bound, bound]: the extremes reach the bound
        assert bound * 0.99 < gate.abs().max().item() <= bound
    else:
        assert gate.abs().max().item() > bound  # a normal's tail passes it
    assert close(std([model.model.embed_tokens.weight]), 0.02)  # embeddings N(0, std), not xavier


def test_scaled_residual_shrinks_only_the_output_projections():
    model = llama()
    report = apply_init(model, InitConfig(scheme="scaled_residual"))
    scaled = 0.02 / math.sqrt(2 * LAYERS)
    assert close(std(weights(model, "o_proj")), scaled)
    assert close(std(weights(model, "down_proj")), scaled)
    for name in ATTN_MLP_IN:
        assert close(std(weights(model, name)), 0.02), name
    assert close(std([model.model.embed_tokens.weight, model.lm_head.weight]), 0.02)
    assert "8 tensors (down_proj, o_proj)" in report["residual_out"]


@pytest.mark.parametrize("model_type, outputs, inputs", [
    ("gpt2", ("c_proj",), ("c_attn", "c_fc")),  # transformers' Conv1D, weight stored (in, out)
    ("gpt_neox", ("dense", "dense_4h_to_h"), ("query_key_value", "dense_h_to_4h")),
])
def test_scaled_residual_on_conv1d_and_neox(model_type, outputs, inputs):
    kw = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=64)
    if model_type == "gpt_neox":
        kw["intermediate_size"] = 1024
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw))
    # std 0.05: GPT-2's own init already scales c_proj by 1/sqrt(2 n_layer) around 0.02, so 0.02 would not tell
    apply_init(model, InitConfig(scheme="scaled_residual", std=0.05))
    found = weights(model, *outputs)
    assert len(found) == 2 * LAYERS
    assert close(std(found), 0.05 / math.sqrt(2 * LAYERS))
    assert close(std(weights(model, *inputs)), 0.05)
    biases = [m.bias for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in outputs + inputs]
    assert all(torch.all(b == 0) for b in biases)
    if model_type == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight
        assert close(std([model.transformer.wpe.weight]), 0.05)


def test_small_embeddings_redraws_only_the_token_embedding():
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_init(model, InitConfig(scheme="small_embeddings"))
    assert close(std([model.model.embed_tokens.weight]), 1e-4)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["model.embed_tokens.weight"]
    assert report["token_embedding"] == "N(0, 0.0001)"
    apply_init(model, InitConfig(scheme="small_embeddings", embedding_std=1e-3))
    assert close(std([model.model.embed_tokens.weight]), 1e-3)


def test_embedding_std_is_honoured_by_other_schemes():
    model = llama()
    apply_init(model, InitConfig(scheme="scaled_residual", embedding_std=0.05))
    assert close(std([model.model.embed_tokens.weight]), 0.05)
    assert close(std([model.lm_head.weight]), 0.02)  # the untied head is a Linear: std


@pytest.mark.parametrize("scheme", ["normal", "xavier_uniform", "scaled_residual", "small_embeddings"])
def test_tied_embeddings_stay_tied(scheme):
    model = llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = apply_init(model, InitConfig(scheme=scheme))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # drawn once, as the embedding (xavier would give the (1000, 256) head sqrt(2/1256) = 0.040)
    assert close(std([model.model.embed_tokens.weight]), 1e-4 if scheme == "small_embeddings" else 0.02)
    assert "tied with the output head" in report["token_embedding"]


def test_same_seed_same_weights_other_seed_other_weights():
    def run(seed):
        model = llama(seed=seed, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        apply_init(model, InitConfig(scheme="scaled_residual"))
        return model.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.o_proj.weight"], c["model.layers.0.self_attn.o_proj.weight"])
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_hf_leaves_the_model_as_built():
    model = llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_init(model, InitConfig()) == {"all": "as built by LlamaForCausalLM._init_weights"}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_scaled_residual_on_an_unknown_architecture_says_how_to_fix():
    from transformers import PretrainedConfig, PreTrainedModel

    class ToyConfig(PretrainedConfig):
        model_type = "toy"

    class ToyForCausalLM(PreTrainedModel):
        config_class = ToyConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed_tokens = nn.Embedding(16, 8)
            self.mixer = nn.Linear(8, 8)  # no name that marks a residual output projection
            self.post_init()

        def get_input_embeddings(self):
            return self.embed_tokens

    model = ToyForCausalLM(ToyConfig())
    with pytest.raises(UserError) as e:
        apply_init(model, InitConfig(scheme="scaled_residual"))
    (line,) = e.value.problems
    assert line.startswith("init.scheme: scaled_residual found no residual output projection in ToyForCausalLM")
    assert "use init.scheme: normal" in line and "RESIDUAL_OUTPUTS" in line
    assert "1 tensor" in apply_init(model, InitConfig(scheme="normal"))["linear"]  # schemes without projections work


def test_problems_name_the_key():
    assert InitConfig().problems() == []
    assert InitConfig(std=0.0).problems() == ["std: must be > 0, got 0.0", "std: only read by init.scheme normal / "
                                              "xavier_uniform / xavier_normal / scaled_residual, not 'hf'; remove it"]
    assert InitConfig(scheme="normal", std=-1.0).problems() == ["std: must be > 0, got -1.0"]
    assert InitConfig(scheme="normal", embedding_std=0.0).problems() == [
        "embedding_std: must be > 0 (or null for the scheme's default), got 0.0"]
    assert InitConfig(scheme="bogus").problems() == [  # type: ignore[arg-type]
        "scheme: must be one of hf, normal, xavier_uniform, xavier_normal, scaled_residual, small_embeddings, got 'bogus'"]

    @dataclasses.dataclass
    class Root:
        init: InitConfig = nested(InitConfig)

    assert from_dict(Root, {"init": {"scheme": "scaled_residual", "std": "1e-2"}}).init.std == 0.01
    with pytest.raises(ConfigError) as e:
        from_dict(Root, {"init": {"scheme": "scaled_residul", "embedding_std": -1}})
    assert e.value.problems[0].startswith("recipe: init.scheme: must be one of 'hf'")
    assert e.value.problems[0].endswith("did you mean 'scaled_residual'?")
    with pytest.raises(ConfigError) as e:
        from_dict(Root, {"init": {"scheme": "normal", "embedding_std": -1}})
    assert e.value.problems == ["recipe: init.embedding_std: must be > 0 (or null for the scheme's default), got -1.0"]

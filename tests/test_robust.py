"""Gradient noise against its formula and its resume property; stochastic depth (LayerDrop) on Llama,
GPT-2 and GPT-NeoX against a hand-built model without the dropped block."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lmforge.config import ConfigError, UserError, from_dict
from lmforge.train.robust import (
    GradNoiseConfig,
    StochasticDepth,
    StochasticDepthConfig,
    add_grad_noise,
    decoder_blocks,
    drop_probabilities,
    enable_stochastic_depth,
    grad_noise_sigma,
)

# ---- gradient noise ------------------------------------------------------------------------------


def zero_grad_params(*shapes, dtype=torch.float32) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.zeros_like(p)
    return params


@pytest.mark.parametrize("t", [0, 1, 9, 1000])
def test_sigma_is_the_formula(t):
    eta, gamma = 0.3, 0.55
    expect = math.sqrt(eta / (1 + t) ** gamma)
    assert grad_noise_sigma(eta, gamma, t) == pytest.approx(expect, rel=1e-15)
    assert add_grad_noise(zero_grad_params(3), eta, gamma, t, seed=0) == pytest.approx(expect, rel=1e-15)


def test_empirical_std_matches_sigma_and_mean_is_zero():
    (p, q) = zero_grad_params((300, 300), (50,))
    sigma = add_grad_noise([p, q], eta=0.5, gamma=0.55, step=7, seed=1)
    assert sigma == pytest.approx(math.sqrt(0.5 / 8**0.55))
    assert p.grad.std().item() == pytest.approx(sigma, rel=0.01)  # 90k samples: std error ~0.24%
    assert abs(p.grad.mean().item()) < 4 * sigma / 300
    assert q.grad.abs().sum() > 0  # every gradient gets noise


def test_noise_is_added_to_the_existing_gradient():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(64))
    g = torch.randn(64)
    p.grad = g.clone()
    (ref,) = zero_grad_params(64)
    add_grad_noise([p], 0.1, 0.55, 3, seed=5)
    add_grad_noise([ref], 0.1, 0.55, 3, seed=5)
    torch.testing.assert_close(p.grad, g + ref.grad, rtol=0, atol=1e-7)


def noise_at(step: int, seed: int = 3, rank: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    params = zero_grad_params((4, 5), (7,), dtype=dtype)
    add_grad_noise(params, 0.2, 0.55, step, seed, rank)
    return [p.grad.clone() for p in params]


def test_same_seed_and_step_same_noise_different_step_or_seed_different():
    a, b = noise_at(4), noise_at(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for other in (noise_at(5), noise_at(4, seed=4), noise_at(4, rank=1)):
        assert not torch.equal(a[0], other[0])


def test_noise_at_a_step_does_not_depend_on_earlier_steps_or_touch_the_global_rng():
    fresh = noise_at(0), noise_at(6)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    params = zero_grad_params((4, 5), (7,))
    for step in range(6):  # an uninterrupted run: steps 0..5 first, gradients reset after each
        add_grad_noise(params, 0.2, 0.55, step, 3)
        for p in params:
            p.grad.zero_()
    assert torch.equal(torch.get_rng_state(), before)  # no global RNG consumed
    add_grad_noise(params, 0.2, 0.55, 6, 3)
    assert all(torch.equal(p.grad, x) for p, x in zip(params, fresh[1]))  # = the resumed run's step 6
    assert all(torch.equal(x, y) for x, y in zip(noise_at(0), fresh[0]))


def test_other_dtypes_get_the_fp32_noise_cast_and_missing_grads_are_skipped():
    bf16 = noise_at(2, dtype=torch.bfloat16)
    fp32 = noise_at(2)
    assert bf16[0].dtype == torch.bfloat16
    assert all(torch.equal(x, y.to(torch.bfloat16)) for x, y in zip(bf16, fp32))
    p, q = zero_grad_params(3, 3)
    q.grad = None
    add_grad_noise([p, q], 1.0, 0.55, 0, 0)
    assert q.grad is None and p.grad.abs().sum() > 0


def test_eta_zero_is_off():
    (p,) = zero_grad_params(8)
    assert add_grad_noise([p], 0.0, 0.55, 0, 0) == 0.0
    assert torch.equal(p.grad, torch.zeros(8))


def test_grad_noise_config_problems():
    assert GradNoiseConfig().problems() == []
    assert [p.split(":")[0] for p in GradNoiseConfig(eta=-0.1, gamma=-1).problems()] == ["eta", "gamma"]
    with pytest.raises(ConfigError) as e:  # the recipe parser reports both at once
        from_dict(GradNoiseConfig, {"eta": -0.1, "gamma": -1})
    assert any("eta: must be >= 0" in p for p in e.value.problems)
    assert any("gamma: must be >= 0" in p for p in e.value.problems)


# ---- stochastic depth ----------------------------------------------------------------------------

L = 2
TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(n_embd=64, n_layer=L, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=L, num_attention_heads=4),
}
BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


def tiny_model(model_type: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=128, **TINY[model_type])
    return AutoModelForCausalLM.from_config(config)


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def step_with(sd: StochasticDepth, pattern: list[bool]) -> int:
    """The first counter whose decisions are ``pattern``."""
    return next(k for k in range(10_000) if sd.dropped(k) == pattern)


def without_block(model, model_type: str, drop: int):
    """Reference by hand: a copy of the plain model whose block list lacks block ``drop``."""
    ref = copy.deepcopy(model)
    parent_name, attr = BLOCKS[model_type].rsplit(".", 1)
    parent = ref.get_submodule(parent_name)
    setattr(parent, attr, torch.nn.ModuleList([b for i, b in enumerate(getattr(parent, attr)) if i != drop]))
    return ref


@pytest.mark.parametrize("model_type", list(TINY))
def test_eval_is_the_plain_model_and_train_drops_match_the_model_without_the_block(model_type):
    model = tiny_model(model_type).eval()
    x = ids()
    with torch.no_grad():
        plain = model(x).logits
    keys = list(model.state_dict())
    sd = enable_stochastic_depth(model, rate=0.6, schedule="linear", seed=0)
    assert decoder_blocks(model)[0] == BLOCKS[model_type]
    assert list(model.state_dict()) == keys
    sd.set_step(step_with(sd, [False, True]))
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain)  # eval mode: every block runs
        model.train()  # the tiny configs have no active dropout: train mode is deterministic here
        for drop in (0, 1):
            sd.set_step(step_with(sd, [i == drop for i in range(L)]))
            ref = without_block(model, model_type, drop)
            torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=0)
        sd.set_step(step_with(sd, [True, True]))  # every block dropped: the head on the embeddings
        ref = without_block(without_block(model, model_type, 1), model_type, 0)
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=0)
        sd.set_step(step_with(sd, [False, False]))
        assert torch.equal(model(x).logits, plain)


@pytest.mark.parametrize("model_type", list(TINY))
def test_gradient_flows_and_dropped_blocks_get_none(model_type):
    model = tiny_model(model_type).train()
    sd = enable_stochastic_depth(model, rate=0.6, schedule="linear", seed=0)
    sd.set_step(step_with(sd, [False, True]))
    x = ids()
    model(x, labels=x).loss.backward()
    prefix = BLOCKS[model_type]
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith(f"{prefix}.1."))
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(f"{prefix}.0.") and "bias" not in n)


def test_gradient_checkpointing_recompute_sees_the_same_decisions():
    x = ids()
    out = []
    for ckpt in (False, True):
        model = tiny_model("llama").train()
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        sd = enable_stochastic_depth(model, rate=0.6, schedule="linear", seed=0)
        sd.set_step(step_with(sd, [True, False]))
        model(x, labels=x).loss.backward()
        out.append({n: p.grad for n, p in model.named_parameters()})
    assert out[0].keys() == out[1].keys()
    for n in out[0]:
        if out[0][n] is None:
            assert out[1][n] is None, n
        else:
            torch.testing.assert_close(out[0][n], out[1][n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("schedule", ["linear", "uniform"])
def test_drop_frequencies_follow_the_schedule(schedule):
    L_, rate, n = 4, 0.5, 4000
    blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(L_))
    sd = StochasticDepth(blocks, drop_probabilities(rate, schedule, L_), seed=7)
    expect = [rate * (i + 1) / L_ for i in range(L_)] if schedule == "linear" else [rate] * L_
    assert sd.probs == pytest.approx(expect)
    counts = torch.tensor([sd.dropped(k) for k in range(n)], dtype=torch.float64).mean(0)
    for freq, p in zip(counts.tolist(), expect):
        assert freq == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))  # 4 standard errors
    assert sd.dropped(123) == sd.dropped(123)  # pure in the counter: resume redraws the same
    assert StochasticDepth(torch.nn.ModuleList(torch.nn.Identity() for _ in range(L_)), sd.probs, 7).dropped(123) == sd.dropped(123)


def test_forward_needs_a_step_and_the_global_rng_is_untouched():
    model = tiny_model("llama").train()
    sd = enable_stochastic_depth(model, 0.5, "uniform", seed=0)
    with pytest.raises(RuntimeError, match="set_step"):
        model(ids())
    torch.manual_seed(1)
    before = torch.get_rng_state()
    sd.set_step(3)
    with torch.no_grad():
        model(ids())
    assert torch.equal(torch.get_rng_state(), before)


def test_tuple_returning_blocks_keep_their_structure():
    class Block(torch.nn.Module):  # the transformers 4.x convention: (hidden_states, extra)
        def forward(self, hidden_states, scale=1.0):
            return hidden_states * scale + 1, "extra"

    blocks = torch.nn.ModuleList([Block()])
    sd = StochasticDepth(blocks, [0.5], seed=0)
    h = torch.ones(2)
    sd.set_step(step_with(sd, [False]))
    assert blocks[0](h, scale=2.0)[1] == "extra"
    sd.set_step(step_with(sd, [True]))
    out = blocks[0](hidden_states=h)
    assert isinstance(out, tuple) and len(out) == 2 and out[0] is h and out[1] is None


def test_saved_model_loads_in_plain_transformers_with_identical_keys(tmp_path):
    model = tiny_model("gpt2")
    keys = set(model.state_dict())
    sd = enable_stochastic_depth(model, 0.5, "linear", seed=0)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert set(loaded.state_dict()) == keys
    assert "forward" not in loaded.transformer.h[0].__dict__
    model.eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    sd.disable()
    assert all("forward" not in b.__dict__ and "_lmforge_sd" not in b.__dict__ for b in model.transformer.h)


def test_deepcopy_rebinds_to_the_copy_and_disable_restores_the_plain_model():
    model = tiny_model("llama").train()
    sd = enable_stochastic_depth(model, 0.6, "linear", seed=0)
    clone = copy.deepcopy(model)
    assert clone.model.layers[0].forward.__self__ is clone.model.layers[0]
    assert clone.model.layers[0]._lmforge_sd_inner.__self__ is clone.model.layers[0]
    sd.set_step(step_with(sd, [True, True]))
    x = ids()
    with torch.no_grad():
        dropped = model(x).logits
        sd.disable()
        plain = model(x).logits  # no step needed any more: the plain model
        assert not torch.equal(dropped, plain)
        assert torch.equal(plain, tiny_model("llama").train()(x).logits)
    with pytest.raises(RuntimeError, match="already enabled"):
        StochasticDepth(clone.model.layers, [0.1, 0.1], 0)


def test_works_through_a_peft_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).train()
    keys = list(model.state_dict())
    sd = StochasticDepth.maybe(StochasticDepthConfig(rate=0.6), model, seed=0)
    assert sd is not None and len(sd.blocks) == L and list(model.state_dict()) == keys
    sd.set_step(step_with(sd, [False, True]))
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert all(g is None for n, g in lora.items() if ".layers.1." in n)
    assert any(g is not None for n, g in lora.items() if ".layers.0." in n)
    assert StochasticDepth.maybe(StochasticDepthConfig(), tiny_model("llama"), seed=0) is None


def test_no_block_list_is_a_user_error():
    with pytest.raises(UserError, match="train.stochastic_depth"):
        enable_stochastic_depth(torch.nn.Linear(2, 2), 0.5, "linear", 0)


def test_stochastic_depth_config_problems():
    assert StochasticDepthConfig().problems() == []
    assert StochasticDepthConfig(rate=1.0).problems()[0].startswith("rate: must be in [0, 1)")
    assert StochasticDepthConfig(rate=-0.1).problems()[0].startswith("rate:")
    assert StochasticDepthConfig(schedule="cosine").problems()[0].startswith("schedule:")
    with pytest.raises(ConfigError) as e:
        from_dict(StochasticDepthConfig, {"rate": 1.5})
    assert any("rate: must be in [0, 1)" in p for p in e.value.problems)

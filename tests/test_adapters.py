"""Bottleneck adapters (lmforge.peft): a real peft method — identity at start, placement, save/load, no merge."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from test_finetune import build_tiny_base

import lmforge.peft  # noqa: F401  (registers BOTTLENECK)
from lmforge.peft import BottleneckConfig, BottleneckLayer

IDS = torch.tensor([[5, 70, 73, 301, 77, 203, 4, 265]])


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_bases")
    return {t: build_tiny_base(root / t, t) for t in ("llama", "gpt2")}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("adapter_type,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_placement_identity_at_init_and_exact_reload(bases, model_type, adapter_type, per_layer, tmp_path):
    base = _load(bases[model_type])
    with torch.no_grad():
        ref = base(IDS).logits
    model = get_peft_model(base, BottleneckConfig(task_type="CAUSAL_LM", adapter_type=adapter_type, reduction_factor=4,
                                                  non_linearity="gelu"))
    layers = [n for n, m in model.named_modules() if isinstance(m, BottleneckLayer)]
    assert len(layers) == 2 * per_layer  # 2 transformer blocks
    if adapter_type == "pfeiffer":
        assert all(n.endswith(("mlp.down_proj", "mlp.c_proj")) for n in layers)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref)  # up-projection starts at zero: the base model exactly
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".bottleneck_" in n for n in trainable)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        out = model(IDS).logits
    assert not torch.allclose(out, ref)
    model.save_pretrained(tmp_path / "ad")
    assert '"peft_type": "BOTTLENECK"' in (tmp_path / "ad" / "adapter_config.json").read_text()
    reloaded = PeftModel.from_pretrained(_load(bases[model_type]), tmp_path / "ad").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, out)
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(IDS).logits, ref)


def test_width_from_reduction_factor_and_no_merge(bases):
    model = get_peft_model(_load(bases["llama"]), BottleneckConfig(task_type="CAUSAL_LM", reduction_factor=16))
    layer = next(m for m in model.modules() if isinstance(m, BottleneckLayer))
    assert layer.bottleneck_down["default"].weight.shape == (64 // 16, 64)
    with pytest.raises(ValueError, match="non-linear and cannot be merged"):
        model.merge_and_unload()


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="adapter_type must be 'houlsby' or 'pfeiffer'"):
        BottleneckConfig(adapter_type="parallel")
    with pytest.raises(ValueError, match="non_linearity must be one of"):
        BottleneckConfig(non_linearity="softmax")


def test_unknown_model_type_asks_for_target_modules():
    from transformers import AutoConfig, AutoModelForCausalLM

    m = AutoModelForCausalLM.from_config(AutoConfig.for_model("gptj", vocab_size=64, n_embd=32, n_layer=1, n_head=2, rotary_dim=8))
    with pytest.raises(ValueError, match="no default placement for model type 'gptj'; set target_modules"):
        get_peft_model(m, BottleneckConfig(task_type="CAUSAL_LM"))
    model = get_peft_model(m, BottleneckConfig(task_type="CAUSAL_LM", target_modules=["attn.out_proj", "mlp.fc_out"]))
    assert sum(isinstance(x, BottleneckLayer) for x in model.modules()) == 2

"""Every bad input of the finetune stage is one line that names the key (and usually the fix)."""

from __future__ import annotations

import pytest
from conftest import ROOT
from test_finetune import build_tiny_base

from lmforge import cli
from lmforge.config import ConfigError, UserError, load
from lmforge.peft import merge, methods
from lmforge.stages import finetune

LORA = ROOT / "recipes" / "tiny" / "finetune_lora.yaml"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return build_tiny_base(tmp_path_factory.mktemp("gpt2") / "gpt2", "gpt2")


def cfg_for(base, *over, recipe=LORA):
    return load(finetune.Config, recipe, [f"model.name_or_path={base}", "output_dir=unused", *over])


def apply_error(base, *over) -> str:
    from transformers import AutoModelForCausalLM

    with pytest.raises(UserError) as e:
        methods.apply_method(cfg_for(base, *over), AutoModelForCausalLM.from_pretrained(base))
    (line,) = e.value.problems
    return line


def test_target_modules_matching_nothing_list_the_linear_modules(gpt2_dir):
    line = apply_error(gpt2_dir, "peft.target_modules=[c_attn, q_proj]")
    assert line == ("peft.target_modules: ['q_proj'] match no module of this gpt2 model; its linear modules are: "
                    "c_attn, c_fc, c_proj, lm_head (or use all-linear)")
    assert apply_error(gpt2_dir, "peft.target_modules=.*nothing.*").startswith("peft.target_modules: ['.*nothing.*'] match no module")


@pytest.mark.parametrize("method,says", [
    ("adaption_prompt", "Unsupported model type for adaption prompt: 'gptj'"),
    ("adapter", "bottleneck adapters: no default placement for model type 'gptj'; set target_modules"),
])
def test_method_the_model_type_does_not_support(gpt2_dir, method, says):
    from transformers import AutoConfig, AutoModelForCausalLM

    gptj = AutoModelForCausalLM.from_config(AutoConfig.for_model("gptj", vocab_size=64, n_embd=32, n_layer=1, n_head=2, rotary_dim=8))
    with pytest.raises(UserError) as e:
        methods.apply_method(cfg_for(gpt2_dir, f"peft.method={method}", "peft.target_modules=null"), gptj)
    (line,) = e.value.problems
    assert line.startswith(f"peft.method: '{method}' does not support this gptj model (peft says: {says}")


def test_unknown_peft_options_are_named_with_a_suggestion(gpt2_dir):
    with pytest.raises(UserError) as e:
        methods.peft_config_for(cfg_for(gpt2_dir, "peft.options={lora_dropot: 0.1}"))
    assert e.value.problems == ["peft.options: 'lora_dropot' (did you mean 'lora_dropout'?) not a field of peft's LoraConfig"]


def test_our_key_a_generic_method_cannot_read(gpt2_dir):
    with pytest.raises(UserError, match=r"^peft\.use_dora: not read by peft's VeraConfig \(method 'vera'\)"):
        methods.peft_config_for(cfg_for(gpt2_dir, "peft.method=vera", "peft.use_dora=true"))


@pytest.mark.parametrize("overrides,expected", [
    (["model.name_or_path=/no/such/model"], "model.name_or_path: '/no/such/model' does not exist; give an existing model folder or a hub id"),
    (["peft.method=lorra"], "peft.method: unknown method 'lorra'; did you mean 'lora'?; choose one of "),
    (["peft.method=prefix"], "peft.target_modules: not read by method 'prefix' (only by lora, dora, qlora, ia3, adapter); remove it"),
    (["peft.method=prompt", "peft.target_modules=null", "data.packing=true"],
     "data.packing: peft.method=prompt prepends virtual tokens to every row, which packed examples cannot share"),
    (["peft.method=adapter", "export.merge=true"], "export.merge: peft.method=adapter has nothing to merge into the base weights"),
    (["task=classification", "data.packing=true"], "data.packing: only for task: sft; set data.packing=false"),
    (["peft.method=full", "peft.target_modules=null", "peft.options={r: 2}"], "peft.options: full fine-tuning has no peft config"),
])
def test_recipe_errors_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load(finetune.Config, LORA, overrides)
    assert any(p.split(": ", 1)[1].startswith(expected) for p in e.value.problems), e.value.problems


def test_cli_prints_one_line_and_exits_2(capsys):
    assert cli.main(["finetune", str(LORA), "model.name_or_path=/no/such/model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {LORA}: model.name_or_path: '/no/such/model' does not exist; give an existing model folder or a hub id"]


def test_export_refuses_what_cannot_merge_and_missing_runs(gpt2_dir, tmp_path):
    with pytest.raises(UserError, match=r"^peft\.method: prefix cannot be merged into the base weights \(it adds virtual tokens\)"):
        merge.export(load(finetune.Config, ROOT / "recipes/tiny/finetune_prefix.yaml", [f"model.name_or_path={gpt2_dir}"]))
    with pytest.raises(UserError, match=r"^output_dir: no adapter in '.*final'; run `lmforge finetune` with this recipe first"):
        merge.export(cfg_for(gpt2_dir, f"output_dir={tmp_path}"))


def test_pretrain_only_train_keys_are_refused_not_ignored():
    with pytest.raises(ConfigError) as e:
        load(finetune.Config, "recipes/tiny/finetune_lora.yaml",
             ["train.label_smoothing=0.1", "train.dropout.attention=0.1", "train.objective=mlm"])
    text = "\n".join(e.value.problems)
    for key in ("train.label_smoothing", "train.dropout", "train.objective"):
        assert f"{key}: not used by finetune" in text

"""Model cards: every final/ gets a README.md in the Hugging Face format that ModelCard.load parses, with the
run's metrics in its metadata; the run report names the command, the environment, wall time and memory."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT
from huggingface_hub import ModelCard

from lmforge.cards import write_card
from lmforge.config import load
from lmforge.stages import pretrain


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_pretrain_final_has_a_model_card_with_the_runs_metrics(tmp_path):
    out = tmp_path / "run"
    cfg = load(pretrain.Config, ROOT / "recipes" / "tiny" / "pretrain.yaml",
               [f"output_dir={out}", "train.max_steps=4", "eval.eval_every=4", "checkpoint.save_every=0", "log.trackers=[]"])
    try:
        pretrain.main(cfg)
    finally:
        _reset_accelerate()
    card = ModelCard.load(out / "final" / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and {"lmforge", "pretrain"} <= set(meta["tags"])
    summary = json.loads((out / "summary.json").read_text())
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["eval_loss"] == pytest.approx(summary["eval"]["loss"])
    assert metrics["train_loss"] == pytest.approx(summary["train_loss"])
    assert "AutoModelForCausalLM.from_pretrained" in card.text and "stage: pretrain" in card.text
    report = (out / "report.md").read_text()
    assert "## Environment" in report and "transformers" in report and "wall time" in report
    assert "peak memory" in report and summary["peak_rss_mb"] > 0 and summary["wall_time_s"] > 0


def test_an_adapter_card_says_peft_and_keeps_only_hub_ids_as_base_model(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    local_base = tmp_path / "base"
    local_base.mkdir()
    write_card(folder, stage="finetune", recipe={"model": {"name_or_path": str(local_base)}}, library_name="peft",
               metrics={"eval_loss": 1.5, "nan": float("nan")})
    meta = ModelCard.load(folder / "README.md").data.to_dict()
    assert meta["library_name"] == "peft" and "base_model" not in meta  # a local path is not a hub id
    assert [m["type"] for m in meta["model-index"][0]["results"][0]["metrics"]] == ["eval_loss"]
    write_card(folder, stage="finetune", recipe={"model": {"name_or_path": "meta-llama/Llama-3.2-1B"}}, library_name="peft")
    card = ModelCard.load(folder / "README.md")
    assert card.data.to_dict()["base_model"] == "meta-llama/Llama-3.2-1B" and "PeftModel.from_pretrained" in card.text

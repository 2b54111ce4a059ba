"""The optimization toolkit inside real (tiny) pretraining runs: the optimizer receives the scheduled
lr times each group's scale, the LLRD and MLM recipes train, MLM + curriculum + EMA + label
smoothing resume bitwise, early stopping stops, and a NaN loss stops with the good checkpoints kept."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lmforge.config import load
from lmforge.optim.schedules import make_schedule
from lmforge.stages import pretrain
from lmforge.train.regularize import Diverged
from lmforge.train.tasks import CausalLM

FAST = ["log.trackers=[]", "eval.eval_every=0", "log.log_every=1", "checkpoint.save_every=0"]
SMALL = ["data.block_size=32", "train.per_device_train_batch_size=4", "eval.max_eval_batches=2",
         "eval.per_device_eval_batch_size=8"]


def run(recipe: str, out, *overrides: str):
    cfg = load(pretrain.Config, ROOT / "recipes" / "tiny" / recipe, [f"output_dir={out}", *FAST, *overrides])
    return cfg, pretrain.main(cfg)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_llrd_recipe_optimizer_receives_scheduled_lr_per_group(tmp_path):
    """A global optimizer pre-step hook records every group's lr at every real loop step."""
    seen: list[dict[str, float]] = []

    def hook(opt, args, kwargs):
        seen.append({g["name"]: g["lr"] for g in opt.param_groups} | {f"scale:{g['name']}": g["lr_scale"]
                                                                        for g in opt.param_groups})

    handle = register_optimizer_step_pre_hook(hook)
    try:
        cfg, result = run("pretrain_llrd.yaml", tmp_path, "train.max_steps=8", "schedule.warmup_ratio=null",
                          "schedule.warmup_steps=3", "train.dropout.attention=0.1", *SMALL)
    finally:
        handle.remove()
    assert len(seen) == 8
    lr_at = make_schedule(cfg.schedule, cfg.optim.learning_rate, 8)
    names = [k for k in seen[0] if not k.startswith("scale:")]
    assert {"embeddings.no_decay", "layer_00.decay", "layer_01.decay", "head*lm_head.decay"} <= set(names)
    d = cfg.optim.layerwise_lr_decay
    expected_scale = {"embeddings.no_decay": d ** 3, "layer_00.decay": d ** 2, "layer_01.decay": d,
                      "head*lm_head.decay": 2.0}
    for step, lrs in enumerate(seen):  # step 0 (lr 0), mid-warmup, warmup end (3), decay, last (7)
        for name in names:
            assert lrs[name] == pytest.approx(lr_at(step) * lrs[f"scale:{name}"], rel=1e-12, abs=1e-15)
        for name, scale in expected_scale.items():
            assert lrs[f"scale:{name}"] == pytest.approx(scale)
    assert seen[3]["layer_01.decay"] == pytest.approx(cfg.optim.learning_rate * d)  # warmup boundary: peak·d
    train = [r for r in metrics(tmp_path) if r["split"] == "train"]
    assert [r["lr"] for r in train] == pytest.approx([lr_at(s) for s in range(8)])
    config = json.loads((result.final_dir / "config.json").read_text())
    assert config["attention_dropout"] == 0.1


def test_mlm_recipe_trains_and_saves_a_masked_lm_with_mask_token(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    cfg, result = run("pretrain_mlm.yaml", tmp_path, "train.max_steps=30", "eval.eval_every=30", *SMALL)
    train = [r for r in metrics(tmp_path) if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.2  # MLM learns slower per step than causal LM
    assert 0 < result.eval["accuracy"] < 1
    tok = AutoTokenizer.from_pretrained(result.final_dir)
    assert tok.mask_token == "[MASK]" and tok.mask_token_id == 512
    model = AutoModelForMaskedLM.from_pretrained(result.final_dir)
    assert model.config.vocab_size == 513 and model.config.model_type == "bert"


@pytest.mark.parametrize("extra", [
    ["train.curriculum.min_length=8", "train.curriculum.steps=4", "train.ema.decay=0.9", "train.ema.every=2",
     "train.label_smoothing=0.1"],
])
def test_mlm_curriculum_ema_smoothing_resume_bitwise(tmp_path, extra):
    common = ["train.max_steps=8", "schedule.warmup_ratio=null", "schedule.warmup_steps=2", *SMALL, *extra]
    _, full = run("pretrain_mlm.yaml", tmp_path / "full", *common)
    _, part = run("pretrain_mlm.yaml", tmp_path / "part", *common, "train.stop_at_step=3")
    assert part.final_dir is None
    _, resumed = run("pretrain_mlm.yaml", tmp_path / "part", *common, "resume=auto")
    for folder in ("final", "final_ema"):
        a = load_file(tmp_path / "full" / folder / "model.safetensors")
        b = load_file(tmp_path / "part" / folder / "model.safetensors")
        for k in a:
            assert torch.equal(a[k], b[k]), (folder, k)
    ema, raw = load_file(full.final_dir.parent / "final_ema" / "model.safetensors"), load_file(full.final_dir / "model.safetensors")
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)


def test_early_stopping_stops_checkpoints_and_saves_final(tmp_path):
    cfg, result = run("pretrain.yaml", tmp_path, "train.max_steps=20", "eval.eval_every=2",
                      "train.early_stopping.patience=2", "train.early_stopping.min_delta=100", *SMALL)
    # eval 2 sets the best; evals 4 and 6 cannot improve by > 100 nats: stop at 6
    assert result.step == 6 and result.final_dir is not None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["step"] == 6
    state = json.loads((tmp_path / "checkpoints" / "step_6" / "loop_state.json").read_text())
    assert state["early_stopping_bad_evals"] == 2


def test_nan_loss_stops_with_last_good_checkpoint_kept(tmp_path):
    """A loss that turns NaN at step 5 stops the real loop before it updates or saves over good checkpoints."""
    from lmforge.datasets.lm import build_lm_datasets
    from lmforge.models import load_causal_lm, load_tokenizer
    from lmforge.train import loop

    cfg = load(pretrain.Config, ROOT / "recipes" / "tiny" / "pretrain.yaml",
               [f"output_dir={tmp_path}", *FAST, *SMALL, "train.max_steps=10", "checkpoint.save_every=2",
                "checkpoint.keep_last=2"])
    acc = loop.setup(cfg)
    tok = load_tokenizer(cfg.model)
    train_ds, val_ds = build_lm_datasets(cfg.data, tok, cfg.seed)
    model = load_causal_lm(cfg.model, tok)
    calls = {"n": 0}

    class Poisoned(CausalLM):
        def loss(self, model, batch):
            calls["n"] += 1
            out = super().loss(model, batch)
            if calls["n"] >= 5:  # the 5th update (gas=1)
                out["loss_sum"] = out["loss_sum"] * float("nan")
            return out

    with pytest.raises(Diverged, match=r"at step 5; stopped before updating or saving; the last good checkpoint is .*step_4"):
        loop.run(acc, cfg, model, Poisoned(32), train_ds, val_ds)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the NaN step did not reach the weights"


def test_ema_weights_are_used_for_eval_and_saved(tmp_path):
    from transformers import AutoModelForCausalLM

    from lmforge.datasets.lm import build_lm_datasets
    from lmforge.models import load_tokenizer

    cfg, result = run("pretrain.yaml", tmp_path, "train.max_steps=4", "eval.eval_every=4", "train.ema.decay=0.5",
                      "train.ema.use_for_eval=true", *SMALL)
    _, val = build_lm_datasets(cfg.data, load_tokenizer(cfg.model), cfg.seed)
    ids = val[:16]["input_ids"]  # the 2 eval batches of 8 a single process scores

    def loss_of(folder):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / folder).eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1)).item()

    assert loss_of("final_ema") == pytest.approx(result.eval["loss"], abs=1e-4)
    assert abs(loss_of("final") - result.eval["loss"]) > 1e-3

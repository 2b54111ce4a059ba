"""The second-half toolkit keys inside real runs: schedule.name: plateau, train.grad_noise,
train.stochastic_depth and model.init — each takes effect, and a resumed run is bitwise the
uninterrupted one (their randomness is seeded by step, their state checkpointed)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from lmforge.config import UserError, load
from lmforge.stages import pretrain

RECIPE = ROOT / "recipes" / "tiny" / "pretrain.yaml"
FAST = ["log.trackers=[]", "log.log_every=1", "eval.max_eval_batches=2"]
# every eval is "bad" after the first (a 50% relative threshold), patience 0: the lr halves at each eval from the 2nd
TOOLKIT = ["train.max_steps=8", "eval.eval_every=2", "schedule.name=plateau", "schedule.warmup_steps=2",
           "schedule.min_lr=0.0", "schedule.plateau.patience=0", "schedule.plateau.factor=0.5",
           "schedule.plateau.threshold=0.5", "train.grad_noise.eta=0.01", "train.stochastic_depth.rate=0.5"]


def run(out, *overrides):
    pretrain.main(load(pretrain.Config, RECIPE, [f"output_dir={out}", *FAST, *overrides]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = out / "final" / "model.safetensors"
    return {r["step"]: r for r in rows if r["split"] == "train"}, load_file(final) if final.exists() else None


def test_toolkit_keys_take_effect_and_resume_bitwise(tmp_path):
    rows, full = run(tmp_path / "full", *TOOLKIT, "checkpoint.save_every=0")
    # plateau: warmup to 3e-3 by step 2, then halved after the evals at steps 4 and 6 (step 2's eval sets the best)
    peak = 3e-3
    lrs = [rows[s]["lr"] for s in range(1, 9)]  # the lr logged at step s was used for update s (0-based s-1)
    assert lrs == pytest.approx([peak * 0 / 2, peak * 1 / 2, peak, peak, peak / 2, peak / 2, peak / 4, peak / 4])
    # interrupted at step 4 (checkpoint), resumed: same weights bit for bit
    run(tmp_path / "cut", *TOOLKIT, "checkpoint.save_every=4", "train.stop_at_step=4")
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step_4" / "loop_state.json").read_text())
    assert state["plateau"]["reductions"] == 1
    _, resumed = run(tmp_path / "cut", *TOOLKIT, "checkpoint.save_every=4", "resume=auto")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full), "the resumed run drew other noise or other drops"
    # noise and stochastic depth changed the run: without them (same plateau schedule) the weights differ
    plain = [o for o in TOOLKIT if not o.startswith(("train.grad_noise", "train.stochastic_depth"))]
    _, without = run(tmp_path / "plain", *plain, "checkpoint.save_every=0")
    assert any(not torch.equal(full[k], without[k]) for k in full)


def test_init_scheme_reaches_the_built_model(tmp_path):
    from lmforge.models import load_causal_lm, load_tokenizer

    cfg = load(pretrain.Config, RECIPE, [f"output_dir={tmp_path}", "model.init.scheme=scaled_residual",
                                         "model.init.std=0.05"])
    torch.manual_seed(0)
    model = load_causal_lm(cfg.model, load_tokenizer(cfg.model))
    n_layers = model.config.num_hidden_layers
    o_proj = torch.cat([layer.self_attn.o_proj.weight.flatten() for layer in model.model.layers])
    q_proj = torch.cat([layer.self_attn.q_proj.weight.flatten() for layer in model.model.layers])
    assert float(o_proj.std()) == pytest.approx(0.05 / (2 * n_layers) ** 0.5, rel=0.1)
    assert float(q_proj.std()) == pytest.approx(0.05, rel=0.1)


@pytest.mark.parametrize("overrides,match", [
    (["schedule.name=plateau", "eval.eval_every=0"], "needs eval.eval_every > 0"),
    (["schedule.plateau.factor=0.5"], "only read by schedule plateau"),
    (["model.init.scheme=normal", "model.name_or_path=recipes", "model.config={}"], "only read when the model is built"),
])
def test_toolkit_key_errors(overrides, match, tmp_path):
    with pytest.raises(UserError, match=match):
        load(pretrain.Config, RECIPE, [f"output_dir={tmp_path}", *overrides])

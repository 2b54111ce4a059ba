"""The pretraining stage end to end on the tiny recipe: loss falls, outputs reload, resume is exact."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from lmforge.config import UserError, load
from lmforge.datasets.batching import RankBatches
from lmforge.stages import pretrain
from lmforge.train.tasks import CausalLM, collate_blocks

RECIPE = ROOT / "recipes" / "tiny" / "pretrain.yaml"
FAST = ["log.trackers=[]", "eval.eval_every=0", "log.log_every=5"]


def run_pretrain(out, *overrides: str):
    cfg = load(pretrain.Config, RECIPE, [f"output_dir={out}", *FAST, *overrides])
    return pretrain.main(cfg)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    result = run_pretrain(out, "train.max_steps=60", "eval.eval_every=30", "checkpoint.save_every=20",
                          "checkpoint.keep_last=2", "log.trackers=[tensorboard]")
    return out, result


def test_loss_falls_and_outputs_exist(tiny_run):
    out, result = tiny_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0  # from ~ln(512)=6.24 down by more than a nat
    assert [r["step"] for r in evals] == [30, 60]
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["loss"]), rel=1e-6)
    assert 0 < evals[-1]["accuracy"] < 1
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert all(0 < r["mfu"] < 1 for r in train)
    png = (out / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert list((out / "lmforge").rglob("events.out.tfevents*")), "TensorBoard events were written"
    assert (out / "recipe.yaml").exists() and (out / "final" / "recipe.yaml").exists()
    assert "validation loss" in (out / "report.md").read_text()
    # keep_last=2 of saves at 20, 40, 60; no half-written folder left
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_40", "step_60"]
    state = json.loads((out / "checkpoints" / "step_60" / "loop_state.json").read_text())
    assert state["step"] == 60 and state["micro_batches"] == 60 and state["tokens_seen"] == 60 * 8 * 128


def test_final_model_reloads_with_same_eval_loss(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.datasets.lm import build_lm_datasets

    out, result = tiny_run
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    tok = AutoTokenizer.from_pretrained(out / "final")
    cfg = load(pretrain.Config, RECIPE, [f"output_dir={out}"])
    _, val = build_lm_datasets(cfg.data, tok, cfg.seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val), 16):
            ids = val[i:i + 16]["input_ids"]
            logits = model(input_ids=ids).logits[:, :-1]
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                                       reduction="sum").item()
            count += ids[:, 1:].numel()
    assert total / count == pytest.approx(result.eval["loss"], abs=1e-4)


@pytest.mark.parametrize("gas", [1, 2])
def test_resume_is_bitwise_identical(tmp_path, gas):
    common = ["train.max_steps=12", f"train.gradient_accumulation_steps={gas}", "train.per_device_train_batch_size=4",
              "checkpoint.save_every=0", "schedule.warmup_steps=3"]
    full = run_pretrain(tmp_path / "full", *common)
    part = run_pretrain(tmp_path / "part", *common, "train.stop_at_step=5")
    assert part.final_dir is None and part.step == 5
    assert (tmp_path / "part" / "checkpoints" / "step_5").is_dir()
    resumed = run_pretrain(tmp_path / "part", *common, "resume=auto")
    assert resumed.step == 12
    a = load_file(full.final_dir / "model.safetensors")
    b = load_file(resumed.final_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed metrics log has no duplicated steps
    steps = [json.loads(line)["step"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == sorted(set(steps))


def test_accumulation_normalises_over_all_tokens(tmp_path):
    """bs=8 x 1 and bs=4 x 2 see the same 8 examples per step and take the same steps (up to float
    summation order). Packed blocks have equal token counts, so this checks the bookkeeping of
    accumulation; the normalisation itself is checked against a hand-computed SGD step below."""
    a = run_pretrain(tmp_path / "a", "train.max_steps=3", "schedule.warmup_steps=1", "train.per_device_train_batch_size=8",
                     "train.gradient_accumulation_steps=1", "checkpoint.save_every=0")
    b = run_pretrain(tmp_path / "b", "train.max_steps=3", "schedule.warmup_steps=1", "train.per_device_train_batch_size=4",
                     "train.gradient_accumulation_steps=2", "checkpoint.save_every=0")
    wa = load_file(a.final_dir / "model.safetensors")
    wb = load_file(b.final_dir / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_refuses_non_empty_output_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="is not empty; pass resume=auto"):
        run_pretrain(tmp_path, "train.max_steps=2")
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_interrupted_save_is_ignored_on_resume(tmp_path):
    run_pretrain(tmp_path, "train.max_steps=10", "train.stop_at_step=4", "checkpoint.save_every=2")
    # simulate a kill during the save of step 6: a .tmp folder without loop_state.json
    (tmp_path / "checkpoints" / "step_6.tmp").mkdir()
    from lmforge.train.checkpoint import latest

    assert latest(tmp_path / "checkpoints").name == "step_4"
    resumed = run_pretrain(tmp_path, "train.max_steps=10", "checkpoint.save_every=2", "resume=auto")
    assert resumed.step == 10


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    a = run_pretrain(tmp_path / "a", "train.max_steps=2", "checkpoint.save_every=0", "schedule.warmup_steps=1")
    b = run_pretrain(tmp_path / "b", "train.max_steps=2", "checkpoint.save_every=0", "schedule.warmup_steps=1",
                     "train.gradient_checkpointing=true")
    wa, wb = load_file(a.final_dir / "model.safetensors"), load_file(b.final_dir / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_continue_from_a_local_model_dir_and_plain_text(tiny_run, tmp_path):
    """model.name_or_path takes a local folder (the hub path is the same code); data.train_files takes .txt."""
    out, first = tiny_run
    text = tmp_path / "notes.txt"
    corpus = [json.loads(line)["text"] for line in (ROOT / "tests/fixtures/corpus/stdlib_docs.jsonl").read_text().splitlines()]
    text.write_text("\n".join(corpus[:200]))
    cont = run_pretrain(tmp_path / "cont", f"model.name_or_path={out / 'final'}", "model.config={}",
                        f"model.tokenizer={out / 'final'}", f"data.train_files=[{text}]", "train.max_steps=5",
                        "schedule.warmup_steps=0", "optim.learning_rate=1e-4", "schedule.min_lr=0",
                        "checkpoint.save_every=0")
    # a trained model starts far below a fresh one (~ln 512 = 6.2)
    assert cont.first_train_loss < first.first_train_loss - 1.0


def test_one_sgd_step_matches_the_global_token_mean_gradient(tmp_path):
    """Micro-batches with very different numbers of loss tokens: the loop's update must equal
    -lr * grad(sum of token losses over the accumulated batch / its token count), which a mean of
    per-micro-batch means (or a missing 1/gas or x gas) would not give. SGD keeps the scale visible."""
    import copy

    from lmforge.datasets.lm import build_lm_datasets
    from lmforge.models import load_causal_lm, load_tokenizer
    from lmforge.train import loop

    lr = 0.5
    cfg = load(pretrain.Config, RECIPE, [
        f"output_dir={tmp_path}", *FAST, "train.max_steps=1", "train.per_device_train_batch_size=4",
        "train.gradient_accumulation_steps=2", "optim.name=sgd", "optim.momentum=0", "optim.weight_decay=0",
        "optim.max_grad_norm=null", f"optim.learning_rate={lr}", "schedule.name=constant", "schedule.warmup_steps=null",
        "schedule.min_lr=0", "checkpoint.save_every=0",
    ])

    def collate(rows):  # the first two examples of each micro-batch keep 8 loss tokens, the others all
        batch = collate_blocks(rows)
        batch["labels"][:2, :-8] = -100
        return batch

    acc = loop.setup(cfg)
    tok = load_tokenizer(cfg.model)
    train, _ = build_lm_datasets(cfg.data, tok, cfg.seed)
    model = load_causal_lm(cfg.model, tok)
    start = copy.deepcopy(model)
    batches = RankBatches(train, 4, collate, cfg.seed, 0, 1)
    micro = [batches.get(0), batches.get(1)]
    loop.run(acc, cfg, model, CausalLM(cfg.data.block_size, collate=collate), train, None, save_final=False)

    total = sum(CausalLM().count_tokens(b) for b in micro)
    loss = sum(CausalLM().loss(start, b)["loss_sum"] for b in micro) / total
    loss.backward()
    for (name, p0), p1 in zip(start.named_parameters(), model.parameters()):
        torch.testing.assert_close(p1.detach(), p0.detach() - lr * p0.grad, rtol=1e-4, atol=1e-6, msg=name)

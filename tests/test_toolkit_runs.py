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


def test_lr_scaling_rules_run_and_schedule_tool(tmp_path, capsys):
    from lmforge.optim.optimizers import OptimConfig, scaled_learning_rate
    from lmforge.tools.schedule import cli

    lin = OptimConfig(learning_rate=1e-3, lr_scaling="linear", base_batch_size=64)
    assert scaled_learning_rate(lin, 256)[0] == pytest.approx(4e-3)
    sqrt = OptimConfig(learning_rate=1e-3, lr_scaling="sqrt", base_batch_size=64)
    lr, rule = scaled_learning_rate(sqrt, 256)
    assert lr == pytest.approx(2e-3) and "sqrt(4)" in rule and "256 sequences" in rule
    assert scaled_learning_rate(OptimConfig(learning_rate=1e-3), 256)[0] == 1e-3
    # in a run: 8 sequences per step over a base of 4 doubles the recipe's 3e-3 peak (linear)
    rows, _ = run(tmp_path / "run", "train.max_steps=3", "eval.eval_every=0", "schedule.name=constant_with_warmup",
                  "schedule.warmup_steps=1", "schedule.min_lr=0.0", "optim.lr_scaling=linear", "optim.base_batch_size=4")
    assert rows[2]["lr"] == pytest.approx(6e-3)
    # the schedule tool shows the scaled curve for the ranks the run will have: 8 x 2 processes / 4 -> sqrt(4)
    assert cli([str(RECIPE), "optim.lr_scaling=sqrt", "optim.base_batch_size=4", "--processes", "2",
                "--out", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "sqrt(4)" in out and "peak learning rate 0.006" in out
    with pytest.raises(UserError, match="give both"):
        load(pretrain.Config, RECIPE, [f"output_dir={tmp_path}", "optim.lr_scaling=linear"])


def test_grad_flow_rows_match_a_hand_count_and_draw_heatmaps(tmp_path):
    """The logged per-block gradient norm is the norm of the block's gradient at that step; the update
    ratio is what the saved weights moved; every block has all three quantities; the PNG is written."""
    out = tmp_path / "run"
    cfg = load(pretrain.Config, RECIPE, [f"output_dir={out}", *FAST, "train.max_steps=4", "eval.eval_every=0",
                                         "log.grad_flow_every=2", "optim.max_grad_norm=null"])
    pretrain.main(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    flow = [r for r in rows if r["split"] == "grad_flow"]
    assert [r["step"] for r in flow] == [2, 4]
    n_blocks = 2
    for r in flow:
        for i in range(n_blocks):
            assert r[f"block_{i}/grad_norm"] > 0 and 0 < r[f"block_{i}/update_ratio"] < 1 and r[f"block_{i}/act_rms"] > 0
    # without clipping, the blocks' norms combine (with the embeddings' and head's) into at most the global norm
    train = {r["step"]: r for r in rows if r["split"] == "train"}
    for r in flow:
        blocks = sum(r[f"block_{i}/grad_norm"] ** 2 for i in range(n_blocks)) ** 0.5
        assert blocks <= train[r["step"]]["grad_norm"] * (1 + 1e-5)
    png = (out / "grad_flow.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_activation_offload_on_cpu_says_so_and_changes_nothing(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="lmforge"):
        _, offloaded = run(tmp_path / "off", "train.max_steps=2", "eval.eval_every=0", "train.activation_offload=true")
    assert "no effect on cpu" in caplog.text
    _, plain = run(tmp_path / "plain", "train.max_steps=2", "eval.eval_every=0")
    assert all(torch.equal(offloaded[k], plain[k]) for k in plain)


def test_save_on_cpu_gives_the_same_gradients():
    """The mechanism train.activation_offload uses on GPUs, on this CPU: gradients bitwise equal."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=300))
    ids = torch.randint(0, 300, (2, 16))

    def grads(offload: bool):
        model.zero_grad(set_to_none=True)
        if offload:
            with torch.autograd.graph.save_on_cpu():
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    a, b = grads(False), grads(True)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (activation offload moves GPU activations)")
def test_activation_offload_on_gpu_lowers_peak_memory_with_equal_gradients():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)).cuda()
    ids = torch.randint(0, 1000, (8, 256), device="cuda")

    def run_once(offload: bool):
        model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
        if offload:
            with torch.autograd.graph.save_on_cpu(pin_memory=True):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        peak = torch.cuda.max_memory_allocated()
        loss.backward()
        return peak, {n: p.grad.clone() for n, p in model.named_parameters()}

    p_plain, g_plain = run_once(False)
    p_off, g_off = run_once(True)
    assert p_off < p_plain
    assert all(torch.allclose(g_plain[n], g_off[n], rtol=1e-4, atol=1e-6) for n in g_plain)


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=300))


def test_fgm_adds_the_gradient_of_the_loss_at_the_normalised_ascent_step():
    from lmforge.train.adversarial import Adversarial, AdversarialConfig

    model = _tiny_lm()
    ids = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(1))

    def loss_sum(inputs_embeds=None):
        out = model(input_ids=None if inputs_embeds is not None else ids, inputs_embeds=inputs_embeds, labels=ids)
        return out.loss * ids[:, 1:].numel()

    # by hand: g = d loss / d embeddings, r = eps * g / ||g|| per example, grads of loss(e) + loss(e + r)
    eps = 0.5
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    g = torch.autograd.grad(loss_sum(emb), emb)[0]
    r = eps * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
    model.zero_grad()
    (loss_sum(model.get_input_embeddings()(ids)) + loss_sum(model.get_input_embeddings()(ids) + r)).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    adv_by_hand = float(loss_sum(model.get_input_embeddings()(ids) + r))

    model.zero_grad()
    fgm = Adversarial(model, AdversarialConfig(method="fgm", epsilon=eps))
    res = fgm.step(lambda: {"loss_sum": loss_sum()}, lambda loss: loss.backward())
    assert float(res["adv_loss_sum"]) == pytest.approx(adv_by_hand, rel=1e-5)
    assert float(res["adv_loss_sum"]) > float(res["loss_sum"])  # the ascent direction raised the loss
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want[n], rtol=1e-4, atol=1e-7), n


def test_freelb_stays_in_the_ball_and_averages_its_passes():
    from lmforge.train.adversarial import Adversarial, AdversarialConfig

    model = _tiny_lm()
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    seen = []
    freelb = Adversarial(model, AdversarialConfig(method="freelb", epsilon=0.3, steps=3, step_size=0.2))
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))

    def loss_fn():
        return {"loss_sum": model(input_ids=ids, labels=ids).loss * ids[:, 1:].numel()}

    passes = []
    res = freelb.step(loss_fn, lambda loss: (passes.append(float(loss)), loss.backward()))
    assert len(passes) == 3
    assert float(res["loss_sum"]) / 3 == pytest.approx(passes[0], rel=1e-6)  # each pass contributes loss / K
    assert passes[2] > passes[0]  # ascent
    # `seen` hooks after ours, so it records embedding + delta: delta = 0, then alpha, then projected into eps
    clean = seen[0]
    with torch.no_grad():
        assert torch.equal(clean, model.get_input_embeddings()(ids))
    norms = [(e - clean).flatten(1).norm(dim=1) for e in seen[1:]]
    assert torch.allclose(norms[0], torch.full((2,), 0.2), rtol=1e-4)
    assert bool((norms[1] <= 0.3 + 1e-5).all()) and bool((norms[1] > 0.2).all())


@pytest.mark.parametrize("method", ["fgm", "freelb"])
def test_adversarial_lora_finetune_trains_and_differs_from_plain(method, tmp_path):
    """LoRA leaves the embeddings frozen: the perturbation still reaches the loss through the hook."""
    from test_finetune import build_tiny_base, loss_on, recipe_cfg, val_batch

    from lmforge.stages import finetune

    base = build_tiny_base(tmp_path / "base")
    losses, val = {}, {}
    for name, extra in (("plain", []), (method, [f"train.adversarial.method={method}", "train.adversarial.epsilon=0.5"])):
        cfg = recipe_cfg("finetune_lora", base, tmp_path / name, *extra, "log.log_every=1", steps=6)
        _, model, tok = finetune.train(cfg)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows if r["split"] == "train"]
        batch = val_batch(cfg, tok)
        model.eval()
        with torch.no_grad():
            val[name] = loss_on(model, batch)
            with model.disable_adapter():
                val["base"] = loss_on(model, batch)
    assert val[method] < val["base"]  # it trains: the adapter beats the untouched base on validation examples
    assert losses[method][0] == pytest.approx(losses["plain"][0], rel=1e-6)  # the logged loss is the clean one
    assert losses[method][1:] != pytest.approx(losses["plain"][1:], rel=1e-6)  # and the updates differ


def test_token_budget_batches_fit_the_budget_split_ranks_and_resume():
    import datasets

    from lmforge.datasets.batching import TokenBudgetBatches, round_up

    g = torch.Generator().manual_seed(0)
    lengths = (torch.randint(3, 60, (200,), generator=g)).tolist()
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    budget = 256
    ranks = [TokenBudgetBatches(ds, budget, lambda rows: rows, seed=3, rank=r, world=2) for r in (0, 1)]
    per_epoch = ranks[0].per_epoch
    seen = []
    for k in range(per_epoch):
        for src in ranks:
            idx = src.indices(k)
            assert len(idx) * round_up(max(lengths[i] for i in idx), 8) <= budget
            seen += idx
    assert len(seen) == len(set(seen))  # no example twice in an epoch, across ranks
    assert len(seen) > 0.9 * len(lengths)  # only a last incomplete round is dropped
    fresh = TokenBudgetBatches(ds, budget, lambda rows: rows, seed=3, rank=1, world=2)
    assert fresh.indices(per_epoch + 2) == ranks[1].indices(per_epoch + 2)  # a pure function of k: resume is exact
    assert ranks[0].indices(per_epoch) != ranks[0].indices(0)  # a new epoch reshuffles


def test_sft_with_a_token_budget_trains_and_pads_less(tmp_path):
    from test_finetune import build_tiny_base, recipe_cfg

    from lmforge.stages import finetune

    base = build_tiny_base(tmp_path / "base")
    eff = {}
    for name, extra in (("fixed", ["data.group_by_length=false"]),
                        ("budget", ["train.max_tokens_per_batch=192", "data.group_by_length=false"])):
        finetune.train(recipe_cfg("finetune_lora", base, tmp_path / name, *extra, steps=4))
        eff[name] = json.loads((tmp_path / name / "summary.json").read_text())["padding_efficiency"]
    assert eff["budget"] > eff["fixed"]
    with pytest.raises(UserError, match="only read by finetune"):
        load(pretrain.Config, RECIPE, [f"output_dir={tmp_path}", "train.max_tokens_per_batch=256"])


def test_mixture_probabilities_and_draws():
    import datasets

    from lmforge.datasets.batching import MixtureBatches
    from lmforge.datasets.sft import mixing_probabilities

    assert mixing_probabilities([100, 300], [1, 1], 1.0) == pytest.approx([0.25, 0.75])
    assert mixing_probabilities([100, 300], [3, 1], 1.0) == pytest.approx([0.5, 0.5])
    assert mixing_probabilities([100, 400], [1, 1], 2.0) == pytest.approx([1 / 3, 2 / 3])  # sqrt(100) : sqrt(400)
    a = datasets.Dataset.from_dict({"input_ids": [[1]] * 10})
    b = datasets.Dataset.from_dict({"input_ids": [[2]] * 1000})
    src = MixtureBatches([a, b], [0.7, 0.3], 50, lambda rows: rows, seed=0, rank=0)
    tasks = [t for k in range(40) for t, _ in src.picks(k)]
    assert sum(t == 0 for t in tasks) / len(tasks) == pytest.approx(0.7, abs=0.03)  # the small task is revisited
    again = MixtureBatches([a, b], [0.7, 0.3], 50, lambda rows: rows, seed=0, rank=0)
    assert again.picks(17) == src.picks(17)  # pure in k: resume is exact
    assert MixtureBatches([a, b], [0.7, 0.3], 50, lambda r: r, seed=0, rank=1).picks(17) != src.picks(17)


def test_multi_task_sft_logs_each_tasks_validation_loss(tmp_path):
    from test_finetune import build_tiny_base, recipe_cfg

    from lmforge.stages import finetune

    base = build_tiny_base(tmp_path / "base")
    fx = ROOT / "tests" / "fixtures" / "sft"
    tasks = (f"data.tasks=[{{name: qa, train_files: [{fx / 'train.jsonl'}], validation_files: [{fx / 'validation.jsonl'}], "
             f"weight: 2}}, {{name: chat, train_files: [{fx / 'chat.jsonl'}]}}]")
    cfg = recipe_cfg("finetune_lora", base, tmp_path / "mt", tasks, "data.train_files=[]", "data.validation_files=[]",
                     "data.mixing_temperature=2.0", "eval.eval_every=3", "eval.max_eval_batches=null", steps=6)
    finetune.train(cfg)
    out = tmp_path / "mt"
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert {"loss/qa", "loss/chat", "perplexity/qa", "perplexity/chat"} <= set(r)
        lo, hi = sorted((r["loss/qa"], r["loss/chat"]))
        assert lo - 1e-9 <= r["loss"] <= hi + 1e-9  # the overall loss is their token-weighted mean
    assert evals[-1]["loss/qa"] < evals[0]["loss/qa"] or evals[-1]["loss/chat"] < evals[0]["loss/chat"]
    assert (out / "final" / "adapter_config.json").exists()  # one adapter for all tasks
    with pytest.raises(UserError, match="unknown key"):
        recipe_cfg("finetune_lora", base, tmp_path / "bad", "data.tasks=[{name: a, train_files: [x], wieght: 2}]",
                   "data.train_files=[]", "data.validation_files=[]")


def test_harness_tasks_during_training(tmp_path):
    """eval.harness_tasks: lm-eval scores at every evaluation, in the eval rows; equal to lm-eval run on the
    saved final model afterwards (same task, same limit)."""
    from lmforge.evaluation.harness import run_harness

    fixtures = ROOT / "tests" / "fixtures" / "harness"
    harness = ["eval.harness_tasks=[lmforge_fixture_mc]", f"eval.harness_include_path={fixtures}",
               "eval.harness_limit=12"]
    run(tmp_path / "run", "train.max_steps=4", "eval.eval_every=2", *harness)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert 0 <= r["harness/lmforge_fixture_mc/acc"] <= 1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = tmp_path / "run" / "final"
    again = run_harness(AutoModelForCausalLM.from_pretrained(final), AutoTokenizer.from_pretrained(final),
                        ["lmforge_fixture_mc"], str(fixtures), limit=12, batch_size=8, seed=42)
    assert again["lmforge_fixture_mc/acc"] == pytest.approx(evals[-1]["harness/lmforge_fixture_mc/acc"])
    with pytest.raises(UserError, match="no_such_task"):
        run(tmp_path / "bad", "train.max_steps=2", "eval.eval_every=2", "eval.harness_tasks=[no_such_task]",
            f"eval.harness_include_path={fixtures}")
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()  # refused before the first step


def test_runs_table_names_each_stage_output_metric_and_report(tmp_path, capsys):
    from lmforge.tools.runs import cli

    out = tmp_path / "run"
    run(out, "train.max_steps=2", "eval.eval_every=2")
    (tmp_path / "not_a_run").mkdir()
    assert cli([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    row = next(line for line in text.splitlines() if line.startswith("| pretrain"))
    assert str(out / "final") in row and f"val loss {s['eval']['loss']:.4f}" in row and str(out / "report.md") in row
    assert "not_a_run" not in text
    with pytest.raises(UserError, match="no stage output"):
        cli([str(tmp_path / "not_a_run")])

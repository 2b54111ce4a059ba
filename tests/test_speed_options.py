"""The loop's speed options: the fused linear cross-entropy (train.loss_impl), torch.compile
(train.compile), the per-phase clock and the torch.profiler window (train.profile).

The fused loss must train exactly the run the logits loss trains (to fp32 rounding, step by step);
the compiled run must resume bitwise like an eager one and save the keys plain transformers loads.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import BIN, ROOT, subprocess_env
from safetensors.torch import load_file

from lmforge.config import UserError, load
from lmforge.stages import pretrain

PRETRAIN = ROOT / "recipes" / "tiny" / "pretrain.yaml"
FAST = ["log.trackers=[]", "eval.eval_every=0", "log.log_every=1", "checkpoint.save_every=0"]


def pretrain_run(out, *overrides):
    result = pretrain.main(load(pretrain.Config, PRETRAIN, [f"output_dir={out}", *FAST, *overrides]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return result, [r for r in rows if r["split"] == "train"], json.loads((out / "summary.json").read_text())


def test_fused_loss_trains_the_same_run_as_the_logits_loss(tmp_path):
    steps = ["train.max_steps=5", "train.label_smoothing=0.1"]
    _, ref, _ = pretrain_run(tmp_path / "logits", *steps)
    _, ours, summary = pretrain_run(tmp_path / "fused", *steps, "train.loss_impl=fused_linear_ce",
                                    "train.loss_chunk_tokens=100")
    assert len(ours) == len(ref) == 5
    for a, b in zip(ours, ref, strict=True):  # every step's loss: the updates stayed the same too
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    w_ref = load_file(tmp_path / "logits" / "final" / "model.safetensors")
    w_ours = load_file(tmp_path / "fused" / "final" / "model.safetensors")
    assert w_ours.keys() == w_ref.keys()
    assert max(float((w_ours[k] - w_ref[k]).abs().max()) for k in w_ref) < 1e-5
    assert summary["loss_impl"] == "fused_linear_ce"


def test_phase_clock_in_metrics_summary_and_report(tmp_path):
    _, rows, s = pretrain_run(tmp_path / "run", "train.max_steps=4", "eval.eval_every=2", "eval.max_eval_batches=1")
    phases = ("data", "forward", "backward", "optimizer")
    for r in rows:
        assert all(r[f"time_{p}_ms"] > 0 for p in phases), r
    # a row's phases are per-step means: their sum cannot exceed the step time tokens/s implies
    step_ms = 1000 * 8 * 128 / rows[-1]["tokens_per_s"]
    assert sum(rows[-1][f"time_{p}_ms"] for p in phases) <= step_ms * 1.05
    assert set(phases) | {"eval"} <= set(s["phase_seconds"])
    assert sum(s["phase_fraction"].values()) == pytest.approx(1.0)
    assert s["mixed_precision"] == "no" and "LMFORGE_AUTO_PRECISION" in s["mixed_precision_reason"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "training time by phase" in report and "forward" in report


def test_profile_writes_a_trace_and_an_operator_table(tmp_path):
    pretrain_run(tmp_path / "run", "train.max_steps=4", "train.profile=true", "train.profile_steps=2")
    folder = tmp_path / "run" / "profile"
    traces = list(folder.glob("*.pt.trace.json"))
    assert len(traces) == 1, list(folder.iterdir())
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any("addmm" in n or "aten::mm" in n for n in names)  # the model's matmuls were recorded
    assert "Self CPU" in (folder / "ops.txt").read_text()


def test_sft_fused_matches_logits(tmp_path):
    from test_finetune import build_tiny_base, recipe_cfg

    from lmforge.stages import finetune

    base = build_tiny_base(tmp_path / "base")
    losses = {}
    for impl in ("logits", "fused_linear_ce"):
        cfg = recipe_cfg("finetune_lora", base, tmp_path / impl, f"train.loss_impl={impl}", "log.log_every=1", steps=3)
        finetune.train(cfg)
        rows = [json.loads(line) for line in (tmp_path / impl / "metrics.jsonl").read_text().splitlines()]
        losses[impl] = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses["fused_linear_ce"] == pytest.approx(losses["logits"], rel=1e-5)


@pytest.mark.parametrize("stage,recipe,extra,match", [
    ("finetune", "classify_lora", [], "task: classification"),
    ("finetune", "finetune_prompt", [], "virtual tokens"),
    ("pretrain", "pretrain", ["train.objective=mlm"], "causal LMs"),
    ("quantize", "quantize_qat", [], "not used by quantize"),
])
def test_fused_loss_refused_where_it_cannot_apply(stage, recipe, extra, match, tmp_path):
    from lmforge.recipe import import_stage

    module = import_stage(stage)
    overrides = [f"output_dir={tmp_path / 'x'}", "train.loss_impl=fused_linear_ce", *extra]
    with pytest.raises(UserError, match=match) as err:
        load(module.Config, ROOT / "recipes" / "tiny" / f"{recipe}.yaml", overrides)
    assert "train.loss_impl" in str(err.value)


@pytest.mark.slow  # two torch.compile runs (~1 min of compilation each on a loaded 2-core machine)
def test_compiled_run_resumes_bitwise_and_saves_plain_keys(tmp_path):
    common = ["train.max_steps=6", "train.compile=true"]
    _, full_rows, _ = pretrain_run(tmp_path / "full", *common)
    pretrain_run(tmp_path / "cut", *common, "train.stop_at_step=3", "checkpoint.save_every=3")
    _, resumed_rows, _ = pretrain_run(tmp_path / "cut", *common, "checkpoint.save_every=3", "resume=auto")
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed compiled run differs from the uninterrupted one"
    # and compiled training is the eager run to fp32 rounding
    _, eager_rows, _ = pretrain_run(tmp_path / "eager", "train.max_steps=6")
    assert [r["loss"] for r in full_rows] == pytest.approx([r["loss"] for r in eager_rows], rel=1e-4)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final")  # loads without missing keys


@pytest.mark.slow  # two 2-rank launches
def test_fused_loss_under_ddp_matches_logits(tmp_path):
    def launch(name, *extra):
        out = tmp_path / name
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / "multi_cpu.yaml"),
               "-m", "lmforge", "pretrain", "recipes/tiny/pretrain.yaml", f"output_dir={out}", "train.max_steps=6",
               *FAST, *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return json.loads((out / "summary.json").read_text()), [r["loss"] for r in rows if r["split"] == "train"]

    s_ref, ref = launch("logits")
    s, ours = launch("fused", "train.loss_impl=fused_linear_ce")
    assert s["model_wrapper"] == "DistributedDataParallel" and s["num_processes"] == 2
    assert s["param_digest_per_rank"][0] == s["param_digest_per_rank"][1], "DDP ranks diverged with the fused loss"
    assert ours == pytest.approx(ref, rel=1e-5)


MMAP_PROBE = """
import sys, torch
from lmforge.train.malloc import mmapped_bytes, set_mmap_threshold
assert set_mmap_threshold(int(sys.argv[1]))
before = mmapped_bytes()
x = torch.ones(1024 * 1024)  # 4 MiB
print(mmapped_bytes() - before)
"""


def test_mmap_threshold_decides_where_a_large_tensor_lives():
    from lmforge.train.malloc import mmapped_bytes

    if mmapped_bytes() is None:
        pytest.skip("the allocator is not glibc >= 2.33 (no mallinfo2 to read the mmapped bytes from)")

    def mapped(kb):
        r = subprocess.run([str(BIN / "python"), "-c", MMAP_PROBE, str(kb)], capture_output=True, text=True,
                           env=subprocess_env(), check=True)
        return int(r.stdout.split()[-1])

    assert mapped(128) >= 4 * 2**20  # above the threshold: its own mapping, returned to the system when freed
    assert mapped(32 * 1024) < 4 * 2**20  # below it: carved from the heap


def test_mmap_threshold_key_reaches_the_allocator_and_is_checked(tmp_path, monkeypatch):
    import lmforge.train.malloc as malloc

    seen = []
    monkeypatch.setattr(malloc, "set_mmap_threshold", seen.append)  # the test process keeps glibc's default
    pretrain_run(tmp_path / "run", "train.max_steps=1", "train.malloc_mmap_threshold_kb=128")
    assert seen == [128]
    with pytest.raises(UserError, match="malloc_mmap_threshold_kb: must be in"):
        load(pretrain.Config, PRETRAIN, [f"output_dir={tmp_path / 'bad'}", "train.malloc_mmap_threshold_kb=65536"])

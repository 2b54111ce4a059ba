"""The tiny pretraining recipe, unchanged, under every hardware layout this machine can run.

Each layout is a real `accelerate launch --config_file accelerate_configs/<layout>.yaml -m lmforge pretrain`
(2 CPU ranks except `cpu`), launched once per session and shared by the tests below. On a machine without
a GPU DeepSpeed uses its CPU accelerator and gloo; the first launch JIT-builds its shm_comm op (about
2 minutes) and the offload run its cpu_adam op (about 1.5 minutes), both cached in TORCH_EXTENSIONS_DIR.

What is asserted, per layout: the layout really happened (summary.json's model wrapper and ZeRO stage:
a DEEPSPEED YAML launched with --cpu silently runs as plain DDP), the loss fell, the final model reloads
with `from_pretrained` in a fresh process to the eval loss the run reported, and the ZeRO curves match
the DDP curve:
- ZeRO-1/2 within 1e-4 per step: same initial weights, same data, the same fp32 sums reduced in
  another order (DeepSpeed reduces gradient buckets, DDP its own buckets).
- ZeRO-3 (and ZeRO-3 + offload) within 0.1 per step and 0.05 on average and at the final eval (the
  loss falls by ~0.9 over the run): `zero3_init_flag` creates the weights inside `deepspeed.zero.Init`,
  which draws the same initial distribution from the RNG in a different order, so the run starts from
  other (equally random) weights; measured: 0.007 apart at step 1, at most 0.065, 0.024 at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BIN, ROOT, subprocess_env

pytestmark = pytest.mark.layouts

STEPS = 20
COMMON = [f"train.max_steps={STEPS}", "log.log_every=1", "log.trackers=[]", "eval.eval_every=0",
          "checkpoint.save_every=0"]
ZERO_TOL = 1e-4   # ZeRO-1/2 vs DDP, per logged step
ZERO3_TOL = 0.1   # ZeRO-3 vs DDP per step (different initial weights, see the module docstring)
ZERO3_MEAN_TOL = 0.05  # ... and on average over the curve, and for the final eval loss


def launch(config: Path | str, out: Path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "-m", "lmforge", "pretrain",
           "recipes/tiny/pretrain.yaml", f"output_dir={out}", *COMMON, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=timeout)


class Runs:
    """Launch each layout at most once per session, on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, Path] = {}

    def get(self, name: str, config: str | Path | None = None, *overrides: str) -> Path:
        if name not in self.done:
            out = self.root / name
            r = launch(config or ROOT / "accelerate_configs" / f"{name}.yaml", out, *overrides)
            assert r.returncode == 0, f"{name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
            self.done[name] = out
        return self.done[name]


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("layouts"))


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def train_curve(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


_RELOAD = """
import json, sys
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer
from lmforge.config import load
from lmforge.datasets.lm import build_lm_datasets
from lmforge.stages.pretrain import Config
from lmforge.train.evaluate import evaluate
from lmforge.train.tasks import CausalLM
acc = Accelerator(cpu=True)
out = {}
for d in sys.argv[1:]:
    cfg = load(Config, d + "/recipe.yaml")
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    _, val = build_lm_datasets(cfg.data, tok, cfg.seed)
    out[d] = evaluate(acc, model, val, CausalLM(), cfg.eval.per_device_eval_batch_size)["loss"]
print("RELOAD" + json.dumps(out))
"""


def reload_eval_losses(final_dirs: list[Path]) -> dict[str, float]:
    """Eval loss of each saved model, loaded with from_pretrained in a fresh process (never one in
    which ZeRO-3 was initialised: from_pretrained would then build the model inside zero.Init)."""
    r = subprocess.run([sys.executable, "-c", _RELOAD, *map(str, final_dirs)], capture_output=True, text=True,
                       cwd=ROOT, env=subprocess_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RELOAD"))
    return json.loads(line.removeprefix("RELOAD"))


# ---------------------------------------------------------------------------------------------
# Every CPU layout: it ran as configured, the loss fell, the model reloads to the same eval loss

# name -> (model wrapper, ZeRO stage, processes)
LAYOUTS = {
    "cpu": ("LlamaForCausalLM", None, 1),
    "multi_cpu": ("DistributedDataParallel", None, 2),
    "deepspeed_zero1": ("DeepSpeedEngine", 1, 2),
    "deepspeed_zero2": ("DeepSpeedEngine", 2, 2),
    "deepspeed_zero3": ("DeepSpeedEngine", 3, 2),
}
# ZeRO-3 with CPU offload: the same checks in make test-slow (test_zero3_offload_trains_like_zero3)
OFFLOAD = {"deepspeed_zero3_offload": ("DeepSpeedEngine", 3, 2)}
# ZeRO-2/3 runs also write a checkpoint at step 10 for the resume tests.
EXTRA = {"deepspeed_zero2": ["checkpoint.save_every=10"], "deepspeed_zero3": ["checkpoint.save_every=10"]}


def run_layout(runs: Runs, name: str) -> Path:
    return runs.get(name, None, *EXTRA.get(name, []))


def test_every_layout_trains_as_configured_and_reloads(runs):
    check_layouts(runs, LAYOUTS)


@pytest.mark.slow
def test_zero3_offload_trains_like_zero3(runs):
    check_layouts(runs, OFFLOAD)
    ddp = train_curve(run_layout(runs, "multi_cpu"))
    off = train_curve(run_layout(runs, "deepspeed_zero3_offload"))
    diffs = [abs(off[k] - ddp[k]) for k in ddp]
    assert max(diffs) <= ZERO3_TOL and sum(diffs) / len(diffs) <= ZERO3_MEAN_TOL
    # Offload only moves ZeRO-3's states to CPU RAM (and swaps torch AdamW for DeepSpeedCPUAdam): same curve.
    z3 = train_curve(run_layout(runs, "deepspeed_zero3"))
    assert max(abs(z3[k] - off[k]) for k in z3) <= ZERO_TOL


def check_layouts(runs, layouts: dict) -> None:
    outs = {name: run_layout(runs, name) for name in layouts}
    for name, (wrapper, stage, procs) in layouts.items():
        s = summary(outs[name])
        assert s["model_wrapper"] == wrapper, f"{name}: ran as {s['model_wrapper']}, not {wrapper}"
        assert s["zero_stage"] == stage, name
        assert s["num_processes"] == procs, name
        assert s["step"] == STEPS and s["tokens_seen"] == STEPS * procs * 8 * 128, name
        assert s["parameters"] == 158016, f"{name}: {s['parameters']} parameters (ZeRO-3 shards report numel 0)"
        assert s["train_loss"] < s["first_train_loss"] - 0.4, f"{name}: loss did not fall {s['first_train_loss']} -> {s['train_loss']}"
        if stage in (1, 2) or name == "multi_cpu":  # weights replicated: every rank ends bitwise equal
            d = s["param_digest_per_rank"]
            assert len(d) == 2 and d[0] == d[1], f"{name}: ranks diverged"
        if name.endswith("offload"):
            assert s["offload_optimizer"] == "cpu" and s["offload_param"] == "cpu"
    reloaded = reload_eval_losses([outs[n] / "final" for n in layouts])
    for name in layouts:
        want = summary(outs[name])["eval"]["loss"]
        got = reloaded[str(outs[name] / "final")]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5), f"{name}: reloaded eval loss {got} != run's {want}"


def test_zero_curves_match_ddp(runs):
    ddp = train_curve(run_layout(runs, "multi_cpu"))
    assert sorted(ddp) == list(range(1, STEPS + 1))
    for name, tol in (("deepspeed_zero1", ZERO_TOL), ("deepspeed_zero2", ZERO_TOL), ("deepspeed_zero3", ZERO3_TOL)):
        curve = train_curve(run_layout(runs, name))
        assert sorted(curve) == sorted(ddp), name
        diffs = [abs(curve[k] - ddp[k]) for k in ddp]
        assert max(diffs) <= tol, f"{name}: loss curve differs from DDP by up to {max(diffs):.2e} (tolerance {tol})"
        if tol == ZERO3_TOL:
            assert sum(diffs) / len(diffs) <= ZERO3_MEAN_TOL, name
            final = summary(run_layout(runs, name))["eval"]["loss"]
            assert final == pytest.approx(summary(run_layout(runs, "multi_cpu"))["eval"]["loss"], abs=ZERO3_MEAN_TOL)


# ---------------------------------------------------------------------------------------------
# Resume under ZeRO-2 and ZeRO-3


# ZeRO-3 (sharded parameters) is the harder case and stays in make test; ZeRO-2's resume runs in make test-slow
@pytest.mark.parametrize("name", [pytest.param("deepspeed_zero2", marks=pytest.mark.slow), "deepspeed_zero3"])
def test_resume_matches_uninterrupted_run(runs, name):
    """Continue from the step-10 checkpoint (DeepSpeed's per-rank shards, RNG states, data position) in a
    new output_dir; the last 10 steps must reproduce the uninterrupted run. On this CPU, in fp32, with the
    same number of ranks they do so bitwise; docs/layouts.md says when that stops being true."""
    full = run_layout(runs, name)
    ckpt = full / "checkpoints" / "step_10"
    assert (ckpt / "loop_state.json").is_file()
    resumed = runs.get(name + "_resumed", ROOT / "accelerate_configs" / f"{name}.yaml", f"resume={ckpt}")
    a, b = train_curve(full), train_curve(resumed)
    assert sorted(b) == list(range(11, STEPS + 1)), "the resumed run must start at step 11"
    for k in b:
        assert b[k] == pytest.approx(a[k], abs=1e-6), f"step {k}: resumed {b[k]} vs uninterrupted {a[k]}"
    assert summary(resumed)["eval"]["loss"] == pytest.approx(summary(full)["eval"]["loss"], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# The ZeRO stage is one line of YAML


def test_editing_zero_stage_in_yaml_switches_layout(runs, tmp_path):
    src = ROOT / "accelerate_configs" / "deepspeed_zero2.yaml"
    text = src.read_text()
    assert text.count("zero_stage: 2") == 1
    edited = tmp_path / "deepspeed_zero2_edited.yaml"
    edited.write_text(text.replace("zero_stage: 2", "zero_stage: 3"))
    out = runs.get("zero2_yaml_edited_to_3", edited, "train.max_steps=3", "schedule.warmup_steps=1")
    s = summary(out)
    assert s["model_wrapper"] == "DeepSpeedEngine" and s["zero_stage"] == 3
    assert s["param_digest_per_rank"] is None  # weights sharded: no per-rank full copy to compare
    assert (out / "final" / "model.safetensors").is_file()  # the consolidated ZeRO-3 model was saved


@pytest.mark.slow  # the JSON path is also covered without training by test_configs_files.py
def test_yaml_pointing_at_json_trains(runs):
    """accelerate_configs/deepspeed.yaml -> ds_configs/zero2.json ("auto" everywhere the recipe decides)."""
    s = summary(runs.get("deepspeed", None, "train.max_steps=3", "schedule.warmup_steps=1"))
    assert s["model_wrapper"] == "DeepSpeedEngine" and s["zero_stage"] == 2


# ---------------------------------------------------------------------------------------------
# FSDP: refused on a machine without a GPU; runs on one with GPUs


NO_GPU = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="FSDP is refused only without a GPU")


@NO_GPU
def test_fsdp_is_refused_without_gpu_before_anything_starts(monkeypatch):
    """What `accelerate launch --config_file accelerate_configs/fsdp.yaml` sets, seen by lmforge's Accelerator
    factory: a UserError (printed as `error: ...`, exit 2) instead of a silent unsharded run."""
    from lmforge.config import UserError
    from lmforge.train.accel import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="FSDP needs a GPU.*multi_cpu.yaml or a deepspeed_zero"):
        make_accelerator(gradient_accumulation_steps=1, mixed_precision=None, project_dir=".", max_grad_norm=1.0)


@NO_GPU
@pytest.mark.slow
def test_fsdp_launch_is_refused_without_gpu(tmp_path):
    r = launch(ROOT / "accelerate_configs" / "fsdp.yaml", tmp_path / "fsdp", timeout=300)
    assert r.returncode != 0
    assert "error: accelerate config: FSDP needs a GPU" in r.stderr + r.stdout
    assert "multi_cpu.yaml" in r.stderr + r.stdout  # the message names what to use instead
    assert not (tmp_path / "fsdp" / "summary.json").exists()


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


GPU_LAYOUTS = {"ddp": "DistributedDataParallel", "fsdp": "FullyShardedDataParallel",
               "fsdp_shard_grad_op": "FullyShardedDataParallel", "deepspeed_zero3": "DeepSpeedEngine"}


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() == 0, reason="needs a CUDA GPU (DDP/FSDP over NCCL, bf16); this machine has none")
@pytest.mark.parametrize("name", list(GPU_LAYOUTS))
def test_gpu_layout_bf16(tmp_path, name):
    n = _gpus()
    if name == "ddp" and n < 2:
        pytest.skip("DDP over NCCL needs 2 GPUs; this machine has 1")
    out = tmp_path / name
    cfg = ROOT / "accelerate_configs" / f"{name}.yaml"
    raw = yaml.safe_load(cfg.read_text())
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(cfg), "--num_processes", str(n),
           "--mixed_precision", "bf16", "-m", "lmforge", "pretrain", "recipes/tiny/pretrain.yaml",
           f"output_dir={out}", *COMMON]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    s = summary(out)
    assert s["model_wrapper"] == GPU_LAYOUTS[name], s["model_wrapper"]
    assert s["mixed_precision"] == "bf16"
    if raw.get("distributed_type") == "FSDP":
        want = raw["fsdp_config"]["fsdp_sharding_strategy"]
        assert s["fsdp_sharding"] == want
    assert s["train_loss"] < s["first_train_loss"] - 0.4
    reloaded = reload_eval_losses([out / "final"])[str(out / "final")]
    assert reloaded == pytest.approx(s["eval"]["loss"], rel=2e-2)  # bf16 run vs fp32 reload


def test_tensor_parallel_config_is_refused_without_a_gpu(monkeypatch):
    """tp.yaml on a CPU-only machine: one line naming the layout and the alternative, before anything runs."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for CPU-only machines")
    from lmforge.config import UserError
    from lmforge.models import ModelConfig, _tensor_parallel_kwargs
    from lmforge.train.accel import launched_layout, make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_TP_SIZE", "2")
    assert launched_layout() == "tp"
    with pytest.raises(UserError, match="tensor parallelism .* needs GPUs"):
        make_accelerator(gradient_accumulation_steps=1, mixed_precision=None, project_dir=".", max_grad_norm=1.0)
    with pytest.raises(UserError, match="give model.name_or_path"):
        _tensor_parallel_kwargs(ModelConfig(config={"model_type": "llama"}, tokenizer="x"))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallelism over 2 ranks needs 2 CUDA GPUs")
def test_tensor_parallel_finetune_on_two_gpus(tmp_path):
    from test_finetune import build_tiny_base

    base = build_tiny_base(tmp_path / "base")
    out = tmp_path / "tp"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / "tp.yaml"), "-m",
           "lmforge", "finetune", "recipes/tiny/finetune_full.yaml", f"model.name_or_path={base}", f"output_dir={out}",
           "train.max_steps=6", "log.trackers=[]", "eval.eval_every=0", "checkpoint.save_every=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["num_processes"] == 2 and s["train_loss"] < s["first_train_loss"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")

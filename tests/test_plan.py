"""`lmforge plan`: parameter counts without weights, DeepSpeed's own estimators, a measured CPU run."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from contextlib import redirect_stdout

import pytest
from conftest import ROOT, subprocess_env

from lmforge.tools import plan

GiB = 1024**3
TINY = "recipes/tiny/pretrain.yaml"
# A 7B Llama shape on top of the tiny recipe (nothing is allocated: meta weights).
LLAMA_7B = ["model.config.hidden_size=4096", "model.config.intermediate_size=11008", "model.config.num_hidden_layers=32",
            "model.config.num_attention_heads=32", "model.config.num_key_value_heads=32", "model.config.vocab_size=32000"]


def _llama_config(**kw):
    from transformers import AutoConfig

    base = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512)
    return AutoConfig.for_model("llama", **{**base, **kw})


@pytest.mark.parametrize("tied", [False, True])
def test_meta_count_equals_deepspeeds_count_of_the_real_model(tied):
    """init_empty_weights counts what DeepSpeed counts on the allocated model (tied weights once)."""
    import torch
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoModelForCausalLM

    cfg = _llama_config(tie_word_embeddings=tied, hidden_size=96, intermediate_size=256)
    shape = plan.shape_from_config(cfg)
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(cfg)
    total, largest = model_to_params(real)
    assert (shape.params, shape.largest_layer) == (total, largest)
    assert shape.layers == 2 and shape.hidden == 96 and shape.kv_hidden == 48
    assert shape.root + 2 * shape.block == shape.params  # blocks + (embeddings, norm, head)


def test_recipe_vocab_follows_the_tokenizer():
    shape, _ = plan.estimate_recipe(TINY)
    assert shape.vocab == 512 and shape.params == 158016  # what `lmforge pretrain` logs for this recipe


def _ds_table(fn, *args, **kw) -> dict[str, tuple[float, float]]:
    """Run DeepSpeed's *_all_cold estimator and parse its printed table: options -> (CPU GiB, GPU GiB)."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        fn(*args, **kw)
    rows = {}
    for line in buf.getvalue().splitlines():
        m = re.match(r"\s*([\d.]+)GB\s*\|\s*([\d.]+)GB\s*\|\s*(.*)$", line)
        if m:
            options = m.group(3).replace("OffloadDeviceEnum.", "")
            rows[options] = (float(m.group(1)), float(m.group(2)))
    return rows


@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 2)])
def test_zero_model_states_within_10pct_of_deepspeed_estimators(gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    shape, rows = plan.estimate_recipe(TINY, LLAMA_7B, n_gpus=gpus, n_nodes=nodes, precision="bf16")
    assert 6.5e9 < shape.params < 7.0e9
    ours = {e.layout.name: e for e in rows}
    z2 = _ds_table(estimate_zero2_model_states_mem_needs_all_cold, shape.params, num_gpus_per_node=gpus,
                   num_nodes=nodes)
    z3 = _ds_table(estimate_zero3_model_states_mem_needs_all_cold, shape.params, shape.largest_layer,
                   num_gpus_per_node=gpus, num_nodes=nodes)
    checks = [
        (ours["ZeRO-2"].model_states, z2["offload_optimizer=none"][1]),
        (ours["ZeRO-3"].model_states, z3["offload_param=none, offload_optimizer=none, zero_init=1"][1]),
        (ours["ZeRO-3 + offload"].model_states, z3["offload_param=cpu, offload_optimizer=cpu, zero_init=1"][1]),
        (ours["ZeRO-3 + offload"].cpu_per_node, z3["offload_param=cpu, offload_optimizer=cpu, zero_init=1"][0]),
    ]
    for mine, theirs in checks:
        assert mine / GiB == pytest.approx(theirs, rel=0.10), (mine / GiB, theirs)


def test_sharding_lowers_memory_in_order():
    _, rows = plan.estimate_recipe(TINY, LLAMA_7B, n_gpus=8, precision="bf16")
    states = {e.layout.name: e.model_states for e in rows}
    assert states["DDP"] > states["ZeRO-1"] > states["ZeRO-2"] > states["ZeRO-3"] > states["ZeRO-3 + offload"]
    assert states["FSDP SHARD_GRAD_OP"] > states["FSDP FULL_SHARD"]
    assert all(e.activations_ckpt < e.activations for e in rows)


def _cli(*argv: str) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = plan.cli(list(argv))
    return rc, buf.getvalue()


def test_cli_recommends_ddp_when_it_fits():
    rc, out = _cli(TINY, "--gpus", "2", "--gpu-memory", "80GB")
    assert rc == 0
    for name in ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-3 + offload", "FSDP FULL_SHARD"):
        assert re.search(rf"^\s+{re.escape(name)}\s+[\d.]+", out, re.M), name
    assert "recommended: DDP" in out
    assert ("accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 2 --mixed_precision bf16 "
            "-m lmforge pretrain recipes/tiny/pretrain.yaml") in out


def test_cli_one_gpu_needs_no_launcher():
    rc, out = _cli(TINY, "--gpus", "1", "--gpu-memory", "24GB")
    assert rc == 0 and out.strip().splitlines()[-1].strip() == (
        "lmforge pretrain recipes/tiny/pretrain.yaml train.mixed_precision=bf16")


def test_cli_picks_zero_when_the_replica_does_not_fit_and_names_an_existing_config():
    rc, out = _cli(TINY, *LLAMA_7B, "--gpus", "8", "--gpu-memory", "80GB")
    assert rc == 0
    # DDP needs ~20 bytes/param (~140 GiB); ZeRO-1 keeps 16-bit weights and gradients whole and shards
    # the rest: 2P + 2P + 16P/8 ~ 38 GiB, the fastest layout that fits.
    assert "recommended: ZeRO-1" in out
    cmd = out.strip().splitlines()[-1].split()
    cfg = cmd[cmd.index("--config_file") + 1]
    assert (ROOT / cfg).is_file()
    assert "model.config.hidden_size=4096" in cmd  # the overrides are part of the command


def test_cli_recommends_checkpointing_then_offload_as_memory_shrinks():
    rc, out = _cli(TINY, *LLAMA_7B, "train.per_device_train_batch_size=8", "data.block_size=4096",
                   "--gpus", "8", "--gpu-memory", "40GB")
    assert rc == 0 and "with gradient checkpointing" in out and "train.gradient_checkpointing=true" in out
    rc, out = _cli(TINY, *LLAMA_7B, "--gpus", "1", "--gpu-memory", "24GB", "--cpu-memory", "512GB")
    assert rc == 0 and "recommended: ZeRO-3 + offload" in out
    rc, out = _cli(TINY, *LLAMA_7B, "--gpus", "1", "--gpu-memory", "24GB", "--cpu-memory", "64GB")
    assert rc == 1 and "nothing fits" in out


def test_adapter_recipes_are_planned_as_full_training_and_say_so(tmp_path):
    from test_finetune import build_tiny_base

    base = tmp_path / "base"  # the recipes' base (outputs/tiny/pretrain/final) exists only after `make demo`
    build_tiny_base(base)
    rc, out = _cli("recipes/tiny/finetune_lora.yaml", "--gpus", "1", f"model.name_or_path={base}")
    assert rc == 0 and "note: peft.method=lora: these figures are for full training" in out
    rc, out = _cli("recipes/tiny/finetune_full.yaml", "--gpus", "1", f"model.name_or_path={base}")
    assert rc == 0 and "note: peft.method" not in out


def test_multi_node_command_uses_the_slurm_script():
    rc, out = _cli(TINY, *LLAMA_7B, "--gpus", "8", "--nodes", "2", "--gpu-memory", "80GB")
    assert rc == 0
    assert "sbatch --nodes 2 --gpus-per-node 8 scripts/slurm_multinode.sh pretrain" in out
    assert "16 rank(s)" in out


def test_user_errors_exit_2_with_a_message(capsys):
    from lmforge.cli import main

    assert main(["plan", TINY, "--gpu-memory", "lots"]) == 2
    assert "error: memory size 'lots': expected a number with a unit" in capsys.readouterr().err
    assert main(["plan", TINY, "trian.max_steps=3"]) == 0  # only model/train/data are read: no error here
    assert main(["plan", TINY, "train.per_device_train_batch_size=zero"]) == 2
    assert "train.per_device_train_batch_size: expected an integer" in capsys.readouterr().err


def test_parse_bytes():
    assert plan.parse_bytes("80GB") == 80 * GiB == plan.parse_bytes("80 GiB") == plan.parse_bytes("80g")
    assert plan.parse_bytes("512MB") == 512 * 1024**2
    assert plan.parse_bytes("1.5T") == 1.5 * 1024**4


# ---------------------------------------------------------------------------------------------
# The estimate against a real CPU run's peak RSS

_MEASURE = """
import json, resource, sys
import lmforge.stages.pretrain as pre
from lmforge.cli import main

# Warm up first: the first forward/backward/AdamW step maps libtorch's kernels and thread pools into
# memory (tens of MiB of RSS that no estimate of tensors should count).
import torch
from transformers import AutoConfig, AutoModelForCausalLM
warm = AutoModelForCausalLM.from_config(AutoConfig.for_model(
    "llama", hidden_size=64, intermediate_size=176, num_hidden_layers=1, num_attention_heads=4, vocab_size=512))
warm(input_ids=torch.zeros(2, 16, dtype=torch.long), labels=torch.zeros(2, 16, dtype=torch.long)).loss.backward()
torch.optim.AdamW(warm.parameters(), foreach=True).step()
del warm

marks = {}
build = pre.load_causal_lm
def measured_build(*a, **k):
    # Reset the peak-RSS counter (Linux: clear_refs 5) so that the peak counts from here: the model,
    # optimizer states, activations and their transients, not the tokenizer/data loading before.
    with open("/proc/self/status") as f:
        marks["rss_before_model"] = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return build(*a, **k)
pre.load_causal_lm = measured_build
rc = main(sys.argv[1:])
with open("/proc/self/status") as f:
    marks["peak_rss"] = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print("RSS" + json.dumps(marks))
sys.exit(rc)
"""
MEDIUM = ["model.config.hidden_size=512", "model.config.intermediate_size=1408", "model.config.num_hidden_layers=4",
          "model.config.num_attention_heads=8", "model.config.num_key_value_heads=4"]


def test_estimate_matches_measured_cpu_peak_rss(tmp_path):
    """One process on the CPU, fp32: the planner's single-device figure (16 bytes/param + activations)
    against the growth of the process's peak RSS from just before the model is built."""
    run = ["pretrain", TINY, *MEDIUM, f"output_dir={tmp_path / 'rss'}", "train.max_steps=3", "schedule.warmup_steps=1",
           "log.trackers=[]", "eval.eval_every=0", "eval.max_eval_batches=1", "checkpoint.save_every=0"]
    # A fixed mmap threshold makes glibc return every freed tensor to the OS at once; with its default
    # (dynamic) threshold freed tensors stay resident and RSS reads up to ~1.5x the live bytes.
    env = {**subprocess_env(), "MALLOC_MMAP_THRESHOLD_": "131072"}
    r = subprocess.run([sys.executable, "-c", _MEASURE, *run], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    marks = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RSS")).removeprefix("RSS"))
    measured = marks["peak_rss"] - marks["rss_before_model"]
    shape, rows = plan.estimate_recipe(TINY, MEDIUM, n_gpus=1, precision="fp32")
    single = next(e for e in rows if e.layout.name == "DDP")  # one device: a plain replica
    assert single.model_states == 16 * shape.params
    ratio = measured / single.total
    print(f"\nCPU peak RSS growth {measured / 2**20:.0f} MiB vs estimate {single.total / 2**20:.0f} MiB "
          f"(states {single.model_states / 2**20:.0f} + activations {single.activations / 2**20:.0f}); ratio {ratio:.2f}")
    assert 0.75 <= ratio <= 1.35, f"measured {measured / 2**20:.0f} MiB vs estimated {single.total / 2**20:.0f} MiB"

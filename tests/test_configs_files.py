"""Every shipped accelerate YAML and DeepSpeed JSON parses into accelerate's own objects, as
`accelerate launch` would build them, and states nothing the recipe (or the JSON) already owns.

No training here: these run in seconds and cover the GPU-only layouts (ddp, fsdp, multi-node) on CPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT

ACC_DIR = ROOT / "accelerate_configs"
DS_DIR = ROOT / "ds_configs"
YAMLS = sorted(ACC_DIR.glob("*.yaml"))
JSONS = sorted(DS_DIR.glob("*.json"))

# What the issue promises to ship.
EXPECTED_YAMLS = {"cpu", "multi_cpu", "ddp", "fsdp", "fsdp_shard_grad_op", "deepspeed", "deepspeed_zero1",
                  "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "multi_node", "tp"}
EXPECTED_JSONS = {"zero1", "zero2", "zero3", "zero3_offload"}
# "auto" only where accelerate fills the value from the run (see accelerate's _prepare_deepspeed and
# DeepSpeedPlugin.set_mixed_precision) or lmforge does (gradient_clipping <- optim.max_grad_norm).
ALLOWED_AUTO = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "bf16.enabled", "fp16.enabled", "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold",
}
# accelerate refuses these in a YAML that points at a DeepSpeed JSON (the JSON owns them).
JSON_OWNED = {"gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
              "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path",
              "zero3_save_16bit_model"}
# The recipe owns these; a YAML that states them would silently fight the recipe.
RECIPE_OWNED = {"gradient_accumulation_steps", "gradient_clipping"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def test_every_promised_file_is_shipped():
    assert {p.stem for p in YAMLS} >= EXPECTED_YAMLS
    assert {p.stem for p in JSONS} >= EXPECTED_JSONS


# ---------------------------------------------------------------------------------------------
# accelerate YAMLs


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_yaml_opens_with_purpose_and_exact_command(path: Path):
    lines = path.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 2, f"{path.name}: open with a comment saying what it is for and the exact command"
    text = "\n".join(header)
    if path.stem == "multi_node":
        assert "scripts/slurm_multinode.sh" in text
    assert f"--config_file accelerate_configs/{path.name}" in text or "ACCELERATE_CONFIG" in text


def _launch_env(path: Path, monkeypatch) -> tuple[dict, object]:
    """What `accelerate launch --config_file path -m lmforge ...` exports to the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    for k in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(k)
    # Port 0 = any free port: the launcher refuses a busy 29500 (another run on this machine), a
    # fact about the machine, not about the file under test.
    args = launch_command_parser().parse_args(["--config_file", str(path), "--main_process_port", "0", "-m", "lmforge",
                                               "pretrain", "x.yaml"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config.keys()) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    env = {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env, defaults


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_yaml_builds_accelerates_plugin(path: Path, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    from lmforge.train.accel import layout_info

    monkeypatch.chdir(ROOT)  # deepspeed_config_file paths are relative to the repo root, where users launch
    env, cfg = _launch_env(path, monkeypatch)
    raw = yaml.safe_load(path.read_text())
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        ds_fields = set(raw.get("deepspeed_config", {}))
        assert not ds_fields & RECIPE_OWNED, f"{path.name}: the recipe owns {ds_fields & RECIPE_OWNED}"
        if "deepspeed_config_file" in ds_fields:
            assert not ds_fields & JSON_OWNED, f"{path.name}: stated in the JSON already: {ds_fields & JSON_OWNED}"
            assert "mixed_precision" not in raw, f"{path.name}: mixed_precision is the JSON's (bf16/fp16 'auto')"
            assert (ROOT / raw["deepspeed_config"]["deepspeed_config_file"]).is_file()
        plugin = DeepSpeedPlugin()  # raises if the YAML repeats what the JSON owns
        z = plugin.deepspeed_config["zero_optimization"]
        assert plugin.zero_stage in (1, 2, 3)
        assert z["stage3_gather_16bit_weights_on_model_save"] is True, "ZeRO-3 could not save the final model"
        assert "optimizer" not in plugin.deepspeed_config and "scheduler" not in plugin.deepspeed_config
        name = path.stem
        if name.startswith("deepspeed_zero"):
            assert plugin.zero_stage == int(name[len("deepspeed_zero")])
        if "offload" in name:
            assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
        info = layout_info(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)))
        assert info["zero_stage"] == plugin.zero_stage and info["fsdp_sharding"] is None
        if plugin.zero_stage == 3:
            assert plugin.zero3_init_flag, f"{path.name}: ZeRO-3 should create weights sharded (zero3_init_flag)"
    elif path.stem == "tp":
        # tensor parallelism: FSDP2 over dp_shard ranks x the TP degree; the whole world is the product
        from accelerate.parallelism_config import ParallelismConfig

        assert env["ACCELERATE_USE_PARALLELISM_CONFIG"] == "true" and env["FSDP_VERSION"] == "2"
        monkeypatch.setenv("PARALLELISM_CONFIG_TP_SIZE", os.environ.get("PARALLELISM_CONFIG_TP_SIZE", "2"))
        pc = ParallelismConfig(tp_size=raw["parallelism_config"]["parallelism_config_tp_size"],
                               dp_shard_size=raw["parallelism_config"]["parallelism_config_dp_shard_size"])
        assert pc.tp_enabled and pc.total_size == cfg.num_processes == 2
    elif cfg.distributed_type == DistributedType.FSDP:
        # sync_module_states makes the plugin look for a GPU when built: check the setting, build without it.
        # (cpu_ram_efficient_loading turns it back on, so both go off for this structural check.)
        assert env["FSDP_SYNC_MODULE_STATES"] == "true" and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
        monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
        monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
        plugin = FullyShardedDataParallelPlugin()
        strategy = plugin.sharding_strategy.name
        assert strategy == ("SHARD_GRAD_OP" if "shard_grad_op" in path.stem else "FULL_SHARD")
        assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
        assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
        # what summary.json will record for this layout (GPU tests assert on it)
        assert layout_info(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=plugin))) == {
            "zero_stage": None, "offload_optimizer": None, "offload_param": None, "fsdp_sharding": strategy}
    elif path.stem in ("ddp", "multi_cpu"):
        assert cfg.distributed_type == DistributedType.MULTI_GPU and cfg.num_processes >= 2
    else:
        assert cfg.distributed_type == DistributedType.NO and cfg.num_processes == 1
    if path.stem == "multi_node":
        assert cfg.num_machines == 2 and cfg.num_processes == 16
        assert raw["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"


# ---------------------------------------------------------------------------------------------
# DeepSpeed JSONs


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.stem)
def test_ds_json_auto_only_where_the_run_decides(path: Path):
    cfg = json.loads(path.read_text())
    flat = _flat(cfg)
    autos = {k for k, v in flat.items() if v == "auto"}
    assert autos <= ALLOWED_AUTO, f"{path.name}: 'auto' that nothing fills: {autos - ALLOWED_AUTO}"
    # Everything the recipe decides is "auto" (stated once, in the recipe).
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16.enabled", "fp16.enabled"):
        assert flat.get(key) == "auto", f"{path.name}: {key} must be \"auto\" (the recipe decides it)"
    assert "optimizer" not in cfg and "scheduler" not in cfg, "lmforge builds optimizer groups and schedule itself"
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    stage = int(re.search(r"zero(\d)", path.stem).group(1))
    assert cfg["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.stem)
def test_ds_json_filled_as_accelerate_does_is_valid_for_deepspeed(path: Path, monkeypatch):
    """Fill the "auto"s the way accelerate + lmforge do for the tiny recipe, then let DeepSpeed's own
    config class parse the result (it checks the batch-size arithmetic and every ZeRO field)."""
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig

    for k in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(k)
    plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    plugin.set_mixed_precision("no")
    hidden = 64
    plugin.deepspeed_config_process(must_match=False, **{
        "train_micro_batch_size_per_gpu": 8, "train_batch_size": 8, "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0, "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
    })
    assert "auto" not in _flat(plugin.deepspeed_config).values()
    ds = DeepSpeedConfig(plugin.deepspeed_config)
    assert ds.zero_optimization_stage == json.loads(path.read_text())["zero_optimization"]["stage"]
    assert ds.gradient_clipping == 1.0


def test_deepspeed_config_refuses_optimizer_block_and_clip_mismatch(tmp_path, monkeypatch):
    """lmforge's own check (train/accel.py): a JSON that would override the recipe is an error that names the fix."""
    from accelerate.utils import DeepSpeedPlugin

    from lmforge.config import UserError
    from lmforge.train.accel import _check_deepspeed_config

    for k in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(k)
    bad = json.loads((DS_DIR / "zero2.json").read_text())
    bad["optimizer"] = {"type": "AdamW", "params": {"lr": "auto"}}
    bad["gradient_clipping"] = 0.5
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(p))
    with pytest.raises(UserError) as e:
        _check_deepspeed_config(DeepSpeedPlugin(hf_ds_config=str(p)), max_grad_norm=1.0)
    msg = "\n".join(e.value.problems)
    assert "remove the 'optimizer' block" in msg and "optim.max_grad_norm is 1.0" in msg and '"auto"' in msg
    good = DeepSpeedPlugin(hf_ds_config=str(DS_DIR / "zero2.json"))
    _check_deepspeed_config(good, max_grad_norm=None)  # null: no clipping
    assert good.deepspeed_config["gradient_clipping"] == 0.0


# ---------------------------------------------------------------------------------------------
# The Slurm launcher and the docs


def test_slurm_script_builds_one_launch_per_node():
    script = ROOT / "scripts" / "slurm_multinode.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "DRY_RUN": "1", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8", "MAIN_ADDR": "node001"}
    r = subprocess.run([str(script), "pretrain", "recipes/tiny/pretrain.yaml", "train.max_steps=5"], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout
    for piece in ("--config_file accelerate_configs/multi_node.yaml", "--num_machines 2", "--num_processes 16",
                  "--machine_rank $SLURM_NODEID", "--main_process_ip node001",
                  "-m lmforge pretrain recipes/tiny/pretrain.yaml train.max_steps=5"):
        assert piece in " ".join(cmd.split()), piece


def test_docs_table_names_every_layout_file():
    doc = (ROOT / "docs" / "layouts.md").read_text()
    for p in [*YAMLS, *JSONS]:
        assert p.name in doc, f"docs/layouts.md does not mention {p.name}"

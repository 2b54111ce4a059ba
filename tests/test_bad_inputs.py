"""Bad input, as a new user types it: one `error:` line naming the key (or file and line) and the fix,
exit code 2, no traceback, and nothing written or removed (the folder is checksummed before/after)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import ROOT

from lmforge import cli

PRETRAIN = str(ROOT / "recipes" / "tiny" / "pretrain.yaml")


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    err = capsys.readouterr().err
    return rc, err


@pytest.fixture
def workdir(tmp_path):
    """An output folder holding another run's work that no refused command may touch."""
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.safetensors").write_bytes(b"weights")
    (out / "notes.txt").write_text("keep me")
    return out


CASES = {
    "typo inside model.config": (["model.config.num_hidden_layer=6"], "model.config.num_hidden_layer: not a LlamaConfig key; did you mean 'num_hidden_layers'?"),
    "unknown model_type": (["model.config.model_type=lama"], "model.config.model_type: 'lama' is not a transformers model type; did you mean 'llama'"),
    "output_dir null": (["output_dir=null"], "output_dir: required"),
    "eval batch size 0": (["eval.per_device_eval_batch_size=0"], "eval.per_device_eval_batch_size: must be >= 1"),
    "seed too large": (["seed=4294967296"], "seed: 4294967296 is outside 0 .. 2**32-1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_mistakes_are_one_line_errors_and_write_nothing(case, workdir, capsys):
    overrides, message = CASES[case]
    before = tree_digest(workdir)
    extra = [] if any(o.startswith("output_dir=") for o in overrides) else [f"output_dir={workdir}"]
    rc, err = run_cli(capsys, "pretrain", PRETRAIN, *extra, "overwrite=true", *overrides)
    assert rc == 2
    assert message in err, err
    assert "Traceback" not in err and all(line.startswith("error: ") for line in err.strip().splitlines())
    assert tree_digest(workdir) == before
    assert not (ROOT / "None").exists()


def test_output_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    rc, err = run_cli(capsys, "pretrain", PRETRAIN, f"output_dir={f}")
    assert rc == 2 and f"output_dir: '{f}' is a file, not a folder" in err and f.read_text() == "x"


def test_duplicate_yaml_keys_name_both_lines(tmp_path, capsys):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("stage: pretrain\noutput_dir: x\nseed: 1\nseed: 2\n")
    rc, err = run_cli(capsys, "check", str(recipe))
    assert rc == 2 and "key 'seed' appears twice in one mapping (lines 3 and 4)" in err and str(recipe) in err


def test_a_recipe_for_another_stage_says_which_command_runs_it(capsys):
    recipe = str(ROOT / "recipes" / "tiny" / "finetune_lora.yaml")
    rc, err = run_cli(capsys, "pretrain", recipe)
    assert rc == 2 and f"this is a 'finetune' recipe (stage: finetune); run `lmforge finetune {recipe}`" in err
    assert err.count("\n") == 1  # one line, not a list of unknown keys


def test_check_refuses_a_warmup_longer_than_training(capsys):
    rc, err = run_cli(capsys, "check", PRETRAIN, "train.max_steps=5")
    assert rc == 2 and "schedule.warmup_steps: 10 warmup steps exceed train.max_steps=5" in err


def test_launch_checks_config_and_recipe_before_spawning_ranks(capsys):
    rc, err = run_cli(capsys, "launch", "--config_file", "accelerate_configs/nope.yaml", "pretrain", PRETRAIN)
    assert rc == 2 and "--config_file: 'accelerate_configs/nope.yaml' does not exist" in err
    rc, err = run_cli(capsys, "launch", "--config_file", "accelerate_configs/multi_cpu.yaml", "--num_processes", "2",
                      "pretrain", PRETRAIN, "model.config.num_hidden_layer=3")
    assert rc == 2 and err.count("error: ") == 1 and "did you mean 'num_hidden_layers'" in err


@pytest.mark.layouts
def test_launch_hands_a_good_recipe_to_accelerate(tmp_path):
    import subprocess

    from conftest import BIN, subprocess_env

    r = subprocess.run([str(BIN / "lmforge"), "launch", "--config_file", "accelerate_configs/multi_cpu.yaml", "pretrain",
                        PRETRAIN, f"output_dir={tmp_path}", "train.max_steps=2", "log.trackers=[]", "eval.eval_every=0",
                        "checkpoint.save_every=0", "schedule.warmup_steps=0", "data.block_size=32"],
                       capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    assert json.loads((tmp_path / "summary.json").read_text())["num_processes"] == 2


def test_data_the_model_cannot_take(tmp_path, capsys):
    rc, err = run_cli(capsys, "pretrain", PRETRAIN, f"output_dir={tmp_path / 'o'}", "data.block_size=512")
    assert rc == 2 and "data.block_size: 512 exceeds the model's max_position_embeddings (256)" in err
    assert not (tmp_path / "o" / "final").exists()


def test_bad_data_files_are_named_with_their_line(tmp_path, capsys):
    rc, err = run_cli(capsys, "pretrain", PRETRAIN, f"output_dir={tmp_path / 'o'}", f"data.train_files=[{tmp_path}]")
    assert rc == 2 and f"data.train_files: '{tmp_path}' is a directory; give its files or a glob" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "cut off\n')
    rc, err = run_cli(capsys, "pretrain", PRETRAIN, f"output_dir={tmp_path / 'b'}", f"data.train_files=[{broken}]")
    assert rc == 2 and f"{broken}:2: not a JSON object" in err
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    rc, err = run_cli(capsys, "pretrain", PRETRAIN, f"output_dir={tmp_path / 'c'}", f"data.train_files=[{latin}]")
    assert rc == 2 and f"{latin}:2: not UTF-8" in err


def test_generate_on_a_folder_without_weights(tmp_path, capsys):
    from transformers import AutoConfig

    AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    rc, err = run_cli(capsys, "generate", str(tmp_path), "--prompt", "x")
    assert rc == 2 and "MODEL_DIR: cannot load a model from" in err and "Traceback" not in err

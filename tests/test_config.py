"""Recipe parsing: strict keys with suggestions, types, cross-field rules, all problems at once."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import BIN, ROOT, subprocess_env

from lmforge import config, recipe
from lmforge.config import ConfigError, load
from lmforge.stages.pretrain import Config as PretrainConfig

RECIPE = ROOT / "recipes" / "tiny" / "pretrain.yaml"


def problems_of(overrides: list[str], recipe: Path = RECIPE) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(PretrainConfig, recipe, overrides)
    return e.value.problems


def test_tiny_recipe_loads_with_types():
    cfg = load(PretrainConfig, RECIPE, ["optim.learning_rate=3e-4", "train.max_steps=7", "log.trackers=a,b",
                                        "train.gradient_checkpointing=true"])
    assert cfg.optim.learning_rate == pytest.approx(3e-4) and isinstance(cfg.optim.learning_rate, float)
    assert cfg.train.max_steps == 7
    assert cfg.log.trackers == ["a", "b"]
    assert cfg.train.gradient_checkpointing is True
    assert cfg.model.config["hidden_size"] == 64
    assert cfg.stage == "pretrain"


def test_unknown_key_suggests_closest():
    (p,) = problems_of(["optim.learnign_rate=1e-3"])
    assert "optim.learnign_rate: unknown key" in p and "did you mean 'optim.learning_rate'" in p


def test_key_in_wrong_section_points_to_the_right_one():
    (p,) = problems_of(["train.learning_rate=1e-3"])
    assert "train.learning_rate: unknown key" in p and "'optim.learning_rate'" in p


def test_bad_type_and_choice():
    probs = problems_of(["train.max_steps=abc", "schedule.name=cosin"])
    assert any("train.max_steps: expected an integer, got 'abc'" in p for p in probs)
    assert any("schedule.name" in p and "did you mean 'cosine'" in p for p in probs)


def test_all_problems_reported_at_once():
    probs = problems_of(["schedule.warmup_ratio=0.1", "train.max_steps=0", "data.train_files=[nope/*.jsonl]",
                         "optim.bogus=1"])
    text = "\n".join(probs)
    assert "warmup_steps / warmup_ratio: give one, not both" in text
    assert "max_steps: must be > 0" in text
    assert "'nope/*.jsonl' matches no file" in text
    assert "optim.bogus: unknown key" in text
    assert all(p.startswith(str(RECIPE)) for p in probs)  # each line names the file


def test_stage_mismatch_is_refused(tmp_path):
    raw = yaml.safe_load(RECIPE.read_text())
    raw["stage"] = "finetune"
    bad = tmp_path / "r.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="this recipe is for 'finetune'"):
        load(PretrainConfig, bad)


def test_invalid_yaml_names_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("stage: pretrain\noptim:\n  learning_rate: [1,\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+ is not valid YAML"):
        load(PretrainConfig, bad)


def test_resolved_recipe_round_trips(tmp_path):
    cfg = load(PretrainConfig, RECIPE, ["seed=7"])
    config.dump(cfg, tmp_path / "recipe.yaml")
    again = load(PretrainConfig, tmp_path / "recipe.yaml")
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_every_recipe_parses():
    """Every YAML under recipes/ loads into its stage's schema (paths to outputs of earlier stages
    may not exist yet, and are the only problems allowed)."""
    recipes = sorted((ROOT / "recipes").rglob("*.yaml"))
    assert recipes
    for path in recipes:
        stage = yaml.safe_load(path.read_text()).get("stage")
        assert stage in recipe.STAGES, f"{path}: stage {stage!r}"
        module = recipe.import_stage(stage)
        try:
            load(module.Config, path)
        except ConfigError as e:
            rest = [p for p in e.problems if "does not exist" not in p and "matches no file" not in p]
            assert not rest, f"{path}: {rest}"


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lmforge"), *args], capture_output=True, text=True, cwd=cwd, env=subprocess_env())


def test_cli_user_error_exit_code_2_without_traceback():
    r = _cli("pretrain", str(RECIPE), "optim.learnign_rate=1", "train.max_steps=-1")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert "Traceback" not in r.stderr


def test_cli_check_ok_and_unknown_command():
    ok = _cli("check", str(RECIPE))
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = _cli("pretrian", str(RECIPE))
    assert bad.returncode == 2 and "did you mean 'pretrain'" in bad.stderr


def test_cli_missing_recipe_file():
    r = _cli("check", "recipes/tiny/nope.yaml")
    assert r.returncode == 2 and "recipes/tiny/nope.yaml: recipe file not found" in r.stderr

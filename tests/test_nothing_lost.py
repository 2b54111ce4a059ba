"""Nothing already written is lost: overwrite replaces only a run's own folder and only once the new run
has its result; resume=auto refuses a changed recipe, says when there is nothing to do, and skips a
checkpoint that lost a file; two runs cannot share a folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_bad_inputs import run_cli, tree_digest

PRETRAIN = str(ROOT / "recipes" / "tiny" / "pretrain.yaml")
TINY = ["log.trackers=[]", "eval.eval_every=0", "log.log_every=2", "schedule.warmup_steps=0", "data.block_size=32",
        "train.per_device_train_batch_size=4"]


def pretrain(capsys, out: Path, *overrides: str) -> tuple[int, str]:
    return run_cli(capsys, "pretrain", PRETRAIN, f"output_dir={out}", *TINY, *overrides)


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_late(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(capsys, out, "train.max_steps=2", "checkpoint.save_every=0")[0] == 0
    (out / "notes.txt").write_text("my notes")
    before = tree_digest(out)
    # min_lr above the lr is found only when the schedule is built, after the model and data
    rc, err = pretrain(capsys, out, "train.max_steps=2", "overwrite=true", "schedule.min_lr=1e-2")
    assert rc == 2 and "min_lr" in err
    assert tree_digest(out) == before and not (tmp_path / "run.replaced").exists()
    # a successful overwrite replaces it, and leaves nothing set aside
    assert pretrain(capsys, out, "train.max_steps=3", "checkpoint.save_every=0", "overwrite=true")[0] == 0
    assert not (out / "notes.txt").exists() and not (tmp_path / "run.replaced").exists()
    assert (out / "final" / "model.safetensors").is_file()


def test_overwrite_refuses_a_folder_no_run_made(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    rc, err = pretrain(capsys, out, "train.max_steps=2", "overwrite=true")
    assert rc == 2 and "holds files no lmforge run made (thesis.tex)" in err
    assert (out / "thesis.tex").read_text() == "years of work" and len(list(out.iterdir())) == 1


def test_resume_auto_on_a_finished_run_without_checkpoints(tmp_path, capsys):
    out = tmp_path / "done"
    assert pretrain(capsys, out, "train.max_steps=2", "checkpoint.save_every=0")[0] == 0
    before = tree_digest(out)
    from lmforge import cli

    rc = cli.main(["pretrain", PRETRAIN, f"output_dir={out}", *TINY, "train.max_steps=2", "checkpoint.save_every=0",
                   "resume=auto"])
    assert rc == 0 and "the run is complete already (step 2 of train.max_steps=2" in capsys.readouterr().out
    assert tree_digest(out) == before
    rc, err = pretrain(capsys, out, "train.max_steps=4", "checkpoint.save_every=0", "resume=auto")
    assert rc == 2 and "finished at step 2 and kept no checkpoint" in err
    assert tree_digest(out) == before


def test_resume_auto_refuses_another_model_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "r"
    assert pretrain(capsys, out, "train.max_steps=4", "train.stop_at_step=2", "checkpoint.save_every=2")[0] == 0
    before = tree_digest(out)
    rc, err = pretrain(capsys, out, "train.max_steps=4", "checkpoint.save_every=2", "resume=auto",
                       "model.config.hidden_size=32")
    assert rc == 2 and "the recipe differs from the run" in err and "model.config.hidden_size" in err
    assert "Traceback" not in err and tree_digest(out) == before


def test_resume_skips_a_checkpoint_that_lost_a_file(tmp_path, capsys):
    out = tmp_path / "k"
    assert pretrain(capsys, out, "train.max_steps=6", "train.stop_at_step=4", "checkpoint.save_every=2",
                    "checkpoint.keep_last=3")[0] == 0
    broken = next((out / "checkpoints" / "step_4").glob("optimizer*"))
    broken.unlink()
    from lmforge.train import checkpoint

    assert checkpoint.latest(out / "checkpoints").name == "step_2"
    rc, err = pretrain(capsys, out, "train.max_steps=6", "checkpoint.save_every=2", "checkpoint.keep_last=3", "resume=auto")
    assert rc == 0, err
    for p in (out / "checkpoints").glob("step_*"):
        for f in p.glob("optimizer*"):
            f.unlink()
    rc, err = pretrain(capsys, tmp_path / "k", "train.max_steps=8", "checkpoint.save_every=2", "checkpoint.keep_last=3",
                       "resume=auto")
    assert rc == 2 and "every checkpoint in" in err and "is incomplete" in err


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('4242'); "
        "f.flush(); print('held', flush=True); time.sleep(60)"), str(out / ".lmforge.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, err = pretrain(capsys, out, "train.max_steps=2", "overwrite=true")
        assert rc == 2 and "another lmforge run (pid 4242) is writing into" in err
    finally:
        holder.kill()


def test_data_overwrite_keeps_the_complete_dataset_when_the_new_run_fails(tmp_path, capsys):
    out = tmp_path / "data"
    good = ROOT / "tests" / "fixtures" / "corpus" / "stdlib_docs.jsonl"
    src = ["sources=[{name: a, files: [" + str(good) + "], text_key: text}]", "executor.tasks=1"]
    assert run_cli(capsys, "data", str(ROOT / "recipes" / "tiny" / "data.yaml"), f"output_dir={out}", *src)[0] == 0
    before = tree_digest(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text().splitlines()[0] + "\n{not json\n")
    rc, err = run_cli(capsys, "data", str(ROOT / "recipes" / "tiny" / "data.yaml"), f"output_dir={out}", "overwrite=true",
                      "executor.tasks=1", "sources=[{name: a, files: [" + str(bad) + "], text_key: text}]")
    assert rc == 2 and f"{bad}:2" in err
    assert tree_digest(out) == before


@pytest.mark.layouts
def test_deepspeed_divergence_stops_before_the_engine_steps(tmp_path):
    """Under DeepSpeed the engine steps inside backward, so the NaN/inf guard checks each micro-batch's loss
    before it: a run whose loss overflows stops at that step, on both ranks, with the last good checkpoint
    kept and nothing newer written."""
    from conftest import BIN, subprocess_env

    out = tmp_path / "ds"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / "deepspeed_zero2.yaml"),
           "-m", "lmforge", "pretrain", PRETRAIN, f"output_dir={out}", *TINY, "train.max_steps=6", "checkpoint.save_every=1",
           "optim.learning_rate=1e30", "schedule.name=constant", "schedule.warmup_steps=null", "schedule.min_lr=0",
           "optim.max_grad_norm=null"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=600)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert "training diverged: the loss became NaN/inf at step" in err
    step = int(err.split("NaN/inf at step ")[1].split(";")[0])
    saved = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert saved and max(saved) == step - 1 and not (out / "final").exists()


def test_a_key_newer_than_the_saved_recipe_counts_as_unchanged_at_its_default():
    """A run made before a recipe key existed resumes, unless the key is now set away from its default."""
    from lmforge.outputs import changed_keys

    saved = {"train": {"max_steps": 10}, "data": {"path": "d"}}
    defaults = {"train": {"max_steps": 100}, "data": {"path": None, "kind": "blocks"}}
    assert changed_keys(saved, {"train": {"max_steps": 10}, "data": {"path": "d", "kind": "blocks"}}, defaults=defaults) == []
    assert changed_keys(saved, {"train": {"max_steps": 10}, "data": {"path": "d", "kind": "sft"}}, defaults=defaults) == ["data.kind"]
    assert changed_keys(saved, {"train": {"max_steps": 10}, "data": {"path": "d", "kind": "blocks"}}) == ["data.kind"]

"""`lmforge data` end to end on recipes/tiny/data.yaml: outputs, planted documents, pretrain reads it; bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from conftest import ROOT

from lmforge import cli
from lmforge.config import load
from lmforge.stages import data as data_stage

RECIPE = str(ROOT / "recipes" / "tiny" / "data.yaml")


def run(capsys, *args: str) -> tuple[int, str]:
    from loguru import logger

    logger.remove()  # datatrove's handlers still point at an earlier test's captured stderr
    code = cli.main(["data", RECIPE, *args])
    return code, capsys.readouterr().err


def documents(out: Path) -> dict[str, dict]:
    with gzip.open(out / "documents.jsonl.gz", "rt", encoding="utf-8") as f:
        return {r["id"]: r for r in map(json.loads, f)}


def dropped(out: Path) -> dict[str, str]:
    """{doc id: reason} over every filter's dropped/ folder."""
    reasons = {}
    for f in (out / "dropped").rglob("*.jsonl.gz"):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for r in map(json.loads, fh):
                reasons[r["id"]] = r["metadata"]["filter_reason"]
    return reasons


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "out"
    assert cli.main(["data", RECIPE, f"output_dir={out}"]) == 0
    return out


def test_outputs_are_complete(tiny):
    import datasets
    from transformers import AutoTokenizer

    for name in ("dataset", "tokenizer", "report.json", "report.md", "lengths.png", "drops.png", "recipe.yaml",
                 "documents.jsonl.gz", "logs"):
        assert (tiny / name).exists(), name
    assert not Path(str(tiny) + ".partial").exists()
    dd = datasets.load_from_disk(str(tiny / "dataset"))
    assert set(dd) == {"train", "validation"} and dd["train"].column_names == ["input_ids"]
    assert {len(x) for x in dd["train"]["input_ids"]} == {128} and len(dd["validation"]) > 0
    tok = AutoTokenizer.from_pretrained(str(tiny / "tokenizer"))
    assert len(tok) == 512 and tok.eos_token == "<|endoftext|>"
    report = json.loads((tiny / "report.json").read_text())
    assert report["tokens"]["train"] == len(dd["train"]) * 128 + report["tokens"]["dropped_remainder"] - (
        report["tokens"]["validation"] - len(dd["validation"]) * 128)
    assert report["sources"]["stdlib"] == {"read": 513, "kept": 513}
    md = (tiny / "report.md").read_text()
    for heading in ("## Blocks", "## PII replaced", "## Deduplication", "## Tokenizer"):
        assert heading in md


def test_blocks_decode_to_the_kept_documents_split_by_document(tiny):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny / "tokenizer"))
    docs = documents(tiny)
    dd = datasets.load_from_disk(str(tiny / "dataset"))
    for split in ("train", "validation"):
        texts = [d["text"] for d in docs.values() if d["split"] == split]
        stream = [t for x in texts for t in tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
        flat = [t for row in dd[split]["input_ids"] for t in row]
        assert flat == stream[: len(flat)] and len(stream) - len(flat) < 128
    train_texts = {d["text"] for d in docs.values() if d["split"] == "train"}
    assert not any(d["text"] in train_texts for d in docs.values() if d["split"] == "validation")


def test_planted_documents(tiny):
    docs, reasons = documents(tiny), dropped(tiny)
    # exact and near duplicates: exactly one of original and copy survives (both, when the original was
    # dropped by a filter, is impossible; none would mean the copy was filtered too)
    planted = [json.loads(line)["id"] for line in (ROOT / "tests/fixtures/raw/planted.jsonl").open()]
    pairs = [(f"planted/{p}", "stdlib/" + p.split("-of-")[1]) for p in planted if "-dup-of-" in p]
    assert len(pairs) == 7
    for copy, original in pairs:
        if original in docs or copy in docs:
            assert (copy in docs) != (original in docs), (copy, original)
    assert sum((copy in docs) or (original in docs) for copy, original in pairs) >= 5
    # of each group the smallest id stays ("planted/..." < "stdlib/..."), whatever the number of tasks
    assert all(original not in docs for copy, original in pairs if copy in docs)
    report = json.loads((tiny / "report.json").read_text())
    assert report["dedup"]["exact_duplicates"] >= 3 and report["dedup"]["near_duplicates"] >= 4
    assert not ("licenses/GFDL-1.2.txt" in docs and "licenses/GFDL-1.3.txt" in docs)  # natural near-duplicates
    # non-English documents dropped by language ID, junk by the quality filters
    for lang in ("de", "fr", "es", "it"):
        assert reasons[f"planted/foreign-{lang}"] == f"language_{lang}"
    assert reasons["planted/low-quality-too_short"] == "too_short"
    assert reasons["planted/low-quality-repeated_lines"] == "dup_line_frac"
    # PII replaced
    text = " ".join(docs[f"planted/pii-{i}"]["text"] for i in range(4))
    for secret in ("jane.doe@", "7946 0958", "8.8.4.4", "Zx81Qm4PvB7t2LwK9sR3", "ghp_", "AKIA", "BEGIN RSA", "2606:4700"):
        assert secret not in text
    assert "203.0.113.7" in text  # a documentation address, not PII
    assert report["pii"]["email"] >= 4 and report["pii"]["secret_private_key"] == 1
    # control characters and odd spaces normalised
    assert docs["planted/control-chars"]["text"].startswith("Café menu with odd spaces.\n\n")


def test_pretrain_reads_the_output(tiny):
    from lmforge.datasets.lm import LMDataConfig, build_lm_datasets
    from lmforge.models import ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig(tokenizer=str(tiny / "tokenizer")))
    train, val = build_lm_datasets(LMDataConfig(path=str(tiny / "dataset"), block_size=128), tok, seed=0)
    ids = train[:]["input_ids"]  # (n_blocks, 128) torch tensor
    assert ids.shape == (len(train), 128) and ids.dtype.is_floating_point is False and int(ids.max()) < len(tok)
    assert val is not None and len(val) > 0


@pytest.mark.slow
def test_pretrain_runs_on_the_output(tiny, tmp_path):
    code = cli.main(["pretrain", str(ROOT / "recipes/tiny/pretrain.yaml"), f"output_dir={tmp_path}",
                     f"data.path={tiny / 'dataset'}", "data.train_files=[]", f"model.tokenizer={tiny / 'tokenizer'}",
                     "train.max_steps=4", "schedule.warmup_steps=1", "eval.eval_every=4", "checkpoint.save_every=4", "log.trackers=[]"])
    assert code == 0 and (tmp_path / "final").is_dir()


def test_refuses_non_empty_output_dir_and_resumes(tiny, tmp_path, capsys):
    code, err = run(capsys, f"output_dir={tiny}")
    assert code == 2 and err.strip() == (f"error: output_dir: '{tiny}' is not empty; pass overwrite=true to "
                                         "replace it, or choose another output_dir")
    code, _ = run(capsys, f"output_dir={tiny}", "resume=auto")  # complete already: nothing to do
    assert code == 0


def test_interrupted_run_resumes_skipping_finished_tasks(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    light = [f"output_dir={out}", "filters.language.enabled=false", "tokenizer.vocab_size=300"]
    import lmforge.pipeline.publish as publish_mod

    def crash(*a, **k):
        raise RuntimeError("simulated crash in the last step")

    with monkeypatch.context() as m:
        m.setattr(publish_mod, "publish", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            cli.main(["data", RECIPE, *light])
    partial = Path(str(out) + ".partial")
    assert not out.exists() and (partial / "logs" / "clean" / "completions" / "00001").exists()
    first = (partial / "clean" / "00000.jsonl.gz").stat().st_mtime_ns
    code, err = run(capsys, *light, "filters.length.min_chars=10", "resume=auto")
    assert code == 2 and "resume: the recipe changed since the interrupted run" in err
    assert cli.main(["data", RECIPE, *light, "resume=auto"]) == 0
    assert (out / "report.json").exists() and not partial.exists()
    assert (out / "clean" / "00000.jsonl.gz").stat().st_mtime_ns == first  # finished task was skipped


def bad_source(tmp_path: Path, name: str, content: bytes) -> list[str]:
    (tmp_path / name).write_bytes(content)
    fmt = "text" if name.endswith(".txt") else "jsonl"
    return [f"output_dir={tmp_path / 'out'}", f"sources=[{{files: [{tmp_path / name}], format: {fmt}}}]"]


@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl", b'{"text": "fine"}\n{"text": oops}\n', "a.jsonl:2: not valid JSON (Expecting value at column 10); fix or delete that line"),
    ("a.jsonl", b'{"body": "no text"}\n', "a.jsonl:1: no 'text' field (fields: body); set sources[0].text_key"),
    ("a.txt", b"caf\xe9\n", "a.txt: not UTF-8 text (invalid continuation byte at byte 3); convert it"),
])
def test_bad_input_is_one_clear_line_and_leaves_nothing_complete(tmp_path, capsys, name, content, message):
    code, err = run(capsys, *bad_source(tmp_path, name, content))
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err[-2000:]
    assert str(tmp_path / name) in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_missing_file_and_empty_corpus(tmp_path, capsys):
    code, err = run(capsys, f"output_dir={tmp_path / 'out'}", f"sources=[{{files: [{tmp_path}/none*.jsonl]}}]")
    assert code == 2 and "matches no file" in err and not (tmp_path / "out").exists()
    code, err = run(capsys, f"output_dir={tmp_path / 'out'}", "filters.length.min_chars=10000000")
    assert code == 2 and "error: sources: no document is left after filtering and deduplication" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_recipe_validation_collects_problems():
    from lmforge.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load(data_stage.Config, RECIPE, ["sources[0]=x", "executor.kind=slurm", "dedup.near.bands=3",
                                         "pack.validation_ratio=1.5", "resume=/nope"])
    text = "\n".join(e.value.problems)
    for needle in ("slurm.partition: required", "bands / rows: give both", "validation_ratio: must be in [0, 1)",
                   "resume: the data stage takes 'none' or 'auto'"):
        assert needle in text
    with pytest.raises(ConfigError, match=r"filters.gopher_quality.min_doc_wrds: unknown key; did you mean"):
        load(data_stage.Config, RECIPE, ["filters.gopher_quality.min_doc_wrds=3"])


def test_lmforge_check_validates_the_recipe(capsys):
    assert cli.main(["check", RECIPE]) == 0
    assert "OK (data recipe)" in capsys.readouterr().out


@pytest.mark.slow
def test_same_result_with_one_task_or_two_parallel_workers(tiny, tmp_path):
    """Sharding and worker processes change nothing: same kept documents, same packed blocks."""
    import datasets

    out = tmp_path / "two"
    # three tasks, and a sort buffer small enough that publishing spills many sorted runs
    assert cli.main(["data", RECIPE, f"output_dir={out}", "executor.tasks=3", "executor.workers=2",
                     "pack.sort_buffer_mb=0.05"]) == 0
    one = tmp_path / "one"
    assert cli.main(["data", RECIPE, f"output_dir={one}", "executor.tasks=1"]) == 0
    assert set(documents(out)) == set(documents(one)) == set(documents(tiny))
    assert documents(out) == documents(one)  # same texts, same split of every document
    a, b = datasets.load_from_disk(str(out / "dataset")), datasets.load_from_disk(str(one / "dataset"))
    for split in ("train", "validation"):
        assert len(a[split]) > 0 and a[split]["input_ids"] == b[split]["input_ids"]


def test_cluster_executors_are_wired_from_the_recipe(tmp_path, monkeypatch):
    """Slurm: the three pipelines become chained sbatch jobs (built here, not submitted); Ray: a clear
    install hint when Ray is missing."""
    from datatrove.executor import SlurmPipelineExecutor

    from lmforge.config import UserError

    cfg = load(data_stage.Config, RECIPE, [f"output_dir={tmp_path / 'o'}", "executor.kind=slurm",
                                           "executor.slurm.partition=cpu", "executor.tasks=4"])
    steps = data_stage.pipelines(cfg, tmp_path / "w", str(tmp_path / "o"))
    clean = data_stage.make_executor(cfg, "clean", steps["clean"], 4, tmp_path / "logs")
    dedup = data_stage.make_executor(cfg, "dedup", steps["dedup"], 1, tmp_path / "logs", depends=clean)
    assert isinstance(dedup, SlurmPipelineExecutor) and dedup.depends is clean
    assert (clean.tasks, clean.partition, dedup.tasks) == (4, "cpu", 1)
    monkeypatch.setattr(data_stage.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="sbatch` is not on PATH"):
        data_stage.check(cfg)
    cfg.executor.kind = "ray"
    try:
        import ray  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"pip install -e '\.\[ray\]'"):
            data_stage.check(cfg)

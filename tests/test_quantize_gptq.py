"""`quant.method: gptq` / `awq` through llm-compressor on a CPU: the stage calibrates on training blocks, saves
compressed-tensors folders that plain `AutoModelForCausalLM.from_pretrained` reloads in a fresh process to the
reported perplexity, the quantized layers are int4-sized, and missing calibration data or a missing library is
one line (exit 2, nothing written).

The runs need llm-compressor, an optional install (its metadata caps transformers below lmforge's pin, so it
goes in without its dependencies): pip install 'lmforge[gptq]' && pip install --no-deps llmcompressor==0.14.0.1
Without it those tests skip with that command; the bad-input tests run everywhere."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT, subprocess_env
from test_bad_inputs import run_cli, tree_digest
from test_quantize_stage import (  # noqa: F401  (module fixtures: the tiny corpus and a tiny pretrained Llama)
    RECIPE,
    corpus,
    model_dir,
    rows_by_name,
    run_stage,
)

from lmforge.config import UserError
from lmforge.quant import methods

REASON = methods.available("gptq")
needs_llmcompressor = pytest.mark.skipif(REASON is not None, reason=str(REASON))
# group 32: the tiny Llama's widths are 64 and 128 (the default group of 128 does not divide 64)
GPTQ = ["quant.method=gptq", "quant.compare=[awq]", "quant.group_size=32", "quant.calibration_blocks=8",
        "measure.bf16_baseline=false"]


@pytest.fixture(scope="module")
def gptq_run(model_dir, corpus, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("gptq") / "run"
    report = run_stage(RECIPE, model_dir, corpus, out, *GPTQ)
    return out, report


@needs_llmcompressor
def test_gptq_and_awq_calibrate_save_compressed_and_shrink_the_layers(gptq_run):
    out, report = gptq_run
    rows = rows_by_name(json.loads((out / "report.json").read_text()))
    assert list(rows) == ["float32", "gptq", "awq"]
    fp32 = rows["float32"]
    for name, folder in [("gptq", out / "final"), ("awq", out / "compare" / "awq")]:
        r = rows[name]
        assert r["reloaded"] and r["folder"] == str(folder)
        assert math.isfinite(r["perplexity"]) and r["perplexity"] <= fp32["perplexity"] * 1.1, name
        assert r["top1_agreement"] >= 0.8, name
        # int4 packed 8 per int32 plus an fp32 scale per 32 weights: 0.16x the fp32 bytes of those layers
        assert r["layer_ratio"] is not None and r["layer_ratio"] <= 0.2, (name, r["layer_ratio"])
        assert r["file_bytes"] < fp32["file_bytes"] and "calibrated on 8 training blocks" in r["note"]
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
        weights = config["config_groups"]["group_0"]["weights"]
        assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, 32, "group")
        assert config["ignore"] == ["lm_head"]
        record = json.loads((folder / "quant.json").read_text())
        assert record["method"] == name and record["settings"]["group_size"] == 32
        assert (folder / "tokenizer.json").is_file() and (folder / "llmcompressor_recipe.yaml").is_file()
    assert not (out / ".fp32").exists()


RELOAD = textwrap.dedent("""
    import json, sys
    from transformers import AutoModelForCausalLM
    from lmforge.datasets.lm import build_lm_datasets
    from lmforge.models import load_tokenizer
    from lmforge.quant import measure
    from lmforge.recipe import load_recipe
    from lmforge.stages import quantize
    out = sys.argv[1]
    _, cfg = load_recipe(out + "/recipe.yaml")
    _, val = build_lm_datasets(cfg.data, load_tokenizer(cfg.model), cfg.seed)
    batches = quantize.measurement_batches(cfg, val)
    report = json.load(open(out + "/report.json"))
    print(json.dumps({r["name"]: measure.perplexity(AutoModelForCausalLM.from_pretrained(r["folder"]).eval(), batches)
                      for r in report["rows"] if r["folder"]}))
""")


@needs_llmcompressor
def test_plain_from_pretrained_in_a_fresh_process_reproduces_the_reported_perplexity(gptq_run):
    out, report = gptq_run
    r = subprocess.run([sys.executable, "-c", RELOAD, str(out)], capture_output=True, text=True, cwd=ROOT,
                       env=subprocess_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    expected = {row["name"]: row["perplexity"] for row in report["rows"] if row["folder"]}
    assert set(got) == set(expected) == {"gptq", "awq"}
    for name, ppl in expected.items():
        assert got[name] == pytest.approx(ppl, rel=1e-4), name


@needs_llmcompressor
def test_the_default_group_of_128_does_not_fit_the_tiny_model(model_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    rc, err = run_cli(capsys, "quantize", str(RECIPE), f"model.name_or_path={model_dir}", f"output_dir={out}",
                      "quant.method=gptq", "quant.compare=[]")
    assert rc == 2 and "quant.group_size: 128 does not divide the input width" in err and "use group_size" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written (no llm-compressor needed)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_without_calibration_data_is_one_line_and_writes_nothing(method, model_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    rc, err = run_cli(capsys, "quantize", str(RECIPE), f"model.name_or_path={model_dir}", f"output_dir={out}",
                      f"quant.method={method}", "quant.compare=[]", "quant.group_size=32", "quant.calibration_blocks=0")
    assert rc == 2, err
    line, = err.strip().splitlines()
    assert line.startswith("error: ") and line.endswith(
        f"quant.calibration_blocks: must be >= 1, got 0 ({method} calibrates on that many training blocks)"), err
    assert not out.exists()


def test_the_library_call_without_calibration_data_is_refused(model_dir):  # noqa: F811
    with pytest.raises(UserError) as e:
        methods.quantize("gptq", model_dir, methods.QuantSettings(group_size=32))
    assert e.value.problems == ["calibration: gptq calibrates on data; pass calibration=[token id batches] "
                                "(the quantize stage takes quant.calibration_blocks training blocks)"]
    with pytest.raises(UserError, match="does not read calibration data"):
        methods.quantize("bnb_nf4", model_dir, calibration=[torch.zeros(1, 8, dtype=torch.long)])


def test_a_missing_llmcompressor_is_one_line_naming_the_install(model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "llmcompressor", None)  # import of a None entry raises ImportError
    out = tmp_path / "out"
    before = tree_digest(model_dir)
    rc, err = run_cli(capsys, "quantize", str(RECIPE), f"model.name_or_path={model_dir}", f"output_dir={out}",
                      "quant.method=awq", "quant.compare=[gptq]", "quant.group_size=32")
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: quant: ") for line in lines), err  # one per method
    for line, name in zip(lines, ["awq", "gptq"]):
        assert f"{name} needs llmcompressor, which does not import here" in line
        assert "pip install 'lmforge[gptq]' && pip install --no-deps llmcompressor==0.14.0.1" in line
    assert not out.exists() and tree_digest(model_dir) == before

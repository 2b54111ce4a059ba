"""`lmforge inspect attention`: the maps are causal probability rows, the PNG is written and readable,
and bad arguments are one-line UserErrors."""

from __future__ import annotations

import pytest
import torch
from conftest import TOKENIZER
from PIL import Image

from lmforge.config import UserError
from lmforge.models import load_for_generation
from lmforge.tools import inspect

TEXT = "def add(a, b):\n    return a + b"
LAYERS, HEADS = 2, 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 2-layer, 4-head Llama of the fixture tokenizer's vocabulary, saved with the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                               num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=128,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("inspect") / "model"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)  # saved as sdpa: the tool must switch to eager
    tok.save_pretrained(path)
    return path


def test_maps_are_causal_probability_rows(model_dir):
    model, tok = load_for_generation(model_dir)
    tokens, maps = inspect.attention_maps(model, tok, TEXT)
    seq = len(tok(TEXT, add_special_tokens=False)["input_ids"])
    assert len(tokens) == seq > 5
    assert maps.shape == (LAYERS, HEADS, seq, seq)
    torch.testing.assert_close(maps.sum(-1), torch.ones(LAYERS, HEADS, seq))  # each query's row is a distribution
    assert torch.all(maps.triu(diagonal=1) == 0)  # no query sees a later key
    assert torch.all(maps[..., 0, 0] == 1)  # the first token can only attend to itself
    assert "\u2423return" in tokens or any("\\n" in t for t in tokens)  # spaces and newlines are visible in labels
    _, short = inspect.attention_maps(model, tok, TEXT, max_tokens=4)
    torch.testing.assert_close(short, maps[..., :4, :4])  # causal: a prefix's maps are the full run's corner


@pytest.mark.parametrize("flags, name, wide", [
    (["--layer", "1"], "attention_L1.png", True),  # 1 x 4 heads
    (["--layer", "0", "--head", "3"], "attention_L0_H3.png", False),  # one square map
    ([], "attention.png", True),  # 2 layers x 4 heads
])
def test_png_is_written(model_dir, tmp_path, monkeypatch, capsys, flags, name, wide):
    monkeypatch.chdir(tmp_path)
    assert inspect.cli(["attention", str(model_dir), "--text", TEXT, *flags]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == name  # the path written, last
    with Image.open(tmp_path / name) as img:
        img.verify()
        assert img.format == "PNG"
        width, height = img.size
    assert 300 < width < 4000 and 300 < height < 4000
    assert (width > 1.3 * height) == wide


def test_out_range_and_empty_text_are_user_errors(model_dir, tmp_path):
    out = str(tmp_path / "a.png")
    cases = {
        ("--layer", "2"): f"--layer: 2 is out of range; this model has {LAYERS} layers (0..{LAYERS - 1})",
        ("--layer", "-1"): f"--layer: -1 is out of range; this model has {LAYERS} layers (0..{LAYERS - 1})",
        ("--layer", "0", "--head", "4"): f"--head: 4 is out of range; this model has {HEADS} heads (0..{HEADS - 1})",
    }
    for flags, message in cases.items():
        with pytest.raises(UserError) as e:
            inspect.cli(["attention", str(model_dir), "--text", TEXT, "--out", out, *flags])
        assert e.value.problems == [message]
    with pytest.raises(UserError, match=r"^--text: is empty"):
        inspect.cli(["attention", str(model_dir), "--text", "  ", "--out", out])
    with pytest.raises(UserError, match=r"^MODEL_DIR: '.*nowhere' does not exist"):
        inspect.cli(["attention", str(tmp_path / "nowhere"), "--text", TEXT, "--out", out])
    with pytest.raises(UserError, match=r"^--out: '.*a.jpg' does not end in .png"):
        inspect.cli(["attention", str(model_dir), "--text", TEXT, "--out", str(tmp_path / "a.jpg")])
    assert not (tmp_path / "a.png").exists()


def test_existing_png_is_kept_without_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "plots" / "att.png"  # the folder is created
    argv = ["attention", str(model_dir), "--text", TEXT, "--layer", "0", "--head", "0", "--out", str(out)]
    assert inspect.cli(argv) == 0
    first = out.read_bytes()
    out.write_bytes(b"keep me")
    with pytest.raises(UserError) as e:
        inspect.cli(argv)
    assert e.value.problems == [f"--out: '{out}' exists; pass --overwrite to replace it, or choose another --out"]
    assert out.read_bytes() == b"keep me"
    assert inspect.cli(argv + ["--overwrite"]) == 0
    assert out.read_bytes()[:8] == first[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_of_a_deep_model_is_capped():
    assert inspect._pick(4, 8) == [0, 1, 2, 3]
    picked = inspect._pick(32, 8)
    assert len(picked) == 8 and picked[0] == 0 and picked[-1] == 31 and picked == sorted(set(picked))
    panels, cols, note = inspect.panels_for(None, None, n_layers=32, n_heads=32)  # 8 x 8 of 32 x 32, and says so
    assert len(panels) == 64 and cols == 8 and (0, 0) in panels and (31, 31) in panels
    assert note.startswith("showing layers 0, 4, 9") and "pass --layer L or --head H" in note
    panels, cols, note = inspect.panels_for(3, None, n_layers=32, n_heads=16)  # every head of one layer, 8 a row
    assert panels == [(3, h) for h in range(16)] and cols == 8 and note == ""
    panels, cols, note = inspect.panels_for(None, 5, n_layers=2, n_heads=16)  # one head in every layer
    assert panels == [(0, 5), (1, 5)] and cols == 2 and note == ""
    assert inspect.panels_for(1, 2, n_layers=2, n_heads=4) == ([(1, 2)], 1, "")

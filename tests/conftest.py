"""Shared test setup: no network, repo root as working directory, tiny runs of the real stages."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TOKENIZER = FIXTURES / "tokenizer"
CORPUS = FIXTURES / "corpus" / "stdlib_docs.jsonl"
BIN = Path(sys.executable).parent

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("LMFORGE_CACHE", str(ROOT / ".cache" / "lmforge"))
# train.mixed_precision defaults to auto, which picks bf16 on CPUs with AVX512-BF16: the suite pins it to fp32 so
# numeric comparisons hold on every CPU kind (tests/test_precision.py tests the probe and the resolution).
os.environ.setdefault("LMFORGE_AUTO_PRECISION", "no")


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch):
    """Recipes use paths relative to the repo root, as users run them."""
    monkeypatch.chdir(ROOT)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide singletons; reset them so in-process runs don't leak settings."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env

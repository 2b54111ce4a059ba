"""auto_mixed_precision: the cpuinfo flag filter, the cached CPU probe, and the CUDA rule.

The timing probe itself is replaced by a counting stand-in where the test is about the cache or
the decision (timings are not asserted in tests); only the machine-consistency test may run the
real probe, and only on a CPU that has a bf16 flag.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config import UserError
from lmforge.train import precision

X86_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n"
X86_AVX512 = "model name\t: Intel Xeon\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"
X86_BF16 = "model name\t: Intel Xeon Cooper Lake\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
X86_AMX = "model name\t: Intel Xeon Sapphire Rapids\nflags\t\t: fpu avx512f amx_tile amx_bf16 amx_int8\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16\nCPU part\t: 0xd40\n"


def test_flag_filter():
    assert not precision.cpu_has_fast_bf16(X86_AVX2)
    assert not precision.cpu_has_fast_bf16(X86_AVX512)  # AVX-512 alone emulates bf16
    assert precision.cpu_has_fast_bf16(X86_BF16)
    assert precision.cpu_has_fast_bf16(X86_AMX)
    assert precision.cpu_has_fast_bf16(ARM_BF16)
    assert not precision.cpu_has_fast_bf16("")  # no /proc/cpuinfo (macOS): no bf16 claim
    assert precision.cpu_model_name(X86_AVX2) == "AMD EPYC 7B13"


@pytest.fixture
def fake_probe(monkeypatch, tmp_path):
    """A bf16-capable CPU whose probe returns ``speedup`` and counts its calls; cache in tmp_path."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda cpuinfo=None: True)
    state = {"calls": 0, "speedup": 2.0}

    def measure(budget_s: float = 0.15):
        state["calls"] += 1
        return {"matmul_speedup": 3.0, "block_speedup": state["speedup"]}

    monkeypatch.setattr(precision, "measure_bf16_speedup", measure)
    return state


def test_probe_is_cached_and_reused(fake_probe, tmp_path):
    first = precision.auto_mixed_precision("cpu")
    second = precision.auto_mixed_precision(torch.device("cpu"))
    assert first[0] == second[0] == "bf16" and fake_probe["calls"] == 1
    assert "measured" in first[1] and "cached" in second[1]
    table = json.loads((tmp_path / "bf16_probe.json").read_text())
    assert list(table) == [precision.probe_key()]
    key = precision.probe_key()
    assert torch.__version__ in key and torch.backends.cpu.get_cpu_capability() in key
    assert f"threads={torch.get_num_threads()}" in key


def test_probe_reruns_for_another_thread_count_or_a_broken_cache(fake_probe, tmp_path):
    precision.auto_mixed_precision("cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        precision.auto_mixed_precision("cpu")
    finally:
        torch.set_num_threads(threads)
    assert fake_probe["calls"] == 2 and len(json.loads((tmp_path / "bf16_probe.json").read_text())) == 2
    (tmp_path / "bf16_probe.json").write_text("{not json")
    assert precision.auto_mixed_precision("cpu")[0] == "bf16" and fake_probe["calls"] == 3


def test_bf16_needs_a_clear_speedup(fake_probe):
    fake_probe["speedup"] = 1.1
    choice, reason = precision.auto_mixed_precision("cpu")
    assert choice == "no" and "1.10x" in reason


def test_no_flag_means_no_probe(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda cpuinfo=None: False)
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda *a: pytest.fail("probed without a bf16 flag"))
    assert precision.auto_mixed_precision("cpu")[0] == "no"
    assert not (tmp_path / "bf16_probe.json").exists()


def test_this_machine_is_consistent_with_its_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    if not precision.cpu_has_fast_bf16():
        monkeypatch.setattr(precision, "measure_bf16_speedup", lambda *a: pytest.fail("probed without a bf16 flag"))
        assert precision.auto_mixed_precision("cpu")[0] == "no"
        return
    choice, _ = precision.auto_mixed_precision("cpu")  # the real probe (about a second)
    probe = json.loads((tmp_path / "bf16_probe.json").read_text())[precision.probe_key()]
    fast = probe["block_speedup"] is not None and min(probe["matmul_speedup"], probe["block_speedup"]) >= precision.MIN_SPEEDUP
    assert choice == ("bf16" if fast else "no")


def test_cuda_rule(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.auto_mixed_precision("cuda")[0] == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.auto_mixed_precision("cuda:0")[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="cuda"):
        precision.auto_mixed_precision("cuda")


def test_train_mixed_precision_auto_uses_the_probe_answer(tmp_path):
    """`train.mixed_precision: auto` runs in the precision the probe picks for this machine (fp32 on an
    AVX2-only CPU, bf16 on one with AVX512-BF16/AMX where it measured faster) and records it."""

    from lmforge.config import load
    from lmforge.stages import pretrain
    from lmforge.train.precision import auto_mixed_precision

    cfg = load(pretrain.Config, "recipes/tiny/pretrain.yaml", [
        f"output_dir={tmp_path}", "train.max_steps=2", "train.mixed_precision=auto", "log.trackers=[]",
        "schedule.warmup_steps=0", "eval.eval_every=0", "checkpoint.save_every=0", "data.block_size=32"])
    pretrain.main(cfg)
    assert json.loads((tmp_path / "summary.json").read_text())["mixed_precision"] == auto_mixed_precision("cpu")[0]


def test_resolution_order(fake_probe, monkeypatch):
    """Explicit values win; auto takes a launch's bf16/fp16, else the probe; the pin overrides the probe."""
    monkeypatch.delenv(precision.PIN_ENV, raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert precision.resolve_mixed_precision("no", "cpu")[0] == "no"
    assert precision.resolve_mixed_precision("bf16", "cpu")[0] == "bf16"
    assert precision.resolve_mixed_precision(None, "cpu")[0] is None  # the accelerate config decides
    assert precision.resolve_mixed_precision("auto", "cpu")[0] == "bf16"  # the fake probe: 2x faster
    fake_probe["speedup"] = 1.0
    monkeypatch.setenv("LMFORGE_CACHE", str(precision.cache_path().parent / "other"))  # a fresh cache
    assert precision.resolve_mixed_precision("auto", "cpu")[0] == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    got, why = precision.resolve_mixed_precision("auto", "cpu")
    assert got == "fp16" and "accelerate config" in why
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # 'no' in the accelerate config: the probe decides
    assert precision.resolve_mixed_precision("auto", "cpu")[0] == "no"
    monkeypatch.setenv(precision.PIN_ENV, "bf16")
    assert precision.resolve_mixed_precision("auto", "cpu") == ("bf16", f"pinned by {precision.PIN_ENV}")
    monkeypatch.setenv(precision.PIN_ENV, "fp8")
    with pytest.raises(UserError, match="must be no, bf16 or fp16"):
        precision.resolve_mixed_precision("auto", "cpu")



def test_auto_is_the_default():
    from lmforge.train.settings import TrainConfig

    assert TrainConfig().mixed_precision == "auto"

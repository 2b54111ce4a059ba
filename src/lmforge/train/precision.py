"""Which mixed precision a run should use on this machine: :func:`auto_mixed_precision`.

- CUDA: bf16 where the GPU has it (Ampere and later), else fp16 (with loss scaling).
- CPU: bf16 autocast only pays where the CPU multiplies bf16 natively (AVX512-BF16, AMX, Arm
  BF16): there a bf16 matmul runs ~2-4x faster than fp32; elsewhere (AVX2) bf16 is emulated and
  *slower* than fp32, and only costs accuracy. So: no bf16 flag in /proc/cpuinfo -> 'no' at once;
  a flag -> a short timing probe (a matmul, and a Linear+GELU+Linear forward+backward under bf16
  autocast, against fp32) decides, and bf16 is chosen only when both are at least
  ``MIN_SPEEDUP`` faster. The probe takes about a second (less where bf16 loses at once) and is cached in
  ``$LMFORGE_CACHE/bf16_probe.json`` (default ``~/.cache/lmforge``) per torch version, CPU
  capability, CPU model and thread count, so it runs once per machine.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmforge.config import UserError

MIN_SPEEDUP = 1.3  # bf16 must beat fp32 by this factor to be worth its rounding
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 flags; "bf16" is Arm's Features entry


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo (x86 'flags', Arm 'Features')."""
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU has native bf16 arithmetic (avx512_bf16, amx_bf16, or Arm bf16).

    A fast first filter: without one of these flags bf16 is emulated and never faster."""
    return not cpu_flags(cpuinfo).isdisjoint(_BF16_FLAGS)


def cpu_model_name(cpuinfo: str | None = None) -> str:
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "CPU part"):
            return value.strip()
    import platform

    return platform.processor() or platform.machine()


def probe_key() -> str:
    """What the probe's answer depends on: torch build, CPU capability and model, threads."""
    capability = torch.backends.cpu.get_cpu_capability()
    return f"torch={torch.__version__}|cap={capability}|cpu={cpu_model_name()}|threads={torch.get_num_threads()}"


def cache_path() -> Path:
    root = os.environ.get("LMFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lmforge"
    )
    return Path(root) / "bf16_probe.json"


# ---------------------------------------------------------------------------------------------
# The timing probe


def _best_seconds(fn: Callable[[], object], budget_s: float) -> float:
    """Fastest of repeated calls (after one warm-up) within about ``budget_s``; at least one."""
    fn()  # warm-up: oneDNN primitive creation, autocast's weight-cast cache
    best, start, reps = float("inf"), time.perf_counter(), 0
    while reps < 1 or (time.perf_counter() - start < budget_s and reps < 50):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        reps += 1
    return best


def measure_bf16_speedup(budget_s: float = 0.15) -> dict[str, float | None]:
    """fp32 time / bf16 time of (a) a 512³ matmul and (b) forward+backward of a
    Linear(256, 1024)-GELU-Linear(1024, 256) block on 256 rows under bf16 autocast.

    About 1 s where bf16 is native; (b) is skipped (None) when (a) already shows no gain."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=g), torch.randn(512, 512, generator=g)
    a16, b16 = a.bfloat16(), b.bfloat16()
    out: dict[str, float | None] = {
        "matmul_fp32_s": _best_seconds(lambda: a @ b, budget_s),
        "matmul_bf16_s": _best_seconds(lambda: a16 @ b16, budget_s),
    }
    out["matmul_speedup"] = out["matmul_fp32_s"] / out["matmul_bf16_s"]
    out["block_speedup"] = None
    if out["matmul_speedup"] < MIN_SPEEDUP:
        return out
    block = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    x = torch.randn(256, 256, generator=g)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            block(x).float().square().mean().backward()

    out["block_fp32_s"] = _best_seconds(lambda: step(False), budget_s)
    out["block_bf16_s"] = _best_seconds(lambda: step(True), budget_s)
    out["block_speedup"] = out["block_fp32_s"] / out["block_bf16_s"]
    return out


def cached_bf16_probe() -> tuple[dict[str, float | None], bool]:
    """(:func:`measure_bf16_speedup`'s result for this machine, whether it came from the cache)."""
    path, key = cache_path(), probe_key()
    try:
        table = json.loads(path.read_text())
        if isinstance(table.get(key), dict):
            return table[key], True
    except (OSError, ValueError, AttributeError):
        table = {}
    table[key] = measure_bf16_speedup()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # atomic: parallel runs never read half a file
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs a re-probe next time
    return table[key], False


# ---------------------------------------------------------------------------------------------
# The decision


def auto_mixed_precision(device: str | torch.device) -> tuple[str, str]:
    """``('bf16' | 'fp16' | 'no', reason)`` — accelerate's ``mixed_precision`` for ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device cuda was asked for, but torch.cuda.is_available() is False")
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return "bf16", f"cuda: {name} supports bf16"
        return "fp16", f"cuda: {name} has no bf16; fp16 with loss scaling"
    if device.type != "cpu":
        return "no", f"{device.type}: no automatic mixed-precision policy; fp32"
    if not cpu_has_fast_bf16():
        return "no", "cpu: no avx512_bf16/amx_bf16 flag, so bf16 is emulated and slower than fp32"
    probe, cached = cached_bf16_probe()
    matmul, block = probe["matmul_speedup"], probe.get("block_speedup")
    how = f"bf16 matmul {matmul:.2f}x" + (f", bf16-autocast block {block:.2f}x" if block is not None else "")
    how += f" fp32's speed ({'cached' if cached else 'measured'} in {cache_path()})"
    if block is not None and min(matmul, block) >= MIN_SPEEDUP:
        return "bf16", f"cpu: {how}"
    return "no", f"cpu: {how}; below the {MIN_SPEEDUP}x needed for bf16"


# Pins what ``auto`` resolves to, whatever the device: the test suite sets it to 'no' so that numeric
# comparisons hold on every CPU kind (tests/test_precision.py exercises the probe itself).
PIN_ENV = "LMFORGE_AUTO_PRECISION"


def resolve_mixed_precision(requested: str | None, device: str | torch.device) -> tuple[str | None, str]:
    """``train.mixed_precision`` -> (accelerate's ``mixed_precision`` or None, reason).

    Explicit ``no``/``bf16``/``fp16`` win; None leaves it to the accelerate config. ``auto``: the launch's
    accelerate config when it names bf16 or fp16 (``accelerate launch`` exports it as
    ``ACCELERATE_MIXED_PRECISION``: the user chose it for that hardware), else :func:`auto_mixed_precision`."""
    if requested != "auto":
        return requested, "set in the recipe" if requested else "left to the accelerate config"
    pinned = os.environ.get(PIN_ENV)
    if pinned:
        if pinned not in ("no", "bf16", "fp16"):
            raise UserError(f"{PIN_ENV}={pinned}: must be no, bf16 or fp16 (or unset to let the probe decide)")
        return pinned, f"pinned by {PIN_ENV}"
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched in ("bf16", "fp16"):
        return launched, f"the accelerate config asks for {launched}"
    return auto_mixed_precision(device)

"""Model FLOPs per token and the device's peak FLOP/s, for MFU (model FLOPs utilisation).

FLOPs per token (PaLM appendix B): ``6·N + 12·L·d·T`` where N is the non-embedding parameter
count, L the layers, d the hidden size and T the sequence length — 6N for the matmuls of forward +
backward, 12·L·d·T for attention scores and the weighted sum. MFU = achieved model FLOP/s over
peak. The peak is measured once per device/dtype by a short matmul probe and cached, because few
CPUs have a published number; set ``train.peak_flops`` to use a data-sheet figure instead.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def flops_per_token(non_embedding_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    return 6.0 * non_embedding_params + 12.0 * n_layers * hidden * seq_len


def model_dims(hf_config) -> tuple[int, int]:
    layers = getattr(hf_config, "num_hidden_layers", None) or getattr(hf_config, "n_layer", None) or 0
    hidden = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd", None) or 0
    return int(layers), int(hidden)


def cache_dir() -> Path:
    root = os.environ.get("LMFORGE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lmforge")
    return Path(root)


def _device_key(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        import platform

        name = f"{platform.processor() or platform.machine()}-{torch.get_num_threads()}threads"
    return f"{device.type}:{name}:{dtype}".replace(" ", "_")


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.5) -> float:
    """Best FLOP/s of repeated n×n matmuls over about ``seconds`` (a lower bound of the true peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm-up
        a @ b
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Cached per device and dtype in ``~/.cache/lmforge/peak_flops.json``."""
    path = cache_dir() / "peak_flops.json"
    key = _device_key(device, dtype)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        table[key] = measure_peak_flops(device, dtype)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table, indent=1))
            tmp.replace(path)
        except OSError:
            pass
    return float(table[key])

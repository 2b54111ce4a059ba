"""The before/after report of ``lmforge quantize``: one row per model (the fp32 and bf16 originals, each
result), written as ``report.json``, ``report.md`` and ``report.png``, and printed as a table."""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path
from typing import Any

import torch


@dataclasses.dataclass
class Row:
    name: str  # float32, bfloat16, or the method (prune:wanda, qat:int4_weight_only, ...)
    kind: str  # baseline | ptq | prune | qat
    folder: str | None  # where it was saved (None for the baselines)
    file_bytes: int  # weights on disk (baselines: the safetensors bytes of their parameters)
    param_bytes: int  # every tensor of the state dict, each storage once
    quantized_bytes: int  # the quantized (or pruned) layers alone
    quantized_fp32_bytes: int  # the same layers in the fp32 original
    other_bytes: int  # embeddings, norms, layers kept in full precision
    latency_ms: float  # median forward time of one (batch, seq) batch
    fp32_latency_ms: float  # the fp32 original timed right after it (ratios use this pair: CPU load drifts)
    generate_tokens_per_s: float
    perplexity: float
    top1_agreement: float  # with the fp32 original's most likely next token
    sparsity: float | None = None  # pruning: fraction of zero weights in the pruned layers
    reloaded: bool = False  # measured on the folder reloaded from disk (what a user loads), not the in-memory model
    note: str = ""

    @property
    def layer_ratio(self) -> float | None:
        return self.quantized_bytes / self.quantized_fp32_bytes if self.quantized_fp32_bytes else None


def machine() -> dict[str, Any]:
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


def table(rows: list[Row]) -> str:
    """Markdown table; ratios against the float32 row."""
    base = next((r for r in rows if r.name == "float32"), rows[0])
    head = ("| model | file MB | params MB | quantized layers MB (x fp32) | latency ms (x fp32) | generate tok/s "
            "| perplexity (Δ%) | top-1 agreement | sparsity |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ratio = f"{_mb(r.quantized_bytes)} ({r.layer_ratio:.2f}x)" if r.layer_ratio is not None else "-"
        dppl = 100 * (r.perplexity / base.perplexity - 1)
        lines.append(
            f"| {r.name} | {_mb(r.file_bytes)} | {_mb(r.param_bytes)} | {ratio} "
            f"| {r.latency_ms:.2f} ({r.latency_ms / r.fp32_latency_ms:.2f}x) | {r.generate_tokens_per_s:.1f} "
            f"| {r.perplexity:.3f} ({dppl:+.2f}%) | {r.top1_agreement:.4f} "
            f"| {'-' if r.sparsity is None else f'{r.sparsity:.3f}'} |")
    return "\n".join(lines)


NOTES = """\
- *file MB*: the weight files of the saved folder (baselines: the bytes their safetensors would hold).
- *quantized layers MB*: the layers a method changed, packed weights with their scales and zero points;
  embeddings and the layers kept in full precision (`quant.skip_modules`) are in *params MB* only.
- *latency*: median of `measure.repeats` forward passes of one `measure.batch_size x seq_len` batch after
  `measure.warmup`, on `measure.threads` threads; the ratio is against the float32 model timed right after
  it (`fp32_latency_ms` in report.json), so a change of load on the machine does not skew it. *generate tok/s*: greedy decoding, `measure.generate_tokens`
  new tokens per sequence.
- *perplexity*, *top-1 agreement*: on the recipe's validation blocks; agreement is with the float32 model's
  most likely next token. Every result is measured after reloading its folder from disk.
- Unstructured pruning (magnitude, Wanda) zeroes weights but stores and multiplies them densely: it saves no
  file bytes and no time on a CPU. 2:4 needs sparse tensor cores (CUDA) to run faster.
- On a CPU without AVX512-BF16 (or AMX), bfloat16 matmuls are emulated and much slower than float32; the
  bfloat16 row shows what this machine does, not what bf16 costs elsewhere.
"""


def write(out: Path, rows: list[Row], settings: dict[str, Any]) -> dict[str, Any]:
    report = {"machine": machine(), "settings": settings,
              "rows": [{**dataclasses.asdict(r), "layer_ratio": r.layer_ratio} for r in rows]}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    md = [f"# Quantization report: {settings.get('model')}", "",
          f"Machine: CPU capability {m['cpu_capability']}, {m['processor']}, torch {m['torch']}"
          + (f", GPU {m['cuda']}" if m["cuda"] else "") + f"; {settings.get('threads')} threads.", "",
          table(rows), "", NOTES]
    notes = [f"- {r.name}: {r.note}" for r in rows if r.note]
    if notes:
        md += ["Per result:", *notes, ""]
    (out / "report.md").write_text("\n".join(md))
    plot(rows, out / "report.png")
    return report


def plot(rows: list[Row], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in rows]
    colors = ["tab:gray" if r.kind == "baseline" else "tab:blue" if r.kind == "ptq" else "tab:orange"
              if r.kind == "qat" else "tab:green" for r in rows]
    panels = [("weights on disk (MB)", [r.file_bytes / 2**20 for r in rows]),
              ("forward latency (ms)", [r.latency_ms for r in rows]),
              ("validation perplexity", [r.perplexity for r in rows])]
    fig, axes = plt.subplots(1, 3, figsize=(min(18, max(12, 0.55 * len(rows) * 3)), 5))
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.bar(range(len(rows)), values, color=colors)
        ax.set_xticks(range(len(rows)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    base = next((r for r in rows if r.name == "float32"), None)
    if base is not None:
        axes[2].axhline(base.perplexity, color="black", lw=0.8, ls="--")
        low = min(r.perplexity for r in rows)
        axes[2].set_ylim(bottom=max(0.0, low * 0.95))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

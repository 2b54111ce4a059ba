"""What quantization and pruning bought and cost: bytes, time, perplexity, agreement with the original.

Batches for :func:`perplexity` and :func:`top1_agreement` are ``(input_ids, labels)`` pairs, dicts
with ``input_ids`` (and optionally ``labels``), or bare ``input_ids`` tensors (labels = input_ids);
labels of -100 are ignored, and position t is scored against label t+1 (the causal shift the HF
models apply inside their own loss).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# Size


@dataclasses.dataclass
class ParamBytes:
    """Real storage bytes of a model's state dict, quantized layers apart from the rest."""

    total: int
    quantized: int  # the quantized layers: packed weights with their scales and zero points
    other: int  # embeddings, norms, and every layer left in full precision (lm_head by default)
    layers: dict[str, int]  # bytes per module, for the tensors it holds itself (not its children's)
    quantized_layers: list[str]


def parameter_bytes(model: nn.Module) -> ParamBytes:
    """Bytes of every tensor the model would save, each storage counted once.

    Quantized weights are tensor subclasses (torchao, quanto) whose ``numel() * element_size()``
    reports the full-precision size; they are opened with ``__tensor_flatten__`` down to the plain
    tensors they hold (packed int4 bytes, int8 data, scales, zero points) and those are measured by
    their storage. bitsandbytes keeps plain uint8/int8 tensors and puts its scales into the state dict.
    """
    modules = dict(model.named_modules())
    seen: set[tuple[int, str]] = set()
    layers: dict[str, int] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        owner = _owner(key, modules)
        layers[owner] = layers.get(owner, 0) + _storage_bytes(value, seen)
    quantized_layers = [name for name in layers if is_quantized(modules[name])]
    quantized = sum(layers[name] for name in quantized_layers)
    total = sum(layers.values())
    return ParamBytes(total=total, quantized=quantized, other=total - quantized, layers=layers,
                      quantized_layers=quantized_layers)


def is_quantized(module: nn.Module) -> bool:
    """A layer whose weight is a quantized tensor subclass or an integer tensor."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    return _is_wrapper(weight) or not weight.dtype.is_floating_point


def dir_size(path: str | Path) -> int:
    """Bytes of the files under ``path`` (or of the file itself); links are not followed."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _is_wrapper(t: torch.Tensor) -> bool:
    return hasattr(type(t), "__tensor_flatten__")


def _storage_bytes(value: Any, seen: set[tuple[int, str]]) -> int:
    if isinstance(value, (tuple, list)):
        return sum(_storage_bytes(v, seen) for v in value)
    if not isinstance(value, torch.Tensor) or value.device.type == "meta":
        return 0
    if _is_wrapper(value):
        inner, _ = value.__tensor_flatten__()
        return sum(_storage_bytes(getattr(value, name), seen) for name in inner)
    storage = value.untyped_storage()
    key = (storage.data_ptr(), str(value.device))
    if key in seen:  # tied weights, views
        return 0
    seen.add(key)
    return storage.nbytes()


def _owner(key: str, modules: Mapping[str, nn.Module]) -> str:
    """The module a state-dict key belongs to: the longest module name that prefixes it."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in modules:
            return prefix
    return ""


# --------------------------------------------------------------------------------------------
# Speed (CPU numbers depend on the thread count, so it is fixed for the measurement)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def forward_latency(model: nn.Module, input_ids: torch.Tensor, warmup: int = 3, repeats: int = 10,
                    threads: int = 1) -> float:
    """Median wall time of one forward pass over ``input_ids`` (batch, seq), in milliseconds."""
    input_ids = input_ids.to(_device(model))
    with _threads(threads):
        for _ in range(warmup):
            model(input_ids)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def generation_tokens_per_s(model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 32,
                            threads: int = 1, warmup: int = 1) -> float:
    """Greedy-decoded new tokens per second over the batch (exactly ``new_tokens`` per sequence)."""
    input_ids = input_ids.to(_device(model))
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if pad is not None else (getattr(model.config, "eos_token_id", None) or 0)
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad,
              attention_mask=torch.ones_like(input_ids))
    with _threads(threads):
        for _ in range(warmup):
            model.generate(input_ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
        start = time.perf_counter()
        out = model.generate(input_ids, **kw)
        seconds = time.perf_counter() - start
    return (out.shape[1] - input_ids.shape[1]) * input_ids.shape[0] / seconds


# --------------------------------------------------------------------------------------------
# Quality


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[Any]) -> float:
    """exp(mean next-token NLL), the mean taken over all scored tokens of all batches."""
    nll, tokens = 0.0, 0
    for batch in batches:
        logits, targets = _logits_and_targets(model, batch)
        nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum").item()
        tokens += int((targets != -100).sum())
    if tokens == 0:
        raise ValueError("perplexity: the batches hold no scored token (all labels are -100)")
    return math.exp(nll / tokens)


@torch.no_grad()
def top1_agreement(model_a: nn.Module, model_b: nn.Module, batches: Iterable[Any]) -> float:
    """Fraction of scored positions where both models' most likely next token is the same."""
    same, total = 0, 0
    for batch in batches:
        logits_a, targets = _logits_and_targets(model_a, batch)
        logits_b, _ = _logits_and_targets(model_b, batch)
        scored = targets != -100
        same += int(((logits_a.argmax(-1) == logits_b.argmax(-1)) & scored).sum())
        total += int(scored.sum())
    return same / total


@torch.no_grad()
def next_token_predictions(model: nn.Module, batches: Iterable[Any]) -> list[torch.Tensor]:
    """Per batch, the model's most likely next token at each scored position (-1 where unscored)."""
    out = []
    for batch in batches:
        logits, targets = _logits_and_targets(model, batch)
        out.append(logits.argmax(-1).masked_fill(targets == -100, -1).cpu())
    return out


def agreement(preds_a: list[torch.Tensor], preds_b: list[torch.Tensor]) -> float:
    """Fraction of scored positions where two :func:`next_token_predictions` agree."""
    same = sum(int(((a == b) & (a != -1)).sum()) for a, b in zip(preds_a, preds_b, strict=True))
    total = sum(int((a != -1).sum()) for a in preds_a)
    return same / total


def _logits_and_targets(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, seq-1, vocab) float logits and the (batch, seq-1) labels they predict."""
    mask = None
    if isinstance(batch, Mapping):
        input_ids, labels, mask = batch["input_ids"], batch.get("labels"), batch.get("attention_mask")
    elif isinstance(batch, torch.Tensor):
        input_ids, labels = batch, None
    else:
        input_ids, labels = batch
    labels = input_ids if labels is None else labels
    device = _device(model)
    kwargs = {} if mask is None else {"attention_mask": mask.to(device)}
    logits = model(input_ids.to(device), **kwargs).logits
    return logits[:, :-1].float(), labels[:, 1:].to(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device

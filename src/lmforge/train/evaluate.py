"""Sharded evaluation for every task: token-weighted loss, perplexity and accuracy over a whole
validation set on all ranks, plus the task's own metrics from gathered predictions."""

from __future__ import annotations

import math

import torch

from lmforge.datasets.batching import rows_of
from lmforge.train.accel import set_train_mode


@torch.no_grad()
def evaluate(acc, model, dataset, task, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
    """{'loss', 'perplexity', 'accuracy', 'tokens'} (+ the task's metrics, e.g. macro-F1).

    Each rank takes a strided shard; shards are padded to equal length with uncounted rows so that
    every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively). The loss
    is the sum of token losses over the sum of tokens of the whole set, not a mean of batch means."""
    from accelerate.utils import gather_object

    was_training = model.training
    set_train_mode(model, False)
    n, world, rank = len(dataset), acc.num_processes, acc.process_index
    n_batches = math.ceil(math.ceil(n / world) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    sums = torch.zeros(3, dtype=torch.float64, device=acc.device)  # loss, tokens, correct
    pairs: list[tuple[int, int]] = []
    for b in range(n_batches):
        slots = [rank + world * (b * batch_size + i) for i in range(batch_size)]
        idx = [s for s in slots if s < n] or [0]
        counted = any(s < n for s in slots)
        batch = {k: v.to(acc.device) for k, v in task.eval_collate(rows_of(dataset, idx)).items()}
        out = task.loss(model, batch)
        if counted:
            sums += torch.stack([out["loss_sum"].double(), out["n_tokens"].double(),
                                 out.get("n_correct", torch.zeros(())).double().to(acc.device)])
            if "predictions" in out:
                pairs += list(zip(out["predictions"].tolist(), batch["labels"].tolist()))
    sums = acc.reduce(sums, reduction="sum")
    if was_training:
        set_train_mode(model, True)
    loss_sum, tokens, correct = sums.tolist()
    loss = loss_sum / max(tokens, 1.0)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / max(tokens, 1.0), "tokens": tokens}
    if "predictions" in out:
        result.update(task.metrics(gather_object(pairs) if world > 1 else pairs))
    return result

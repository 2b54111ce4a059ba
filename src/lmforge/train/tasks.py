"""The Task seam: what one training objective tells the shared loop.

A stage builds a task and hands it to ``loop.run(acc, cfg, model, task, train, eval)``; the loop stays
fixed (torchtune's recipes vary their loss step the same way). A task says how rows become a batch
(``collate``), the *summed* loss of a batch and its token count (``loss``, ``count_tokens``; the loop
divides by the tokens of the whole accumulated global batch), how many real input tokens a batch
holds (throughput and padding efficiency), how long its rows are (FLOPs per token), and, for
evaluation, what extra metrics the gathered predictions give (classification: accuracy, macro-F1).

    CausalLM        next-token prediction on packed blocks (pretrain; label smoothing in training)
    MaskedLM        BERT-style masked positions only (pretrain with train.objective: mlm)
    SFT             next-token prediction on completion tokens of padded or packed records (finetune)
    Classification  cross-entropy over classes; "tokens" are examples (finetune task: classification)

Distillation adds its KD task here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Batch = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# The one next-token loss


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) labels aligned with the inputs -> the token each position predicts, -100 at the end."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                    accuracy: bool = False) -> dict[str, torch.Tensor]:
    """Summed next-token cross-entropy: {'loss_sum', 'n_tokens'[, 'n_correct']}; labels -100 ignored.

    logits (batch, seq, vocab), labels (batch, seq) aligned with the inputs. The labels are shifted
    left and padded with -100 instead of slicing the logits, so the logits are never copied. With
    smoothing ε each counted position adds (1-ε)·(-log p_y) + ε·mean_k(-log p_k)."""
    target = next_token_targets(labels)  # (batch, seq): the next token, -100 at the end
    flat = logits.reshape(-1, logits.size(-1))
    loss_sum = F.cross_entropy(flat.float(), target.reshape(-1), ignore_index=-100, reduction="sum",
                               label_smoothing=label_smoothing)
    mask = target != -100
    out = {"loss_sum": loss_sum, "n_tokens": mask.sum()}
    if accuracy:
        with torch.no_grad():
            out["n_correct"] = ((logits.argmax(-1) == target) & mask).sum()
    return out


def token_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
               accuracy: bool = False) -> dict[str, torch.Tensor]:
    """Summed cross-entropy at the positions themselves (no shift): masked-LM labels."""
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100,
                               reduction="sum", label_smoothing=label_smoothing)
    mask = labels != -100
    out = {"loss_sum": loss_sum, "n_tokens": mask.sum()}
    if accuracy:
        with torch.no_grad():
            out["n_correct"] = ((logits.argmax(-1) == labels) & mask).sum()
    return out


def collate_blocks(examples: list[dict]) -> Batch:
    """Packed blocks of equal length -> input_ids and labels (a copy: the model shifts nothing)."""
    ids = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])  # (batch, block_size)
    return {"input_ids": ids, "labels": ids.clone()}


def _model_inputs(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k != "labels"}


class FusedHead:
    """``train.loss_impl: fused_linear_ce``: the summed next-token loss of the model's own LM head
    without its (tokens x vocab) logits (:mod:`lmforge.train.fused_ce`).

    The model still runs through whatever wraps it (DDP's gradient sync, DeepSpeed's engine,
    torch.compile), asked for the logits of the last position only (``logits_to_keep=1``, a
    (batch, 1, vocab) sliver); a forward hook on its body keeps the final hidden states, and the fused
    loss takes them with the head's weight. Only in training: evaluation uses the logits path."""

    def __init__(self, chunk_tokens: int | None = None):
        self.chunk_tokens = chunk_tokens
        self.body: torch.nn.Module | None = None
        self.head: torch.nn.Linear | None = None
        self._armed = False
        self._hidden: torch.Tensor | None = None

    def bind(self, model: torch.nn.Module) -> None:
        """Find the body and head of the unwrapped model (plain or PeftModel) and hook the body once."""
        import inspect

        from lmforge.config import UserError
        from lmforge.train.fused_ce import _unwrap_peft, body_and_head

        body, head = body_and_head(model)
        lm = _unwrap_peft(model)
        if "logits_to_keep" not in inspect.signature(lm.forward).parameters:
            raise UserError(f"train.loss_impl: {type(lm).__name__}.forward takes no logits_to_keep, so the fused loss "
                            "would still compute every logit; use train.loss_impl: logits for this model")
        if body is not self.body:
            body.register_forward_hook(self._keep_hidden)
        self.body, self.head = body, head

    def _keep_hidden(self, module, args, output) -> None:
        if self._armed:
            self._hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def forward(self, model: torch.nn.Module, inputs: Batch, **kw: Any) -> tuple[torch.Tensor, Any]:
        """(final hidden states (batch, seq, H), the model's output) of ``model(**inputs, logits_to_keep=1)``."""
        if self.head is None:
            raise RuntimeError("FusedHead.forward before bind(model)")
        self._armed = True
        try:
            out = model(**inputs, logits_to_keep=1, **kw)
        finally:
            self._armed = False
        hidden, self._hidden = self._hidden, None
        return hidden, out

    def loss(self, model: torch.nn.Module, inputs: Batch, target: torch.Tensor,
             label_smoothing: float) -> dict[str, torch.Tensor]:
        """{'loss_sum', 'n_tokens'} for ``target`` (batch, seq) aligned with the hidden states (-100 ignored)."""
        from lmforge.train.fused_ce import fused_linear_ce

        hidden, _ = self.forward(model, inputs)
        loss_sum, n_tokens = fused_linear_ce(hidden, self.head.weight, target, self.head.bias,
                                             label_smoothing=label_smoothing, chunk_size=self.chunk_tokens)
        return {"loss_sum": loss_sum, "n_tokens": n_tokens}


def fused_head(train_cfg) -> FusedHead | None:
    """The recipe's ``train.loss_impl`` as a task's ``fused`` attribute (None: the logits loss)."""
    return FusedHead(train_cfg.loss_chunk_tokens) if train_cfg.loss_impl == "fused_linear_ce" else None


# ---------------------------------------------------------------------------------------------
# Tasks


class Task:
    """Base: causal-LM defaults. Subclasses override what differs."""

    name = "causal_lm"

    def __init__(self, seq_len: int = 0, collate: Callable[[list[dict]], Batch] = collate_blocks,
                 eval_collate: Callable[[list[dict]], Batch] | None = None, fused: FusedHead | None = None):
        self.seq_len = seq_len  # tokens per row, for FLOPs per token (0: unknown)
        self.collate = collate
        self.eval_collate = eval_collate or collate
        self.fused = fused  # train.loss_impl: fused_linear_ce (tasks that support it read it in loss())

    def bind(self, model: torch.nn.Module) -> None:
        """Called by the loop with the unwrapped model once it is prepared, before the first step."""
        if self.fused is not None:
            self.fused.bind(model)

    def loss(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def count_tokens(self, batch: Batch) -> torch.Tensor:
        """Loss tokens of a batch (what the loss is normalised by)."""
        return (batch["labels"][:, 1:] != -100).sum()

    def input_tokens(self, batch: Batch) -> torch.Tensor:
        """Real (non-pad) input tokens of a batch, for tokens/s, MFU and padding efficiency."""
        if "attention_mask" in batch:
            return batch["attention_mask"].sum()
        return torch.tensor(batch["input_ids"].numel())

    def metrics(self, pairs: list[tuple[int, int]]) -> dict[str, float]:
        """Extra evaluation metrics from gathered (prediction, label) pairs (none by default)."""
        return {}


class CausalLM(Task):
    name = "causal_lm"
    token_loss_fn = staticmethod(next_token_loss)  # labels shifted by one

    def __init__(self, seq_len: int = 0, label_smoothing: float = 0.0, **kw: Any):
        super().__init__(seq_len, **kw)
        self.label_smoothing = label_smoothing

    def loss(self, model, batch):
        if self.fused is not None and model.training:
            return self.fused.loss(model, _model_inputs(batch), next_token_targets(batch["labels"]), self.label_smoothing)
        logits = model(**_model_inputs(batch)).logits  # (batch, seq, vocab)
        # accuracy (an argmax over the vocabulary) only in eval, where it is reported; smoothing only in training
        return self.token_loss_fn(logits, batch["labels"], self.label_smoothing if model.training else 0.0,
                                  accuracy=not model.training)


class MaskedLM(CausalLM):
    """The same, at the masked positions themselves (no shift)."""

    name = "masked_lm"
    token_loss_fn = staticmethod(token_loss)

    def count_tokens(self, batch):
        return (batch["labels"] != -100).sum()


class SFT(Task):
    """Completion-only next-token loss on padded (attention_mask) or packed (position_ids) rows."""

    name = "sft"

    def __init__(self, pad_token_id: int, seq_len: int = 0, **kw: Any):
        super().__init__(seq_len, **kw)
        self.pad_token_id = pad_token_id

    def loss(self, model, batch):
        inputs = _model_inputs(batch)
        if "position_ids" in inputs:
            # packed rows: transformers builds the block-diagonal mask from position_ids only when no cache
            # exists, and decoder models create one (even in training) unless told not to
            inputs["use_cache"] = False
        if self.fused is not None and model.training:
            return self.fused.loss(model, inputs, next_token_targets(batch["labels"]), 0.0)
        logits = model(**inputs).logits  # (batch, virtual + seq, vocab)
        labels = batch["labels"]
        if logits.size(1) > labels.size(1):  # prompt tuning prepends its virtual tokens' outputs
            logits = logits[:, -labels.size(1):]
        return next_token_loss(logits, labels, accuracy=not model.training)

    def input_tokens(self, batch):
        if "attention_mask" in batch:
            return batch["attention_mask"].sum()
        # packed rows have no attention_mask: their tail is pad tokens with label -100 (a labelled EOS counts)
        return ((batch["input_ids"] != self.pad_token_id) | (batch["labels"] != -100)).sum()


class Classification(Task):
    """Cross-entropy over classes, summed over examples ('tokens' are examples); accuracy and macro-F1."""

    name = "classification"

    def __init__(self, n_classes: int, seq_len: int = 0, **kw: Any):
        super().__init__(seq_len, **kw)
        self.n_classes = n_classes

    def loss(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()  # (batch, classes)
        labels = batch["labels"]
        out = {"loss_sum": F.cross_entropy(logits, labels, reduction="sum"),
               "n_tokens": torch.tensor(labels.numel(), device=labels.device)}
        with torch.no_grad():
            pred = logits.argmax(-1)
            out["n_correct"] = (pred == labels).sum()
            if not model.training:
                out["predictions"] = pred  # gathered by evaluate() for macro-F1
        return out

    def count_tokens(self, batch):
        return torch.tensor(batch["labels"].numel())

    def metrics(self, pairs):
        return classification_scores(pairs, self.n_classes)


def classification_scores(pairs: list[tuple[int, int]], n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (mean over classes of 2PR/(P+R); a class never predicted nor present scores 0)."""
    tp, fp, fn = [0] * n_classes, [0] * n_classes, [0] * n_classes
    for pred, gold in pairs:
        if pred == gold:
            tp[gold] += 1
        else:
            fp[pred] += 1
            fn[gold] += 1
    f1 = [2 * tp[c] / max(2 * tp[c] + fp[c] + fn[c], 1) for c in range(n_classes)]
    return {"accuracy": sum(tp) / max(len(pairs), 1), "macro_f1": sum(f1) / n_classes, "examples": len(pairs)}


# ---------------------------------------------------------------------------------------------
# The pretraining objective a recipe asks for


def pretrain_task(cfg, tokenizer, train_data, rank: int = 0, world: int = 1) -> tuple[Task, Any]:
    """(task, batch source or None) for ``train.objective``, ``train.label_smoothing`` (training mode
    only: validation reports plain cross-entropy, so perplexities stay comparable) and
    ``train.curriculum``. None: the loop's default :class:`RankBatches` over packed blocks."""
    from lmforge.datasets.batching import RankBatches
    from lmforge.datasets.mlm import MLMMasker
    from lmforge.train.regularize import CurriculumBatches

    tc, block = cfg.train, cfg.data.block_size
    batches = None
    if tc.objective == "mlm":
        masker = MLMMasker(tokenizer, tc.mlm_probability, cfg.seed)
        task: Task = MaskedLM(block, tc.label_smoothing, eval_collate=masker.collate_eval)
        base = RankBatches(train_data, tc.per_device_train_batch_size, collate_blocks, cfg.seed, rank, world)
        batches = masker.train_batches(base, rank)
    else:
        task = CausalLM(block, tc.label_smoothing, fused=fused_head(tc))
    if tc.curriculum.min_length is not None:
        if batches is None:
            batches = RankBatches(train_data, tc.per_device_train_batch_size, collate_blocks, cfg.seed, rank, world)
        batches = CurriculumBatches(batches, tc.curriculum, block, tc.gradient_accumulation_steps)
    return task, batches

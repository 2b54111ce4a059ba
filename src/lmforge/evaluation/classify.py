"""Sequence classification on text/label records: loss, accuracy, macro-F1 and the confusion matrix.

Records are encoded as ``lmforge finetune`` (task: classification) encodes them, and scored through the same
:class:`lmforge.train.tasks.Classification` task; the metrics come from scikit-learn
(:func:`lmforge.evaluation.metrics.classification_metrics`).
"""

from __future__ import annotations

import dataclasses

import torch

from lmforge.config import UserError, help_field, missing_files


@dataclasses.dataclass
class ClassificationGroup:
    files: list[str] = help_field([], help="JSONL text/label records to classify (empty: no classification metrics).")
    text_key: str = help_field("text", help="Column of the text.")
    label_key: str = help_field("label", help="Column of the label (names as in the model's labels.json).")
    max_seq_length: int = help_field(512, help="Texts are cut to this many tokens (as finetune's data.max_seq_length).")
    batch_size: int = help_field(32, help="Records per forward pass.")

    @property
    def enabled(self) -> bool:
        return bool(self.files)

    def problems(self) -> list[str]:
        out = missing_files("files", self.files)
        out += [f"{k}: must be >= 1, got {getattr(self, k)}" for k in ("max_seq_length", "batch_size") if getattr(self, k) < 1]
        return out


def records(cfg: ClassificationGroup, tokenizer, label_names: list[str]) -> list[dict]:
    """[{'input_ids', 'labels'}] with the class index of each record's label in the model's ``label_names``."""
    from lmforge.datasets.sft import SFTDataConfig, detect_format, expand, read_records

    keys = SFTDataConfig(text_key=cfg.text_key, label_key=cfg.label_key)
    index = {n: i for i, n in enumerate(label_names)}
    out = []
    for path in expand(cfg.files):
        rows = read_records(path)
        if detect_format(rows, keys, path) != "classification":
            raise UserError(f"classification.files: {path}: records need '{cfg.text_key}' and '{cfg.label_key}' columns; "
                            "set classification.text_key / label_key")
        for r in rows:
            label = str(r.get(cfg.label_key))
            if label not in index:
                raise UserError(f"classification.files: {r['_where']}: label {label!r} is not a class of the model "
                                f"({', '.join(label_names)})")
            ids = tokenizer(str(r[cfg.text_key]), add_special_tokens=True)["input_ids"][: cfg.max_seq_length]
            out.append({"input_ids": ids, "labels": index[label]})
    return out


@torch.no_grad()
def score(model, tokenizer, label_names: list[str], cfg: ClassificationGroup) -> dict:
    """{'loss', 'accuracy', 'macro_f1', 'examples', 'confusion_matrix', 'label_names'}."""
    from lmforge.datasets.sft import ClassificationCollator
    from lmforge.evaluation.lm import model_device
    from lmforge.evaluation.metrics import classification_metrics
    from lmforge.train.tasks import Classification

    rows = records(cfg, tokenizer, label_names)
    task = Classification(len(label_names), cfg.max_seq_length, collate=ClassificationCollator(tokenizer.pad_token_id))
    device = model_device(model)
    preds: list[int] = []
    loss_sum = 0.0
    for start in range(0, len(rows), cfg.batch_size):
        batch = {k: v.to(device) for k, v in task.collate(rows[start:start + cfg.batch_size]).items()}
        out = task.loss(model, batch)  # eval mode: summed CE over the batch + argmax predictions
        loss_sum += float(out["loss_sum"])
        preds += out["predictions"].tolist()
    result = classification_metrics(preds, [r["labels"] for r in rows], label_names)
    return {"loss": loss_sum / len(rows), **result}

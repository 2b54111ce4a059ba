"""Fine-tuning data: SFT records -> token ids + completion-only labels; classification records -> ids + class.

Record formats (JSONL, one object per line; the format is detected per file from its columns):

- prompt/completion: ``{"prompt": "...", "completion": "..."}`` -> ``prompt ids + completion ids + EOS``;
  labels are -100 on the prompt, so only the completion and the EOS (the model learns to stop) are trained.
- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` rendered with the
  tokenizer's chat template (``data.chat_template`` may set one); only assistant turns are trained.
  Templates with ``{% generation %}`` markers give the mask directly; for others each assistant turn's
  tokens are found by rendering the conversation prefix by prefix.
- classification: ``{"text": "...", "label": "pos"}``; label names are the sorted distinct labels of the
  training files.

Batches: padded to a multiple of 8 (``data.batching.PadCollator``) and grouped by length
(:class:`LengthGroupedBatches`), or packed (:func:`pack_examples`): several examples per row with
``position_ids`` restarting at 0 for each, and no ``attention_mask``, which transformers' masking turns
into a block-diagonal causal mask, so no token attends across an example boundary. (Only when no KV
cache is built: the forward must get ``use_cache=False``, or the mask silently spans the whole row.)
"""

from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmforge.config import UserError, help_field
from lmforge.datasets.batching import IGNORE_INDEX, PadCollator, round_up


@dataclasses.dataclass
class SFTDataConfig:
    train_files: list[str] = help_field([], help="JSONL files or globs: prompt/completion, chat messages, or text/label records.")
    validation_files: list[str] = help_field([], help="Held-out JSONL files; default: validation_ratio of the training records.")
    validation_ratio: float = help_field(0.1, help="Fraction of training records held out when validation_files is empty.")
    prompt_key: str = help_field("prompt", help="Column of the prompt (prompt/completion records).")
    completion_key: str = help_field("completion", help="Column of the completion (prompt/completion records).")
    messages_key: str = help_field("messages", help="Column of the chat messages (chat records).")
    text_key: str = help_field("text", help="Column of the text (classification records).")
    label_key: str = help_field("label", help="Column of the label (classification records).")
    chat_template: str | None = help_field(None, help="A Jinja chat template, or a path to a .jinja file (default: the tokenizer's).")
    max_seq_length: int = help_field(512, help="Examples are cut to this many tokens (right side); ones left with no trained token are dropped.")
    completion_only_loss: bool = help_field(True, help="Train only on completion/assistant tokens (prompt tokens get label -100).")
    packing: bool = help_field(False, help="Pack several examples per row of max_seq_length, no attention across examples (SFT only).")
    group_by_length: bool = help_field(True, help="Without packing: batch examples of similar length (less padding).")
    num_proc: int | None = help_field(None, help="Processes for tokenization (datasets.map num_proc).")
    tasks: list[dict[str, Any]] = help_field(
        [], help="Multi-task SFT instead of train_files: [{name, train_files, validation_files?, weight?}, ...]; "
                 "rows drawn per task with probability ∝ (weight·examples)^(1/mixing_temperature); per-task "
                 "validation loss in metrics.jsonl and the plots.")
    mixing_temperature: float = help_field(
        1.0, help="tasks: 1 = in proportion to weight x examples; larger flattens towards uniform (T5's mixing).")

    TASK_KEYS = ("name", "train_files", "validation_files", "weight")

    def problems(self) -> list[str]:
        out = []
        if self.tasks:
            out += self._task_problems()
        elif not self.train_files:
            out.append("train_files: required; give one or more JSONL files")
        for key in ("train_files", "validation_files"):
            for pattern in getattr(self, key):
                if not glob.glob(pattern):
                    out.append(f"{key}: '{pattern}' matches no file; check the path (relative to where you run lmforge)")
        if self.max_seq_length < 8:
            out.append("max_seq_length: must be >= 8")
        if not 0 <= self.validation_ratio < 1:
            out.append("validation_ratio: must be in [0, 1)")
        if self.chat_template and self.chat_template.endswith(".jinja") and not Path(self.chat_template).is_file():
            out.append(f"chat_template: '{self.chat_template}' does not exist; give a template file or the template text")
        return out

    def _task_problems(self) -> list[str]:
        out = []
        if self.train_files or self.validation_files:
            out.append("train_files / tasks: give the files inside each task (tasks[i].train_files), not both")
        if not self.mixing_temperature > 0:
            out.append(f"mixing_temperature: must be > 0, got {self.mixing_temperature}")
        names = []
        for i, t in enumerate(self.tasks):
            where = f"tasks[{i}]"
            if not isinstance(t, dict):
                out.append(f"{where}: must be a mapping {{name, train_files, ...}}")
                continue
            unknown = sorted(set(t) - set(self.TASK_KEYS))
            if unknown:
                out.append(f"{where}: unknown key(s) {', '.join(unknown)}; a task takes {', '.join(self.TASK_KEYS)}")
            name = t.get("name")
            if not name or not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
                out.append(f"{where}.name: required, letters/digits/_/- (it names the task's metrics)")
            names.append(name)
            files = t.get("train_files") or []
            if isinstance(files, str):
                files = [files]
            if not files:
                out.append(f"{where}.train_files: required; give one or more JSONL files")
            for key in ("train_files", "validation_files"):
                for pattern in ([t.get(key)] if isinstance(t.get(key), str) else t.get(key) or []):
                    if not glob.glob(pattern):
                        out.append(f"{where}.{key}: '{pattern}' matches no file; check the path")
            weight = t.get("weight", 1.0)
            if not isinstance(weight, (int, float)) or not weight > 0:
                out.append(f"{where}.weight: must be a number > 0, got {weight!r}")
        dup = sorted({n for n in names if n and names.count(n) > 1})
        if dup:
            out.append(f"tasks: names must be unique; {', '.join(dup)} repeated")
        return out

    def task_configs(self) -> list[tuple[str, float, SFTDataConfig]]:
        """(name, weight, this config with the task's files and no tasks) per task."""
        def files(v):
            return [v] if isinstance(v, str) else list(v or [])

        return [(t["name"], float(t.get("weight", 1.0)),
                 dataclasses.replace(self, train_files=files(t["train_files"]),
                                     validation_files=files(t.get("validation_files")), tasks=[]))
                for t in self.tasks]


def mixing_probabilities(sizes: list[int], weights: list[float], temperature: float) -> list[float]:
    """p_i ∝ (w_i·n_i)^(1/T): examples-proportional at T = 1 (weighted), towards uniform as T grows
    (the temperature mixing of T5, Raffel et al. 2020, sec. 3.5.2)."""
    raw = [(w * n) ** (1.0 / temperature) for n, w in zip(sizes, weights, strict=True)]
    total = sum(raw)
    return [r / total for r in raw]


Format = Literal["prompt_completion", "chat", "classification"]


# ---------------------------------------------------------------------------------------------
# Reading


def expand(patterns: list[str]) -> list[str]:
    return sorted({f for p in patterns for f in glob.glob(p)})


def read_records(path: str) -> list[dict]:
    """One JSONL file as a list of dicts (errors name the file and line)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"data: {path} line {i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"data: {path} line {i}: expected a JSON object per line")
            row["_where"] = f"{path} line {i}"
            rows.append(row)
    if not rows:
        raise UserError(f"data: {path} holds no records")
    return rows


def detect_format(rows: list[dict], cfg: SFTDataConfig, path: str) -> Format:
    keys = set(rows[0])
    if cfg.messages_key in keys:
        return "chat"
    if cfg.prompt_key in keys and cfg.completion_key in keys:
        return "prompt_completion"
    if cfg.text_key in keys and cfg.label_key in keys:
        return "classification"
    found = sorted(keys - {"_where"})
    raise UserError(
        f"data.train_files: {path}: records have keys {found}; expected '{cfg.prompt_key}'+'{cfg.completion_key}', "
        f"'{cfg.messages_key}' (chat) or '{cfg.text_key}'+'{cfg.label_key}' (classification); set data.*_key to your column names"
    )


# ---------------------------------------------------------------------------------------------
# SFT encoding: ids + labels (prompt positions -100)


def encode_prompt_completion(tokenizer, prompt: str, completion: str, completion_only: bool = True) -> dict[str, list[int]]:
    """``[bos] + prompt + completion + eos``; labels are -100 on bos and prompt when ``completion_only``.

    Prompt and completion are tokenized separately so the boundary is exact and matches generation,
    where the model continues the prompt's own tokens."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    p = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = ([IGNORE_INDEX] * len(p) if completion_only else list(p)) + c
    return {"input_ids": p + c, "labels": labels}


def _generation_marked(template: str | None) -> bool:
    return bool(template) and "{% generation %}" in template.replace("{%-", "{%").replace("-%}", "%}")


def encode_chat(tokenizer, messages: list[dict], completion_only: bool = True, where: str = "",
                key: str = "messages") -> dict[str, list[int]]:
    """Render ``messages`` with the chat template; labels are the assistant tokens (others -100)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise UserError(f"data.{key}: {where}: expected a list of {{'role': ..., 'content': ...}} messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"data.{key}: {where}: chat record without an assistant turn; every record needs at least "
                        "one {\"role\": \"assistant\", ...} message to train on")
    if _generation_marked(tokenizer.chat_template):
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    else:
        ids, mask = _chat_by_prefixes(tokenizer, messages, where, key)
    trained = [t for t, m in zip(ids, mask) if m]
    if messages[-1]["role"] == "assistant" and (not trained or trained[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)  # the model must learn to stop after its last turn
        mask.append(1)
    labels = [t if (m or not completion_only) else IGNORE_INDEX for t, m in zip(ids, mask)]
    return {"input_ids": ids, "labels": labels}


def _chat_by_prefixes(tokenizer, messages: list[dict], where: str, key: str) -> tuple[list[int], list[int]]:
    """Assistant-token mask for templates without generation markers: the tokens that rendering message
    i adds after ``messages[:i]`` + generation prompt belong to assistant turn i."""
    def render(msgs, gen_prompt):
        if not msgs:
            return []
        return list(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen_prompt, return_dict=True)["input_ids"])

    ids = render(messages, False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(messages[:i], True))
        end = len(render(messages[: i + 1], False))
        if ids[:start] != render(messages[:i], True):
            raise UserError(f"data.chat_template: {where}: the template does not render conversations prefix by prefix; "
                            "add {% generation %} ... {% endgeneration %} around assistant content")
        for j in range(start, min(end, len(ids))):
            mask[j] = 1
            if ids[j] == tokenizer.eos_token_id:
                break  # the turn ends at its EOS; template whitespace after it is not the model's to say
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Datasets


@dataclasses.dataclass
class DataStats:
    """Counts a person can read: what was kept, cut and dropped, and why."""

    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_trained_token: int = 0
    formats: dict[str, int] = dataclasses.field(default_factory=dict)
    trained_tokens: int = 0
    tokens: int = 0


def _encode_rows(rows: list[dict], fmt: Format, tokenizer, cfg: SFTDataConfig, stats: DataStats) -> list[dict]:
    out = []
    for row in rows:
        stats.records += 1
        if fmt == "chat":
            enc = encode_chat(tokenizer, row[cfg.messages_key], cfg.completion_only_loss, row["_where"], "messages_key")
        else:
            p, c = row.get(cfg.prompt_key), row.get(cfg.completion_key)
            if not isinstance(p, str) or not isinstance(c, str) or not c:
                raise UserError(f"data.completion_key: {row['_where']}: '{cfg.prompt_key}' and '{cfg.completion_key}' "
                                "must be strings and the completion non-empty")
            enc = encode_prompt_completion(tokenizer, p, c, cfg.completion_only_loss)
        if len(enc["input_ids"]) > cfg.max_seq_length:
            stats.truncated += 1
            enc = {k: v[: cfg.max_seq_length] for k, v in enc.items()}
        # after the causal shift, position 0's label is never predicted
        if not any(t != IGNORE_INDEX for t in enc["labels"][1:]):
            stats.dropped_no_trained_token += 1
            continue
        stats.kept += 1
        stats.tokens += len(enc["input_ids"])
        stats.trained_tokens += sum(t != IGNORE_INDEX for t in enc["labels"][1:])
        out.append(enc)
    return out


def _to_dataset(rows: list[dict]):
    import datasets

    if not rows:
        return None
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})


def set_chat_template(tokenizer, cfg: SFTDataConfig) -> None:
    if cfg.chat_template:
        p = Path(cfg.chat_template)
        tokenizer.chat_template = p.read_text(encoding="utf-8") if p.suffix == ".jinja" and p.is_file() else cfg.chat_template


def _split(rows: list[dict], ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    if ratio <= 0 or len(rows) < 2:
        return rows, []
    perm = np.random.default_rng(seed).permutation(len(rows))
    n_val = max(1, int(round(ratio * len(rows))))
    val = {int(i) for i in perm[:n_val]}
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def _load_split_rows(cfg: SFTDataConfig, seed: int) -> tuple[list[tuple[Format, list[dict]]], list[tuple[Format, list[dict]]]]:
    """[(format, rows)] per file for train and validation (validation held out per file when not given)."""
    train, val = [], []
    for path in expand(cfg.train_files):
        rows = read_records(path)
        fmt = detect_format(rows, cfg, path)
        if not cfg.validation_files:
            rows, held = _split(rows, cfg.validation_ratio, seed)
            if held:
                val.append((fmt, held))
        train.append((fmt, rows))
    for path in expand(cfg.validation_files):
        rows = read_records(path)
        val.append((detect_format(rows, cfg, path), rows))
    return train, val


def build_sft_datasets(cfg: SFTDataConfig, tokenizer, seed: int):
    """(train, validation, stats): datasets with ``input_ids`` and ``labels`` lists (validation may be None)."""
    if tokenizer.eos_token_id is None:
        raise UserError("model.tokenizer: the tokenizer has no eos_token; SFT appends EOS so the model learns to stop")
    set_chat_template(tokenizer, cfg)
    train_parts, val_parts = _load_split_rows(cfg, seed)
    stats, val_stats = DataStats(), DataStats()
    train_rows, val_rows = [], []
    for parts, rows_out, st in ((train_parts, train_rows, stats), (val_parts, val_rows, val_stats)):
        for fmt, rows in parts:
            if fmt == "classification":
                raise UserError(f"data.train_files: {rows[0]['_where']}: text/label records are for task: classification, "
                                "not sft; set task=classification or give prompt/completion or chat records")
            if fmt == "chat" and not tokenizer.chat_template:
                raise UserError("data.chat_template: chat records need a chat template and the tokenizer has none; "
                                "set data.chat_template to a template (text or .jinja file)")
            st.formats[fmt] = st.formats.get(fmt, 0) + len(rows)
            rows_out.extend(_encode_rows(rows, fmt, tokenizer, cfg, st))
    if not train_rows:
        raise UserError(f"data.max_seq_length: no training example kept ({stats.dropped_no_trained_token} had no trained "
                        "token left after truncation); raise data.max_seq_length")
    return _to_dataset(train_rows), _to_dataset(val_rows), {"train": dataclasses.asdict(stats), "validation": dataclasses.asdict(val_stats)}


def build_classification_datasets(cfg: SFTDataConfig, tokenizer, seed: int):
    """(train, validation, label_names, stats): ``input_ids`` and an integer ``labels`` per record."""
    train_parts, val_parts = _load_split_rows(cfg, seed)
    for fmt, rows in train_parts + val_parts:
        if fmt != "classification":
            raise UserError(f"data.train_files: {rows[0]['_where']}: task: classification needs '{cfg.text_key}' and "
                            f"'{cfg.label_key}' columns (got {fmt} records); set data.text_key / data.label_key")
    names = sorted({str(r[cfg.label_key]) for _, rows in train_parts for r in rows})
    if len(names) < 2:
        raise UserError(f"data.label_key: the column '{cfg.label_key}' has only one class ({names[0]!r}) in the training "
                        "data; classification needs at least two")
    index = {n: i for i, n in enumerate(names)}
    stats = {"train": {"records": 0, "truncated": 0}, "validation": {"records": 0, "truncated": 0}, "label_names": names}

    def encode(parts, split):
        out = []
        for _, rows in parts:
            for r in rows:
                label = str(r[cfg.label_key])
                if label not in index:
                    raise UserError(f"data.label_key: {r['_where']}: label {label!r} does not occur in the training data "
                                    f"(classes: {', '.join(names)})")
                ids = tokenizer(str(r[cfg.text_key]), add_special_tokens=True)["input_ids"]
                stats[split]["records"] += 1
                if len(ids) > cfg.max_seq_length:
                    stats[split]["truncated"] += 1
                    ids = ids[: cfg.max_seq_length]
                out.append({"input_ids": ids, "labels": index[label]})
        return out

    train, val = encode(train_parts, "train"), encode(val_parts, "validation")
    return _to_dataset(train), _to_dataset(val), names, stats


# ---------------------------------------------------------------------------------------------
# Packing


def pack_examples(ds, max_len: int):
    """Examples -> rows of at most ``max_len`` tokens, each holding whole examples (first-fit decreasing).

    Each row gets ``position_ids`` restarting at 0 per example; the first label of every example is
    -100 so no example is trained to predict the start of the next one."""
    import datasets

    lengths = [len(x) for x in ds["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        for b, free in enumerate(space):
            if lengths[i] <= free:
                bins[b].append(i)
                space[b] -= lengths[i]
                break
        else:
            bins.append([i])
            space.append(max_len - lengths[i])
    ids_col, labels_col = ds["input_ids"], ds["labels"]
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for b in bins:
        ids, labels, pos = [], [], []
        for i in sorted(b):
            ids += list(ids_col[i])
            labels += [IGNORE_INDEX] + list(labels_col[i])[1:]
            pos += list(range(lengths[i]))
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(pos)
    return datasets.Dataset.from_dict(rows)


# ---------------------------------------------------------------------------------------------
# Collation and batches


@dataclasses.dataclass
class SFTCollator:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (-100 on padding), length a multiple of 8.

    Packed rows carry ``position_ids`` and get no ``attention_mask`` (that is what makes transformers
    build the block-diagonal mask); their padding continues the positions as one more, untrained example."""

    pad_token_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if "position_ids" not in rows[0]:
            return PadCollator(self.pad_token_id, self.pad_to_multiple_of)(
                [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows])
        width = round_up(max(len(r["input_ids"]) for r in rows), self.pad_to_multiple_of)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (batch, width)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        pos = torch.arange(width).repeat(len(rows), 1)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(list(r["input_ids"]))
            labels[i, :n] = torch.as_tensor(list(r["labels"]))
            pos[i, :n] = torch.as_tensor(list(r["position_ids"]))
            pos[i, n:] = torch.arange(width - n)
        return {"input_ids": ids, "labels": labels, "position_ids": pos}


@dataclasses.dataclass
class ClassificationCollator:
    pad_token_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = PadCollator(self.pad_token_id, self.pad_to_multiple_of)([{"input_ids": list(r["input_ids"])} for r in rows])
        batch["labels"] = torch.tensor([int(r["labels"]) for r in rows])  # (batch,)
        return batch


def describe_stats(stats: dict[str, Any]) -> str:
    t = stats.get("train", {})
    return (f"{t.get('kept', t.get('records'))} training examples ({t.get('formats', '')}), "
            f"{t.get('truncated', 0)} truncated, {t.get('dropped_no_trained_token', 0)} dropped with no trained token")

"""Language-model metrics on text: loss, perplexity, token accuracy and bits per byte.

Two ways to cut the text into rows, both scored by :func:`lmforge.train.evaluate.evaluate` (the function
training's validation uses: the token-weighted sum over the whole set, never a mean of batch means):

- ``packed`` (``lm.packing: true``): the blocks :func:`lmforge.datasets.lm.tokenize_and_pack` makes, documents
  joined by EOS and cut every ``block_size`` tokens, scored like pretraining's validation (the same blocks,
  the same numbers as ``pretrain``'s eval perplexity for the same split). Every token but the first of a
  block is scored. The bytes are counted by decoding the scored tokens of each block (special tokens such
  as EOS carry no text and count 0 bytes, but their NLL is in the sum).
- ``documents`` (``lm.packing: false``, the default): each document alone, after one context token (the
  tokenizer's BOS, else EOS: what precedes a document in packed training data), in windows of
  ``block_size`` tokens whose first token is the last of the window before (each token is scored once,
  with up to block_size - 1 tokens of context). Rows are padded in batches; padding is never scored. The
  bytes are the UTF-8 bytes of the raw documents, so bits per byte compares models with different tokenizers
  on exactly the same text.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lmforge.config import UserError, help_field
from lmforge.datasets.batching import IGNORE_INDEX
from lmforge.evaluation.metrics import lm_metrics


@dataclasses.dataclass
class LMGroup:
    files: list[str] = help_field([], help="Text/JSONL/Parquet/CSV files or globs whose documents are scored (empty, and no lm.path: no LM metrics).")
    path: str | None = help_field(None, help="Instead of files: a dataset from `lmforge data` (its validation split; lm.packing must be true).")
    validation_ratio: float = help_field(0.0, help="Score only the documents pretrain held out with this ratio (and the recipe's seed); 0: all documents.")
    text_key: str = help_field("text", help="Column holding the text in JSONL/Parquet/CSV files.")
    block_size: int = help_field(128, help="Tokens per row (packed block, or document window).")
    packing: bool = help_field(False, help="true: packed blocks as in training; false: each document alone (bytes from the raw text).")
    batch_size: int = help_field(8, help="Rows per forward pass.")
    limit: int | None = help_field(None, help="Score only the first N documents (packing false) or blocks (packing true).")

    @property
    def enabled(self) -> bool:
        return bool(self.files or self.path)

    def problems(self) -> list[str]:
        from lmforge.datasets.lm import LMDataConfig

        out = []
        if self.files and self.path:
            out.append("files / path: give one (raw files, or a dataset from `lmforge data`)")
        if self.path and self.validation_ratio:
            out.append("validation_ratio: only read with lm.files (lm.path scores the dataset's own validation split); remove it")
        if self.path and not self.packing:
            out.append("packing: a dataset from `lmforge data` holds tokens only, no text to count bytes of; set lm.packing=true "
                       "or give lm.files")
        if self.enabled:  # the same file checks as pretrain's data group
            data = LMDataConfig(path=self.path, train_files=list(self.files), validation_ratio=self.validation_ratio,
                                text_key=self.text_key, block_size=self.block_size)
            out += [p for p in data.problems() if p.startswith(("path:", "train_files:", "validation_ratio", "block_size"))]
        out = [p.replace("train_files:", "files:", 1) for p in out]
        for key in ("batch_size", "limit"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                out.append(f"{key}: must be >= 1, got {getattr(self, key)}")
        return out


# ---------------------------------------------------------------------------------------------
# Rows


def documents(cfg: LMGroup, seed: int):
    """The documents scored (a datasets.Dataset with column ``text_key``): every document of lm.files, or the
    part pretrain held out with the same validation_ratio and seed (``datasets.train_test_split``, as
    :func:`lmforge.datasets.lm.build_lm_datasets` splits)."""
    from lmforge.datasets.lm import load_raw
    from lmforge.datasets.sft import expand

    raw = load_raw(expand(cfg.files), cfg.text_key)
    if cfg.validation_ratio > 0 and len(raw) > 1:
        raw = raw.train_test_split(test_size=cfg.validation_ratio, seed=seed)["test"]
    return raw


def packed_blocks(cfg: LMGroup, tokenizer, seed: int):
    """(n_blocks, block_size) blocks: the data stage's validation split, or the scored documents packed."""
    import datasets

    from lmforge.datasets.lm import tokenize_and_pack

    if cfg.path:
        dd = datasets.load_from_disk(cfg.path)
        split = dd.get("validation") if isinstance(dd, datasets.DatasetDict) else None
        if split is None or "input_ids" not in split.column_names:
            raise UserError(f"lm.path: '{cfg.path}' has no validation split of input_ids; point at `lmforge data`'s dataset folder")
        blocks = split
    else:
        blocks = tokenize_and_pack(documents(cfg, seed), tokenizer, cfg.text_key, cfg.block_size)
    if cfg.limit is not None:
        blocks = blocks.select(range(min(cfg.limit, len(blocks))))
    if len(blocks) == 0:
        raise UserError(f"lm: the documents hold fewer than lm.block_size={cfg.block_size} tokens; lower lm.block_size "
                        "or set lm.packing=false")
    return blocks.with_format("torch")


def document_windows(texts: list[str], tokenizer, block_size: int) -> list[dict[str, list[int]]]:
    """Rows of at most ``block_size`` tokens: [context token] + the document's tokens, cut into windows that
    start at the last token of the window before; labels are -100 at each window's first position (only
    ever context) so every document token is scored exactly once."""
    first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if first is None:
        raise UserError("model.tokenizer: the tokenizer has neither a BOS nor an EOS token to start a document with")
    rows = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream = [first] + list(ids)
        for start in range(0, len(stream) - 1, block_size - 1):
            window = stream[start:start + block_size]
            rows.append({"input_ids": window, "labels": [IGNORE_INDEX] + window[1:]})
    return rows


def scored_bytes(tokenizer, blocks) -> int:
    """UTF-8 bytes of the scored tokens of packed blocks (all but the first of each block), decoded run by run
    between special tokens (those count 0 bytes). Exact for byte-level BPE (GPT-2, Llama 3, Qwen and the data
    stage's tokenizers); a tokenizer that drops the space before a run's first word (SentencePiece) counts one
    byte less per run, and a character cut by a block boundary counts as U+FFFD (3 bytes): documents mode
    (lm.packing: false) counts the raw text instead."""
    special = set(tokenizer.all_special_ids)
    runs: list[list[int]] = []
    for row in blocks["input_ids"]:
        run: list[int] = []
        for t in (int(x) for x in row[1:]):
            if t in special:
                if run:
                    runs.append(run)
                run = []
            else:
                run.append(t)
        if run:
            runs.append(run)
    texts = tokenizer.batch_decode(runs, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return sum(len(t.encode("utf-8")) for t in texts)


# ---------------------------------------------------------------------------------------------
# Scoring


class OneProcess:
    """What :func:`lmforge.train.evaluate.evaluate` reads of an Accelerator, for one process on ``device``
    (the evaluate stage runs in one process; the model stays on the device its loader chose)."""

    num_processes, process_index = 1, 0

    def __init__(self, device: torch.device):
        self.device = device

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor


def model_device(model: torch.nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


def score(model, tokenizer, cfg: LMGroup, seed: int) -> dict[str, float]:
    """{'loss', 'perplexity', 'token_accuracy', 'bits_per_byte', 'tokens', 'bytes', 'rows'} on the recipe's text."""
    import datasets

    from lmforge.datasets.lm import check_model_fits
    from lmforge.datasets.sft import SFTCollator
    from lmforge.train.evaluate import evaluate
    from lmforge.train.tasks import SFT, collate_blocks

    # the SFT task is next-token loss on the rows' labels; unlike CausalLM it drops the outputs prompt tuning
    # prepends for its virtual tokens, so every kind of adapter scores
    if cfg.packing:
        rows = packed_blocks(cfg, tokenizer, seed)
        task = SFT(tokenizer.pad_token_id, cfg.block_size, collate=collate_blocks)
        n_bytes = scored_bytes(tokenizer, rows)
    else:
        docs = documents(cfg, seed)
        if cfg.limit is not None:
            docs = docs.select(range(min(cfg.limit, len(docs))))
        texts = [t for t in docs[cfg.text_key] if t]
        windows = document_windows(texts, tokenizer, cfg.block_size)
        if not windows:
            raise UserError(f"lm.files: no document with text in {cfg.files}")
        rows = datasets.Dataset.from_list(windows)
        # right-padded rows with an attention_mask; labels -100 on padding (never scored)
        task = SFT(tokenizer.pad_token_id, cfg.block_size, collate=SFTCollator(tokenizer.pad_token_id))
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    check_model_fits(model.config, cfg.block_size, [rows] if cfg.packing else [])  # positions (and data-stage token ids)
    out = evaluate(OneProcess(model_device(model)), model, rows, task, cfg.batch_size)
    tokens = int(out["tokens"])
    result = lm_metrics(out["loss"] * tokens, tokens, round(out["accuracy"] * tokens), n_bytes)
    result["rows"] = len(rows)
    return result


def describe(cfg: LMGroup) -> str:
    source = cfg.path or ", ".join(str(Path(f)) for f in cfg.files)
    part = f"the validation_ratio={cfg.validation_ratio:g} held-out documents of " if cfg.validation_ratio > 0 and not cfg.path else ""
    mode = f"packed blocks of {cfg.block_size}" if cfg.packing else f"documents alone (windows of {cfg.block_size})"
    return f"{part}{source}, {mode}"

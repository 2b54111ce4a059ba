"""The minimal data path the training loop needs: local files -> tokenized -> packed blocks.

``data.path`` reads a dataset the data stage wrote with ``save_to_disk`` (splits ``train`` and
``validation``, column ``input_ids`` of ``block_size`` tokens): no conversion. ``data.train_files``
reads raw local text / JSONL / Parquet / CSV (globs allowed), holds out ``validation_ratio`` of the
*documents* (never blocks of one document on both sides), tokenizes with ``datasets.map(batched=True)``
(cached in the datasets cache, keyed by content fingerprint) and packs documents joined by EOS into
blocks of ``block_size``.
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path

import numpy as np

from lmforge.config import UserError, help_field

_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
             ".parquet": "parquet", ".csv": "csv"}


@dataclasses.dataclass
class LMDataConfig:
    path: str | None = help_field(None, help="A packed dataset from `lmforge data` (save_to_disk folder).")
    train_files: list[str] = help_field([], help="Raw local files or globs (.txt .jsonl .parquet .csv).")
    validation_files: list[str] = help_field([], help="Held-out files; default: validation_ratio of the documents.")
    validation_ratio: float = help_field(0.05, help="Fraction of documents held out when validation_files is empty.")
    text_key: str = help_field("text", help="Column holding the text in JSONL/Parquet/CSV files.")
    block_size: int = help_field(128, help="Tokens per packed training block.")
    num_proc: int | None = help_field(None, help="Processes for tokenization (datasets.map num_proc).")

    def problems(self) -> list[str]:
        out = []
        if bool(self.path) == bool(self.train_files):
            out.append("path / train_files: give exactly one (a packed dataset, or raw files)")
        if self.path and not Path(self.path).is_dir():
            out.append(f"path: '{self.path}' does not exist; run `lmforge data` first or fix the path")
        for key in ("train_files", "validation_files"):
            for pattern in getattr(self, key):
                if Path(pattern).is_dir():
                    out.append(f"{key}: '{pattern}' is a directory; give its files or a glob, e.g. '{Path(pattern) / '*.jsonl'}'")
                elif not glob.glob(pattern):
                    out.append(f"{key}: '{pattern}' matches no file; check the path (relative to where you run lmforge)")
                elif Path(pattern).suffix.lower() not in _BUILDERS and not any(
                    Path(f).suffix.lower() in _BUILDERS for f in glob.glob(pattern)
                ):
                    out.append(f"{key}: '{pattern}': unsupported file type; use {', '.join(sorted(_BUILDERS))}")
        if self.block_size < 2:
            out.append("block_size: must be >= 2")
        if not 0 <= self.validation_ratio < 1:
            out.append("validation_ratio: must be in [0, 1)")
        return out


def _expand(patterns: list[str]) -> list[str]:
    return sorted({f for p in patterns for f in glob.glob(p)})


def load_raw(files: list[str], text_key: str):
    """Load local files with the datasets builder their extension names (all files: one type)."""
    import datasets

    kinds = {_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if len(kinds) != 1 or None in kinds:
        raise UserError(f"data files must share one supported type, got {sorted(map(str, kinds))}: {files[:3]}")
    builder = kinds.pop()
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as e:  # datasets raises many types for a malformed file
        where = _first_bad_line(files) if builder == "json" else None
        raise UserError(where or f"cannot read {files[0] if len(files) == 1 else files}: {str(e).splitlines()[0]}") from None
    if text_key not in ds.column_names:
        raise UserError(f"{files[0]}: no '{text_key}' column (found {ds.column_names}); set data.text_key")
    return ds.select_columns([text_key])


def _first_bad_line(files: list[str]) -> str | None:
    """'file:line: what is wrong; the fix' for the first undecodable or unparsable JSON Lines record
    (datasets only says "An error occurred while generating the dataset")."""
    import json

    for f in files:
        with open(f, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"{f}:{n}: not UTF-8 (byte {e.start}); re-encode the file as UTF-8"
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        return f"{f}:{n}: not a JSON object ({e.msg}); fix or remove the line"
    return None


def max_token_id(ds) -> int:
    """The largest token id in a dataset's ``input_ids`` (Arrow compute, no Python lists)."""
    import pyarrow.compute as pc

    flat = pc.list_flatten(ds.data.column("input_ids"))
    return int(pc.max(flat).as_py()) if len(flat) else -1


def check_model_fits(model_config, block_size: int, datasets_: list) -> None:
    """One-line errors for data the model cannot take: blocks longer than its positions (GPT-2 fails with
    an IndexError, Llama trains silently past its RoPE range) or token ids beyond its vocabulary."""
    problems = []
    limit = next((getattr(model_config, k) for k in ("max_position_embeddings", "n_positions", "max_seq_len")
                  if getattr(model_config, k, None)), None)
    if limit is not None and block_size > limit:
        problems.append(f"data.block_size: {block_size} exceeds the model's max_position_embeddings ({limit}); lower "
                        "data.block_size or raise model.config.max_position_embeddings")
    vocab = getattr(model_config, "vocab_size", None)
    top = max((max_token_id(d) for d in datasets_ if d is not None), default=-1)
    if vocab is not None and top >= vocab:
        problems.append(f"data: token id {top} is outside the model's vocabulary of {vocab}; the data was tokenized with "
                        "another tokenizer (use the data stage's tokenizer as model.tokenizer) or raise model.config.vocab_size")
    if problems:
        raise UserError(problems)


def pack_flat(ids: np.ndarray, block_size: int) -> np.ndarray:
    """(n_tokens,) -> (n_tokens // block_size, block_size); the tail shorter than a block is dropped."""
    n = len(ids) // block_size
    return ids[: n * block_size].reshape(n, block_size)


def tokenize_and_pack(ds, tokenizer, text_key: str, block_size: int, num_proc: int | None = None):
    """Documents -> EOS-terminated token ids -> blocks of ``block_size`` (a datasets.Dataset).

    Packing runs once over the flat token array of *all* documents (read from Arrow without Python
    lists), so only the final remainder shorter than a block is dropped.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("model.tokenizer: the tokenizer has no eos_token; documents cannot be separated")

    def tokenize(batch):
        enc = tokenizer(batch[text_key], add_special_tokens=False)["input_ids"]
        return {"input_ids": [ids + [eos] for ids in enc]}

    tok = ds.map(tokenize, batched=True, remove_columns=ds.column_names, num_proc=num_proc, desc="tokenize")
    flat = tok.data.column("input_ids").combine_chunks().flatten().to_numpy()  # (n_tokens,)
    return blocks_dataset(pack_flat(flat, block_size))


def blocks_dataset(blocks: np.ndarray):
    """(n_blocks, block_size) int array -> datasets.Dataset with one ``input_ids`` list column (Arrow, no copy to lists)."""
    import datasets
    import pyarrow as pa

    n, width = blocks.shape if blocks.ndim == 2 else (0, 0)
    values = pa.array(np.ascontiguousarray(blocks).reshape(-1))
    offsets = pa.array(np.arange(0, n * width + 1, max(width, 1), dtype=np.int32)[: n + 1])
    column = pa.ListArray.from_arrays(offsets, values)
    return datasets.Dataset(pa.Table.from_arrays([column], names=["input_ids"]))


def build_lm_datasets(cfg: LMDataConfig, tokenizer, seed: int):
    """(train, validation) datasets of packed ``input_ids`` blocks."""
    import datasets

    if cfg.path:
        dd = datasets.load_from_disk(cfg.path)
        if not isinstance(dd, datasets.DatasetDict) or "train" not in dd:
            raise UserError(f"data.path: '{cfg.path}' is not a DatasetDict with a 'train' split; point at `lmforge data`'s dataset folder")
        train, val = dd["train"], dd.get("validation")
        for name, split in (("train", train), ("validation", val)):
            if split is not None and "input_ids" not in split.column_names:
                raise UserError(f"data.path: split '{name}' has no input_ids column; was it written by `lmforge data`?")
        width = len(train[0]["input_ids"])
        if width != cfg.block_size:
            raise UserError(f"data.block_size: {cfg.block_size}, but the dataset at '{cfg.path}' has blocks of {width}; set data.block_size={width}")
        return train.with_format("torch"), (val.with_format("torch") if val is not None else None)

    raw = load_raw(_expand(cfg.train_files), cfg.text_key)
    if cfg.validation_files:
        raw_val = load_raw(_expand(cfg.validation_files), cfg.text_key)
    elif cfg.validation_ratio > 0 and len(raw) > 1:
        split = raw.train_test_split(test_size=cfg.validation_ratio, seed=seed)  # split by *document*
        raw, raw_val = split["train"], split["test"]
    else:
        raw_val = None
    try:
        train = tokenize_and_pack(raw, tokenizer, cfg.text_key, cfg.block_size, cfg.num_proc)
        val = tokenize_and_pack(raw_val, tokenizer, cfg.text_key, cfg.block_size, cfg.num_proc) if raw_val is not None else None
    except UnicodeDecodeError:  # Arrow's JSON reader accepts bytes that are not UTF-8; decoding fails here
        files = _expand(cfg.train_files + cfg.validation_files)
        where = _first_bad_line(files) if all(Path(f).suffix.lower() in (".jsonl", ".json") for f in files) else None
        raise UserError(where or f"data: {files[:3]} hold text that is not UTF-8; re-encode the files as UTF-8") from None
    if len(train) == 0:
        raise UserError(f"data.train_files: fewer than {cfg.block_size} tokens in total; add data or lower data.block_size")
    return train.with_format("torch"), (val.with_format("torch") if val is not None and len(val) else None)

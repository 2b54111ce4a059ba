"""The last block: deduplicated documents -> split by document -> tokenizer -> packed blocks -> report.

``Publish`` is a one-task datatrove ``PipelineStep`` so it runs on the cluster like the others. Its memory
does not grow with the corpus: nothing holds all documents, texts or token ids at once.

1. ``sort_by_id``: each cleaning task's ``clean/<rank>.jsonl.gz`` is read in rank order, skipping the
   indices the dedup step listed; the kept documents are cut into runs of at most ``pack.sort_buffer_mb``
   of text, each run is sorted by document id and spilled to ``publish/runs/``, and the runs are merged
   with ``heapq.merge`` (an external merge sort). The merged stream is in global id order, so the result
   does not depend on how many tasks ran.
2. ``DocumentSplit``: validation or train per document, from a seeded hash of its id (no global view but
   the id with the smallest / largest hash, which guarantees one document on each side).
3. The tokenizer trains from an iterator over the training documents (``tokenizer.max_docs`` bounds it).
4. Tokenize in batches (``pack.batch_size`` documents, at most ~1 MB of text); ``BlockWriter`` carries
   the remainder shorter than a block to the next batch and appends full blocks to Arrow files in
   ``save_to_disk`` layout, one per split; ``documents.jsonl.gz`` is written in the same pass.
"""

from __future__ import annotations

import dataclasses
import gzip
import heapq
import json
import os
import shutil
import time
from array import array
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

import numpy as np
import xxhash
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from tqdm.auto import tqdm

from lmforge.config import UserError, help_field
from lmforge.datasets.lm import blocks_dataset
from lmforge.pipeline.readers import user_errors_abort
from lmforge.pipeline.report import block_rows, markdown, plots, summed_stats
from lmforge.pipeline.tokenizer import TokenizerConfig, train_tokenizer

BATCH_CHARS = 1_000_000  # a tokenizer batch holds at most this much text (its Python token lists take ~10x more)


@dataclasses.dataclass
class PackConfig:
    block_size: int = help_field(128, help="Tokens per packed block (pretrain's data.block_size must match).")
    validation_ratio: float = help_field(0.05, help="Fraction of *documents* held out for validation (by a hash of the id).")
    batch_size: int = help_field(1000, help="Documents per tokenizer call (and at most ~1 MB of text).")
    sort_buffer_mb: float = help_field(
        16.0, help="Text held in memory while sorting the documents by id; more is spilled to sorted runs on disk.")

    def problems(self) -> list[str]:
        out = []
        if self.block_size < 2:
            out.append("block_size: must be >= 2")
        if not 0 <= self.validation_ratio < 1:
            out.append("validation_ratio: must be in [0, 1)")
        if self.batch_size < 1:
            out.append("batch_size: must be >= 1")
        if self.sort_buffer_mb <= 0:
            out.append("sort_buffer_mb: must be > 0")
        return out


# --------------------------------------------------------------------------------------------
# Tokenize + pack on flat arrays


def _encoder(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    if encode is not None:
        return lambda batch: [e.ids for e in encode(batch, add_special_tokens=False)]
    return lambda batch: tokenizer(batch, add_special_tokens=False)["input_ids"]  # a slow (Python) tokenizer


def _eos(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("tokenizer: it has no eos_token; documents cannot be separated (set tokenizer.eos_token)")
    return eos


def _join_with_eos(ids: list[list[int]], eos: int) -> np.ndarray:
    """Token id lists -> one (n_tokens + n_docs,) int32 array, EOS after each; EOS positions by index arithmetic."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    out = np.empty(int(lengths.sum()) + len(ids), dtype=np.int32)
    eos_at = np.cumsum(lengths + 1) - 1  # position of each document's EOS
    mask = np.ones(len(out), dtype=bool)
    mask[eos_at] = False
    out[mask] = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    out[eos_at] = eos
    return out


def tokenize_flat(texts: list[str], tokenizer, batch_size: int = 1000, desc: str | None = None) -> np.ndarray:
    """Every document's token ids followed by EOS, concatenated: (n_tokens,) int32.

    Uses the Rust tokenizer's ``encode_batch_fast`` (no offsets) when available; the per-batch ids are
    joined into one numpy array and the EOS positions are filled by index arithmetic, not list appends.
    (The data stage itself streams: ``tokenize_batches`` + ``BlockWriter``.)
    """
    eos, encode = _eos(tokenizer), _encoder(tokenizer)
    parts = [_join_with_eos(encode(texts[i : i + batch_size]), eos)
             for i in tqdm(range(0, len(texts), batch_size), desc=desc, disable=desc is None, unit="batch")]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def batches(docs: Iterable, batch_size: int, max_chars: int = BATCH_CHARS, text=lambda d: d["text"]) -> Iterator[list]:
    """Consecutive lists of at most ``batch_size`` items and (unless one item is larger) ``max_chars`` of text."""
    batch, chars = [], 0
    for d in docs:
        n = len(text(d))
        if batch and (len(batch) >= batch_size or chars + n > max_chars):
            yield batch
            batch, chars = [], 0
        batch.append(d)
        chars += n
    if batch:
        yield batch


def tokenize_batches(text_batches: Iterable[list[str]], tokenizer) -> Iterator[np.ndarray]:
    """Per batch of texts, its documents' token ids each followed by EOS (int32), one batch in memory at a time."""
    eos, encode = _eos(tokenizer), _encoder(tokenizer)
    for batch in text_batches:
        yield _join_with_eos(encode(batch), eos) if batch else np.zeros(0, dtype=np.int32)


def _blocks_table(blocks: np.ndarray):
    """(n, block_size) ints -> a pyarrow table with one ``input_ids`` list<int32> column (as ``blocks_dataset``)."""
    import pyarrow as pa

    n, width = blocks.shape
    values = pa.array(np.ascontiguousarray(blocks, dtype=np.int32).reshape(-1))
    offsets = pa.array(np.arange(0, n * width + 1, max(width, 1), dtype=np.int32)[: n + 1])
    return pa.Table.from_arrays([pa.ListArray.from_arrays(offsets, values)], names=["input_ids"])


class BlockWriter:
    """Packs a stream of token ids into rows of ``block_size`` and appends them to Arrow files in
    ``Dataset.save_to_disk`` layout (``datasets.load_from_disk`` reads the folder).

    The same rows as ``pack_flat`` over the concatenated stream: the tail shorter than a block is carried to
    the next ``add`` and only the final one is dropped. Memory: one batch plus the carry. A new file starts
    every ``rows_per_file`` rows (default: ~500 MB of int32, as ``save_to_disk``'s shards); the fingerprint
    is a hash of the rows, so equal data gives equal folders.
    """

    def __init__(self, folder: Path, block_size: int, rows_per_file: int | None = None):
        from datasets.arrow_writer import ArrowWriter  # noqa: F401  (fail early if datasets is missing)

        self.folder, self.block_size = Path(folder), block_size
        self.rows_per_file = rows_per_file or max(1, 500_000_000 // (4 * block_size))
        self.folder.mkdir(parents=True, exist_ok=True)
        self._template = blocks_dataset(np.zeros((1, block_size), dtype=np.int32))
        self._carry = np.zeros(0, dtype=np.int32)
        self._writer, self._files, self._in_file = None, [], 0
        self._hash = xxhash.xxh64()
        self.tokens = self.rows = 0

    def add(self, ids: np.ndarray) -> None:
        self.tokens += len(ids)
        buf = np.concatenate([self._carry, np.asarray(ids, dtype=np.int32)]) if len(self._carry) else np.asarray(ids, dtype=np.int32)
        n = len(buf) // self.block_size
        if n:
            self._write(buf[: n * self.block_size].reshape(n, self.block_size))
        self._carry = buf[n * self.block_size :].copy()

    def _write(self, blocks: np.ndarray) -> None:
        from datasets.arrow_writer import ArrowWriter

        while len(blocks):
            if self._writer is None:
                path = self.folder / f"part-{len(self._files):05d}.arrow"
                self._writer = ArrowWriter(features=self._template.features, path=str(path))
                self._files.append(path)
                self._in_file = 0
            take = blocks[: self.rows_per_file - self._in_file]
            self._writer.write_table(_blocks_table(take))
            self._hash.update(np.ascontiguousarray(take).tobytes())
            self.rows += len(take)
            self._in_file += len(take)
            blocks = blocks[len(take) :]
            if self._in_file >= self.rows_per_file:
                self._close_file()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.finalize()
            self._writer.close()
            self._writer = None

    @property
    def remainder(self) -> int:
        return len(self._carry)

    def close(self) -> None:
        """Finish the files (an empty split gets one empty file) and write ``state.json`` / ``dataset_info.json``."""
        from datasets import config as ds_config

        if not self._files:
            self._write_empty()
        self._close_file()
        n = len(self._files)
        names = []
        for i, path in enumerate(self._files):
            name = f"data-{i:05d}-of-{n:05d}.arrow"
            os.replace(path, self.folder / name)
            names.append({"filename": name})
        t = self._template
        state = {"_data_files": names, "_fingerprint": self._hash.hexdigest(), "_format_columns": t._format_columns,
                 "_format_kwargs": t._format_kwargs, "_format_type": t._format_type,
                 "_output_all_columns": t._output_all_columns, "_split": None}
        (self.folder / ds_config.DATASET_STATE_JSON_FILENAME).write_text(json.dumps(state, indent=2, sort_keys=True))
        info = dataclasses.asdict(t._info)
        (self.folder / ds_config.DATASET_INFO_FILENAME).write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))

    def _write_empty(self) -> None:
        from datasets.arrow_writer import ArrowWriter

        path = self.folder / "part-00000.arrow"
        self._writer = ArrowWriter(features=self._template.features, path=str(path))
        self._writer.write_table(_blocks_table(np.zeros((0, self.block_size), dtype=np.int32)))
        self._files.append(path)


def write_dataset_dict(folder: Path, splits: dict[str, BlockWriter]) -> None:
    for w in splits.values():
        w.close()
    (Path(folder) / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))


# --------------------------------------------------------------------------------------------
# Split by document, one document at a time


def validation_score(doc_id: str, seed: int) -> float:
    """A document's place in [0, 1): a seeded hash of its id (the same whatever else is in the corpus)."""
    return xxhash.xxh64_intdigest(str(doc_id), seed=seed & 0xFFFFFFFFFFFFFFFF) / 2.0**64


class DocumentSplit:
    """Validation iff ``validation_score(id) < validation_ratio``: a rule per document, no permutation of
    the corpus. ``observe`` every id first (O(1) memory: counts and the ids of extreme score); then, when
    ``validation_ratio > 0`` and there are >= 2 documents, the document of smallest score is validation
    even if none fell below the ratio, and the one of largest score is train even if all did."""

    def __init__(self, validation_ratio: float, seed: int):
        self.ratio, self.seed = validation_ratio, seed
        self.n = self.n_below = 0
        self._min = (2.0, None)
        self._max = (-1.0, None)

    def observe(self, doc_id: str) -> None:
        s = validation_score(doc_id, self.seed)
        self.n += 1
        self.n_below += s < self.ratio
        if s < self._min[0]:
            self._min = (s, doc_id)
        if s > self._max[0]:
            self._max = (s, doc_id)

    def is_validation(self, doc_id: str) -> bool:
        if self.ratio <= 0 or self.n < 2:
            return False
        if self.n_below == 0 and doc_id == self._min[1]:
            return True
        if self.n_below == self.n and doc_id == self._max[1]:
            return False
        return validation_score(doc_id, self.seed) < self.ratio


def split_documents(ids: list[str], validation_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) of ``ids`` by ``DocumentSplit``: disjoint, in the given order."""
    split = DocumentSplit(validation_ratio, seed)
    for i in ids:
        split.observe(i)
    val = np.array([split.is_validation(i) for i in ids], dtype=bool)
    return np.nonzero(~val)[0], np.nonzero(val)[0]


# --------------------------------------------------------------------------------------------
# Reading the deduplicated documents, sorted by id with bounded memory


def read_kept(clean_dir: Path, remove_dir: Path, n_tasks: int) -> Iterator[dict]:
    for r in range(n_tasks):
        f = clean_dir / f"{r:05d}.jsonl.gz"
        if not f.exists():
            continue
        rm = remove_dir / f"{r:05d}.npy"
        removed = set(np.load(rm).tolist()) if rm.exists() else set()
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if i not in removed:
                    yield json.loads(line)


def _slim(d: dict) -> dict:
    return {"id": d["id"], "text": d["text"], "source": (d.get("metadata") or {}).get("source", d.get("source"))}


def _write_run(path: Path, docs: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return path


def _read_run(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _by_id(d: dict):
    return d["id"]


class SortedRuns:
    """An external merge sort of documents by id (stable: equal ids keep their input order).

    ``SortedRuns(docs, folder, buffer_chars)`` consumes ``docs`` once, holding at most ``buffer_chars`` of
    text (plus one document): each full buffer is sorted and written to ``folder/run-*.jsonl``; with more
    than ``fan_in`` runs, consecutive groups are merged into longer runs first. Iterating the object
    (as often as needed) merges the runs lazily: memory is one document per run. ``on_doc`` sees every
    document in input order (counters, the split's ``observe``).
    """

    def __init__(self, docs: Iterable[dict], folder: Path, buffer_chars: int, fan_in: int = 64, on_doc=None):
        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)  # runs of an interrupted attempt
        self.folder.mkdir(parents=True)
        self.runs: list[Path] = []
        self.n_docs = self.max_buffered_chars = 0
        buf, chars = [], 0
        for d in docs:
            d = _slim(d)
            if on_doc is not None:
                on_doc(d)
            self.n_docs += 1
            buf.append(d)
            chars += len(d["text"])
            self.max_buffered_chars = max(self.max_buffered_chars, chars)
            if chars >= buffer_chars:
                self._spill(buf)
                buf, chars = [], 0
        if buf:
            self._spill(buf)
        level = 0
        while len(self.runs) > fan_in:  # keep the number of files open at once bounded
            level += 1
            groups = [self.runs[i : i + fan_in] for i in range(0, len(self.runs), fan_in)]
            merged = []
            for g, group in enumerate(groups):
                merged.append(_write_run(self.folder / f"run-L{level}-{g:06d}.jsonl",
                                         heapq.merge(*map(_read_run, group), key=_by_id)))
                for p in group:
                    p.unlink()
            self.runs = merged

    def _spill(self, buf: list[dict]) -> None:
        buf.sort(key=_by_id)
        self.runs.append(_write_run(self.folder / f"run-{len(self.runs):06d}.jsonl", buf))

    def __iter__(self) -> Iterator[dict]:
        return heapq.merge(*map(_read_run, self.runs), key=_by_id)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------


class Publish(PipelineStep):
    type = "💾 - PUBLISH"
    name = "📦 Tokenizer + pack + report"

    def __init__(self, workdir: str, cfg, n_tasks: int, final_dir: str):
        super().__init__()
        self.workdir, self.cfg, self.n_tasks, self.final_dir = workdir, cfg, n_tasks, final_dir

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.track_time("run"), user_errors_abort():
            publish(Path(self.workdir), self.cfg, self.n_tasks, self.final_dir)
        if data:
            yield from data


def publish(work: Path, cfg, n_tasks: int, final_dir: str, docs: Iterable[dict] | None = None) -> dict:
    """Streams ``docs`` (default: the kept documents of every cleaning task) to ``dataset/``,
    ``tokenizer/``, ``documents.jsonl.gz`` and the report; memory independent of the corpus size."""
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    if docs is None:
        docs = read_kept(work / "clean", work / "dedup" / "remove", n_tasks)

    # ---- id order (the split and the packed blocks do not depend on how many tasks cleaned the data) ----
    split = DocumentSplit(cfg.pack.validation_ratio, cfg.seed)
    kept_lengths = array("q")  # for the length histogram: 8 bytes per document, not its text

    def observe(d):
        split.observe(d["id"])
        kept_lengths.append(len(d["text"]))

    runs = SortedRuns(docs, work / "publish" / "runs", int(cfg.pack.sort_buffer_mb * 1e6), on_doc=observe)
    times["sort"] = time.perf_counter() - t0
    if runs.n_docs == 0:
        raise UserError("sources: no document is left after filtering and deduplication; loosen the filters "
                        "(see report counts in the logs) or add data")

    # ---- tokenizer: trained on the training documents only (validation stays unseen) ----
    t = time.perf_counter()
    tk: TokenizerConfig = cfg.tokenizer
    if tk.train:
        def train_texts():
            n = 0
            for d in runs:
                if tk.max_docs is not None and n >= tk.max_docs:
                    return
                if not split.is_validation(d["id"]):
                    n += 1
                    yield d["text"]

        tokenizer = train_tokenizer(train_texts(), tk)
        tokenizer.save_pretrained(work / "tokenizer")
        source = "trained"
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tk.path)
        except OSError as e:
            raise UserError(f"tokenizer.path: cannot load '{tk.path}' ({str(e).splitlines()[0]})") from None
        source = f"loaded from {tk.path}"
    times["tokenizer"] = time.perf_counter() - t

    # ---- tokenize + pack, streamed; documents.jsonl.gz in the same pass ----
    t = time.perf_counter()
    bs = cfg.pack.block_size
    shutil.rmtree(work / "dataset", ignore_errors=True)  # files of an interrupted attempt
    writers = {"train": BlockWriter(work / "dataset" / "train", bs),
               "validation": BlockWriter(work / "dataset" / "validation", bs)}
    counts = {"train": 0, "validation": 0}
    val_chars = 0
    eos, encode = _eos(tokenizer), _encoder(tokenizer)
    with gzip.open(work / "documents.jsonl.gz", "wt", encoding="utf-8", compresslevel=6) as f:
        for batch in batches(runs, cfg.pack.batch_size):
            parts: dict[str, list[str]] = {"train": [], "validation": []}
            for d in batch:
                name = "validation" if split.is_validation(d["id"]) else "train"
                parts[name].append(d["text"])
                f.write(json.dumps({"id": d["id"], "text": d["text"], "source": d["source"], "split": name},
                                   ensure_ascii=False) + "\n")
            val_chars += sum(map(len, parts["validation"]))
            for name, texts in parts.items():
                if texts:
                    counts[name] += len(texts)
                    writers[name].add(_join_with_eos(encode(texts), eos))
    train = writers["train"]
    if train.rows == 0:
        raise UserError(f"pack.block_size: the training split has {train.tokens} tokens, fewer than one block of "
                        f"{bs}; lower pack.block_size or add data")
    write_dataset_dict(work / "dataset", writers)
    runs.remove()
    times["tokenize_pack"] = time.perf_counter() - t

    # ---- report ----
    times["publish"] = time.perf_counter() - t0
    stats = {"kept": runs.n_docs, "train_docs": counts["train"], "validation_docs": counts["validation"],
             "kept_lengths": np.frombuffer(kept_lengths, dtype=np.int64), "val_chars": val_chars,
             **{f"{k}_{a}": getattr(w, a) for k, w in writers.items() for a in ("tokens", "rows", "remainder")}}
    return build_report(work, cfg, final_dir, stats, tokenizer, source, times)


def build_report(work, cfg, final_dir, s: dict, tokenizer, tok_source, times) -> dict:
    """``s``: the streamed counters (documents per split, tokens / rows / remainder per split, kept lengths)."""
    clean_steps = summed_stats(work / "logs" / "clean")
    dedup_steps = summed_stats(work / "logs" / "dedup")
    blocks = block_rows(clean_steps) + block_rows(dedup_steps)
    reader = clean_steps[0]["stats"] if clean_steps else {}
    sources = {}
    for k, v in reader.items():
        if k.startswith("read_"):
            name = k.removeprefix("read_")
            sources[name] = {"read": int(v), "kept": int(v - reader.get(f"sampled_out_{name}", 0))}
    pii = {}
    for st in clean_steps:
        for k, v in st["stats"].items():
            if k.startswith("pii_"):
                pii[k.removeprefix("pii_")] = int(v)
    dedup = json.loads((work / "dedup" / "remove" / "clusters.json").read_text()) if (
        work / "dedup" / "remove" / "clusters.json").exists() else {}
    drops: dict[str, int] = {}
    for b in blocks:
        for k, v in b["dropped"].items():
            drops[k] = drops.get(k, 0) + v
    before = _lengths(work / "lengths" / "read")
    n_val = s["validation_docs"]
    report = {
        "output_dir": final_dir,
        "documents": {"read": int(sum(v["kept"] for v in sources.values())), "kept": int(s["kept"]),
                      "train": int(s["train_docs"]), "validation": int(n_val)},
        "sources": sources,
        "blocks": blocks,
        "drops_by_reason": drops,
        "pii": pii,
        "dedup": dedup,
        "tokens": {"train": int(s["train_tokens"]), "validation": int(s["validation_tokens"]),
                   "block_size": cfg.pack.block_size,
                   "train_blocks": int(s["train_rows"]), "validation_blocks": int(s["validation_rows"]),
                   "dropped_remainder": int(s["train_remainder"] + s["validation_remainder"])},
        "tokenizer": {"source": tok_source, "type": cfg.tokenizer.type if cfg.tokenizer.train else "pretrained",
                      "vocab_size": len(tokenizer),
                      "chars_per_token": (s["val_chars"] / max(1, s["validation_tokens"] - n_val)) if n_val else 0.0},
        "time_s": {**{b["block"]: b["time_s"] for b in blocks}, **{k: round(v, 3) for k, v in times.items()}},
        "outputs": {"dataset": "dataset/ (DatasetDict: train, validation; column input_ids)",
                    "tokenizer": "tokenizer/" if cfg.tokenizer.train else f"(loaded from {cfg.tokenizer.path})",
                    "documents": "documents.jsonl.gz (kept documents with their split)",
                    "report": "report.json, report.md, lengths.png, drops.png",
                    "logs": "logs/ (datatrove stats and logs per executor)"},
    }
    if cfg.filters.write_dropped:
        report["outputs"]["dropped"] = "dropped/<filter>/*.jsonl.gz"
    report["time_s"]["total"] = round(sum(b["time_s"] for b in blocks) + times["publish"], 3)
    plots(work, before, s["kept_lengths"], drops)
    (work / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (work / "report.md").write_text(markdown(report), encoding="utf-8")
    return report


def _lengths(folder: Path) -> np.ndarray:
    files = sorted(folder.glob("*.npy"))
    return np.concatenate([np.load(f) for f in files]) if files else np.zeros(0, dtype=np.int64)

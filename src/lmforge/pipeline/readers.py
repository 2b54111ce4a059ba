"""Reading local sources: text / JSONL / Parquet / CSV files and globs, a weighted mixture, strict errors.

``LocalReader`` is a datatrove ``PipelineStep`` (so it runs under every executor): task ``rank`` of
``world_size`` reads every ``world_size``-th file. Each source keeps a ``weight`` fraction of its
documents, chosen by a hash of (seed, source, document id) so the choice does not depend on the
number of tasks. Bad input raises :class:`UserError` naming the file (and line) and the fix, instead
of datatrove's default of logging and skipping.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import gzip
import io
import json
import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import xxhash
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from lmforge.config import UserError, help_field

FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".rst": "text", ".jsonl": "jsonl", ".json": "jsonl",
           ".parquet": "parquet", ".csv": "csv"}


@dataclasses.dataclass
class SourceConfig:
    """One source of the mixture."""

    files: list[str] = help_field([], help="Local files or globs (.txt .md .jsonl .parquet .csv; .gz allowed for text/jsonl/csv).")
    name: str = help_field("", help="Name in the report and in document ids (default: source<i>).")
    format: Literal["auto", "text", "jsonl", "parquet", "csv"] = help_field(
        "auto", help="File format; 'auto' goes by the extension."
    )
    text_key: str = help_field("text", help="Field holding the text (jsonl / parquet / csv).")
    id_key: str = help_field("id", help="Field holding a document id; documents without one get file:line.")
    weight: float = help_field(1.0, help="Fraction of this source's documents kept, in (0, 1] (seeded by `seed`).")
    text_unit: Literal["file", "paragraph", "line"] = help_field(
        "file", help="For text files: one document per file, per blank-line-separated paragraph, or per line."
    )

    def problems(self) -> list[str]:
        out = []
        if not self.files:
            out.append("files: empty; list at least one file or glob")
        if not 0 < self.weight <= 1:
            out.append(f"weight: {self.weight} is not in (0, 1]; it is the fraction of documents kept")
        return out


class StepAbort(BaseException):
    """A UserError leaving a block that runs in the main process.

    datatrove's executor logs every ``Exception`` of a task with a full variable dump before re-raising;
    a ``BaseException`` passes through untouched, so the CLI prints the one-line message alone. In worker
    processes the plain UserError is kept (a pool worker must not die on a BaseException).
    """

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


_ABORT_IN_PROCESS = False  # set by the stage while an executor runs blocks in this process


@contextlib.contextmanager
def aborts_in_process():
    """While active, UserErrors inside blocks running in this process leave as :class:`StepAbort`."""
    global _ABORT_IN_PROCESS
    _ABORT_IN_PROCESS = True
    try:
        yield
    finally:
        _ABORT_IN_PROCESS = False


@contextlib.contextmanager
def user_errors_abort():
    try:
        yield
    except UserError as e:
        if _ABORT_IN_PROCESS and multiprocessing.current_process().name == "MainProcess":
            raise StepAbort(e.problems) from None
        raise


def file_format(path: str, declared: str) -> str | None:
    if declared != "auto":
        return declared
    return FORMATS.get(Path(path.removesuffix(".gz")).suffix.lower())


def expand_sources(sources: list[SourceConfig]) -> list[tuple[int, str]]:
    """(source index, file) for every file of every source, sorted; UserError for globs matching nothing."""
    out, problems = [], []
    for i, src in enumerate(sources):
        for pattern in src.files:
            matches = sorted(p for p in glob.glob(pattern) if Path(p).is_file())
            if not matches:
                problems.append(f"sources[{i}].files: '{pattern}' matches no file; check the path "
                                "(relative to where you run lmforge)")
            for m in matches:
                if file_format(m, src.format) is None:
                    problems.append(f"{m}: unknown file type; set sources[{i}].format to text, jsonl, parquet or csv")
                out.append((i, m))
    if problems:
        raise UserError(problems)
    return out


def _open_text(path: str):
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def _not_utf8(path: str, e: UnicodeDecodeError, line: int | None = None) -> UserError:
    where = f"{path}:{line}" if line else path
    return UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); convert it "
                     f"(e.g. `iconv -f latin1 -t utf-8`) or remove it from the sources")


def _records(path: str, fmt: str, src: SourceConfig, src_i: int) -> Iterator[tuple[str, str]]:
    """(id, text) pairs of one file."""
    stem = Path(path).name
    key = f"sources[{src_i}].text_key"
    if fmt == "text":
        try:
            with _open_text(path) as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None
        if src.text_unit == "file":
            yield stem, text
        elif src.text_unit == "line":
            for n, line in enumerate(text.splitlines(), 1):
                yield f"{stem}:{n}", line
        else:
            for n, para in enumerate(p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()):
                yield f"{stem}:p{n}", para
    elif fmt == "jsonl":
        # bytes per line, decoded one at a time, so a bad byte is reported on its own line
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _not_utf8(path, e, n) from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); "
                                    "fix or delete that line") from None
                if not isinstance(rec, dict):
                    raise UserError(f"{path}:{n}: expected a JSON object per line, got {type(rec).__name__}")
                if src.text_key not in rec:
                    raise UserError(f"{path}:{n}: no '{src.text_key}' field (fields: {', '.join(map(str, rec))}); "
                                    f"set {key}")
                text = rec[src.text_key]
                if not isinstance(text, str):
                    raise UserError(f"{path}:{n}: '{src.text_key}' is {type(text).__name__}, not a string")
                yield str(rec.get(src.id_key, f"{stem}:{n}")), text
    elif fmt == "csv":
        try:
            with _open_text(path) as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or src.text_key not in reader.fieldnames:
                    raise UserError(f"{path}: no '{src.text_key}' column (columns: {reader.fieldnames}); set {key}")
                for row in reader:
                    yield str(row.get(src.id_key) or f"{stem}:{reader.line_num}"), row[src.text_key] or ""
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
            raise UserError(f"{path}: cannot read as Parquet ({str(e).splitlines()[0]}); check the file") from None
        names = pf.schema_arrow.names
        if src.text_key not in names:
            raise UserError(f"{path}: no '{src.text_key}' column (columns: {names}); set {key}")
        cols = [src.text_key] + ([src.id_key] if src.id_key in names else [])
        row = 0
        for batch in pf.iter_batches(columns=cols, batch_size=4096):
            texts = batch.column(src.text_key).to_pylist()
            ids = batch.column(src.id_key).to_pylist() if src.id_key in names else [None] * len(texts)
            for doc_id, text in zip(ids, texts):
                row += 1
                yield (str(doc_id) if doc_id is not None else f"{stem}:{row}"), text or ""
    else:  # pragma: no cover - formats are validated by the schema
        raise UserError(f"{path}: unsupported format {fmt}")


def keep_fraction(seed: int, source: str, doc_id: str, weight: float) -> bool:
    """Deterministic Bernoulli(weight) draw keyed by the document: the same on every executor and task count."""
    if weight >= 1:
        return True
    h = xxhash.xxh64_intdigest(f"{source}\x00{doc_id}", seed=seed & 0xFFFFFFFFFFFFFFFF)
    return h / 2**64 < weight


class LocalReader(PipelineStep):
    """Reads the sources' files (task ``rank`` takes every ``world_size``-th file) into Documents."""

    type = "📖 - READER"
    name = "📂 Local files"

    def __init__(self, sources: list[SourceConfig], seed: int = 42):
        super().__init__()
        self.sources = sources
        self.seed = seed
        self.files = expand_sources(sources)

    def source_name(self, i: int) -> str:
        return self.sources[i].name or f"source{i}"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with user_errors_abort():
            yield from self._read(rank, world_size)

    def _read(self, rank: int, world_size: int) -> DocumentsPipeline:
        from tqdm.auto import tqdm

        mine = self.files[rank::world_size]
        bar = tqdm(total=len(mine), desc=f"task {rank}: files", unit="file", disable=len(mine) < 2, leave=False)
        for src_i, path in mine:
            bar.update()
            src = self.sources[src_i]
            name = self.source_name(src_i)
            fmt = file_format(path, src.format)
            for doc_id, text in _records(path, fmt, src, src_i):
                with self.track_time():
                    self.stat_update(f"read_{name}")
                    if not keep_fraction(self.seed, name, doc_id, src.weight):
                        self.stat_update(f"sampled_out_{name}")
                        continue
                    self.stat_update("forwarded")
                    doc = Document(text=text, id=f"{name}/{doc_id}", metadata={"source": name, "file": path})
                    self.update_doc_stats(doc)
                yield doc
        bar.close()

"""The last block: deduplicated documents -> split by document -> tokenizer -> packed blocks -> report.

``Publish`` is a one-task datatrove ``PipelineStep`` so it runs on the cluster like the others. It reads
each cleaning task's ``clean/<rank>.jsonl.gz`` in rank order, skipping the indices the dedup step listed,
so the result does not depend on how many tasks ran.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import time
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from tqdm.auto import tqdm

from lmforge.config import UserError, help_field
from lmforge.datasets.lm import blocks_dataset, pack_flat
from lmforge.pipeline.readers import user_errors_abort
from lmforge.pipeline.report import block_rows, markdown, plots, summed_stats
from lmforge.pipeline.tokenizer import TokenizerConfig, train_tokenizer


@dataclasses.dataclass
class PackConfig:
    block_size: int = help_field(128, help="Tokens per packed block (pretrain's data.block_size must match).")
    validation_ratio: float = help_field(0.05, help="Fraction of *documents* held out for validation.")
    batch_size: int = help_field(1000, help="Documents per tokenizer call.")

    def problems(self) -> list[str]:
        out = []
        if self.block_size < 2:
            out.append("block_size: must be >= 2")
        if not 0 <= self.validation_ratio < 1:
            out.append("validation_ratio: must be in [0, 1)")
        return out


# --------------------------------------------------------------------------------------------
# Tokenize + pack on flat arrays


def tokenize_flat(texts: list[str], tokenizer, batch_size: int = 1000, desc: str | None = None) -> np.ndarray:
    """Every document's token ids followed by EOS, concatenated: (n_tokens,) int32.

    Uses the Rust tokenizer's ``encode_batch_fast`` (no offsets) when available; the per-batch ids are
    joined into one numpy array and the EOS positions are filled by index arithmetic, not list appends.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("tokenizer: it has no eos_token; documents cannot be separated (set tokenizer.eos_token)")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    parts = []
    for i in tqdm(range(0, len(texts), batch_size), desc=desc, disable=desc is None, unit="batch"):
        batch = texts[i : i + batch_size]
        if encode is not None:
            ids = [e.ids for e in encode(batch, add_special_tokens=False)]
        else:  # a slow (Python) tokenizer
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        out = np.empty(int(lengths.sum()) + len(ids), dtype=np.int32)
        eos_at = np.cumsum(lengths + 1) - 1  # position of each document's EOS
        mask = np.ones(len(out), dtype=bool)
        mask[eos_at] = False
        out[mask] = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        out[eos_at] = eos
        parts.append(out)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def split_documents(n: int, validation_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), disjoint sets of *documents*, both in corpus order."""
    n_val = int(round(n * validation_ratio))
    if validation_ratio > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# --------------------------------------------------------------------------------------------
# Reading the deduplicated documents


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


def publish(work: Path, cfg, n_tasks: int, final_dir: str) -> dict:
    import datasets

    t0 = time.perf_counter()
    times: dict[str, float] = {}
    # id order: the split and the packed blocks do not depend on how many tasks cleaned the data
    docs = sorted(read_kept(work / "clean", work / "dedup" / "remove", n_tasks), key=lambda d: d["id"])
    if not docs:
        raise UserError("sources: no document is left after filtering and deduplication; loosen the filters "
                        "(see report counts in the logs) or add data")
    texts = [d["text"] for d in docs]
    train_idx, val_idx = split_documents(len(texts), cfg.pack.validation_ratio, cfg.seed)
    train_texts, val_texts = [texts[i] for i in train_idx], [texts[i] for i in val_idx]

    # ---- tokenizer: trained on the training documents only (validation stays unseen) ----
    t = time.perf_counter()
    tk: TokenizerConfig = cfg.tokenizer
    if tk.train:
        corpus = train_texts if tk.max_docs is None else train_texts[: tk.max_docs]
        tokenizer = train_tokenizer(corpus, tk)
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

    # ---- tokenize + pack (flat arrays; one remainder dropped per split) ----
    t = time.perf_counter()
    bs = cfg.pack.block_size
    train_ids = tokenize_flat(train_texts, tokenizer, cfg.pack.batch_size, desc="tokenize train")
    val_ids = tokenize_flat(val_texts, tokenizer, cfg.pack.batch_size, desc="tokenize validation")
    train_blocks, val_blocks = pack_flat(train_ids, bs), pack_flat(val_ids, bs)
    if len(train_blocks) == 0:
        raise UserError(f"pack.block_size: the training split has {len(train_ids)} tokens, fewer than one block of "
                        f"{bs}; lower pack.block_size or add data")
    dd = datasets.DatasetDict({"train": blocks_dataset(train_blocks), "validation": blocks_dataset(val_blocks)})
    dd.save_to_disk(str(work / "dataset"))
    times["tokenize_pack"] = time.perf_counter() - t

    # ---- the cleaned documents, for inspection or other tokenizers ----
    val_set = set(val_idx.tolist())
    with gzip.open(work / "documents.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            split = "validation" if i in val_set else "train"
            f.write(json.dumps({"id": d["id"], "text": d["text"], "source": d.get("metadata", {}).get("source"),
                                "split": split}, ensure_ascii=False) + "\n")

    # ---- report ----
    times["publish"] = time.perf_counter() - t0
    report = build_report(work, cfg, final_dir, docs, tokenizer, train_idx, val_idx, train_ids, val_ids,
                          train_blocks, val_blocks, val_texts, source, times)
    return report


def build_report(work, cfg, final_dir, docs, tokenizer, train_idx, val_idx, train_ids, val_ids, train_blocks,
                 val_blocks, val_texts, tok_source, times) -> dict:
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
    for s in clean_steps:
        for k, v in s["stats"].items():
            if k.startswith("pii_"):
                pii[k.removeprefix("pii_")] = int(v)
    dedup = json.loads((work / "dedup" / "remove" / "clusters.json").read_text()) if (
        work / "dedup" / "remove" / "clusters.json").exists() else {}
    drops: dict[str, int] = {}
    for b in blocks:
        for k, v in b["dropped"].items():
            drops[k] = drops.get(k, 0) + v
    before = _lengths(work / "lengths" / "read")
    after = np.array([len(d["text"]) for d in docs])
    val_chars = sum(len(t) for t in val_texts)
    report = {
        "output_dir": final_dir,
        "documents": {"read": int(sum(s["kept"] for s in sources.values())), "kept": len(docs),
                      "train": len(train_idx), "validation": len(val_idx)},
        "sources": sources,
        "blocks": blocks,
        "drops_by_reason": drops,
        "pii": pii,
        "dedup": dedup,
        "tokens": {"train": int(len(train_ids)), "validation": int(len(val_ids)), "block_size": cfg.pack.block_size,
                   "train_blocks": int(len(train_blocks)), "validation_blocks": int(len(val_blocks)),
                   "dropped_remainder": int(len(train_ids) - train_blocks.size + len(val_ids) - val_blocks.size)},
        "tokenizer": {"source": tok_source, "type": cfg.tokenizer.type if cfg.tokenizer.train else "pretrained",
                      "vocab_size": len(tokenizer),
                      "chars_per_token": (val_chars / max(1, len(val_ids) - len(val_texts))) if len(val_texts) else 0.0},
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
    plots(work, before, after, drops)
    (work / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (work / "report.md").write_text(markdown(report), encoding="utf-8")
    return report


def _lengths(folder: Path) -> np.ndarray:
    files = sorted(folder.glob("*.npy"))
    return np.concatenate([np.load(f) for f in files]) if files else np.zeros(0, dtype=np.int64)

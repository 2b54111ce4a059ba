"""Exact and near-duplicate removal as two datatrove steps, so the work scales out like datatrove's own:

1. ``DedupKeys`` (every task, at the end of the cleaning pipeline): per document an exact key
   (xxh64 of the case-folded, whitespace-collapsed text) and a MinHash signature, saved as
   ``keys/<rank>.npz`` in the order the task writes its documents.
2. ``DedupClusters`` (one task): loads every task's keys; exact duplicates keep their first copy; the
   rest are clustered with MinHash-LSH + union-find (keep the first document of each cluster); writes
   ``remove/<rank>.npy`` (indices into that task's document file) and ``clusters.json``.

The publishing step then reads each task's documents and skips the listed indices.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import numpy as np
import xxhash
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from lmforge.config import help_field
from lmforge.pipeline.minhash import MinHasher, cluster, optimal_param


@dataclasses.dataclass
class NearDedupConfig:
    enabled: bool = help_field(True, help="MinHash-LSH near-duplicate removal (one document kept per cluster).")
    ngram: int = help_field(5, help="Shingle size in words.")
    num_perm: int = help_field(128, help="Signature length (bins for oph, hash functions for permutations).")
    method: Literal["oph", "permutations"] = help_field(
        "oph", help="oph: one hash per shingle into num_perm bins, densified (fast); permutations: classic num_perm hashes."
    )
    threshold: float = help_field(0.8, help="Target Jaccard similarity; bands/rows are derived from it when not given.")
    bands: int | None = help_field(None, help="LSH bands (with rows; bands*rows <= num_perm). Default: optimal for threshold.")
    rows: int | None = help_field(None, help="Rows per band.")
    verify: bool = help_field(True, help="Link a candidate pair only if its estimated Jaccard >= threshold (fewer false positives).")
    seed: int = help_field(1, help="Seed of the hash functions (same on every task).")
    batch_size: int = help_field(1000, help="Documents per vectorised signature batch.")

    def problems(self) -> list[str]:
        out = []
        if (self.bands is None) != (self.rows is None):
            out.append("bands / rows: give both or neither (neither: derived from threshold)")
        elif self.bands is not None and self.bands * self.rows > self.num_perm:
            out.append(f"bands*rows = {self.bands * self.rows} > num_perm = {self.num_perm}; lower them or raise num_perm")
        if not 0 < self.threshold <= 1:
            out.append("threshold: must be in (0, 1]")
        if self.ngram < 1 or self.num_perm < 1:
            out.append("ngram / num_perm: must be >= 1")
        return out

    def band_rows(self) -> tuple[int, int]:
        """Given, or optimal for the threshold. With ``verify``, false positives cost one signature
        comparison and are then dropped, so the S-curve is tilted towards recall (FP:FN weights 1:9)."""
        if self.bands is not None and self.rows is not None:
            return self.bands, self.rows
        weights = (0.1, 0.9) if self.verify else (0.5, 0.5)
        return optimal_param(self.threshold, self.num_perm, *weights)


@dataclasses.dataclass
class DedupConfig:
    exact: bool = help_field(True, help="Drop exact duplicates (case-folded, whitespace-collapsed text); keep the first.")
    near: NearDedupConfig = dataclasses.field(default_factory=NearDedupConfig)


def exact_key(text: str) -> int:
    """xxh64 of the case-folded text with whitespace runs collapsed to one space and the ends stripped
    (``" ".join(str.split())`` is ``re.sub(r"\\s+", " ", .).strip()`` for every Unicode whitespace, and faster)."""
    return xxhash.xxh64_intdigest(" ".join(text.casefold().split()))


class DedupKeys(PipelineStep):
    """Computes exact keys and MinHash signatures for the documents flowing through; saves them per task."""

    type = "🫂 - DEDUP"
    name = "🔑 Dedup keys (exact + MinHash)"

    def __init__(self, folder: str, cfg: DedupConfig):
        super().__init__()
        self.folder = folder
        self.cfg = cfg

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        near = self.cfg.near
        hasher = MinHasher(near.num_perm, near.ngram, near.seed, near.method) if near.enabled else None
        keys, sigs, ids, batch = [], [], [], []

        def flush():
            with self.track_time("batch"):
                texts = [d.text for d in batch]
                if hasher is not None:
                    sigs.append(hasher.signatures(texts))
                keys.extend(map(exact_key, texts))
                ids.extend(d.id for d in batch)
            yield from batch
            batch.clear()

        for doc in data:
            self.stat_update("total")
            batch.append(doc)
            if len(batch) >= near.batch_size:
                yield from flush()
        if batch:
            yield from flush()
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        sig = np.concatenate(sigs) if sigs else np.zeros((0, near.num_perm if near.enabled else 0), dtype=np.uint32)
        np.savez(Path(self.folder) / f"{rank:05d}.npz", exact=np.asarray(keys, dtype=np.uint64), sig=sig,
                 ids=np.asarray(ids, dtype=object))


class DedupClusters(PipelineStep):
    """One task: exact + near-duplicate decisions over every task's keys; writes the removal lists."""

    type = "🫂 - DEDUP"
    name = "🧩 Dedup clusters (exact + MinHash-LSH)"

    def __init__(self, keys_folder: str, out_folder: str, cfg: DedupConfig, n_tasks: int):
        super().__init__()
        self.keys_folder, self.out_folder, self.cfg, self.n_tasks = keys_folder, out_folder, cfg, n_tasks

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.track_time("run"):
            result = dedup_decisions(self.keys_folder, self.n_tasks, self.cfg)
        out = Path(self.out_folder)
        out.mkdir(parents=True, exist_ok=True)
        for r, idx in result.pop("remove").items():
            np.save(out / f"{r:05d}.npy", np.asarray(idx, dtype=np.int64))
        (out / "clusters.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        self.stat_update("total", value=result["documents"])
        self.stat_update("dropped_exact_duplicate", value=result["exact_duplicates"])
        self.stat_update("dropped_near_duplicate", value=result["near_duplicates"])
        self.stat_update("forwarded", value=result["kept"])
        if data:
            yield from data


def dedup_decisions(keys_folder: str, n_tasks: int, cfg: DedupConfig) -> dict:
    """Which documents to remove: {"remove": {rank: [indices]}, counts, cluster sizes, examples}.

    Of each group of duplicates the document with the smallest id stays (independent of sharding)."""
    exact, sigs, ids, rank_of, index_in_rank = [], [], [], [], []
    for r in range(n_tasks):
        f = Path(keys_folder) / f"{r:05d}.npz"
        if not f.exists():
            continue
        z = np.load(f, allow_pickle=True)
        n = len(z["exact"])
        exact.append(z["exact"])
        sigs.append(z["sig"])
        ids.extend(z["ids"].tolist())
        rank_of.append(np.full(n, r))
        index_in_rank.append(np.arange(n))
    if not exact:
        return {"remove": {}, "documents": 0, "exact_duplicates": 0, "near_duplicates": 0, "kept": 0,
                "clusters": 0, "cluster_sizes": {}, "examples": []}
    # Work in document-id order, so that "keep the first" keeps the same document whatever the number
    # of tasks (ties of equal ids: task order).
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    exact_keys = np.concatenate(exact)[order]
    rank_arr, idx_arr = np.concatenate(rank_of)[order], np.concatenate(index_in_rank)[order]
    ids = [ids[i] for i in order]
    n = len(exact_keys)
    removed_exact = np.zeros(n, dtype=bool)
    if cfg.exact:
        _, first = np.unique(exact_keys, return_index=True)
        removed_exact[:] = True
        removed_exact[first] = False
    removed_near = np.zeros(n, dtype=bool)
    sizes: dict[int, int] = {}
    examples: list[list[str]] = []
    n_clusters = 0
    bands = rows = None
    if cfg.near.enabled and n:
        survivors = np.nonzero(~removed_exact)[0]
        sig = np.concatenate(sigs)[order][survivors]
        bands, rows = cfg.near.band_rows()
        roots = cluster(sig, bands, rows, cfg.near.threshold if cfg.near.verify else None)
        is_dup = roots != np.arange(len(roots))
        removed_near[survivors[is_dup]] = True
        root_ids, counts = np.unique(roots, return_counts=True)
        multi = root_ids[counts > 1]
        n_clusters = len(multi)
        for c in counts[counts > 1]:
            sizes[int(c)] = sizes.get(int(c), 0) + 1
        for root in multi[:10]:  # a few clusters a person can look at
            members = survivors[np.nonzero(roots == root)[0]]
            examples.append([ids[i] for i in members[:5]])
    removed = removed_exact | removed_near
    remove = {r: idx_arr[(rank_arr == r) & removed].tolist() for r in np.unique(rank_arr).tolist()}
    return {
        "remove": remove, "documents": int(n), "exact_duplicates": int(removed_exact.sum()),
        "near_duplicates": int(removed_near.sum()), "kept": int(n - removed.sum()), "clusters": int(n_clusters),
        "bands": bands, "rows": rows, "cluster_sizes": {str(k): v for k, v in sorted(sizes.items())},
        "examples": examples,
    }

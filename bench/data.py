"""Benchmark of the data stage's two hot paths, each against the baseline it replaces, in one process.

    .venv/bin/python bench/data.py [--mb 22] [--pairs 700] [--threshold 0.8]
    .venv/bin/python bench/data.py --corpus docs --threshold 0.7 --near-only --repeat 3 --baseline-rev abf507b

1. MinHash near-dedup: ours (vectorised numpy) vs datatrove's MinHash stages vs datasketch, on a corpus
   of >= 20 MB built from this machine's Python standard-library source (one document per file, long
   files cut at 32 KB), plus copies of some documents with words replaced so that their 5-gram Jaccard
   similarity to the original is spread over 0.3 .. 1.0. All three use 128 permutations, 5-word
   shingles and the same LSH bands x rows. Speed: signature computation (docs/s, MB/s) and the whole
   dedup (signatures + LSH + clusters). Quality, pooled: every pair that any method puts in one cluster,
   plus every planted pair, is labelled by its exact Jaccard (>= threshold = a true duplicate pair);
   precision, recall and F1 per method over those labels.
2. Tokenize + pack: ours (Rust batch encode -> one flat numpy array -> reshape) vs transformers'
   ``run_clm`` recipe (``datasets.map(tokenize)`` then ``datasets.map(group_texts)``), same tokenizer.

3. Near-duplicate speed (issue 14), the whole dedup per core and with 2 tasks: rensa (Rust MinHash, its
   ``RMinHash`` batch sketching + ``RMinHashDeduplicator`` LSH, 5-gram shingles built in Python) and
   datasketch against lmforge's data-stage blocks (``DedupKeys`` on every task's shard in its own
   process, then ``DedupClusters``' ``dedup_decisions``), with ``--corpus docs``: a held-out planted set of
   real documentation text (/usr/share/doc, site-packages READMEs). ``--baseline-rev REV`` adds the
   blocks as they were at git revision REV, run in the same process. ``--repeat N``: runs interleaved,
   median times.

Targets (issue 5): MinHash >= 5x datatrove at F1 >= 0.95; tokenize+pack >= 2x run_clm.
Target (issue 14): lmforge's whole dedup >= rensa's MB/s per core at F1 >= 0.96, scaling with tasks.
datatrove's English word tokenizer needs spaCy, which is not installed here, so datatrove runs with our
regex word tokenizer (faster than spaCy's; the ratio against datatrove+spaCy would be larger).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import sys
import sysconfig
import tempfile
import time
from itertools import chain
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lmforge.pipeline.dedup import NearDedupConfig  # noqa: E402
from lmforge.pipeline.minhash import MinHasher, UnionFind, cluster, jaccard, words  # noqa: E402

NGRAM, NUM_PERM = 5, 128


# --------------------------------------------------------------------------------------------
# corpus


PIECE = 32_000  # characters per document cut from a long file


def pieces(text: str):
    """(index, piece) of a file's text cut into PIECE-character documents, those of >= 50 words."""
    for i in range(0, len(text), PIECE):
        piece = text[i : i + PIECE]
        if len(piece.split()) >= 50:
            yield i // PIECE, piece


def stdlib_named_documents(max_mb: float) -> list[tuple[str, str]]:
    """(name, text) documents cut from the standard library's .py files, in path order, up to ``max_mb``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in glob.glob(str(root / "**" / "*.py"), recursive=True) if "site-packages" not in p)
    docs, total = [], 0
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for k, piece in pieces(text):
            docs.append((f"{Path(f).relative_to(root)}#{k}", piece))
            total += len(piece.encode())
        if total > max_mb * 1e6:
            break
    return docs


def stdlib_documents(max_mb: float) -> list[str]:
    return [text for _, text in stdlib_named_documents(max_mb)]


def doc_documents(max_mb: float, seed: int = 0) -> list[str]:
    """Real documentation text: /usr/share/doc (READMEs, NEWS, changelogs, manuals; licence files left
    out) and the site-packages' README/METADATA files, byte-identical files once, in a seeded order."""
    import gzip
    import hashlib
    import html

    sp = Path(sysconfig.get_paths()["purelib"])
    files = sorted(p for p in glob.glob("/usr/share/doc/**/*", recursive=True) if os.path.isfile(p) and not os.path.islink(p)
                   and "copyright" not in os.path.basename(p).lower())
    files += sorted(glob.glob(str(sp / "*.dist-info" / "METADATA")) + glob.glob(str(sp / "**" / "*.md"), recursive=True)
                    + glob.glob(str(sp / "**" / "*.rst"), recursive=True))
    random.Random(seed).shuffle(files)
    tag = re.compile(r"<[^>]+>")
    docs, total, seen = [], 0, set()
    for f in files:
        if f.endswith((".png", ".gif", ".jpg", ".svg", ".css", ".js", ".pdf", ".ps.gz", ".tar.gz")):
            continue
        try:
            raw = Path(f).read_bytes()
            raw = gzip.decompress(raw) if f.endswith(".gz") else raw
            text = raw.decode("utf-8")
        except (UnicodeDecodeError, OSError, EOFError, gzip.BadGzipFile):
            continue
        digest = hashlib.md5(raw).digest()
        if digest in seen:
            continue
        seen.add(digest)
        if f.endswith((".html", ".htm")):
            text = html.unescape(tag.sub(" ", text))
        for _, piece in pieces(text):
            docs.append(piece)
            total += len(piece.encode())
        if total > max_mb * 1e6:
            break
    return docs


def near_copy(text: str, target: float, rng: random.Random) -> str:
    """Replace a fraction q of the words so that ~ (1-q)^5 of the shingles survive: J = s / (2 - s)."""
    shared = 2 * target / (1 + target)
    q = 1 - shared ** (1 / NGRAM)
    return re.sub(r"\w+", lambda m: f"w{rng.randrange(10**9)}" if rng.random() < q else m.group(0), text)


def build_corpus(mb: float, n_pairs: int, seed: int = 0, corpus: str = "stdlib", threshold: float = 0.8):
    rng = random.Random(seed)
    docs = stdlib_documents(mb) if corpus == "stdlib" else doc_documents(mb, seed)
    levels = [0.3, 0.5, 0.6, 0.7, 0.9, 0.95, 0.98, 1.0]  # none within 0.1 of the 0.8 threshold
    if threshold != 0.8:  # the same spread, none within 0.1 of the threshold
        levels = [x for x in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0) if abs(x - threshold) >= 0.1 - 1e-9]
    sources = rng.sample(range(len(docs)), n_pairs)
    planted = []
    for k, src in enumerate(sources):
        planted.append((src, len(docs)))
        docs.append(near_copy(docs[src], levels[k % len(levels)], rng))
    order = list(range(len(docs)))  # copies interleaved with the originals, as in a real crawl
    rng.shuffle(order)
    pos = {old: new for new, old in enumerate(order)}
    return [docs[i] for i in order], [(pos[a], pos[b]) for a, b in planted]


# --------------------------------------------------------------------------------------------
# the three MinHash implementations: (signature seconds, total seconds, clusters as root per doc)


def run_ours(docs, bands, rows, threshold, method="oph"):
    t = time.perf_counter()
    sig = MinHasher(NUM_PERM, NGRAM, seed=1, method=method).signatures_batched(docs, batch_size=1000)
    t_sig = time.perf_counter() - t
    roots = cluster(sig, bands, rows, threshold=threshold)
    return t_sig, time.perf_counter() - t, roots


def run_ours_no_verify(docs, bands, rows, threshold):
    sig = MinHasher(NUM_PERM, NGRAM, seed=1).signatures_batched(docs, batch_size=1000)
    return cluster(sig, bands, rows, threshold=None)


def drain(result) -> None:
    """datatrove's dedup steps are generators or plain functions depending on the step."""
    if result is not None:
        for _ in result:
            pass


def run_datatrove(docs, bands, rows, tmp):
    import struct

    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupSignature,
    )
    from loguru import logger

    from lmforge.pipeline.clean import RegexWordTokenizer

    logger.remove()
    cfg = MinhashConfig(n_grams=NGRAM, num_buckets=bands, hashes_per_bucket=rows, seed=1)
    t = time.perf_counter()
    sig_step = MinhashDedupSignature(f"{tmp}/sigs", config=cfg, language=RegexWordTokenizer())
    drain(sig_step.run((Document(text=d, id=str(i)) for i, d in enumerate(docs)), rank=0, world_size=1))
    t_sig = time.perf_counter() - t
    for b in range(bands):
        drain(MinhashDedupBuckets(f"{tmp}/sigs", f"{tmp}/buckets", config=cfg).run(None, rank=b, world_size=bands))
    drain(MinhashDedupCluster(f"{tmp}/buckets", f"{tmp}/clusters", config=cfg, save_cluster_id=True).run(None, 0, 1))
    total = time.perf_counter() - t
    roots = np.arange(len(docs))
    cluster_file = Path(f"{tmp}/clusters/000000.clusters")
    if cluster_file.exists():
        raw = cluster_file.read_bytes()
        first: dict[int, int] = {}
        for doc, cid in struct.iter_unpack("<II", raw):
            first.setdefault(cid, doc)
            roots[doc] = first[cid]
    return t_sig, total, roots


def run_datasketch(docs, bands, rows):
    import re

    from datasketch import MinHash, MinHashLSH

    word = re.compile(r"\w+")
    t = time.perf_counter()
    sigs = []
    for d in docs:
        w = word.findall(d.lower())
        grams = {" ".join(w[i : i + NGRAM]).encode() for i in range(max(1, len(w) - NGRAM + 1))}
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch(list(grams))
        sigs.append(m)
    t_sig = time.perf_counter() - t
    lsh = MinHashLSH(num_perm=NUM_PERM, params=(bands, rows))
    uf = UnionFind(len(docs))
    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            uf.union(i, int(j))
        lsh.insert(str(i), m)
    return t_sig, time.perf_counter() - t, uf.roots()


def rensa_shingles(doc: str) -> list[str]:
    """5-word shingles as a rensa user builds them in Python (the words of lmforge's ``words``, so that
    every method sees the same sets as the exact-Jaccard labels)."""
    w = words(doc)
    return [" ".join(g) for g in zip(*(w[k:] for k in range(NGRAM)))] or [" ".join(w)]


def run_rensa(docs, threshold, num_bands=None):
    """rensa 0.5 as its README shows: ``RMinHash`` sketches from token lists in one batch call, then the
    ``RMinHashDeduplicator`` (LSH candidates checked against the threshold). Clusters: every document
    joined to the kept documents ``get_duplicate_sets`` names."""
    from rensa import RMinHash, RMinHashDeduplicator

    t = time.perf_counter()
    sketches = RMinHash.from_token_sets([rensa_shingles(d) for d in docs], num_perm=NUM_PERM, seed=1)
    t_sig = time.perf_counter() - t
    dedup = RMinHashDeduplicator(threshold=threshold, num_perm=NUM_PERM, use_lsh=True, num_bands=num_bands, seed=1)
    dedup.add_pairs((str(i), m) for i, m in enumerate(sketches))
    uf = UnionFind(len(docs))
    for i, keys in enumerate(dedup.get_duplicate_sets(sketches)):
        for k in keys:
            uf.union(i, int(k))
    return t_sig, time.perf_counter() - t, uf.roots()


# lmforge's data-stage blocks, as the stage runs them: DedupKeys on each task's shard (one process per
# task), then dedup_decisions over all tasks' keys. Workers are forked once, so they see these globals.
_BLOCK_DOCS: list[str] = []
_DEDUP_IMPLS: dict[str, object] = {}


def load_revision(rev: str) -> dict:
    """minhash.py and dedup.py as they are at git revision ``rev``, as modules (dedup bound to that minhash)."""
    import subprocess
    import types

    mods = {}
    for name in ("minhash", "dedup"):
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/lmforge/pipeline/{name}.py"],
                             capture_output=True, text=True, check=True).stdout
        mod = types.ModuleType(f"lmforge_rev_{name}")
        sys.modules[mod.__name__] = mod  # dataclasses look their module up
        saved = sys.modules["lmforge.pipeline.minhash"]
        if name == "dedup":
            sys.modules["lmforge.pipeline.minhash"] = mods["minhash"]
        try:
            exec(compile(src, f"{rev}:src/lmforge/pipeline/{name}.py", "exec"), mod.__dict__)
        finally:
            sys.modules["lmforge.pipeline.minhash"] = saved
        mods[name] = mod
    return mods


def _keys_task(job) -> float:
    """One task's DedupKeys; returns its CPU seconds."""
    impl, rank, lo, hi, folder = job
    from datatrove.data import Document

    cpu = time.process_time()
    dedup = _DEDUP_IMPLS[impl]
    step = dedup.DedupKeys(folder, dedup.DedupConfig(near=dedup.NearDedupConfig(**_BLOCK_NEAR)))
    for _ in step.run((Document(text=_BLOCK_DOCS[i], id=f"{i:08d}") for i in range(lo, hi)), rank=rank, world_size=1):
        pass
    return time.process_time() - cpu


_BLOCK_NEAR: dict = {}


def run_blocks(impl: str, tasks: int, pool, tmp: str, n: int | None = None):
    """DedupKeys over the first ``n`` documents in ``tasks`` contiguous shards, then dedup_decisions:
    (keys seconds, whole seconds, frozenset of removed document indices, signatures in document order,
    CPU seconds of the keys summed over tasks, CPU seconds of the slowest task + of the decisions)."""
    import shutil

    dedup = _DEDUP_IMPLS[impl]
    n = len(_BLOCK_DOCS) if n is None else n
    folder = f"{tmp}/keys"
    shutil.rmtree(folder, ignore_errors=True)
    cuts = np.linspace(0, n, tasks + 1).astype(int)
    jobs = [(impl, r, int(cuts[r]), int(cuts[r + 1]), folder) for r in range(tasks)]
    t = time.perf_counter()
    cpu = [_keys_task(jobs[0])] if tasks == 1 else pool.map(_keys_task, jobs)
    t_keys = time.perf_counter() - t
    cpu_decisions = time.process_time()
    result = dedup.dedup_decisions(folder, tasks, dedup.DedupConfig(near=dedup.NearDedupConfig(**_BLOCK_NEAR)))
    total = time.perf_counter() - t
    cpu_decisions = time.process_time() - cpu_decisions
    removed = frozenset(int(cuts[r]) + i for r, idx in result["remove"].items() for i in idx)
    sig = np.concatenate([np.load(f"{folder}/{r:05d}.npz", allow_pickle=True)["sig"] for r in range(tasks)])
    return t_keys, total, removed, sig, sum(cpu), max(cpu) + cpu_decisions


def near_speed(args, docs, planted, mb, bands, rows) -> dict:
    """Section 3: rensa, datasketch, lmforge's blocks (after, and before at --baseline-rev), 1 and 2 tasks."""
    import multiprocessing
    import statistics

    global _BLOCK_DOCS, _BLOCK_NEAR
    _BLOCK_DOCS = docs
    _BLOCK_NEAR = {"threshold": args.threshold, "num_perm": NUM_PERM, "ngram": NGRAM, "bands": bands, "rows": rows}
    import lmforge.pipeline.dedup as dedup_now

    _DEDUP_IMPLS["after"] = dedup_now
    if args.baseline_rev:
        _DEDUP_IMPLS["before"] = load_revision(args.baseline_rev)["dedup"]
    rensa_bands = [None, 32]  # rensa's own choice, and more bands (more recall) for its verified LSH
    runs: dict[str, list] = {}
    pool = multiprocessing.get_context("fork").Pool(2)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # warm-up (imports, page cache, workers)
            for impl in _DEDUP_IMPLS:
                run_blocks(impl, 2, pool, tmp, n=min(200, len(docs)))
            run_rensa(docs[:200], args.threshold)
            for rep in range(args.repeat):
                order = [("rensa", nb) for nb in rensa_bands] + [(impl, k) for impl in _DEDUP_IMPLS for k in (1, 2)]
                order = order[rep % len(order):] + order[: rep % len(order)]  # rotate: no method always first
                for name, k in order:
                    if name == "rensa":
                        key = f"rensa (RMinHash, {'its default' if k is None else k} bands)"
                        runs.setdefault(key, []).append(run_rensa(docs, args.threshold, k))
                    else:
                        key = f"lmforge blocks {name}, {k} task{'s' if k > 1 else ''}"
                        runs.setdefault(key, []).append(run_blocks(name, k, pool, tmp))
            if not args.skip_datasketch:
                runs["datasketch (MinHash + MinHashLSH)"] = [run_datasketch(docs, bands, rows)]
    finally:
        pool.close()
        pool.join()

    # decisions must not depend on the task count; signatures must be the same on every task layout
    for impl in _DEDUP_IMPLS:
        one, two = runs[f"lmforge blocks {impl}, 1 task"], runs[f"lmforge blocks {impl}, 2 tasks"]
        assert all(r[2] == one[0][2] for r in one + two), f"{impl}: decisions depend on the task count"
        assert all((r[3] == one[0][3]).all() for r in one + two), f"{impl}: signatures depend on the task count"
    roots = {}
    for key, rs in runs.items():
        if key.startswith("lmforge"):
            roots[key] = cluster(rs[0][3], bands, rows, threshold=args.threshold)  # DedupClusters' clusters
        else:
            roots[key] = rs[0][2]
    pred = {k: cluster_pairs(r) for k, r in roots.items()}
    universe = set().union(*pred.values()) | {(min(a, b), max(a, b)) for a, b in planted}
    exact = {p: jaccard(docs[p[0]], docs[p[1]], NGRAM) for p in universe}
    truth = {p for p, j in exact.items() if j >= args.threshold}
    print(f"near-duplicate speed: {len(universe)} candidate pairs, {len(truth)} with Jaccard >= {args.threshold}; "
          f"{args.repeat} interleaved runs, median\n")
    print("| whole near-dedup (shingling + signatures + LSH + clusters) | signatures MB/s | whole dedup MB/s | "
          "whole dedup s | keys MB per CPU-s | whole MB/s on own cores (CPU time) | precision | recall | F1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    out = {}
    for key, rs in runs.items():
        t_sig = statistics.median(r[0] for r in rs)
        total = statistics.median(r[1] for r in rs)
        p, r, f1 = prf(pred[key], truth)
        blocks = key.startswith("lmforge")
        cpu = f"{mb / statistics.median(x[4] for x in rs):.1f}" if blocks else ""
        own = f"{mb / statistics.median(x[5] for x in rs):.1f}" if blocks else ""
        out[key] = {"signatures_mb_per_s": mb / t_sig, "whole_mb_per_s": mb / total, "whole_s": total,
                    "times_s": [x[1] for x in rs], "keys_mb_per_cpu_s": cpu, "own_cores_mb_per_s": own,
                    "precision": p, "recall": r, "f1": f1}
        print(f"| {key} | {mb / t_sig:.1f} | {mb / total:.1f} | {total:.2f} | {cpu} | {own} | {p:.3f} | {r:.3f} | {f1:.3f} |")
    best_rensa = max((v["whole_mb_per_s"] for k, v in out.items() if k.startswith("rensa")), default=0.0)
    ours = out["lmforge blocks after, 1 task"]
    ok = ours["whole_mb_per_s"] >= best_rensa and ours["f1"] >= 0.96
    scale = out["lmforge blocks after, 2 tasks"]["whole_mb_per_s"] / ours["whole_mb_per_s"]
    scale_cpu = float(out["lmforge blocks after, 2 tasks"]["own_cores_mb_per_s"]) / float(ours["own_cores_mb_per_s"])
    print(f"\ntarget: lmforge blocks, 1 task >= fastest rensa ({best_rensa:.1f} MB/s) at F1 >= 0.96: "
          f"{'PASS' if ok else 'FAIL'} ({ours['whole_mb_per_s']:.1f} MB/s, F1 {ours['f1']:.3f}); "
          f"2 tasks / 1 task: {scale:.2f}x wall clock, {scale_cpu:.2f}x on own cores (CPU time); "
          f"decisions identical for 1 and 2 tasks: PASS")
    return out


# --------------------------------------------------------------------------------------------
# evaluation


def cluster_pairs(roots: np.ndarray, max_cluster: int = 200) -> set[tuple[int, int]]:
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(roots.tolist()):
        groups.setdefault(r, []).append(i)
    pairs = set()
    for members in groups.values():
        if 1 < len(members) <= max_cluster:
            pairs.update((a, b) for k, a in enumerate(members) for b in members[k + 1 :])
        elif len(members) > max_cluster:  # a giant cluster: count it as a star around its root
            pairs.update((min(members[0], b), max(members[0], b)) for b in members[1:])
    return pairs


def prf(pred: set, truth: set) -> tuple[float, float, float]:
    tp = len(pred & truth)
    p = tp / len(pred) if pred else 1.0
    r = tp / len(truth) if truth else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


# --------------------------------------------------------------------------------------------
# tokenize + pack


def bench_pack(texts: list[str], block_size: int = 512):
    import datasets
    from transformers import AutoTokenizer

    from lmforge.datasets.lm import pack_flat
    from lmforge.pipeline.publish import tokenize_flat

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(str(ROOT / "tests" / "fixtures" / "tokenizer"))
    mb = sum(len(t.encode()) for t in texts) / 1e6

    t = time.perf_counter()
    blocks = pack_flat(tokenize_flat(texts, tok, batch_size=1000), block_size)
    ours = time.perf_counter() - t

    # transformers examples/pytorch/language-modeling/run_clm.py, as written there
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        raw = datasets.Dataset.from_dict({"text": texts})
        tokenized = raw.map(lambda ex: tok(ex["text"]), batched=True, remove_columns=["text"],
                            cache_file_name=f"{cache}/tok.arrow")

        def group_texts(examples):
            concatenated = {k: list(chain(*examples[k])) for k in examples}
            total = (len(concatenated["input_ids"]) // block_size) * block_size
            return {k: [v[i : i + block_size] for i in range(0, total, block_size)] for k, v in concatenated.items()}

        grouped = tokenized.map(group_texts, batched=True, cache_file_name=f"{cache}/group.arrow")
        n_clm = len(grouped)
    clm = time.perf_counter() - t
    return {"mb": mb, "ours_s": ours, "clm_s": clm, "blocks_ours": len(blocks), "blocks_clm": n_clm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=22.0, help="background corpus size (MB)")
    ap.add_argument("--pairs", type=int, default=800, help="planted near-duplicate pairs")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--skip-datasketch", action="store_true")
    ap.add_argument("--corpus", choices=["stdlib", "docs"], default="stdlib",
                    help="stdlib: Python standard-library source; docs: real documentation text (held out)")
    ap.add_argument("--near-only", action="store_true", help="only section 3 (near-duplicate speed)")
    ap.add_argument("--no-near-speed", action="store_true", help="skip section 3")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs per method in section 3 (median)")
    ap.add_argument("--baseline-rev", default=None, help="also time the dedup blocks as at this git revision")
    args = ap.parse_args()

    docs, planted = build_corpus(args.mb, args.pairs, corpus=args.corpus, threshold=args.threshold)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    source = f"Python {sys.version.split()[0]} stdlib source" if args.corpus == "stdlib" else "documentation text"
    print(f"corpus: {len(docs)} documents, {mb:.1f} MB ({source} + {len(planted)} planted copies)")
    bands, rows = NearDedupConfig(threshold=args.threshold, num_perm=NUM_PERM, ngram=NGRAM).band_rows()
    print(f"LSH: {bands} bands x {rows} rows (threshold {args.threshold}); all methods use these "
          f"(rensa: bands must divide {NUM_PERM})\n")
    near = {} if args.no_near_speed else near_speed(args, docs, planted, mb, bands, rows)
    if args.near_only:
        out = ROOT / "outputs" / "bench"
        out.mkdir(parents=True, exist_ok=True)
        (out / "data_near.json").write_text(json.dumps({"corpus": args.corpus, "corpus_mb": mb, "docs": len(docs),
                                                        "threshold": args.threshold, "bands": bands, "rows": rows,
                                                        "near_speed": near}, indent=2))
        print(f"results: {out / 'data_near.json'}")
        return

    # warm-up on a slice (imports, page cache, allocator) so that order does not favour anyone
    run_ours(docs[:100], bands, rows, args.threshold)
    run_ours(docs[:100], bands, rows, args.threshold, method="permutations")
    with tempfile.TemporaryDirectory() as tmp:
        run_datatrove(docs[:100], bands, rows, tmp)
    if not args.skip_datasketch:
        run_datasketch(docs[:100], bands, rows)

    results = {}
    results["ours"] = run_ours(docs, bands, rows, args.threshold)
    results["ours (permutations)"] = run_ours(docs, bands, rows, args.threshold, method="permutations")
    with tempfile.TemporaryDirectory() as tmp:
        results["datatrove"] = run_datatrove(docs, bands, rows, tmp)
    if not args.skip_datasketch:
        results["datasketch"] = run_datasketch(docs, bands, rows)
    no_verify = run_ours_no_verify(docs, bands, rows, args.threshold)

    # pooled ground truth: exact Jaccard of every pair any method proposes, and of every planted pair
    pred = {name: cluster_pairs(r[2]) for name, r in results.items()}
    pred["ours (no verify)"] = cluster_pairs(no_verify)
    universe = set().union(*pred.values()) | {(min(a, b), max(a, b)) for a, b in planted}
    exact = {p: jaccard(docs[p[0]], docs[p[1]], NGRAM) for p in universe}
    truth = {p for p, j in exact.items() if j >= args.threshold}
    planted_j = [exact[(min(a, b), max(a, b))] for a, b in planted]
    print(f"pairs: {len(universe)} candidates, {len(truth)} with Jaccard >= {args.threshold}; planted Jaccard "
          f"quantiles {np.quantile(planted_j, [0, .25, .5, .75, 1]).round(2).tolist()}\n")

    dt_sig = results["datatrove"][0]
    print("| MinHash | signatures docs/s | signatures MB/s | whole dedup s | precision | recall | F1 | speed vs datatrove |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows_out = {}
    for name in [*results, "ours (no verify)"]:
        p, r, f1 = prf(pred[name], truth)
        if name in results:
            t_sig, total, _ = results[name]
            line = (f"| {name} | {len(docs) / t_sig:,.0f} | {mb / t_sig:.2f} | {total:.1f} | {p:.3f} | {r:.3f} | "
                    f"{f1:.3f} | {dt_sig / t_sig:.1f}x |")
            rows_out[name] = {"docs_per_s": len(docs) / t_sig, "mb_per_s": mb / t_sig, "total_s": total,
                              "precision": p, "recall": r, "f1": f1, "speedup_vs_datatrove": dt_sig / t_sig}
        else:
            line = f"| {name} | (same signatures) | | | {p:.3f} | {r:.3f} | {f1:.3f} | |"
            rows_out[name] = {"precision": p, "recall": r, "f1": f1}
        print(line)

    pk = bench_pack(docs)
    print("\n| tokenize + pack (512-token blocks) | seconds | MB/s | speed vs run_clm |")
    print("|---|---:|---:|---:|")
    print(f"| ours (batch encode, flat numpy pack) | {pk['ours_s']:.1f} | {pk['mb'] / pk['ours_s']:.2f} | "
          f"{pk['clm_s'] / pk['ours_s']:.1f}x |")
    print(f"| run_clm (datasets.map tokenize + group_texts) | {pk['clm_s']:.1f} | {pk['mb'] / pk['clm_s']:.2f} | 1.0x |")
    print(f"(blocks: ours {pk['blocks_ours']} incl. EOS between documents, run_clm {pk['blocks_clm']} without)")

    ok_speed = rows_out["ours"]["speedup_vs_datatrove"] >= 5
    ok_f1 = rows_out["ours"]["f1"] >= 0.95
    ok_pack = pk["clm_s"] / pk["ours_s"] >= 2
    print(f"\ntargets: MinHash >= 5x datatrove: {'PASS' if ok_speed else 'FAIL'}; F1 >= 0.95: "
          f"{'PASS' if ok_f1 else 'FAIL'}; tokenize+pack >= 2x run_clm: {'PASS' if ok_pack else 'FAIL'}")
    out = ROOT / "outputs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps({"corpus_mb": mb, "docs": len(docs), "bands": bands, "rows": rows,
                                               "minhash": rows_out, "pack": pk, "near_speed": near}, indent=2))
    print(f"results: {out / 'data.json'}")


if __name__ == "__main__":
    main()

"""The data stage's publishing block streams: external sort by id, split per document, packing to Arrow files.

No memory is measured here (bench/data_scale.py does that); these tests check that each streaming piece
gives exactly what the in-memory version gave, and that ``publish`` takes a one-shot iterator of documents.
"""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest
from conftest import CORPUS, ROOT, TOKENIZER

from lmforge.config import load
from lmforge.datasets.lm import blocks_dataset, pack_flat
from lmforge.pipeline.publish import (
    BlockWriter,
    DocumentSplit,
    SortedRuns,
    batches,
    publish,
    split_documents,
    tokenize_flat,
    validation_score,
    write_dataset_dict,
)
from lmforge.stages import data as data_stage

TEXTS = [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines()]


def _docs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    ids = [f"src/{rng.randrange(10**6):07d}" for _ in range(n)]
    ids[5] = ids[3]  # equal ids keep their input order (a stable sort)
    return [{"id": i, "text": f"{k}:" + "x" * rng.randrange(0, 300), "metadata": {"source": "src"}}
            for k, i in enumerate(ids)]


# ---------------------------------------------------------------------------------------------
# external sort


def test_sorted_runs_is_a_stable_sort_with_bounded_buffer(tmp_path):
    docs = _docs(500)
    seen = []
    # a generator: consumed once, never materialised by the sorter
    runs = SortedRuns((d for d in docs), tmp_path / "runs", buffer_chars=2000, fan_in=4, on_doc=seen.append)
    expected = [{"id": d["id"], "text": d["text"], "source": "src"} for d in sorted(docs, key=lambda d: d["id"])]
    assert list(runs) == expected
    assert list(runs) == expected  # iterable again: the runs stay on disk until removed
    assert runs.n_docs == 500 and [d["id"] for d in seen] == [d["id"] for d in docs]
    assert runs.max_buffered_chars < 2000 + 310  # the buffer never held more than its bound plus one document
    assert 1 < len(runs.runs) <= 4  # spilled in many runs, merged down to at most fan_in files
    runs.remove()
    assert not (tmp_path / "runs").exists()


def test_sorted_runs_one_buffer_and_empty(tmp_path):
    docs = _docs(50)
    runs = SortedRuns(docs, tmp_path / "a", buffer_chars=10**9)
    assert len(runs.runs) == 1 and [d["id"] for d in runs] == sorted(d["id"] for d in docs)
    empty = SortedRuns(iter([]), tmp_path / "b", buffer_chars=100)
    assert empty.n_docs == 0 and list(empty) == []


def test_batches_bound_documents_and_characters():
    items = [{"text": "a" * n} for n in (5, 5, 5, 20, 1, 1, 1, 1)]
    out = list(batches(items, batch_size=3, max_chars=12))
    assert [len(b) for b in out] == [2, 1, 1, 3, 1]  # 5+5 | 5 (20 would exceed) | 20 (alone) | 1+1+1 | 1
    assert [x for b in out for x in b] == items


# ---------------------------------------------------------------------------------------------
# split per document


def test_split_is_per_document_and_independent_of_the_rest_of_the_corpus():
    ids = [f"doc/{i}" for i in range(5000)]
    train, val = split_documents(ids, 0.1, seed=3)
    assert not set(train) & set(val) and sorted([*train, *val]) == list(range(5000))
    assert 0.08 < len(val) / 5000 < 0.12
    assert split_documents(ids, 0.1, seed=3)[1].tolist() == val.tolist()  # deterministic
    assert split_documents(ids, 0.1, seed=4)[1].tolist() != val.tolist()  # seeded
    # a document's side depends on its id only: shuffling or dropping other documents does not move it
    val_ids = {ids[i] for i in val}
    rng = random.Random(0)
    subset = rng.sample(ids, 1000)
    _, v2 = split_documents(subset, 0.1, seed=3)
    assert {subset[i] for i in v2} == val_ids & set(subset)
    assert all((validation_score(i, 3) < 0.1) == (i in val_ids) for i in ids)


def test_split_guarantees_one_document_on_each_side():
    for seed in range(20):
        ids = [f"d{i}" for i in range(5)]
        train, val = split_documents(ids, 0.01, seed=seed)
        assert len(val) >= 1 and len(train) >= 1  # at least one validation document
        train, val = split_documents(ids[:3], 0.99, seed=seed)
        assert len(val) >= 1 and len(train) >= 1  # and at least one training document
    assert len(split_documents([f"d{i}" for i in range(5)], 0.0, seed=0)[1]) == 0
    assert len(split_documents(["only"], 0.5, seed=0)[1]) == 0
    s = DocumentSplit(0.01, seed=0)
    for i in ("a", "b"):
        s.observe(i)
    assert sum(s.is_validation(i) for i in ("a", "b")) == 1


# ---------------------------------------------------------------------------------------------
# packing to Arrow, incrementally


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


@pytest.mark.parametrize("block_size,rows_per_file", [(7, 50), (128, None)])
def test_block_writer_equals_pack_flat_of_the_whole_stream(tmp_path, tok, block_size, rows_per_file):
    import datasets

    flat = tokenize_flat(TEXTS[:120], tok)
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.integers(0, len(flat), 40))
    train = BlockWriter(tmp_path / "dd" / "train", block_size, rows_per_file=rows_per_file)
    for part in np.split(flat, cuts):  # uneven pieces, some empty
        train.add(part)
    val = BlockWriter(tmp_path / "dd" / "validation", block_size)  # an empty split stays loadable
    write_dataset_dict(tmp_path / "dd", {"train": train, "validation": val})
    dd = datasets.load_from_disk(str(tmp_path / "dd"))
    assert isinstance(dd, datasets.DatasetDict) and set(dd) == {"train", "validation"}
    expected = pack_flat(flat, block_size)
    assert np.array(dd["train"]["input_ids"]).tolist() == expected.tolist()
    assert (train.rows, train.tokens, train.remainder) == (len(expected), len(flat), len(flat) - expected.size)
    assert len(dd["validation"]) == 0 and dd["validation"].column_names == ["input_ids"]
    assert dd["train"].features == blocks_dataset(expected).features
    n_files = len(list((tmp_path / "dd" / "train").glob("data-*.arrow")))
    assert n_files == -(-len(expected) // (rows_per_file or len(expected)))


# ---------------------------------------------------------------------------------------------
# publish on a one-shot iterator


def _publish(tmp_path, name: str, docs, *overrides: str):
    work = tmp_path / name
    work.mkdir()
    cfg = load(data_stage.Config, str(ROOT / "recipes" / "tiny" / "data.yaml"),
               [f"output_dir={work}", "tokenizer.train=false", f"tokenizer.path={TOKENIZER}",
                "pack.block_size=64", "pack.validation_ratio=0.1", "pack.batch_size=16", *overrides])
    report = publish(work, cfg, 0, str(work), docs=docs)
    return work, report


def test_publish_streams_a_one_shot_iterator_and_ignores_input_order(tmp_path, tok):
    import datasets

    docs = [{"id": f"s/{i:04d}", "text": t, "metadata": {"source": "s"}} for i, t in enumerate(TEXTS[:200])]
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)  # another sharding gives another reading order
    a, ra = _publish(tmp_path, "a", iter(docs))
    b, rb = _publish(tmp_path, "b", (d for d in shuffled), "pack.sort_buffer_mb=0.005")  # many sorted runs
    da, db = datasets.load_from_disk(str(a / "dataset")), datasets.load_from_disk(str(b / "dataset"))
    for split in ("train", "validation"):
        assert da[split]["input_ids"] == db[split]["input_ids"]
        assert {len(r) for r in da[split]["input_ids"]} <= {64}
    with gzip.open(a / "documents.jsonl.gz", "rt") as fa, gzip.open(b / "documents.jsonl.gz", "rt") as fb:
        rows = [json.loads(x) for x in fa]
        assert rows == [json.loads(x) for x in fb]
    assert [r["id"] for r in rows] == sorted(d["id"] for d in docs)  # in id order
    assert ra["tokens"] == rb["tokens"] and ra["documents"] == rb["documents"]
    assert not (b / "publish" / "runs").exists()  # the spilled runs are removed
    # the blocks are each split's documents, in id order, joined by EOS: what the in-memory packing gave
    for split in ("train", "validation"):
        texts = [r["text"] for r in rows if r["split"] == split]
        expected = pack_flat(tokenize_flat(texts, tok), 64)
        assert np.array(da[split]["input_ids"]).reshape(-1, 64).tolist() == expected.tolist()
    val_ids = {r["id"] for r in rows if r["split"] == "validation"}
    assert val_ids == {d["id"] for d in docs if validation_score(d["id"], 42) < 0.1}
    assert ra["documents"] == {"read": 0, "kept": 200, "train": 200 - len(val_ids), "validation": len(val_ids)}

"""Batch sources and padding helpers: length grouping, token-budget batches, pad-to-multiple-of-8 collate,
and the deterministic per-rank sources the loop reads (resume asks for micro-batch k directly)."""

from __future__ import annotations

import numpy as np
from datasets import Dataset

from lmforge.datasets.batching import (
    LengthGroupedBatches,
    PadCollator,
    RankBatches,
    length_grouped_indices,
    padding_fraction,
    round_up,
    token_budget_batches,
)

LENGTHS = list(np.random.default_rng(0).integers(3, 300, size=500))


def test_round_up():
    assert [round_up(n, 8) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 24]
    assert round_up(13, 1) == 13


def test_length_grouped_is_a_permutation_with_less_padding_and_longest_first():
    idx = length_grouped_indices(LENGTHS, batch_size=16, seed=1)
    assert sorted(idx) == list(range(len(LENGTHS)))
    assert LENGTHS[idx[0]] == max(LENGTHS)
    grouped = [idx[i : i + 16] for i in range(0, len(idx), 16)]
    rand = np.random.default_rng(1).permutation(len(LENGTHS)).tolist()
    random_batches = [rand[i : i + 16] for i in range(0, len(rand), 16)]
    assert padding_fraction(grouped, LENGTHS) < 0.5 * padding_fraction(random_batches, LENGTHS)
    # deterministic per (seed, epoch), different across epochs
    assert idx == length_grouped_indices(LENGTHS, 16, seed=1)
    assert idx != length_grouped_indices(LENGTHS, 16, seed=1, epoch=1)


def test_token_budget_batches_respect_budget_and_cover_everything():
    batches = token_budget_batches(LENGTHS, max_tokens=1024, seed=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(LENGTHS)))  # every example exactly once
    for b in batches:
        assert len(b) * round_up(max(LENGTHS[i] for i in b), 8) <= 1024
    assert padding_fraction(batches, LENGTHS) < 0.1
    # an example longer than the budget gets a batch of its own instead of being dropped
    assert token_budget_batches([5, 5000, 5], max_tokens=64, shuffle=False)[0] == [1]
    capped = token_budget_batches(LENGTHS, max_tokens=10**6, max_batch_size=7)
    assert max(len(b) for b in capped) == 7


def test_pad_collator_pads_to_multiple_of_8():
    feats = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": list(range(1, 11)), "labels": list(range(1, 11))}]
    out = PadCollator(pad_token_id=0)(feats)
    assert out["input_ids"].shape == (2, 16)
    assert out["input_ids"][0].tolist() == [1, 2, 3] + [0] * 13
    assert out["labels"][0].tolist() == [1, 2, 3] + [-100] * 13
    assert out["attention_mask"].sum(1).tolist() == [3, 10]
    left = PadCollator(pad_token_id=0, padding_side="left")(feats)
    assert left["input_ids"][0, -3:].tolist() == [1, 2, 3] and left["attention_mask"][0, :13].sum() == 0
    assert PadCollator(pad_token_id=0, max_length=4)(feats)["input_ids"].shape == (2, 8)


def _ids(batch) -> list[list[int]]:
    return [[t for t in row if t] for row in batch["input_ids"].tolist()]


def test_batch_sources_split_a_global_batch_across_ranks_and_are_pure_in_k():
    data = Dataset.from_dict({"input_ids": [list(range(1, n + 1)) for n in LENGTHS[:96]]})
    collate = PadCollator(pad_token_id=0)
    for cls in (RankBatches, LengthGroupedBatches):
        ranks = [cls(data, 4, collate, seed=5, rank=r, world=2) for r in range(2)]
        for k in (0, 7, 11, 12, 25):  # 12 global batches per epoch: 12 and 25 are in the next epochs
            a, b = (r.indices(k) for r in ranks)
            assert len(a) == len(b) == 4 and not set(a) & set(b), (cls.__name__, k)
        # micro-batch k does not depend on what was asked before (resume jumps straight to k)
        fresh = cls(data, 4, collate, seed=5, rank=1, world=2)
        assert _ids(fresh.get(25)) == _ids(ranks[1].get(25))
        epoch0 = {i for k in range(12) for r in ranks for i in r.indices(k)}
        assert len(epoch0) == 96  # one epoch covers every example exactly once
    grouped = LengthGroupedBatches(data, 4, collate, seed=5, rank=0, world=1)
    rand = RankBatches(data, 4, collate, seed=5, rank=0, world=1)
    lengths = [len(x) for x in data["input_ids"]]
    assert (padding_fraction([grouped.indices(k) for k in range(24)], lengths)
            < 0.5 * padding_fraction([rand.indices(k) for k in range(24)], lengths))

"""Fine-tuning batching helpers: length grouping, token-budget batches, pad-to-multiple-of-8 collate."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from lmforge.data.batching import (
    LengthGroupedSampler,
    PadCollator,
    TokenBudgetBatchSampler,
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
    s = LengthGroupedSampler(LENGTHS, 16, seed=1)
    assert list(s) == idx and len(s) == len(LENGTHS)


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


def test_token_budget_sampler_shards_evenly_across_ranks():
    per_rank = [list(TokenBudgetBatchSampler(LENGTHS, 1024, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(p) for p in per_rank}) == 1
    seen = [i for p in per_rank for b in p for i in b]
    assert len(seen) == len(set(seen))  # no example on two ranks
    s = TokenBudgetBatchSampler(LENGTHS, 1024, seed=3)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first and len(s) == len(list(s))


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


def test_dataloader_with_token_budget():
    data = [{"input_ids": list(range(1, n + 1))} for n in LENGTHS[:100]]
    sampler = TokenBudgetBatchSampler([len(d["input_ids"]) for d in data], max_tokens=512, seed=0)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=PadCollator(pad_token_id=0))
    for batch in loader:
        assert batch["input_ids"].shape[1] % 8 == 0
        assert batch["input_ids"].numel() <= 512 or batch["input_ids"].shape[0] == 1
        assert batch["input_ids"].dtype == torch.long

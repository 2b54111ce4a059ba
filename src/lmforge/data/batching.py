"""Batching helpers for fine-tuning data (variable-length examples): less padding, steady memory.

Three pieces, each usable alone with a plain ``torch.utils.data.DataLoader``::

    from lmforge.data.batching import LengthGroupedSampler, TokenBudgetBatchSampler, PadCollator

    lengths = [len(x) for x in ds["input_ids"]]
    collate = PadCollator(pad_token_id=tok.pad_token_id)               # pads to a multiple of 8

    # (a) fixed batch size, examples of similar length batched together
    DataLoader(ds, batch_size=16, sampler=LengthGroupedSampler(lengths, 16, seed=42), collate_fn=collate)

    # (b) variable batch size, at most max_tokens (padded) tokens per batch
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=4096, seed=42, num_replicas=world, rank=rank)
    DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    for epoch in range(n): sampler.set_epoch(epoch); ...

Both samplers are deterministic given ``seed`` and the epoch (``set_epoch``), so a resumed run sees the
same order. Padding to a multiple of 8 lets tensor cores (and CPU GEMM kernels) use their fast paths;
the token budget counts *padded* tokens (``n_examples * padded_max_len``), which is what memory sees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

IGNORE_INDEX = -100  # labels with this value do not contribute to the loss (torch CrossEntropy default)


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= n (``multiple`` <= 1: n itself)."""
    if multiple <= 1:
        return n
    return ((n + multiple - 1) // multiple) * multiple


def length_grouped_indices(
    lengths: Sequence[int], batch_size: int, seed: int = 0, epoch: int = 0, mega_batch_mult: int = 50
) -> list[int]:
    """A permutation of ``range(len(lengths))`` in which consecutive runs of ``batch_size`` have similar lengths.

    The same recipe as transformers' ``get_length_grouped_indices``: shuffle, cut into mega-batches of
    ``mega_batch_mult * batch_size``, sort each mega-batch by length (longest first), and put the
    batch holding the longest example first so an out-of-memory shows up on step one, not hours in.
    """
    rng = np.random.default_rng([seed, epoch])
    lengths = np.asarray(lengths)
    perm = rng.permutation(len(lengths))
    mega = max(1, batch_size * mega_batch_mult)
    chunks = [perm[i : i + mega] for i in range(0, len(perm), mega)]
    # stable sort by -length inside each mega-batch (ties keep the shuffled order)
    chunks = [c[np.argsort(-lengths[c], kind="stable")] for c in chunks]
    if chunks:
        # move the globally longest example's batch to the front
        firsts = np.array([lengths[c[0]] for c in chunks])
        k = int(np.argmax(firsts))
        chunks[0][0], chunks[k][0] = chunks[k][0], chunks[0][0]
    return [int(i) for c in chunks for i in c]


class LengthGroupedSampler(Sampler[int]):
    """Yields example indices so that batches of ``batch_size`` hold similar lengths (see :func:`length_grouped_indices`)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batch_mult: int = 50):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_indices(self.lengths, self.batch_size, self.seed, self.epoch, self.mega_batch_mult))


def token_budget_batches(
    lengths: Sequence[int],
    max_tokens: int,
    *,
    pad_to_multiple_of: int = 8,
    max_batch_size: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    mega_batch_mult: int = 100,
) -> list[list[int]]:
    """Cut examples into batches whose *padded* size ``len(batch) * round_up(max_len, 8)`` is <= ``max_tokens``.

    Examples are sorted by length inside shuffled mega-batches (so each batch is tight), packed greedily,
    then the batch order is shuffled. An example longer than ``max_tokens`` on its own gets a batch of one
    (it is never dropped; truncate upstream if that does not fit in memory).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    batches: list[list[int]] = []
    if len(order) == 0:
        return batches
    # mega-batches of roughly mega_batch_mult * (typical batch size) examples
    typical = max(1, max_tokens // max(1, round_up(int(np.median(lengths)), pad_to_multiple_of)))
    mega = max(1, typical * mega_batch_mult)
    for start in range(0, len(order), mega):
        chunk = order[start : start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]  # longest first
        batch: list[int] = []
        width = 0  # padded length of the batch so far
        for i in chunk:
            w = max(width, round_up(int(lengths[i]), pad_to_multiple_of))
            full = max_batch_size is not None and len(batch) >= max_batch_size
            if batch and (w * (len(batch) + 1) > max_tokens or full):
                batches.append(batch)
                batch, w = [], round_up(int(lengths[i]), pad_to_multiple_of)
            batch.append(int(i))
            width = w
        if batch:
            batches.append(batch)
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """A ``batch_sampler`` yielding lists of indices with at most ``max_tokens`` padded tokens each.

    Distributed: every rank builds the same batch list (same seed and epoch) and takes
    ``batches[rank::num_replicas]`` after dropping the tail, so all ranks step the same number of times.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        pad_to_multiple_of: int = 8,
        max_batch_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths = list(lengths)
        self.max_tokens = max_tokens
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_batch_size = max_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        batches = token_budget_batches(
            self.lengths, self.max_tokens, pad_to_multiple_of=self.pad_to_multiple_of,
            max_batch_size=self.max_batch_size, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
        )
        usable = (len(batches) // self.num_replicas) * self.num_replicas
        return batches[:usable][self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return len(self._batches())

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())


@dataclasses.dataclass
class PadCollator:
    """Pads a list of examples (dicts of int lists) into tensors whose length is a multiple of 8.

    ``input_ids`` is padded with ``pad_token_id``; ``labels`` with -100 (ignored by the loss);
    ``attention_mask`` is built (or padded) with 0; any other list-valued key is padded with 0 and
    scalar keys are stacked. ``padding_side='left'`` is for generation. ``max_length`` truncates first.
    """

    pad_token_id: int
    pad_to_multiple_of: int = 8
    label_pad_id: int = IGNORE_INDEX
    padding_side: str = "right"
    max_length: int | None = None

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError("padding_side must be 'right' or 'left'")
        if self.pad_token_id is None:
            raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token)")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        feats = [dict(f) for f in features]
        if self.max_length is not None:
            for f in feats:
                for k, v in f.items():
                    if isinstance(v, (list, tuple, np.ndarray, torch.Tensor)):
                        f[k] = list(v)[: self.max_length]
        longest = max(len(f["input_ids"]) for f in feats)
        width = round_up(longest, self.pad_to_multiple_of)
        if "attention_mask" not in feats[0]:
            for f in feats:
                f["attention_mask"] = [1] * len(f["input_ids"])
        out: dict[str, torch.Tensor] = {}
        for key in feats[0]:
            values = [f[key] for f in feats]
            if not isinstance(values[0], (list, tuple, np.ndarray, torch.Tensor)):
                out[key] = torch.tensor(values)
                continue
            fill = self.pad_token_id if key == "input_ids" else self.label_pad_id if key == "labels" else 0
            batch = torch.full((len(values), width), fill, dtype=torch.long)  # (batch, padded_len)
            for row, v in enumerate(values):
                v = torch.as_tensor(list(v) if not isinstance(v, torch.Tensor) else v, dtype=torch.long)
                if self.padding_side == "right":
                    batch[row, : len(v)] = v
                else:
                    batch[row, width - len(v) :] = v
            out[key] = batch
        return out


def padding_fraction(batches: list[list[int]], lengths: Sequence[int], pad_to_multiple_of: int = 8) -> float:
    """Share of padded positions over all batches (0 = no padding): a quick way to compare samplers."""
    real = padded = 0
    for b in batches:
        ls = [lengths[i] for i in b]
        real += sum(ls)
        padded += len(b) * round_up(max(ls), pad_to_multiple_of)
    return 0.0 if padded == 0 else 1 - real / padded


__all__ = [
    "IGNORE_INDEX", "LengthGroupedSampler", "PadCollator", "TokenBudgetBatchSampler", "length_grouped_indices",
    "padding_fraction", "round_up", "token_budget_batches",
]

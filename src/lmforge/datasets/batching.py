"""Batch sources for training and the padding helpers under them.

A batch source has ``get(k)``: this rank's k-th micro-batch, a pure function of (seed, k, rank), so a
resumed run asks for ``k = step * gradient_accumulation_steps`` onwards and sees exactly the batches
an uninterrupted run would (no DataLoader + ``skip_first_batches``):

    RankBatches           a seeded permutation per epoch (pretrain blocks, fixed-size SFT batches)
    LengthGroupedBatches  examples of similar length together (transformers' length grouping)

``PadCollator`` pads to a multiple of 8 (fast GEMM paths); ``token_budget_batches`` cuts examples
into batches of at most N padded tokens; ``padding_fraction`` compares batchings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lmforge.config import UserError

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


def rows_of(dataset, idx: list[int]) -> list[dict]:
    """``dataset[idx]`` (a dict of columns) as a list of row dicts."""
    cols = dataset[idx]
    return [dict(zip(cols, values)) for values in zip(*cols.values())]


def _per_epoch(n: int, batch_size: int, world: int) -> int:
    per_epoch = n // (batch_size * world)
    if per_epoch == 0:
        raise UserError(
            f"data: {n} training examples are fewer than one global batch "
            f"({batch_size} per device x {world} processes); add data or lower train.per_device_train_batch_size"
        )
    return per_epoch


class RankBatches:
    """Deterministic micro-batches for this rank, addressable by their global index ``k``.

    Each epoch is a fresh permutation (seeded by seed + epoch); a global batch is split across ranks;
    the last partial batch of an epoch is dropped so every rank always has the same number of batches."""

    def __init__(self, dataset, batch_size: int, collate: Callable[[list[dict]], dict], seed: int,
                 rank: int, world: int, shuffle: bool = True):
        self.dataset, self.bs, self.collate = dataset, batch_size, collate
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        self.per_epoch = _per_epoch(len(dataset), batch_size, world)
        self._perm_epoch, self._perm = -1, None

    def indices(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._perm_epoch:
            n = len(self.dataset)
            self._perm = (np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle else np.arange(n))
            self._perm_epoch = epoch
        start = (j * self.world + self.rank) * self.bs
        return self._perm[start:start + self.bs].tolist()

    def get(self, k: int) -> dict[str, torch.Tensor]:
        return self.collate(rows_of(self.dataset, self.indices(k)))


class LengthGroupedBatches:
    """This rank's k-th micro-batch, examples of similar length together (deterministic in k, so resume is exact).

    Per epoch: a seeded length-grouped permutation (:func:`length_grouped_indices`) cut into global
    batches of ``batch_size * world``, whose order is shuffled so that lengths vary over time; rank r
    takes its slice of each global batch. The last partial global batch is dropped."""

    def __init__(self, dataset, batch_size: int, collate: Callable[[list[dict]], dict], seed: int, rank: int, world: int):
        self.dataset, self.bs, self.collate = dataset, batch_size, collate
        self.seed, self.rank, self.world = seed, rank, world
        self.lengths = [len(x) for x in dataset["input_ids"]]
        self.per_epoch = _per_epoch(len(dataset), batch_size, world)
        self._epoch, self._batches = -1, []

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        g = self.bs * self.world
        order = length_grouped_indices(self.lengths, g, seed=self.seed, epoch=epoch)
        batches = [order[i: i + g] for i in range(0, self.per_epoch * g, g)]
        perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
        return [batches[i] for i in perm]

    def indices(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[j][self.rank * self.bs: (self.rank + 1) * self.bs]

    def get(self, k: int) -> dict[str, torch.Tensor]:
        return self.collate(rows_of(self.dataset, self.indices(k)))


class TokenBudgetBatches:
    """This rank's k-th micro-batch, filled to a token budget (``train.max_tokens_per_batch``) instead of
    a fixed count: short examples travel many to a batch, long ones few, so the padded size
    ``rows x round_up(longest, 8)`` stays under ``max_tokens`` and memory stays flat (fairseq's
    ``--max-tokens``). Deterministic in k, so resume is exact.

    Per epoch: :func:`token_budget_batches` over the whole dataset (seeded by seed and epoch, sorted
    by length inside shuffled mega-batches), then the batches are dealt out ``world`` at a time —
    global step j gives rank r batch ``j·world + r`` — and a last incomplete round is dropped. The
    loop normalises the loss over the real (label) tokens of the whole global batch, so a batch of 40
    short examples and one of 3 long ones weigh by their tokens, not by their count."""

    def __init__(self, dataset, max_tokens: int, collate: Callable[[list[dict]], dict], seed: int, rank: int,
                 world: int, max_batch_size: int | None = None):
        self.dataset, self.max_tokens, self.collate = dataset, max_tokens, collate
        self.seed, self.rank, self.world, self.max_batch_size = seed, rank, world, max_batch_size
        self.lengths = [len(x) for x in dataset["input_ids"]]
        self._epoch, self._batches = -1, []
        self.per_epoch = len(self._epoch_batches(0)) // world
        if self.per_epoch == 0:
            raise UserError(f"train.max_tokens_per_batch: {max_tokens} tokens make fewer batches than the {world} "
                            "processes need for one step; add data or lower max_tokens_per_batch")

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        return token_budget_batches(self.lengths, self.max_tokens, max_batch_size=self.max_batch_size,
                                    seed=self.seed, epoch=epoch)

    def indices(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[j * self.world + self.rank]

    def get(self, k: int) -> dict[str, torch.Tensor]:
        return self.collate(rows_of(self.dataset, self.indices(k)))


class MixtureBatches:
    """Multi-task micro-batches (``data.tasks``): each row of micro-batch k comes from task t with
    probability ``probs[t]`` and is a uniformly drawn example of that task — sampling with replacement
    from a generator seeded by (seed, k, rank), so the source is a pure function of k (resume is exact)
    and every rank draws its own rows. Over a run, task t supplies ``probs[t]`` of the rows whatever its
    size: small tasks are revisited, large ones subsampled (T5's examples-proportional/temperature mixing)."""

    def __init__(self, datasets: list, probs: list[float], batch_size: int, collate: Callable[[list[dict]], dict],
                 seed: int, rank: int):
        if len(datasets) != len(probs) or not datasets:
            raise ValueError("one probability per task dataset")
        self.datasets, self.probs = datasets, np.asarray(probs, dtype=np.float64)
        self.bs, self.collate, self.seed, self.rank = batch_size, collate, seed, rank

    def picks(self, k: int) -> list[tuple[int, int]]:
        """(task, example index) of each row of micro-batch k."""
        rng = np.random.default_rng([self.seed, k, self.rank, 7])
        tasks = rng.choice(len(self.datasets), size=self.bs, p=self.probs)
        return [(int(t), int(rng.integers(len(self.datasets[t])))) for t in tasks]

    def get(self, k: int) -> dict[str, torch.Tensor]:
        return self.collate([self.datasets[t][i] for t, i in self.picks(k)])

"""Masked-language-model pretraining data (``train.objective: mlm``), BERT's recipe (Devlin et al. 2019):

choose ``train.mlm_probability`` (15%) of the non-special tokens of each block; of those, 80% become
the mask token, 10% a random token, 10% stay; the loss is taken at the chosen positions only
(``labels`` = original id there, -100 elsewhere).

Masks are drawn from a generator seeded by (seed, micro-batch index, rank) for training — dynamic
masking (RoBERTa), each epoch sees new masks, and a resumed run draws exactly the same ones — and
by the block's content for validation, so every evaluation scores the same masked positions.

Tokenizers made for causal LMs (like the fixture tokenizer) have no mask token: :func:`ensure_mask_token`
adds ``train.mask_token`` (default ``[MASK]``) as a special token, the model is built with the grown
vocabulary, and ``final/`` saves the tokenizer with it.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from lmforge.config import UserError

log = logging.getLogger("lmforge")
Batch = dict[str, torch.Tensor]


def ensure_mask_token(tokenizer, mask_token: str = "[MASK]") -> int:
    """The tokenizer's mask-token id, adding ``mask_token`` as a special token when it has none."""
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": mask_token})
        log.info("mlm: the tokenizer had no mask token; added %r as id %d", mask_token, tokenizer.mask_token_id)
    return tokenizer.mask_token_id


def mask_tokens(input_ids: torch.Tensor, *, mask_id: int, vocab_size: int, special_ids: list[int],
                probability: float, generator: torch.Generator) -> Batch:
    """(batch, seq) ids -> {'input_ids' (corrupted), 'labels' (-100 off the chosen positions)}."""
    ids = input_ids.clone()
    labels = input_ids.clone()
    special = torch.isin(ids, torch.tensor(special_ids, dtype=ids.dtype)) if special_ids else torch.zeros_like(ids, dtype=torch.bool)
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & ~special
    labels[~chosen] = -100
    u = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (u < 0.8)                       # 80%: [MASK]
    to_random = chosen & (u >= 0.8) & (u < 0.9)        # 10%: a random token; the last 10% stay
    ids[to_mask] = mask_id
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, dtype=ids.dtype)
    ids[to_random] = random_ids[to_random]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class MLMMasker:
    """Holds the tokenizer facts masking needs; makes the train batch source and the eval collate."""

    def __init__(self, tokenizer, probability: float, seed: int):
        self.mask_id = tokenizer.mask_token_id
        if self.mask_id is None:
            raise UserError("train.objective mlm: the tokenizer has no mask token; set train.mask_token")
        self.vocab_size = len(tokenizer)
        self.special_ids = sorted(set(tokenizer.all_special_ids))
        self.probability, self.seed = probability, seed

    def _mask(self, ids: torch.Tensor, seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        return mask_tokens(ids, mask_id=self.mask_id, vocab_size=self.vocab_size, special_ids=self.special_ids,
                           probability=self.probability, generator=g)

    def collate_eval(self, examples: list[dict]) -> Batch:
        """Validation: the mask of a block depends only on its tokens (same positions every evaluation)."""
        rows = []
        for e in examples:
            ids = torch.as_tensor(e["input_ids"]).unsqueeze(0)
            digest = hashlib.sha256(ids.numpy().tobytes()).digest()
            rows.append(self._mask(ids, self.seed ^ int.from_bytes(digest[:7], "little")))
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def train_batches(self, inner, rank: int) -> MLMBatches:
        return MLMBatches(inner, self, rank)


class MLMBatches:
    """``get(k)``: micro-batch k of ``inner`` (a RankBatches), masked with generator seed (seed, k, rank)."""

    def __init__(self, inner, masker: MLMMasker, rank: int):
        self.inner, self.masker, self.rank = inner, masker, rank

    def get(self, k: int) -> Batch:
        ids = self.inner.get(k)["input_ids"]
        return self.masker._mask(ids, (self.masker.seed * 1_000_003 + k) * 1009 + self.rank)


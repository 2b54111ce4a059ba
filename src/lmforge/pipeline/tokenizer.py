"""Tokenizer training with the `tokenizers` library: byte-level BPE, WordPiece or Unigram.

The result is saved as a ``PreTrainedTokenizerFast`` directory (``AutoTokenizer.from_pretrained`` loads
it). No post-processor adds special tokens: packing appends EOS after every document itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

from lmforge.config import help_field


@dataclasses.dataclass
class TokenizerConfig:
    train: bool = help_field(True, help="Train a tokenizer on the cleaned corpus (else load `path`).")
    path: str | None = help_field(None, help="An existing tokenizer (folder or hub name in the cache) when train: false.")
    type: Literal["bpe", "wordpiece", "unigram"] = help_field("bpe", help="bpe (byte-level, lossless), wordpiece or unigram.")
    vocab_size: int = help_field(8000, help="Vocabulary size, special tokens included.")
    min_frequency: int = help_field(2, help="Minimum pair frequency for a BPE/WordPiece merge.")
    special_tokens: list[str] = help_field(["<|endoftext|>", "<|pad|>"], help="Special tokens, ids 0..k-1 in this order.")
    eos_token: str = help_field("<|endoftext|>", help="Appended after each document when packing (added to special_tokens if missing).")
    pad_token: str = help_field("<|pad|>", help="Padding token (added to special_tokens if missing).")
    unk_token: str = help_field("<|unk|>", help="Unknown token for wordpiece/unigram (byte-level BPE needs none).")
    max_docs: int | None = help_field(None, help="Train on at most this many documents (the first ones; null: all).")
    model_max_length: int = help_field(2048, help="Saved as the tokenizer's model_max_length.")

    def problems(self) -> list[str]:
        out = []
        if not self.train and not self.path:
            out.append("path: required when train is false (a tokenizer to tokenize with)")
        if self.train and self.path:
            out.append("path / train: give one; train: true trains a new tokenizer, path loads one")
        if self.train and self.vocab_size < len(self.all_special_tokens()) + (0 if self.type != "bpe" else 256):
            out.append(f"vocab_size: {self.vocab_size} is too small for the {self.type} alphabet and special tokens")
        return out

    def all_special_tokens(self) -> list[str]:
        out = list(self.special_tokens)
        for t in (self.eos_token, self.pad_token) + ((self.unk_token,) if self.type != "bpe" else ()):
            if t and t not in out:
                out.append(t)
        return out


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig):
    """Train on ``texts``; return a ``PreTrainedTokenizerFast`` (not yet saved)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = cfg.all_special_tokens()
    if cfg.type == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
    elif cfg.type == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=cfg.unk_token))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=specials, show_progress=False,
        )
    else:
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=cfg.vocab_size, special_tokens=specials, unk_token=cfg.unk_token, show_progress=False,
        )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=cfg.eos_token, bos_token=cfg.eos_token, pad_token=cfg.pad_token,
        unk_token=cfg.unk_token if cfg.type != "bpe" else cfg.eos_token,
        additional_special_tokens=[t for t in specials if t not in (cfg.eos_token, cfg.pad_token, cfg.unk_token)],
    )
    fast.model_max_length = cfg.model_max_length
    return fast

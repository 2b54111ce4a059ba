"""MinHash dedup (signatures, LSH params, clusters, exact keys) and tokenize/pack/split/tokenizer training."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import CORPUS, TOKENIZER
from datatrove.data import Document

from lmforge.datasets.lm import pack_flat, tokenize_and_pack
from lmforge.pipeline.dedup import DedupConfig, DedupKeys, NearDedupConfig, dedup_decisions, exact_key
from lmforge.pipeline.minhash import MinHasher, cluster, estimated_jaccard, jaccard, optimal_param
from lmforge.pipeline.publish import split_documents, tokenize_flat
from lmforge.pipeline.tokenizer import TokenizerConfig, train_tokenizer

DOCS = [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines()]
LONG = [d for d in DOCS if len(d.split()) > 120][:40]


def perturb(text: str, every: int, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split(" ")
    return " ".join("zebra" if rng.random() < 1 / every else w for w in words)


# ---------------------------------------------------------------------------------------------
# MinHash


@pytest.mark.parametrize("method", ["oph", "permutations"])
def test_signature_agreement_estimates_jaccard(method):
    hasher = MinHasher(num_perm=256, ngram=5, seed=3, method=method)
    pairs = [(d, perturb(d, every, i)) for i, d in enumerate(LONG[:12]) for every in (8, 30)]
    sig = hasher.signatures([t for p in pairs for t in p])
    est = estimated_jaccard(sig, np.array([[2 * i, 2 * i + 1] for i in range(len(pairs))]))
    exact = np.array([jaccard(a, b) for a, b in pairs])
    assert np.abs(est - exact).max() < 0.12  # std of the estimate at 256 perms is < 0.032
    assert abs(np.mean(est - exact)) < 0.03  # unbiased
    # deterministic, batch-independent: the same text gives the same signature in any batch
    again = MinHasher(num_perm=256, ngram=5, seed=3, method=method).signatures([pairs[5][0]])
    assert (again[0] == sig[10]).all()


@pytest.mark.parametrize("method", ["oph", "permutations"])
def test_short_and_empty_documents(method):
    sig = MinHasher(num_perm=16, ngram=5, method=method).signatures(["", "two words", "two words", "other words here"])
    assert (sig[0] == np.iinfo(np.uint32).max).all()
    assert (sig[1] == sig[2]).all() and not (sig[1] == sig[3]).all()
    # a one-shingle document fills every bin (densification) with that shingle's value
    assert len(set(sig[1].tolist())) == (1 if method == "oph" else 16)


def test_optimal_param_matches_threshold():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        b, r = optimal_param(threshold, 128)
        assert b * r <= 128
        # the S-curve's steepest point (1/b)^(1/r) sits near the threshold
        assert abs((1 / b) ** (1 / r) - threshold) < 0.1
    assert NearDedupConfig(bands=16, rows=8).band_rows() == (16, 8)
    assert NearDedupConfig(bands=20, rows=8).problems()[0].startswith("bands*rows = 160 > num_perm")


def test_cluster_finds_planted_near_duplicates_only():
    base = LONG[:30]
    near = [perturb(base[i], 150, i) for i in range(5)]  # Jaccard ~0.93
    far = [perturb(base[i], 4, i) for i in range(5, 10)]  # Jaccard ~0.3
    texts = base + near + far
    sig = MinHasher().signatures(texts)
    b, r = NearDedupConfig(threshold=0.8).band_rows()  # the stage's default: recall-tilted, then verified
    roots = cluster(sig, b, r, threshold=0.8)
    for i in range(5):
        assert jaccard(base[i], near[i]) > 0.85
        assert roots[30 + i] == i  # clustered with its original, which is kept (smallest index)
    assert (roots[35:] == np.arange(35, 40)).all()  # far copies stay
    assert len(set(roots[:30].tolist())) == 30  # no false merges among distinct documents


def test_exact_key_normalises_case_and_whitespace():
    assert exact_key("Hello  World\n") == exact_key("hello world") != exact_key("hello world!")


def test_dedup_keys_and_decisions_across_tasks(tmp_path):
    cfg = DedupConfig()
    shards = [
        [LONG[0], LONG[1], LONG[0].upper(), LONG[2]],  # task 0: exact dup of its own doc 0
        [perturb(LONG[1], 80, 0), LONG[3], LONG[2] + "  \n"],  # task 1: near dup of LONG[1], exact dup of LONG[2]
    ]
    for rank, texts in enumerate(shards):
        step = DedupKeys(str(tmp_path / "keys"), cfg)
        out = list(step.run([Document(text=t, id=f"{rank}-{i}") for i, t in enumerate(texts)], rank=rank))
        assert len(out) == len(texts)  # keys are computed, nothing dropped here
    result = dedup_decisions(str(tmp_path / "keys"), 2, cfg)
    assert result["remove"] == {0: [2], 1: [0, 2]}
    assert (result["exact_duplicates"], result["near_duplicates"], result["kept"]) == (2, 1, 4)
    assert result["clusters"] == 1 and ["0-1", "1-0"] in result["examples"]
    no_near = dedup_decisions(str(tmp_path / "keys"), 2, DedupConfig(near=NearDedupConfig(enabled=False)))
    assert no_near["remove"] == {0: [2], 1: [2]}


# ---------------------------------------------------------------------------------------------
# tokenize + pack


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def test_tokenize_flat_is_documents_joined_with_eos(tok):
    texts = DOCS[:50]
    flat = tokenize_flat(texts, tok, batch_size=7)
    expected = [t for d in texts for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert flat.dtype == np.int32 and flat.tolist() == expected
    assert tokenize_flat([], tok).shape == (0,)


@pytest.mark.parametrize("block_size", [1, 7, 128])
def test_pack_invariants(tok, block_size):
    flat = tokenize_flat(DOCS[:30], tok)
    blocks = pack_flat(flat, block_size)
    assert blocks.shape[1] == block_size  # every block is block_size long
    assert blocks.reshape(-1).tolist() == flat[: blocks.size].tolist()  # concatenation = the token stream
    assert len(flat) - blocks.size < block_size  # only the final remainder is lost


def test_lm_tokenize_and_pack_drops_only_the_final_remainder(tok):
    import datasets

    ds = datasets.Dataset.from_dict({"text": DOCS[:300]})
    packed = tokenize_and_pack(ds, tok, "text", 64)
    flat = tokenize_flat(DOCS[:300], tok)
    assert len(packed) == len(flat) // 64
    ids = np.array(packed["input_ids"])
    assert ids.shape == (len(flat) // 64, 64) and ids.reshape(-1).tolist() == flat[: ids.size].tolist()


def test_split_by_document():
    # a seeded hash of each document's id (no permutation of the corpus): ~ratio of the documents, not exactly
    ids = [f"doc/{i}" for i in range(1000)]
    train, val = split_documents(ids, 0.1, seed=0)
    assert 70 <= len(val) <= 130 and len(train) + len(val) == 1000 and not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(1000))
    assert split_documents(ids, 0.1, seed=0)[1].tolist() == val.tolist()
    assert len(split_documents(ids[:5], 0.01, seed=0)[1]) == 1  # at least one validation document
    assert len(split_documents(ids[:5], 0.0, seed=0)[1]) == 0


# ---------------------------------------------------------------------------------------------
# tokenizer training


def test_bpe_tokenizer_round_trip_and_reload(tmp_path):
    from transformers import AutoTokenizer

    cfg = TokenizerConfig(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>", "<|user|>"])
    fast = train_tokenizer(DOCS[:200], cfg)
    fast.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 400
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|pad|>", "<|user|>"]
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == 1
    for text in [DOCS[300], "  Unicode: café, 日本語, emoji 🙂\n\ttabs  ", "x = {'a': [1, 2]}"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text  # byte-level BPE is lossless
    assert tok("<|user|>hi", add_special_tokens=False)["input_ids"][0] == 2


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_other_tokenizer_types_train_and_load(tmp_path, kind):
    from transformers import AutoTokenizer

    fast = train_tokenizer(DOCS[:200], TokenizerConfig(type=kind, vocab_size=300))
    fast.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok("Return the number of items.", add_special_tokens=False)["input_ids"]
    assert ids and tok.unk_token == "<|unk|>" and tok.eos_token_id is not None
    assert tok.decode(ids).lower().replace(" ", "") == "returnthenumberofitems."


def test_tokenizer_config_problems():
    assert TokenizerConfig(train=False).problems() == ["path: required when train is false (a tokenizer to tokenize with)"]
    assert "too small" in TokenizerConfig(vocab_size=100).problems()[0]
    assert TokenizerConfig(special_tokens=[]).all_special_tokens() == ["<|endoftext|>", "<|pad|>"]

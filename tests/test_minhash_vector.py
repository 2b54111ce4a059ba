"""The vectorised MinHash path against straightforward references: words, word hashes, shingles,
OPH signatures with densification, exact keys; and the estimate tracking the true Jaccard."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import xxhash

from lmforge.pipeline import minhash as mh
from lmforge.pipeline.dedup import exact_key
from lmforge.pipeline.minhash import MinHasher, estimated_jaccard, jaccard, words

M64 = 2**64 - 1
ALPHABET = list("abcdefghij ABCXYZ_0123 .,;:!?()'\"-\t\n") + list("éÉßΣσİ—–‘’“”…«»。、，¿¡\u00a0\u2009\u3000\x1c\u212a")


def random_texts(n: int, seed: int, max_len: int = 400) -> list[str]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 9))) for _ in range(300)]
    out = []
    for i in range(n):
        k = rng.randrange(0, max_len)
        text = " ".join(rng.choice(vocab) for _ in range(k))
        out.append(text.encode("ascii", "ignore").decode() if i % 3 == 0 else text)  # a third pure ASCII
    return out + ["", " ", "one", "two words", "x\x1cy z", "Ünïcödé “q” —\u00a0x İ KELVIN \u212a"]


def ref_words(text: str) -> list[str]:
    return text.lower().translate(mh._TO_SPACE).split()


def ref_word_hash(word: str) -> int:
    h = 0
    for pos, byte in enumerate(word.encode("utf-8", "surrogatepass")):
        h = (h + (byte + 1) * pow(0x100000001B3, pos, 2**64)) & M64
    return h


def splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def ref_shingles(text: str, n: int) -> list[int]:
    w = [splitmix(ref_word_hash(x)) for x in ref_words(text)]
    if not w:
        return []
    grams = [w[i : i + n] for i in range(len(w) - n + 1)] if len(w) >= n else [w]
    mix = 0x9E3779B97F4A7C15
    return [splitmix(sum(x * pow(mix, k, 2**64) for k, x in enumerate(g)) & M64) for g in grams]


def ref_oph(hasher: MinHasher, text: str) -> np.ndarray:
    """One text, plain Python: bin = high 32 bits mod P, value = low 32 bits, min per bin, then each
    empty bin copies the first filled bin of its probe sequence."""
    p, salt = hasher.num_perm, int(hasher._salt)
    sig = [None] * p
    for x in ref_shingles(text, hasher.ngram):
        h = splitmix(x ^ salt)
        b, v = (h >> 32) % p, h & 0xFFFFFFFF
        sig[b] = v if sig[b] is None else min(sig[b], v)
    if all(v is None for v in sig):
        return np.full(p, 0xFFFFFFFF, dtype=np.uint32)
    filled = [v is not None for v in sig]
    out = list(sig)
    for j in range(p):
        if not filled[j]:
            src = next((int(c) for c in hasher._probe[j] if filled[c]), None)
            if src is None:
                nz = [i for i in range(p) if filled[i]]
                src = next((i for i in nz if i >= j), nz[0])
            out[j] = sig[src]
    return np.array(out, dtype=np.uint32)


def test_words_match_str_translate_reference():
    for t in random_texts(300, seed=1):
        assert words(t) == ref_words(t)
    for cp in list(range(0x80, 0x3100)) + [0xFF0C, 0x212A, 0x1680, 0x205F]:  # every character on its own
        t = f"Ab{chr(cp)}X, y"
        assert words(t) == ref_words(t), hex(cp)


def test_word_hashes_and_shingles_match_reference():
    texts = random_texts(60, seed=2, max_len=60)
    w, lengths = MinHasher._batch_word_hashes(texts)
    expected = [splitmix(ref_word_hash(x)) for t in texts for x in ref_words(t)]
    assert w.tolist() == expected
    assert lengths.tolist() == [len(ref_words(t)) for t in texts]
    hashes, docs = MinHasher(ngram=5).shingles(texts)
    assert hashes.tolist() == [h for t in texts for h in ref_shingles(t, 5)]
    assert docs.tolist() == [i for i, t in enumerate(texts) for _ in ref_shingles(t, 5)]


@pytest.mark.parametrize("num_perm", [16, 128, 100])  # 100: bins by modulo, not by mask
def test_oph_signatures_match_reference(num_perm):
    hasher = MinHasher(num_perm=num_perm, ngram=3, seed=7)
    texts = random_texts(40, seed=3, max_len=200)
    sig = hasher.signatures(texts)
    for t, row in zip(texts, sig):
        assert (row == ref_oph(hasher, t)).all()
    # deterministic and batch-independent (the same row alone, in another order, from a new hasher)
    again = MinHasher(num_perm=num_perm, ngram=3, seed=7).signatures(texts[::-1])[::-1]
    assert (again == sig).all()


def test_estimated_jaccard_tracks_true_jaccard():
    rng = random.Random(4)
    vocab = [f"w{i}" for i in range(5000)]
    base = [" ".join(rng.choice(vocab) for _ in range(rng.randrange(300, 1500))) for _ in range(40)]
    copies = []
    for i, b in enumerate(base):
        q = [0.01, 0.03, 0.06, 0.1, 0.2][i % 5]
        copies.append(" ".join(rng.choice(vocab) if rng.random() < q else x for x in b.split()))
    sig = MinHasher(num_perm=256, ngram=5, seed=1).signatures(base + copies)
    est = estimated_jaccard(sig, np.array([[i, 40 + i] for i in range(40)]))
    exact = np.array([jaccard(a, b) for a, b in zip(base, copies)])
    assert exact.min() < 0.4 < 0.85 < exact.max()  # spread over the range
    assert np.abs(est - exact).max() < 0.12 and abs(np.mean(est - exact)) < 0.02


def test_exact_key_matches_regex_reference():
    ws = re.compile(r"\s+")
    rng = random.Random(5)
    pool = list(" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u2028\u3000abcXYZ.,ßΣ")
    for _ in range(2000):
        t = "".join(rng.choice(pool) for _ in range(rng.randrange(20)))
        assert exact_key(t) == xxhash.xxh64_intdigest(ws.sub(" ", t.casefold()).strip())

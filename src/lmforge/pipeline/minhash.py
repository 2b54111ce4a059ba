"""MinHash near-duplicate detection, vectorised: one numpy hash pass over all shingles of a batch.

    texts -> words -> word n-gram hashes (shingles) -> num_perm min-hashes per document (the signature)
          -> LSH: bands x rows, documents sharing any band bucket are candidates
          -> (optional) keep a candidate pair only if its estimated Jaccard >= threshold
          -> union-find: connected components = duplicate clusters; keep one document per cluster

Why not datatrove's ``MinhashDedupSignature``: it hashes one document at a time in Python (a word
tokenizer call, a Python string join and a hash call per shingle). Here there is no per-word Python work
at all: a batch of texts becomes one byte string, lower-cased and stripped of punctuation by one
``bytes.translate``; word hashes (a polynomial over each word's bytes, ``np.add.reduceat`` over word
boundaries), n-gram hashes (a rolling combination of word hashes), one-permutation binning (one sort of
packed (document, bin, value) keys) and densification are numpy array operations over the whole batch.
Per document there is only ``str.isascii`` (O(1)) and, for non-ASCII text, a ``str.lower``.

Hash family: ``h_j(x) = (a_j * x + b_j) >> 32`` in wrapping uint64 arithmetic with odd ``a_j``
(multiply-add-shift, Dietzfelbinger et al.), applied to splitmix64-mixed 64-bit shingle hashes.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Iterable, Sequence

import numpy as np

# Words = lower-cased text split on whitespace after punctuation becomes space: the same words as
# re.findall(r"\w+") for Latin text (underscore kept), 3-4x faster (str.translate and str.split run in C).
_PUNCT = "".join(c for c in string.punctuation if c != "_") + "\u2014\u2013\u2018\u2019\u201c\u201d\u2026\u00ab\u00bb\u3002\u3001\uff0c\u00bf\u00a1"
# Unicode whitespace str.split() knows but that is not an ASCII space byte: mapped to " " so that the
# byte-level word splitting below and ``words`` agree.
_UNICODE_SPACES = "\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_TO_SPACE = str.maketrans({c: " " for c in _PUNCT + _UNICODE_SPACES})
_SPACE_BYTE = np.zeros(256, dtype=bool)
_SPACE_BYTE[list(b" \t\n\r\x0b\x0c")] = True
_BYTE_BASE = np.uint64(0x100000001B3)  # FNV prime: base of the per-word polynomial byte hash
_BYTE_BASE_INV = np.uint64(pow(0x100000001B3, -1, 2**64))  # its inverse mod 2**64
# One bytes.translate table does str.lower + _TO_SPACE for ASCII bytes and yields the hashed value
# byte + 1 (0xFF never occurs in UTF-8, so it fits a byte): letters lower-cased, punctuation (not "_"),
# \x1c-\x1f and ASCII whitespace become a space (value 33 = the separator). Bytes >= 0x80 (UTF-8 of
# other text, lowered by str.lower, its non-ASCII punctuation and spaces replaced beforehand) only get +1.
_LOWER_BYTE = np.arange(256, dtype=np.uint8)
_LOWER_BYTE[ord("A") : ord("Z") + 1] += 32
_LOWER_BYTE[[ord(c) for c in _PUNCT if ord(c) < 128] + [0x1C, 0x1D, 0x1E, 0x1F]] = ord(" ")
_LOWER_BYTE[_SPACE_BYTE] = ord(" ")
_VALUE_TABLE = bytes(((_LOWER_BYTE.astype(np.int64) + 1) % 256).astype(np.uint8).tolist())
_SEP_VALUE = ord(" ") + 1
_LOWER_TABLE = bytes(_LOWER_BYTE.tolist())
# the UTF-8 of the non-ASCII characters _TO_SPACE makes spaces, as integers: 2-byte (lead<<8|next) and
# 3-byte (lead<<16|next<<8|last) sequences (all of them are 2 or 3 bytes long)
_NON_ASCII_SEQS = [c.encode("utf-8") for c in _PUNCT + _UNICODE_SPACES if ord(c) >= 128]
assert all(len(q) in (2, 3) for q in _NON_ASCII_SEQS)
_SEQ2 = np.array(sorted(int.from_bytes(q, "big") for q in _NON_ASCII_SEQS if len(q) == 2), dtype=np.int64)
_SEQ3 = np.array(sorted(int.from_bytes(q, "big") for q in _NON_ASCII_SEQS if len(q) == 3), dtype=np.int64)


def _non_ascii_bytes(text: str) -> bytes:
    """UTF-8 of ``text.lower()`` with the non-ASCII punctuation and spaces of ``_TO_SPACE`` made spaces
    (one space per byte; the ASCII ones are left to the byte tables): the words of :func:`words`, ~10x
    faster than ``str.translate``. ``str.lower`` runs only when a non-ASCII character has a lower case
    (ASCII letters are lowered by the tables)."""
    raw = text.encode("utf-8", "surrogatepass")
    a = np.frombuffer(raw, dtype=np.uint8)
    high = a >= 0x80
    others = a[high].tobytes().decode("utf-8", "surrogatepass")  # the non-ASCII characters, in order
    if others.lower() != others:
        raw = text.lower().encode("utf-8", "surrogatepass")
        a = np.frombuffer(raw, dtype=np.uint8)
        high = a >= 0x80
    lead = np.flatnonzero(high & (a >= 0xC2))  # lead bytes of multi-byte characters (continuations < 0xC0)
    a = np.concatenate([a, np.zeros(2, dtype=np.uint8)])  # room to read two bytes past any lead byte
    b0, b1, b2 = a[lead].astype(np.int64), a[lead + 1].astype(np.int64), a[lead + 2].astype(np.int64)
    two = lead[np.isin((b0 << 8) | b1, _SEQ2)]
    three = lead[np.isin((b0 << 16) | (b1 << 8) | b2, _SEQ3)]
    if not len(two) and not len(three):
        return raw
    a[two] = a[two + 1] = 32
    a[three] = a[three + 1] = a[three + 2] = 32
    return a[:-2].tobytes()


def words(text: str) -> list[str]:
    """Lower-cased words, punctuation (except "_") as separators: ``text.lower().translate(_TO_SPACE).split()``,
    computed through bytes (``bytes.translate`` is ~10x faster than ``str.translate`` on non-ASCII text)."""
    raw = text.encode("ascii") if text.isascii() else _non_ascii_bytes(text)
    return raw.translate(_LOWER_TABLE).decode("utf-8", "surrogatepass").split()


_MIX = np.uint64(0x9E3779B97F4A7C15)  # n-gram polynomial base (odd, golden ratio)
_SIG_DTYPE = np.uint32
_MAX_CELLS = 262_144  # (shingles x permutations) cells per numpy block: 2 MB of uint64, stays in cache (4x faster than 32 MB)


def optimal_param(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the weighted false-positive and false-negative
    areas under the LSH S-curve ``P(candidate | s) = 1 - (1 - s**rows)**bands`` (as text-dedup/datasketch do).
    """
    best, best_err = (1, num_perm), float("inf")
    below = np.linspace(0.0, threshold, 201)
    above = np.linspace(threshold, 1.0, 201)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - below**r) ** b, below)
            fn = np.trapezoid((1 - above**r) ** b, above)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


_TABLES: list[np.ndarray] = []
_BATCH_CHARS = 1 << 20


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(B**k, B**-k) mod 2**64 for k < n, computed once per process and grown on demand."""
    if not _TABLES or len(_TABLES[0]) < n:
        size = max(n, 1 << 20)
        with np.errstate(over="ignore"):
            pw = np.full(size, _BYTE_BASE, dtype=np.uint64)
            inv = np.full(size, _BYTE_BASE_INV, dtype=np.uint64)
            pw[0] = inv[0] = 1
            np.cumprod(pw, out=pw)
            np.cumprod(inv, out=inv)
        _TABLES[:] = [pw, inv]
    return _TABLES[0], _TABLES[1]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise (a new array; in place after the first add: 2 buffers, not 7)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    t = x >> np.uint64(30)
    x ^= t
    x *= np.uint64(0xBF58476D1CE4E5B9)
    np.right_shift(x, np.uint64(27), out=t)
    x ^= t
    x *= np.uint64(0x94D049BB133111EB)
    np.right_shift(x, np.uint64(31), out=t)
    x ^= t
    return x


@dataclasses.dataclass
class MinHasher:
    """Computes MinHash signatures ``(n_docs, num_perm)`` uint32 for batches of texts.

    ``ngram``: shingle size in words (see :func:`words`); a document with fewer words
    is one shingle. Empty documents get an all-``0xFFFFFFFF`` signature (never matches a real one).
    """

    num_perm: int = 128
    ngram: int = 5
    seed: int = 1
    method: str = "oph"  # "oph" (one permutation + densification) or "permutations" (num_perm hashes)

    def __post_init__(self):
        if self.method not in ("oph", "permutations"):
            raise ValueError(f"method must be 'oph' or 'permutations', got {self.method!r}")
        rng = np.random.default_rng(self.seed)
        self.a = rng.integers(1, 2**63, size=self.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64)
        self._salt = np.uint64(rng.integers(0, 2**63))
        # densification: bin j borrows from bins probe[j, 0], probe[j, 1], ... (the same for every document)
        self._probe = rng.integers(0, self.num_perm, size=(self.num_perm, 4 * self.num_perm))

    def shingles(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All shingle hashes of a batch, concatenated: (hashes (S,) uint64, doc_of_shingle (S,) int64)."""
        w, lengths = self._batch_word_hashes(texts)  # (total_words,) uint64, words per document
        n = self.ngram
        # h[p] = sum_k w[p+k] * MIX^k over k < n (wrapping uint64); valid where p+n <= end of p's document
        total = len(w)
        h = w.copy()
        tmp = np.empty(total, dtype=np.uint64)
        power = np.uint64(1)
        with np.errstate(over="ignore"):
            for k in range(1, n):
                if k >= total:
                    break
                power = power * _MIX
                np.multiply(w[k:], power, out=tmp[: total - k])
                h[: total - k] += tmp[: total - k]
        ends = np.cumsum(lengths)
        starts = ends - lengths
        # the last n-1 word positions of every document start no full n-gram
        valid = np.ones(total, dtype=bool)
        for k in range(1, n):
            pos = ends - k
            valid[pos[pos >= starts]] = False
        doc_of_word = np.repeat(np.arange(len(texts)), lengths)
        hashes, docs = h[valid], doc_of_word[valid]
        short = np.nonzero((lengths > 0) & (lengths < n))[0]
        if len(short):  # documents shorter than one n-gram: one shingle over all their words
            extra = np.empty(len(short), dtype=np.uint64)
            with np.errstate(over="ignore"):
                for j, d in enumerate(short):
                    seg = w[starts[d] : ends[d]]
                    extra[j] = np.sum(seg * (_MIX ** np.arange(len(seg), dtype=np.uint64)), dtype=np.uint64)
            hashes = np.concatenate([hashes, extra])
            docs = np.concatenate([docs, short])
            order = np.argsort(docs, kind="stable")
            hashes, docs = hashes[order], docs[order]
        return _splitmix64(hashes), docs

    @staticmethod
    def _batch_word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """64-bit hashes of every word of every text, in order, and the number of words per text.

        No Python work per word: the batch becomes one byte array; word boundaries, each byte's position
        in its word and the polynomial hash ``sum((byte + 1) * B**pos)`` (then splitmix64) are numpy ops.
        Lower-casing and punctuation -> space are one ``bytes.translate`` over the batch (``_VALUE_TABLE``);
        only non-ASCII texts (``str.isascii`` is O(1)) go through :func:`_non_ascii_bytes` first. The words
        are exactly those of :func:`words`, so the signatures are those of the earlier ``str.translate`` path.
        """
        n_docs = len(texts)
        if all(t.isascii() for t in texts):
            raw = " ".join(texts).encode("ascii")
            doc_len = np.fromiter(map(len, texts), dtype=np.int64, count=n_docs)
        else:
            parts = [t.encode("ascii") if t.isascii() else _non_ascii_bytes(t) for t in texts]
            raw = b" ".join(parts)
            doc_len = np.fromiter(map(len, parts), dtype=np.int64, count=n_docs)
        ends = np.cumsum(doc_len + 1) - 1  # documents separated by one space
        b = np.frombuffer(raw.translate(_VALUE_TABLE), dtype=np.uint8)  # lower-cased byte + 1; 33 = space
        n = len(b)
        # is_word padded with False on both sides: its changes alternate word start, word end, ...
        is_word = np.zeros(n + 2, dtype=bool)
        np.not_equal(b, _SEP_VALUE, out=is_word[1:-1])
        bounds = np.flatnonzero(is_word[1:] != is_word[:-1])  # [start0, end0, start1, end1, ...]
        if len(bounds) == 0:
            return np.zeros(0, dtype=np.uint64), np.zeros(n_docs, dtype=np.int64)
        w_start = bounds[0::2]
        # sum over a word of (byte + 1) * B**(absolute position), then times B**-(word start): the
        # polynomial hash of the word alone (B is odd, so invertible mod 2**64)
        powers, inv = _power_tables(n + 1)
        vals = np.empty(n + 1, dtype=np.uint64)  # one spare slot: reduceat needs an index past the last end
        vals[n] = 0
        with np.errstate(over="ignore"):
            np.multiply(b, powers[:n], out=vals[:n])
            sums = np.add.reduceat(vals, bounds)[0::2]
            sums *= inv[w_start]
            hashes = _splitmix64(sums)
        counts = np.searchsorted(w_start, ends)  # words starting before each document's end
        return hashes, np.diff(counts, prepend=0).astype(np.int64)

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """(n_docs, num_perm) uint32 MinHash signatures of ``texts`` (in sub-batches of ~1M characters,
        so that the per-byte arrays stay in cache-friendly sizes)."""
        out, start, size = [], 0, 0
        for i, t in enumerate(texts):
            size += len(t)
            if size >= _BATCH_CHARS:
                out.append(self._signatures(texts[start : i + 1]))
                start, size = i + 1, 0
        if start < len(texts) or not out:
            out.append(self._signatures(texts[start:]))
        return np.concatenate(out)

    def _signatures(self, texts: Sequence[str]) -> np.ndarray:
        n_docs = len(texts)
        sig = np.full((n_docs, self.num_perm), np.iinfo(_SIG_DTYPE).max, dtype=_SIG_DTYPE)
        x, docs = self.shingles(texts)
        if len(x) == 0:
            return sig
        if self.method == "oph":
            return self._oph(x, docs, sig)
        present, starts = np.unique(docs, return_index=True)  # docs is sorted
        step = max(1, _MAX_CELLS // len(x))
        shift = np.uint64(32)
        with np.errstate(over="ignore"):
            for p0 in range(0, self.num_perm, step):
                a, b = self.a[p0 : p0 + step], self.b[p0 : p0 + step]
                hv = np.multiply(x[:, None], a[None, :])  # (S, block) uint64
                hv += b[None, :]
                # >> 32 is monotone, so the min of the shifted values is the shifted min: shift after reducing
                sig[present, p0 : p0 + step] = (np.minimum.reduceat(hv, starts, axis=0) >> shift).astype(_SIG_DTYPE)
        return sig

    def _oph(self, x: np.ndarray, docs: np.ndarray, sig: np.ndarray) -> np.ndarray:
        """One permutation hashing (Li, Owen & Zhang 2012) with optimal densification (Shrivastava 2017).

        One hash per shingle: its high bits pick one of ``num_perm`` bins, its low 32 bits are the value;
        each bin keeps its minimum. An empty bin (short documents) copies the value of the first non-empty
        bin in a probe sequence shared by all documents, which keeps P(equal bin) = Jaccard. Work is
        O(shingles) instead of O(shingles x num_perm).
        """
        p = self.num_perm
        h = _splitmix64(x ^ self._salt)
        hi = h >> np.uint64(32)
        bins = (hi & np.uint64(p - 1) if p & (p - 1) == 0 else hi % np.uint64(p)).astype(np.int64)
        key = docs * p + bins  # (S,) flat index into sig
        # sort (key, value) packed in one uint64: the first entry of each key is its minimum value
        packed = (key.astype(np.uint64) << np.uint64(32)) | (h & np.uint64(0xFFFFFFFF))
        packed.sort()
        k = (packed >> np.uint64(32)).astype(np.int64)
        first = np.empty(len(k), dtype=bool)
        first[0] = True
        np.not_equal(k[1:], k[:-1], out=first[1:])
        flat = sig.reshape(-1)
        flat[k[first]] = (packed[first] & np.uint64(0xFFFFFFFF)).astype(_SIG_DTYPE)
        filled = np.zeros(flat.shape, dtype=bool)
        filled[k[first]] = True
        filled = filled.reshape(sig.shape)
        rows = np.nonzero(~filled.all(axis=1) & filled.any(axis=1))[0]
        if len(rows):
            self._densify(sig, filled, rows)
        return sig

    def _densify(self, sig: np.ndarray, filled: np.ndarray, rows: np.ndarray) -> None:
        """Every empty bin copies the first filled bin of its probe sequence. Walks the probes one column
        at a time over the still-empty (row, bin) cells only, so the work is the number of probes used."""
        r_idx, jj = np.nonzero(~filled[rows])
        rr = rows[r_idx]
        src = np.zeros(len(rr), dtype=np.int64)
        pending = np.arange(len(rr))
        for t in range(self._probe.shape[1]):
            if not len(pending):
                break
            c = self._probe[jj[pending], t]
            ok = filled[rr[pending], c]
            src[pending[ok]] = c[ok]
            pending = pending[~ok]
        for q in pending.tolist():  # astronomically rare with 4*P probes; fall back to the next filled bin
            nz = np.nonzero(filled[rr[q]])[0]
            src[q] = nz[np.searchsorted(nz, jj[q]) % len(nz)]
        sig[rr, jj] = sig[rr, src]  # sources are filled bins, so the order of the copies does not matter

    def signatures_batched(self, texts: Iterable[str], batch_size: int = 2000) -> np.ndarray:
        out, batch = [], []
        for t in texts:
            batch.append(t)
            if len(batch) == batch_size:
                out.append(self.signatures(batch))
                batch = []
        if batch:
            out.append(self.signatures(batch))
        return np.concatenate(out) if out else np.zeros((0, self.num_perm), dtype=_SIG_DTYPE)


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving; ``root`` of a set is its smallest member."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            if ri < rj:
                self.parent[rj] = ri
            else:
                self.parent[ri] = rj

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def lsh_candidate_pairs(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n_pairs, 2) int64 pairs (i, j), i > j, where j is the first document sharing i's bucket in some band."""
    from tqdm.auto import tqdm

    n = len(sig)
    pairs = []
    for band in tqdm(range(bands), desc="LSH bands", disable=n < 100_000, leave=False):
        block = np.ascontiguousarray(sig[:, band * rows : (band + 1) * rows])
        keys = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel()  # one opaque key per doc
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        rep = first[inverse.ravel()]  # the lowest index with the same key
        dup = np.nonzero(rep != np.arange(n))[0]
        if len(dup):
            pairs.append(np.stack([dup, rep[dup]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def estimated_jaccard(sig: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Fraction of equal min-hashes per pair: an unbiased estimate of the pair's Jaccard similarity."""
    if len(pairs) == 0:
        return np.zeros(0)
    return (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1)


def cluster(sig: np.ndarray, bands: int, rows: int, threshold: float | None = None) -> np.ndarray:
    """Cluster id per document (= the smallest index in its cluster) from LSH buckets + union-find.

    With ``threshold``, a candidate pair is linked only if its estimated Jaccard reaches it (removes most
    LSH false positives at the cost of one vectorised comparison per pair).
    """
    pairs = lsh_candidate_pairs(sig, bands, rows)
    if threshold is not None and len(pairs):
        pairs = pairs[estimated_jaccard(sig, pairs) >= threshold]
    uf = UnionFind(len(sig))
    for i, j in pairs.tolist():
        uf.union(i, j)
    return uf.roots()


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    """Exact Jaccard similarity of two texts' word n-gram sets (same shingling as MinHasher)."""

    def grams(t: str) -> set[tuple[str, ...]]:
        w = words(t)
        if len(w) < ngram:
            return {tuple(w)} if w else set()
        return {tuple(w[i : i + ngram]) for i in range(len(w) - ngram + 1)}

    sa, sb = grams(a), grams(b)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)

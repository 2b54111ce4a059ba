"""Cleaning blocks: normalise, filter (length, Gopher, C4, FineWeb, language), scrub PII, probe lengths.

Each block is a datatrove ``PipelineStep`` (filters subclass ``BaseFilter``: ``filter(doc)`` returns
``True`` or ``(False, "reason")`` and the base counts every drop by reason and can write the dropped
documents). Gopher / C4 / FineWeb are datatrove's own filters; what is ours fills gaps that fail offline:

- ``RegexWordTokenizer``: datatrove's English word tokenizer needs spaCy; the quality filters only count
  words, punctuation and sentences, which a regex does offline and ~20x faster.
- ``LangIdFilter``: datatrove's ``LanguageFilter`` downloads a fastText model at run time; ``langid``
  ships its model in the wheel.
- ``PIIScrubber``: datatrove's ``PIIFormatter`` covers e-mails and IPv4 only; this adds IPv6, phone
  numbers and secret shapes, and counts replacements per kind.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import unicodedata
from pathlib import Path

import numpy as np
import regex
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.text import TERMINAL_PUNCTUATION
from datatrove.utils.word_tokenizers import WordTokenizer, simple_span_tokenize, strip_strings

from lmforge.config import help_field

# --------------------------------------------------------------------------------------------
# Normalise


@dataclasses.dataclass
class NormalizeConfig:
    enabled: bool = help_field(True, help="Unicode NFC, control characters out, whitespace tidied; empty docs dropped.")
    unicode_form: str = help_field("NFC", help="unicodedata normal form: NFC, NFKC, NFD, NFKD.")
    collapse_spaces: bool = help_field(True, help="Runs of spaces/tabs inside a line become one space (indentation kept).")
    max_blank_lines: int = help_field(1, help="At most this many consecutive blank lines.")

    def problems(self) -> list[str]:
        return [] if self.unicode_form in ("NFC", "NFKC", "NFD", "NFKD") else [
            f"unicode_form: '{self.unicode_form}' is not one of NFC, NFKC, NFD, NFKD"]


# Cc (control) except tab and newline, plus BOM / zero-width space / soft hyphen: invisible noise.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\u200b\u00ad]")
_ODD_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_INNER_SPACES = re.compile(r"(?<=\S)[ \t]{2,}")
_TRAILING = re.compile(r"[ \t]+\n")


def normalize_text(text: str, form: str = "NFC", collapse_spaces: bool = True, max_blank_lines: int = 1) -> str:
    text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _ODD_SPACE.sub(" ", text)
    if collapse_spaces:
        text = _INNER_SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    text = re.sub(r"\n{" + str(max_blank_lines + 2) + ",}", "\n" * (max_blank_lines + 1), text)
    return text.strip()


class Normalizer(PipelineStep):
    type = "✂️ - FORMAT"
    name = "🧼 Normalize"

    def __init__(self, cfg: NormalizeConfig):
        super().__init__()
        self.cfg = cfg

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update("total")
            with self.track_time():
                new = normalize_text(doc.text, self.cfg.unicode_form, self.cfg.collapse_spaces, self.cfg.max_blank_lines)
                if new != doc.text:
                    self.stat_update("changed")
                doc.text = new
            if not new:
                self.stat_update("dropped", "dropped_empty")
                continue
            self.stat_update("forwarded")
            yield doc


# --------------------------------------------------------------------------------------------
# Word tokenizer for datatrove's filters (offline, no spaCy)


class RegexWordTokenizer(WordTokenizer):
    """Words (``don't``, ``state-of-the-art`` stay whole) and each punctuation mark as its own token, like
    spaCy's English tokenizer does for what the Gopher / C4 / FineWeb rules count."""

    _word = regex.compile(r"\w+(?:['’\-]\w+)*|[^\w\s]")
    _sent = regex.compile(rf"(?:(?:\p{{Lu}}\.)|.)+?[{re.escape(''.join(TERMINAL_PUNCTUATION))}\n]+[\"'”]?|.+$",
                          regex.UNICODE | regex.DOTALL)

    def __init__(self, language: str = "en"):
        super().__init__(language)

    def word_tokenize(self, text: str) -> list[str]:
        return self._word.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return strip_strings(self._sent.findall(text))

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return list(simple_span_tokenize(text, self.sent_tokenize(text)))


def word_tokenizer(name: str):
    """What datatrove's filters take as ``language``: our regex tokenizer, or a language code (spaCy)."""
    return RegexWordTokenizer() if name == "regex" else "en"


# --------------------------------------------------------------------------------------------
# Filters


@dataclasses.dataclass
class LengthFilterConfig:
    enabled: bool = help_field(True, help="Drop documents outside [min_chars, max_chars] (reasons too_short/too_long).")
    min_chars: int = help_field(200, help="Minimum characters.")
    max_chars: int = help_field(1_000_000, help="Maximum characters.")


class LengthFilter(BaseFilter):
    name = "📏 Length"

    def __init__(self, min_chars: int, max_chars: int, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.min_chars, self.max_chars = min_chars, max_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if len(doc.text) < self.min_chars:
            return False, "too_short"
        if len(doc.text) > self.max_chars:
            return False, "too_long"
        return True


@dataclasses.dataclass
class GopherQualityConfig:
    enabled: bool = help_field(True, help="datatrove GopherQualityFilter (Rae et al. 2021, table A1).")
    min_doc_words: int = help_field(50, help="Minimum words (not counting punctuation).")
    max_doc_words: int = help_field(100_000, help="Maximum words.")
    min_avg_word_length: float = help_field(3, help="Minimum mean word length.")
    max_avg_word_length: float = help_field(10, help="Maximum mean word length.")
    max_symbol_word_ratio: float = help_field(0.1, help="Maximum ('#' or '...') per word.")
    max_bullet_lines_ratio: float = help_field(0.9, help="Maximum fraction of lines starting with a bullet.")
    max_ellipsis_lines_ratio: float = help_field(0.3, help="Maximum fraction of lines ending with an ellipsis.")
    max_non_alpha_words_ratio: float = help_field(0.8, help="Minimum fraction of words with a letter (datatrove's name).")
    min_stop_words: int = help_field(2, help="Minimum distinct English stop words (the, be, to, of, and, that, have, with).")


@dataclasses.dataclass
class GopherRepetitionConfig:
    enabled: bool = help_field(True, help="datatrove GopherRepetitionFilter: duplicate lines/paragraphs/n-grams.")
    dup_line_frac: float = help_field(0.3, help="Maximum fraction of duplicate lines.")
    dup_para_frac: float = help_field(0.3, help="Maximum fraction of duplicate paragraphs.")
    dup_line_char_frac: float = help_field(0.2, help="Maximum fraction of characters in duplicate lines.")
    dup_para_char_frac: float = help_field(0.2, help="Maximum fraction of characters in duplicate paragraphs.")


@dataclasses.dataclass
class C4Config:
    enabled: bool = help_field(False, help="datatrove C4QualityFilter (web-page rules; also drops lines it rejects).")
    filter_no_terminal_punct: bool = help_field(True, help="Drop lines not ending in . ? ! \" '.")
    min_num_sentences: int = help_field(5, help="Drop documents with fewer sentences after line filtering (-1: off).")
    min_words_per_line: int = help_field(3, help="Drop lines with fewer words (-1: off).")
    max_word_length: int = help_field(1000, help="Drop lines with a longer word (-1: off).")
    filter_lorem_ipsum: bool = help_field(True, help="Drop documents containing 'lorem ipsum'.")
    filter_javascript: bool = help_field(True, help="Drop lines mentioning javascript.")
    filter_curly_bracket: bool = help_field(True, help="Drop documents containing '{' (code, templates).")
    filter_policy: bool = help_field(True, help="Drop cookie / terms-of-use lines.")


@dataclasses.dataclass
class FineWebConfig:
    enabled: bool = help_field(False, help="datatrove FineWebQualityFilter.")
    line_punct_thr: float = help_field(0.12, help="Minimum fraction of lines ending in punctuation.")
    short_line_thr: float = help_field(0.67, help="Maximum fraction of short lines.")
    short_line_length: int = help_field(30, help="A line this short or shorter is short.")
    char_duplicates_ratio: float = help_field(0.01, help="Maximum fraction of characters in duplicate lines.")
    new_line_ratio: float = help_field(0.3, help="Maximum newlines per word.")


@dataclasses.dataclass
class LanguageConfig:
    enabled: bool = help_field(True, help="Language ID with langid (offline); keep `languages` above `min_confidence`.")
    languages: list[str] = help_field(["en"], help="ISO 639-1 codes to keep.")
    min_confidence: float = help_field(0.65, help="Minimum langid probability of the detected language.")
    max_chars: int = help_field(4000, help="Classify only the first this many characters (speed).")

    def problems(self) -> list[str]:
        return [] if 0 <= self.min_confidence <= 1 else ["min_confidence: must be in [0, 1]"]


_LANGID = None  # one model per process: unpacking langid's model string takes seconds


def langid_model():
    global _LANGID
    if _LANGID is None:
        from langid.langid import LanguageIdentifier, model

        _LANGID = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    return _LANGID


def classify_languages(texts: list[str]) -> list[tuple[str, float]]:
    """langid's naive Bayes for a batch at once: one (B, features) x (features, languages) matmul instead of
    B vector-matrix products (langid's own ``classify`` is ~40x slower per document)."""
    m = langid_model()
    fv = np.stack([m.instance2fv(t) for t in texts]).astype(np.float64)  # (B, F)
    logp = fv @ m.nb_ptc + m.nb_pc  # (B, L)
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    p /= p.sum(axis=1, keepdims=True)
    best = p.argmax(axis=1)
    return [(str(m.nb_classes[k]), float(p[i, k])) for i, k in enumerate(best)]


class LangIdFilter(BaseFilter):
    """Keeps documents whose langid language is in ``languages`` with probability >= ``min_confidence``.
    Drop reasons: ``language_<code>`` (another language) or ``language_low_confidence``."""

    name = "🌍 Language ID (langid)"
    _requires_dependencies = ["langid"]

    def __init__(self, languages: list[str], min_confidence: float = 0.65, max_chars: int = 4000, exclusion_writer=None):
        super().__init__(exclusion_writer, batch_size=256)
        self.languages = set(languages)
        self.min_confidence = min_confidence
        self.max_chars = max_chars

    def _decide(self, doc: Document, lang: str, prob: float) -> bool | tuple[bool, str]:
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(prob, 4)
        if lang not in self.languages:
            return False, f"language_{lang}"
        if prob < self.min_confidence:
            return False, "language_low_confidence"
        return True

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        preds = classify_languages([d.text[: self.max_chars] for d in batch])
        return [self._decide(d, lang, prob) for d, (lang, prob) in zip(batch, preds)]


@dataclasses.dataclass
class FiltersConfig:
    word_tokenizer: str = help_field("regex", help="Word tokenizer for Gopher/C4/FineWeb: 'regex' (offline) or 'spacy'.")
    write_dropped: bool = help_field(False, help="Write dropped documents to output_dir/dropped/<filter>/ for inspection.")
    length: LengthFilterConfig = dataclasses.field(default_factory=LengthFilterConfig)
    language: LanguageConfig = dataclasses.field(default_factory=LanguageConfig)
    gopher_quality: GopherQualityConfig = dataclasses.field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = dataclasses.field(default_factory=GopherRepetitionConfig)
    c4: C4Config = dataclasses.field(default_factory=C4Config)
    fineweb: FineWebConfig = dataclasses.field(default_factory=FineWebConfig)

    def problems(self) -> list[str]:
        out = []
        if self.word_tokenizer not in ("regex", "spacy"):
            out.append(f"word_tokenizer: '{self.word_tokenizer}' is not 'regex' or 'spacy'")
        elif self.word_tokenizer == "spacy":
            try:
                import spacy  # noqa: F401
            except ImportError:
                out.append("word_tokenizer: 'spacy' needs spaCy; `pip install spacy` or use 'regex'")
        return out


def _fields(cfg) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "enabled"}


def build_filters(cfg: FiltersConfig, dropped_dir: str | None) -> list[BaseFilter]:
    """The enabled filters in a fixed order, cheapest first, each with its own exclusion writer."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.writers import JsonlWriter

    def writer(tag: str):
        return JsonlWriter(str(Path(dropped_dir) / tag)) if (cfg.write_dropped and dropped_dir) else None

    lang = word_tokenizer(cfg.word_tokenizer)
    out: list[BaseFilter] = []
    if cfg.length.enabled:
        out.append(LengthFilter(cfg.length.min_chars, cfg.length.max_chars, exclusion_writer=writer("length")))
    if cfg.language.enabled:
        out.append(LangIdFilter(**_fields(cfg.language), exclusion_writer=writer("language")))
    if cfg.gopher_repetition.enabled:
        out.append(GopherRepetitionFilter(**_fields(cfg.gopher_repetition), exclusion_writer=writer("gopher_repetition"),
                                          language=lang))
    if cfg.gopher_quality.enabled:
        out.append(GopherQualityFilter(**_fields(cfg.gopher_quality), exclusion_writer=writer("gopher_quality"),
                                       language=lang))
    if cfg.c4.enabled:
        out.append(C4QualityFilter(**_fields(cfg.c4), exclusion_writer=writer("c4"), language=lang))
    if cfg.fineweb.enabled:
        out.append(FineWebQualityFilter(**_fields(cfg.fineweb), exclusion_writer=writer("fineweb"), language=lang))
    return out


# --------------------------------------------------------------------------------------------
# PII


@dataclasses.dataclass
class PIIConfig:
    enabled: bool = help_field(True, help="Replace PII and secrets with placeholders; counts go to the report.")
    emails: bool = help_field(True, help="E-mail addresses -> <EMAIL>.")
    ips: bool = help_field(True, help="IPv4 and IPv6 addresses -> <IP_ADDRESS>.")
    only_public_ips: bool = help_field(True, help="Leave private/loopback/documentation addresses (10.0.0.1, ::1) alone.")
    phones: bool = help_field(True, help="Phone numbers -> <PHONE>.")
    secrets: bool = help_field(True, help="API keys, tokens, private-key blocks, password assignments -> <SECRET>.")


EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b")
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]*\d)")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
# +44 20 7946 0958, (555) 123-4567, 555-123-4567, +1.555.123.4567: 9-15 digits with separators
PHONE = re.compile(r"(?<![\w+\-.])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){1,4}(?![\w-]|\.\d)")
_DATE_LIKE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")
SECRETS = [
    ("private_key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)")),
    ("aws_key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("github_token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})\b")),
    ("slack_token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
    ("api_key", re.compile(r"\b(?:sk-(?:proj-|live_|test_)?[A-Za-z0-9_-]{20,}|AIza[0-9A-Za-z_-]{35})")),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
]
# password = "hunter2hunter2", api_key: 'abc...' -> keep the name, hide the value
ASSIGNED_SECRET = re.compile(
    r"(?i)\b((?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|token|password|passwd|pwd)\b"
    r"[\"']?\s*[:=]\s*)([\"']?)([^\s\"']{8,})\2"
)


def _valid_ip(text: str, public_only: bool) -> bool:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    return ip.is_global or not public_only


def _ipv6_shaped(text: str) -> bool:
    """Not Python slices like ``a::2``: at least 3 colons or one full 4-digit group."""
    return text.count(":") >= 3 or any(len(g) == 4 for g in text.split(":"))


def _valid_phone(text: str) -> bool:
    digits = sum(c.isdigit() for c in text)
    return 9 <= digits <= 15 and not _DATE_LIKE.match(text.strip())


def scrub_pii(text: str, cfg: PIIConfig) -> tuple[str, dict[str, int]]:
    """(scrubbed text, replacements per kind). Order: secrets, e-mails, IPs, phones (most specific first)."""
    counts: dict[str, int] = {}

    def sub(pattern: re.Pattern, kind: str, placeholder: str, text: str, valid=None) -> str:
        def repl(m: re.Match) -> str:
            if valid is not None and not valid(m.group(0)):
                return m.group(0)
            counts[kind] = counts.get(kind, 0) + 1
            return placeholder

        return pattern.sub(repl, text)

    if cfg.secrets:
        for kind, pattern in SECRETS:
            text = sub(pattern, f"secret_{kind}", "<SECRET>", text)

        def assigned(m: re.Match) -> str:
            if m.group(3) == "<SECRET>":
                return m.group(0)
            counts["secret_assignment"] = counts.get("secret_assignment", 0) + 1
            return f"{m.group(1)}{m.group(2)}<SECRET>{m.group(2)}"

        text = ASSIGNED_SECRET.sub(assigned, text)
    if cfg.emails:
        text = sub(EMAIL, "email", "<EMAIL>", text)
    if cfg.ips:
        text = sub(IPV4, "ipv4", "<IP_ADDRESS>", text, lambda s: _valid_ip(s, cfg.only_public_ips))
        text = sub(IPV6, "ipv6", "<IP_ADDRESS>", text,
                   lambda s: _ipv6_shaped(s) and _valid_ip(s, cfg.only_public_ips))
    if cfg.phones:
        text = sub(PHONE, "phone", "<PHONE>", text, _valid_phone)
    return text, counts


class PIIScrubber(PipelineStep):
    type = "✂️ - FORMAT"
    name = "🕵️ PII scrub"

    def __init__(self, cfg: PIIConfig):
        super().__init__()
        self.cfg = cfg

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update("total")
            with self.track_time():
                doc.text, counts = scrub_pii(doc.text, self.cfg)
            if counts:
                self.stat_update("documents_with_pii")
                for kind, n in counts.items():
                    self.stat_update(f"pii_{kind}", value=n)
            self.stat_update("forwarded")
            yield doc


# --------------------------------------------------------------------------------------------
# Length probe (for the before/after histogram)


class LengthProbe(PipelineStep):
    """Passes documents through and saves their character lengths to ``folder/<rank>.npy``."""

    type = "📊 - STATS"
    name = "📏 Length probe"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        lengths = []
        for doc in data:
            self.stat_update("total", "forwarded")
            lengths.append(len(doc.text))
            yield doc
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        np.save(Path(self.folder) / f"{rank:05d}.npy", np.asarray(lengths, dtype=np.int64))

"""Data stage blocks, one at a time: readers, normalise, each filter (pass and fail with its reason), PII."""

from __future__ import annotations

import gzip
import json

import pytest
from datatrove.data import Document

from lmforge.config import UserError
from lmforge.pipeline.clean import (
    FiltersConfig,
    LengthProbe,
    NormalizeConfig,
    Normalizer,
    PIIConfig,
    PIIScrubber,
    RegexWordTokenizer,
    build_filters,
    classify_languages,
    normalize_text,
    scrub_pii,
)
from lmforge.pipeline.readers import LocalReader, SourceConfig, keep_fraction

GOOD = (
    "The library reads text files from a folder and writes the cleaned documents to a new folder. Each line is "
    "normalised first, and then the extra spaces and the control characters are removed. When a document is too "
    "short or holds almost nothing but numbers, it is dropped, and the reason is counted in the report. At the "
    "end, the program trains a tokenizer and cuts the data into blocks of the same length, so that the model can "
    "read them with no other conversion. The results can be opened and checked with the usual tools, and each "
    "step writes what it did to a log that a person can read."
)
GERMAN = (
    "Die Bibliothek liest Textdateien aus einem Verzeichnis und schreibt die bereinigten Dokumente in einen neuen "
    "Ordner. Jede Zeile wird zuerst normalisiert, danach werden doppelte Leerzeichen entfernt und Steuerzeichen "
    "gelöscht. Wenn ein Dokument zu kurz ist, wird es verworfen, und der Grund wird im Bericht gezählt."
)


def doc(text: str, id: str = "d") -> Document:
    return Document(text=text, id=id)


def filters(**enable) -> dict:
    """{filter name: filter} with only the named filters enabled (others off)."""
    cfg = FiltersConfig()
    for name in ("length", "language", "gopher_quality", "gopher_repetition", "c4", "fineweb"):
        getattr(cfg, name).enabled = name in enable
        for k, v in (enable.get(name) or {}).items():
            setattr(getattr(cfg, name), k, v)
    return {f.name: f for f in build_filters(cfg, None)}


def only(**enable):
    (f,) = filters(**enable).values()
    return f


def result(f, text: str):
    r = f.filter(doc(text))
    return r if isinstance(r, tuple) else (r, None)


# ---------------------------------------------------------------------------------------------
# readers


def test_reader_reads_every_format_and_shards_files(tmp_path):
    (tmp_path / "a.txt").write_text("first file\n\nsecond paragraph", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"id": "x1", "body": "one"}\n\n{"body": "two"}\n', encoding="utf-8")
    (tmp_path / "c.csv").write_text("id,text\nr1,hello there\nr2,\"multi\nline\"\n", encoding="utf-8")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "zipped"}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "e.parquet")
    sources = [
        SourceConfig(files=[str(tmp_path / "a.txt")], name="txt", text_unit="paragraph"),
        SourceConfig(files=[str(tmp_path / "b.jsonl")], name="js", text_key="body"),
        SourceConfig(files=[str(tmp_path / "c.csv"), str(tmp_path / "d.jsonl.gz")], name="mix"),
        SourceConfig(files=[str(tmp_path / "*.parquet")], name="pq"),
    ]
    reader = LocalReader(sources)
    docs = list(reader.run())
    assert [(d.id, d.text) for d in docs] == [
        ("txt/a.txt:p0", "first file"), ("txt/a.txt:p1", "second paragraph"),
        ("js/x1", "one"), ("js/b.jsonl:3", "two"),
        ("mix/r1", "hello there"), ("mix/r2", "multi\nline"), ("mix/d.jsonl.gz:1", "zipped"),
        ("pq/e.parquet:1", "p1"), ("pq/e.parquet:2", "p2"),
    ]
    assert docs[0].metadata["source"] == "txt"
    # two tasks: every file read exactly once
    shards = [[d.id for d in LocalReader(sources).run(rank=r, world_size=2)] for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(d.id for d in docs)


@pytest.mark.parametrize("content, expected", [
    (b'{"text": "ok"}\n{"text": broken}\n', "b.jsonl:2: not valid JSON"),
    (b'{"text": "ok"}\n{"body": "x"}\n', "b.jsonl:2: no 'text' field (fields: body); set sources[0].text_key"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "b.jsonl:2: not UTF-8 text"),
    (b'["a list"]\n', "b.jsonl:1: expected a JSON object per line"),
])
def test_reader_bad_jsonl_names_file_and_line(tmp_path, content, expected):
    (tmp_path / "b.jsonl").write_bytes(content)
    with pytest.raises(UserError) as e:
        list(LocalReader([SourceConfig(files=[str(tmp_path / "b.jsonl")])]).run())
    assert len(e.value.problems) == 1 and expected in e.value.problems[0]


def test_reader_missing_files_and_bad_text(tmp_path):
    with pytest.raises(UserError, match=r"sources\[0\].files: '.*nothing\*.jsonl' matches no file"):
        LocalReader([SourceConfig(files=[str(tmp_path / "nothing*.jsonl")])])
    (tmp_path / "x.bin").write_bytes(b"\x00")
    with pytest.raises(UserError, match=r"x.bin: unknown file type; set sources\[0\].format"):
        LocalReader([SourceConfig(files=[str(tmp_path / "x.bin")])])
    (tmp_path / "l.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(UserError, match=r"l.txt: not UTF-8 text .*iconv"):
        list(LocalReader([SourceConfig(files=[str(tmp_path / "l.txt")])]).run())
    (tmp_path / "c.csv").write_text("id,body\n1,x\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"c.csv: no 'text' column"):
        list(LocalReader([SourceConfig(files=[str(tmp_path / "c.csv")])]).run())


def test_weight_keeps_a_seeded_fraction_independent_of_task_count(tmp_path):
    lines = "".join(json.dumps({"id": i, "text": f"doc {i}"}) + "\n" for i in range(2000))
    (tmp_path / "a.jsonl").write_text(lines, encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(lines, encoding="utf-8")
    src = [SourceConfig(files=[str(tmp_path / "*.jsonl")], name="s", weight=0.25)]
    one = {d.id + d.metadata["file"] for d in LocalReader(src, seed=1).run()}
    two = {d.id + d.metadata["file"] for r in range(2) for d in LocalReader(src, seed=1).run(rank=r, world_size=2)}
    assert one == two
    assert 0.22 < len(one) / 4000 < 0.28
    assert {d.id for d in LocalReader(src, seed=2).run()} != {d.id for d in LocalReader(src, seed=1).run()}
    assert keep_fraction(0, "s", "x", 1.0)


# ---------------------------------------------------------------------------------------------
# normalise


def test_normalize_text():
    raw = "Cafe\u0301\x00 menu\x07 with   odd\u00a0spaces  \r\n\r\n\r\n\r\n  indented   line\ufeff\n"
    assert normalize_text(raw) == "Café menu with odd spaces\n\n  indented line"
    assert normalize_text(raw, collapse_spaces=False).endswith("  indented   line")


def test_normalizer_drops_empty_documents_with_a_reason():
    step = Normalizer(NormalizeConfig())
    out = list(step.run([doc("  \x00\u200b \n\n", "empty"), doc("ok  text", "ok")]))
    assert [(d.id, d.text) for d in out] == [("ok", "ok text")]
    assert step.stats.stats["dropped_empty"].total == 1 and step.stats.stats["forwarded"].total == 1


def test_length_probe_saves_lengths(tmp_path):
    import numpy as np

    out = list(LengthProbe(str(tmp_path)).run([doc("abc"), doc("hello")], rank=3))
    assert len(out) == 2 and np.load(tmp_path / "00003.npy").tolist() == [3, 5]


# ---------------------------------------------------------------------------------------------
# filters: each must pass good text and fail bad text with its reason


def test_length_filter():
    f = only(length={"min_chars": 10, "max_chars": 50})
    assert result(f, "x" * 20) == (True, None)
    assert result(f, "short") == (False, "too_short")
    assert result(f, "x" * 51) == (False, "too_long")


def test_language_filter():
    f = only(language={"languages": ["en"], "min_confidence": 0.65})
    assert result(f, GOOD) == (True, None)
    assert result(f, GERMAN) == (False, "language_de")
    assert only(language={"languages": ["de", "en"]}).filter(doc(GERMAN)) is True
    assert result(f, "12 34 56") == (False, "language_low_confidence")  # langid: 'en' at p = 0.17
    d = doc(GERMAN)
    f.filter(d)
    assert d.metadata["language"] == "de" and d.metadata["language_score"] > 0.9
    # batched classification agrees with langid's own classify
    from lmforge.pipeline.clean import langid_model

    for text in (GOOD, GERMAN):
        lang, p = langid_model().classify(text)
        assert classify_languages([text])[0][0] == lang and abs(classify_languages([text])[0][1] - p) < 1e-6


def test_gopher_quality_filter():
    f = only(gopher_quality={})
    assert result(f, GOOD) == (True, None)
    assert result(f, "Too few words here, and that is the end of it.") == (False, "gopher_short_doc")
    no_stop = " ".join(["Python developers write clean code daily."] * 20)
    assert result(f, no_stop) == (False, "gopher_enough_stop_words")
    assert result(f, GOOD + " #a #b #c #d #e #f #g #h #i #j #k #l #m" * 3) == (False, "gopher_too_many_hashes")
    bullets = "\n".join(f"- the item {i} of the list and more words to read" for i in range(20))
    assert result(f, bullets) == (False, "gopher_too_many_bullets")
    numbers = GOOD + " " + " ".join(str(i) for i in range(400))
    assert result(f, numbers) == (False, "gopher_below_alpha_threshold")


def test_gopher_repetition_filter():
    f = only(gopher_repetition={})
    assert result(f, GOOD) == (True, None)
    repeated = "\n".join(["Click here to subscribe to the newsletter today."] * 10 + [GOOD])
    assert result(f, repeated) == (False, "dup_line_frac")


def test_c4_filter():
    f = only(c4={})
    assert result(f, GOOD.replace(". ", ".\n")) == (True, None)
    assert result(f, GOOD + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.") == (False, "lorem_ipsum")
    assert result(f, GOOD.replace(". ", ".\n") + "\nThe dict {a: 1} is printed here.") == (False, "curly_bracket")
    assert result(f, "One sentence only, and it ends here.") == (False, "too_few_sentences")


def test_fineweb_filter():
    f = only(fineweb={})
    assert result(f, GOOD) == (True, None)
    no_punct = "\n".join(f"a line of text number {i} without an end mark at all here" for i in range(10))
    assert result(f, no_punct) == (False, "line_punct_ratio")


def test_filter_counts_drops_by_reason():
    f = only(length={"min_chars": 10, "max_chars": 30})
    kept = list(f.run([doc("x" * 20), doc("tiny"), doc("y" * 40), doc("z" * 5)]))
    assert len(kept) == 1
    st = f.stats.stats
    assert st["dropped_too_short"].total == 2 and st["dropped_too_long"].total == 1 and st["forwarded"].total == 1


def test_regex_word_tokenizer_matches_spacy_style_counts():
    tok = RegexWordTokenizer()
    assert tok.word_tokenize("Don't stop: state-of-the-art, #1...") == [
        "Don't", "stop", ":", "state-of-the-art", ",", "#", "1", ".", ".", "."]
    assert tok.sent_tokenize("First one. Second one! Third") == ["First one.", "Second one!", "Third"]


# ---------------------------------------------------------------------------------------------
# PII


@pytest.mark.parametrize("text, expected, kinds", [
    ("mail jane.doe@example-mail.com now", "mail <EMAIL> now", {"email": 1}),
    ("server 8.8.8.8 and 10.0.0.1", "server <IP_ADDRESS> and 10.0.0.1", {"ipv4": 1}),
    ("v6 2606:4700:4700::1111 but not ::1 or x[a::2]", "v6 <IP_ADDRESS> but not ::1 or x[a::2]", {"ipv6": 1}),
    ("call +44 20 7946 0958 or (555) 201-4477.", "call <PHONE> or <PHONE>.", {"phone": 2}),
    ("key AKIAIOSFODNN7EXAMPLE here", "key <SECRET> here", {"secret_aws_key": 1}),
    ("tok ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8", "tok <SECRET>", {"secret_github_token": 1}),
    ("api_key = 'Zx81Qm4PvB7t2LwK9sR3'", "api_key = '<SECRET>'", {"secret_assignment": 1}),
    ("password: hunter2hunter2", "password: <SECRET>", {"secret_assignment": 1}),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIB\n-----END RSA PRIVATE KEY-----\nafter", "<SECRET>\nafter",
     {"secret_private_key": 1}),
])
def test_pii_replaced(text, expected, kinds):
    assert scrub_pii(text, PIIConfig()) == (expected, kinds)


@pytest.mark.parametrize("text", [
    "uuid 12345678-1234-5678-1234-567812345678", "on 2023-11-25 at noon", "pi is 3.14159265358",
    "ISBN 978-3-16-148410-0", "a[1::2] slices", "private 192.168.1.20", "version 3.11.4 released",
])
def test_pii_leaves_lookalikes_alone(text):
    assert scrub_pii(text, PIIConfig()) == (text, {})


def test_pii_kinds_can_be_switched_off_and_are_counted():
    assert scrub_pii("a@b.org 8.8.8.8", PIIConfig(emails=False))[0] == "a@b.org <IP_ADDRESS>"
    assert scrub_pii("8.8.8.8 10.0.0.1", PIIConfig(only_public_ips=False))[0] == "<IP_ADDRESS> <IP_ADDRESS>"
    step = PIIScrubber(PIIConfig())
    out = list(step.run([doc("write to a@b.org or c@d.org"), doc("nothing here")]))
    assert out[0].text == "write to <EMAIL> or <EMAIL>"
    assert step.stats.stats["pii_email"].total == 2 and step.stats.stats["documents_with_pii"].total == 1

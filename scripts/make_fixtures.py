"""Rebuild the small fixtures the tests and tiny recipes use: a text corpus and a 512-token tokenizer.

    python scripts/make_fixtures.py            # writes tests/fixtures/corpus/ and tests/fixtures/tokenizer/

The corpus is the docstrings of Python standard-library modules (Python Software Foundation
License), so it is real English technical prose that ships with every Python and needs no download.
Outputs are committed; rerun only to change them.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

MODULES = [
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmath", "codecs",
    "collections", "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fileinput", "fnmatch", "fractions", "functools", "getopt",
    "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox",
    "math", "mimetypes", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform",
    "plistlib", "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "signal", "smtplib", "socket", "sqlite3", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types",
    "typing", "unittest", "urllib", "uuid", "warnings", "weakref", "xml", "zipfile", "zlib",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}<|endoftext|>{% endgeneration %}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def docstrings() -> list[str]:
    docs: list[str] = []
    seen: set[str] = set()
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        objs = [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if doc and len(doc) > 200 and doc not in seen:
                seen.add(doc)
                docs.append(doc.strip())
    return docs


def main() -> None:
    docs = docstrings()
    random.Random(0).shuffle(docs)
    out = FIXTURES / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    budget, total, kept = 400_000, 0, []
    for d in docs:
        if total > budget:
            break
        kept.append(d)
        total += len(d)
    with open(out / "stdlib_docs.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(kept):
            f.write(json.dumps({"id": f"doc{i:04d}", "text": d}) + "\n")
    print(f"corpus: {len(kept)} documents, {total} characters")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(kept, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
        pad_token="<|pad|>", additional_special_tokens=specials[2:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    fast.save_pretrained(FIXTURES / "tokenizer")
    print(f"tokenizer: vocab {len(fast)} -> {FIXTURES / 'tokenizer'}")


if __name__ == "__main__":
    main()

"""Rebuild the small fine-tuning fixtures: SFT (prompt/completion and chat) and classification JSONL.

    python scripts/make_sft_fixtures.py   # writes tests/fixtures/sft/*.jsonl and tests/fixtures/classify/*.jsonl

Synthetic and deterministic (seeded): string and arithmetic tasks a tiny model can start to learn
in a few CPU steps, and three-topic sentences for classification. Outputs are committed; rerun only
to change them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("apple river stone cloud paper garden window candle forest mirror silver basket engine "
         "ladder pocket rocket spider tunnel violin wallet yellow zipper").split()
SYSTEM = "You are a terse assistant."


def task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        w = rng.choice(WORDS)
        return f"Reverse the word: {w}", w[::-1]
    if kind == 1:
        a, b = rng.randrange(50), rng.randrange(50)
        return f"Add {a} and {b}.", str(a + b)
    if kind == 2:
        ws = rng.sample(WORDS, 2)
        return f"Uppercase: {' '.join(ws)}", " ".join(ws).upper()
    w = rng.choice(WORDS)
    return f"How many letters are in '{w}'?", str(len(w))


def sft(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        p, c = task(rng)
        rows.append({"prompt": f"Question: {p}\nAnswer: ", "completion": c})
    return rows


def chat(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        msgs = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
        for _ in range(rng.choice((1, 1, 2))):
            p, c = task(rng)
            msgs += [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
        rows.append({"messages": msgs})
    return rows


TOPICS = {
    "sports": "team goal match coach player score league ball season referee".split(),
    "food": "soup bread recipe oven salt cheese dinner spoon pepper kitchen".split(),
    "weather": "rain wind cloud storm sunny forecast snow cold humid thunder".split(),
}
FILLER = "the a today this very some our with and of".split()


def classify(rng: random.Random, n: int) -> list[dict]:
    rows = []
    labels = sorted(TOPICS)
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.sample(TOPICS[label], 3) + rng.sample(FILLER, 3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{path.relative_to(ROOT)}: {len(rows)} records")


def main() -> None:
    rng = random.Random(0)
    write(ROOT / "tests/fixtures/sft/train.jsonl", sft(rng, 320))
    write(ROOT / "tests/fixtures/sft/validation.jsonl", sft(rng, 40))
    write(ROOT / "tests/fixtures/sft/chat.jsonl", chat(rng, 160))
    write(ROOT / "tests/fixtures/classify/train.jsonl", classify(rng, 240))
    write(ROOT / "tests/fixtures/classify/validation.jsonl", classify(rng, 60))


if __name__ == "__main__":
    main()

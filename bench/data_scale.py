"""The data stage at 1x, 2x, 4x, 8x a real corpus: wall time and peak memory of every block.

    .venv/bin/python bench/data_scale.py [--mb 3] [--scales 1 2 4 8] [--tasks 2] [--sort-mb 1] [--out docs/data_scale.png]

The 1x corpus is this machine's Python standard-library source (one document per .py file, long files cut
at 32 KB) up to ``--mb`` MB. The k-x corpus holds k copies of it; copy c > 0 of a document has ~20% of its
words replaced by other words of the same document (seeded by document and copy), so neither exact nor
MinHash dedup removes the copies (5-gram Jaccard between copies ~0.1-0.2) while the vocabulary stays that
of the stdlib, as more text of one language does. Every scale runs the same recipe through the data
stage's own ``pipelines()`` and ``make_executor()``; each of the three blocks (clean, dedup, publish) runs
in a fresh Python process (workers: 1, so its tasks run in that process), which reports the block's wall
time, CPU time (all threads) and its peak resident memory (``VmHWM`` of /proc/self/status, which starts
afresh at exec). Publishing holds at most ``pack.sort_buffer_mb`` of text while sorting and ~1 MB per
tokenizer batch; the bench sets ``sort_buffer_mb`` (``--sort-mb``, 1) below the 1x corpus so that the
bound is reached at every scale (with the default 16 MB, RSS grows until 16 MB of kept text, then stays).

Prints one table (scale, documents, MB, wall s and peak RSS MB per block) and the ratio
publish_rss(largest) / publish_rss(1x), and writes a PNG of both curves. Target (issue 14): time grows
~linearly with the corpus and publishing's peak RSS stays flat (<= 1.2x from 1x to 8x).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import stdlib_named_documents  # noqa: E402  (bench/data.py: the same corpus, named)

BLOCKS = ("clean", "dedup", "publish")
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")

RECIPE = """\
stage: data
output_dir: {out}
seed: 0
sources:
  - name: stdlib
    files: [{files}]
    text_key: text
    id_key: id
executor: {{kind: local, tasks: {tasks}, workers: 1}}
filters:
  length: {{min_chars: 200, max_chars: 1000000}}
  language: {{enabled: false}}          # source code: language ID would drop most of it
  gopher_repetition: {{enabled: false}} # likewise (repeated lines such as `return` are normal in code)
  gopher_quality: {{enabled: false}}    # written for prose, not code
pii: {{enabled: true}}
dedup: {{exact: true, near: {{enabled: true, threshold: 0.8}}}}
tokenizer: {{train: true, type: bpe, vocab_size: 4000}}
pack: {{block_size: 512, validation_ratio: 0.05, sort_buffer_mb: {sort_mb}}}
"""


# --------------------------------------------------------------------------------------------
# corpus


def edited(text: str, doc: str, copy: int) -> str:
    """Copy 0: the text itself; copy c: ~20% of its words replaced by other words of the same text."""
    if copy == 0:
        return text
    rng = random.Random(f"{doc}/{copy}")
    vocab = sorted(set(WORD.findall(text))) or ["x"]
    return WORD.sub(lambda m: rng.choice(vocab) if rng.random() < 0.2 else m.group(0), text)


def write_corpus(folder: Path, base: list[tuple[str, str]], scale: int, n_files: int = 4) -> float:
    """k copies of the base corpus as ``n_files`` JSONL files (round robin); returns its size in MB."""
    folder.mkdir(parents=True, exist_ok=True)
    handles = [open(folder / f"part{j}.jsonl", "w", encoding="utf-8") for j in range(n_files)]
    size = 0
    k = 0
    for copy in range(scale):
        for doc, text in base:
            t = edited(text, doc, copy)
            size += len(t.encode())
            handles[k % n_files].write(json.dumps({"id": f"{copy}/{doc}", "text": t}) + "\n")
            k += 1
    for h in handles:
        h.close()
    return size / 1e6


# --------------------------------------------------------------------------------------------
# one block in this (fresh) process


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_block(recipe: str, block: str) -> dict:
    from lmforge.config import load
    from lmforge.pipeline.logs import quiet_datatrove
    from lmforge.stages import data as data_stage

    cfg = load(data_stage.Config, recipe, [])
    out = Path(cfg.output_dir)
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    quiet_datatrove()
    steps = data_stage.pipelines(cfg, work, str(out))
    tasks = cfg.executor.tasks if block == "clean" else 1
    ex = data_stage.make_executor(cfg, block, steps[block], tasks, work / "logs")
    rss0 = peak_rss_mb()
    t, c = time.perf_counter(), time.process_time()
    ex.run()
    return {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c, "peak_rss_mb": peak_rss_mb(),
            "rss_after_imports_mb": rss0}


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=3.0, help="size of the 1x corpus")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--tasks", type=int, default=2, help="executor.tasks of the cleaning block")
    ap.add_argument("--sort-mb", type=float, default=1.0,
                    help="pack.sort_buffer_mb (default recipe: 16); below the 1x corpus, so the bound holds from 1x")
    ap.add_argument("--out", default=str(ROOT / "docs" / "data_scale.png"))
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--run-block", nargs=2, metavar=("RECIPE", "BLOCK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_block:
        print("RESULT " + json.dumps(run_block(*args.run_block)))
        return

    base = stdlib_named_documents(args.mb)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmforge-data-scale-") as tmp:
        for k in args.scales:
            corpus = Path(tmp) / f"corpus{k}"
            mb = write_corpus(corpus, base, k)
            recipe = Path(tmp) / f"recipe{k}.yaml"
            out = Path(tmp) / f"out{k}"
            recipe.write_text(RECIPE.format(out=out, files=corpus / "*.jsonl", tasks=args.tasks, sort_mb=args.sort_mb))
            row = {"scale": k, "docs": len(base) * k, "mb": mb}
            for block in BLOCKS:
                p = subprocess.run([sys.executable, __file__, "--run-block", str(recipe), block],
                                   capture_output=True, text=True, cwd=ROOT)
                line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
                if p.returncode != 0 or line is None:
                    sys.exit(f"{block} at {k}x failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
                r = json.loads(line.removeprefix("RESULT "))
                row[f"{block}_s"], row[f"{block}_cpu"], row[f"{block}_rss"] = r["wall_s"], r["cpu_s"], r["peak_rss_mb"]
            report = json.loads((Path(str(out) + ".partial") / "report.json").read_text())
            row["kept"] = report["documents"]["kept"]
            row["tokens"] = report["tokens"]["train"] + report["tokens"]["validation"]
            import datasets

            dd = datasets.load_from_disk(str(Path(str(out) + ".partial") / "dataset"))
            assert len(dd["train"]) == report["tokens"]["train_blocks"] and len(dd["train"][0]["input_ids"]) == 512
            rows.append(row)
            print(f"{k}x: {mb:.1f} MB, {row['kept']} docs kept, " + ", ".join(
                f"{b} {row[f'{b}_s']:.1f} s / {row[f'{b}_rss']:.0f} MB" for b in BLOCKS), flush=True)

    head = ("| scale | docs read | docs kept | MB | tokens | " + " | ".join(f"{b} wall s" for b in BLOCKS) + " | "
            + " | ".join(f"{b} CPU s" for b in BLOCKS) + " | " + " | ".join(f"{b} peak RSS MB" for b in BLOCKS) + " |")
    lines = [head, "|" + "---:|" * (5 + 3 * len(BLOCKS))]
    for r in rows:
        lines.append(f"| {r['scale']}x | {r['docs']} | {r['kept']} | {r['mb']:.1f} | {r['tokens']:,} | "
                     + " | ".join(f"{r[f'{b}_s']:.1f}" for b in BLOCKS) + " | "
                     + " | ".join(f"{r[f'{b}_cpu']:.1f}" for b in BLOCKS) + " | "
                     + " | ".join(f"{r[f'{b}_rss']:.0f}" for b in BLOCKS) + " |")
    first, last = rows[0], rows[-1]
    growth = last["mb"] / first["mb"]
    lines.append("")
    lines.append(f"corpus {growth:.1f}x larger: wall time " + ", ".join(
        f"{b} {last[f'{b}_s'] / first[f'{b}_s']:.1f}x" for b in BLOCKS) + "; CPU time " + ", ".join(
        f"{b} {last[f'{b}_cpu'] / first[f'{b}_cpu']:.1f}x" for b in BLOCKS) + "; peak RSS " + ", ".join(
        f"{b} {last[f'{b}_rss'] / first[f'{b}_rss']:.2f}x" for b in BLOCKS))
    ratio = last["publish_rss"] / first["publish_rss"]
    lines.append(f"publish_rss({last['scale']}x) / publish_rss({first['scale']}x) = {ratio:.2f} "
                 f"({'within' if ratio <= 1.2 else 'ABOVE'} the 1.2x target)")
    print("\n" + "\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    plot(rows, args.out)
    print(f"\nwrote {args.out}")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mb = [r["mb"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in ((axes[0], "s", "Wall time per block (s)"), (axes[1], "cpu", "CPU time per block (s)")):
        for block in BLOCKS:
            t = [r[f"{block}_{key}"] for r in rows]
            ax.plot(mb, t, "o-", label=block)
            ax.plot(mb, [t[0] * m / mb[0] for m in mb], ":", color=ax.lines[-1].get_color(), alpha=0.6)
        ax.plot([], [], "k:", alpha=0.6, label="linear from 1x")
        ax.set_title(title)
    for block in BLOCKS:
        axes[2].plot(mb, [r[f"{block}_rss"] for r in rows], "o-", label=block)
    axes[2].set_title("Peak RSS per block (MB, fresh process each)")
    axes[2].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel("corpus (scale, MB)")
        ax.set_xticks(mb, [f"{r['scale']}x\n{r['mb']:.0f}" for r in rows])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

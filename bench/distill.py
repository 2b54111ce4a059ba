"""Distillation losses against a CE-only control, live vs cached teacher, over several seeds, in one process.

    .venv/bin/python bench/distill.py [--seeds 3] [--steps 100] [--teacher-steps 1200] [--tune ROW:KEY=VALUE] [--quick]

Data. The fixture corpus is split once by document (10% held out, fixed seed) into
``<out>/data/{train,val}.jsonl``, and every run here, the teacher's pretraining included, trains on one
and validates on the other: the teacher never sees a validation document and every seed validates on
the same blocks. (The stage's own ``data.validation_ratio`` split is seeded by ``seed``, so a distill
run with another seed than the teacher's pretraining would validate on documents the teacher learnt.)

Teacher: a Llama (default 4 layers x 256) pretrained by ``lmforge.stages.pretrain`` for ``--teacher-steps``,
reused from ``<out>/teacher_*`` when one with the same settings and data exists.

Quality section: per seed, real ``lmforge.stages.distill.train`` runs of ``recipes/tiny/distill.yaml``
(T=2, alpha_ce 0.5, weight_kd 0.5 unless ``--set`` / ``--tune`` change them) for ``--steps`` optimizer
steps, all from the same student initialisation (default ``student.init: teacher_layers`` with
``--every-k``; ``--student-init fresh`` builds ``--student`` from the seed instead): the control
(``distill.weight_kd=0 distill.alpha_ce=1``), live forward / reverse / jsd / skew KL, live forward KL +
hidden-state MSE, and cached forward KL at each ``--top-k`` (each cache is built once by the stage, timed
apart, and reused by the later seeds and the speed section).

Speed section: the claim "cached trains >= 1.5x faster than live when the teacher is >= 4x the
student" needs a student 4x cheaper than the teacher, which ``teacher_layers`` (the teacher's width, and
on this 512-token vocabulary the LM head is a large share of a thin model) does not give. So, per seed,
live forward KL and cached forward KL at each k also train a fresh narrow student (``--speed-student``,
default 2 x 128: 6.7x fewer training FLOPs per token than the teacher) for ``--speed-steps``.

Measured per run: validation CE on the real labels (the run's eval loss); KL(teacher || student) at T=1
per position on the validation blocks, computed here from the saved ``final/`` student and the teacher;
training speed from a timer on the loop's batch fetches (one per step, so a step's interval holds its
data loading, forward, backward and optimizer step, never the cache build or the final eval), as tokens
per second of wall time at the median step (robust to other jobs on a shared machine) and per CPU-second
of this process; the cache's bytes per token on disk. Spread = max - min over seeds. A KD row "beats"
the control when its mean margin (control CE - row CE) exceeds the larger of the two rows' spreads.
Writes ``<out>/distill_bench.{md,json}`` (and every run's row to ``distill_runs.json`` as it goes);
default ``<out>`` = ``outputs/bench/distill`` (``--quick``: ``outputs/bench/distill/quick``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CORPUS = ROOT / "tests" / "fixtures" / "corpus" / "stdlib_docs.jsonl"
RECIPES = ROOT / "recipes" / "tiny"
BLOCK, BATCH = 128, 8  # recipes/tiny/distill.yaml: data.block_size, train.per_device_train_batch_size
WARMUP_STEPS = 3  # steps left out of the speed numbers

# row id -> (label, overrides on top of recipes/tiny/distill.yaml); all live mode
LIVE_ROWS = {
    "control": ("control (CE only)", ["distill.weight_kd=0", "distill.alpha_ce=1"]),
    "forward": ("forward KL", ["distill.kl=forward"]),
    "reverse": ("reverse KL", ["distill.kl=reverse"]),
    "jsd": ("jsd", ["distill.kl=jsd"]),
    "skew": ("skew KL", ["distill.kl=skew"]),
    "hidden": ("forward KL + hidden mse", ["distill.kl=forward", "distill.hidden=mse"]),
}
CONTROL, LIVE_FORWARD = "control", "forward"


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def llama_config(layers: int, hidden: int) -> dict:
    heads = max(hidden // 64, 2)
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": hidden * 8 // 3 // 16 * 16,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": max(heads // 2, 1),
            "max_position_embeddings": 256}


def flow(d: dict) -> str:
    """A dict as a one-line YAML flow mapping, for a `key={...}` override."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"


def dims(text: str) -> tuple[int, int]:
    layers, hidden = text.lower().split("x")
    return int(layers), int(hidden)


def split_corpus(out: Path, ratio: float = 0.1, seed: int = 0, max_docs: int | None = None) -> tuple[Path, Path]:
    """Hold out `ratio` of the corpus documents once (of the first `max_docs`, if given): train/val.jsonl."""
    lines = [x for x in CORPUS.read_text().splitlines() if x.strip()][:max_docs]
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    val = set(order[:max(1, round(ratio * len(lines)))])
    out.mkdir(parents=True, exist_ok=True)
    train_f, val_f = out / "train.jsonl", out / "val.jsonl"
    train_f.write_text("".join(x + "\n" for i, x in enumerate(lines) if i not in val))
    val_f.write_text("".join(x + "\n" for i, x in enumerate(lines) if i in val))
    return train_f, val_f


def build_teacher(out: Path, train_f: Path, val_f: Path, layers: int, hidden: int, steps: int,
                  fresh: bool) -> tuple[Path, float | None, list]:
    """Pretrain the teacher (or reuse one made with the same settings and data):
    (its final/, seconds spent or None when reused, [(step, validation CE), ...])."""
    from lmforge.config import load
    from lmforge.stages import pretrain

    digest = hashlib.sha256(train_f.read_bytes() + b"\0" + val_f.read_bytes()).hexdigest()
    key = {"config": llama_config(layers, hidden), "steps": steps, "data": digest}
    folder = out / f"teacher_{layers}x{hidden}_{steps}steps"
    stamp = folder / "bench_key.json"

    def curve():
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return [(r["step"], r["loss"]) for r in rows if r.get("split") == "eval"]

    if not fresh and stamp.is_file() and json.loads(stamp.read_text()) == key and (folder / "final").is_dir():
        return folder / "final", None, curve()
    over = [f"output_dir={folder}", "overwrite=true", f"data.train_files=[{train_f}]", f"data.validation_files=[{val_f}]",
            f"train.max_steps={steps}", "log.trackers=[]", f"log.log_every={max(steps // 10, 1)}",
            f"eval.eval_every={max(steps // 4, 1)}", "checkpoint.save_every=0", f"schedule.warmup_steps={max(steps // 20, 1)}",
            f"model.config={flow(llama_config(layers, hidden))}"]
    cfg = load(pretrain.Config, RECIPES / "pretrain.yaml", over)
    t = time.perf_counter()
    try:
        pretrain.main(cfg)
    finally:
        _reset_accelerate()
    stamp.write_text(json.dumps(key, indent=1))
    return folder / "final", time.perf_counter() - t, curve()


class StepClock:
    """Wall and process-CPU time at every batch fetch of the loop: one per optimizer step (gas = 1), so
    consecutive marks bracket a whole step (data, forward, backward, optimizer)."""

    def __init__(self):
        self.marks: list[tuple[float, float]] = []

    def __enter__(self):
        from lmforge.datasets.batching import RankBatches
        from lmforge.train import loop

        clock, self.real = self, loop.RankBatches

        class Timed(RankBatches):
            def get(self, k):
                clock.marks.append((time.perf_counter(), time.process_time()))
                return super().get(k)

        loop.RankBatches = Timed
        return self

    def __exit__(self, *exc):
        from lmforge.train import loop

        loop.RankBatches = self.real

    def speeds(self, tokens_per_step: int) -> tuple[float, float]:
        """(tokens/s at the median step's wall time, tokens per CPU-second), warm-up steps left out."""
        if len(self.marks) < 2:
            raise RuntimeError("StepClock: the loop fetched no batches through loop.RankBatches; the stage passed its own")
        m = self.marks[WARMUP_STEPS:] if len(self.marks) > WARMUP_STEPS + 2 else self.marks
        walls = [b[0] - a[0] for a, b in zip(m, m[1:])]
        cpu = m[-1][1] - m[0][1]
        return tokens_per_step / statistics.median(walls), tokens_per_step * len(walls) / max(cpu, 1e-9)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Reference:
    """The teacher's log-probs (T=1) on the validation blocks, kept in memory, to score any student."""

    def __init__(self, teacher_dir: Path, val_f: Path, batch: int = 16):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lmforge.datasets.lm import load_raw, tokenize_and_pack

        tok = AutoTokenizer.from_pretrained(teacher_dir)
        val = tokenize_and_pack(load_raw([str(val_f)], "text"), tok, "text", BLOCK, None).with_format("torch")
        self.ids = val[:]["input_ids"]  # (blocks, seq)
        self.batch = batch
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
        self.vocab = teacher.get_output_embeddings().weight.shape[0]
        self.log_p, ce = [], 0.0
        with torch.no_grad():
            for i in range(0, len(self.ids), batch):
                ids = self.ids[i:i + batch]
                lp = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), -1)  # (b, seq-1, vocab)
                self.log_p.append(lp)
                ce += float(-lp.gather(-1, ids[:, 1:, None]).sum())
        self.n_pos = self.ids.shape[0] * (self.ids.shape[1] - 1)
        self.teacher_ce = ce / self.n_pos

    def score(self, student) -> tuple[float, float]:
        """(KL(teacher || student), the student's CE on the real labels), per position over the validation blocks."""
        import torch

        student = student.eval()
        kl = ce = 0.0
        with torch.no_grad():
            for j, i in enumerate(range(0, len(self.ids), self.batch)):
                ids = self.ids[i:i + self.batch]
                lq = torch.log_softmax(student(input_ids=ids).logits[:, :-1, :self.vocab].float(), -1)
                lp = self.log_p[j]
                kl += float((lp.exp() * (lp - lq)).sum())
                ce += float(-lq.gather(-1, ids[:, 1:, None]).sum())
        return kl / self.n_pos, ce / self.n_pos


def run_one(section: str, row: str, label: str, over: list[str], seed: int, out: Path, ref: Reference,
            cache_timer: dict) -> dict:
    """One distill run; its numbers as a dict."""
    from transformers import AutoModelForCausalLM

    from lmforge.config import load
    from lmforge.stages import distill

    run_dir = out / "runs" / section / row / f"seed{seed}"
    cfg = load(distill.Config, RECIPES / "distill.yaml", [*over, f"output_dir={run_dir}", "overwrite=true", f"seed={seed}"])
    cache_timer.clear()
    t = time.perf_counter()
    try:
        with StepClock() as clock:
            result, _, _ = distill.train(cfg)
    finally:
        _reset_accelerate()
    wall = time.perf_counter() - t
    kl, ce_check = ref.score(AutoModelForCausalLM.from_pretrained(run_dir / "final"))
    tps, tpcpu = clock.speeds(BATCH * BLOCK)
    summary = json.loads((run_dir / "summary.json").read_text())
    x = {"section": section, "row": row, "label": label, "seed": seed, "overrides": over, "val_ce": result.eval["loss"],
         "val_ce_recomputed": ce_check, "kl": kl, "tokens_per_s": tps, "tokens_per_cpu_s": tpcpu, "run_wall_s": wall,
         "train_loss": result.train_loss, "parameters": summary["parameters"], "loadavg": os.getloadavg()[0]}
    cache = summary["distill"].get("cache")
    if cache:
        folder = Path(cache["cache_dir"])
        meta = json.loads((folder / "kd_cache.json").read_text())["fingerprint"]
        x.update(cache_reused=cache["reused"], cache_rows=meta["rows"],
                 cache_bytes_per_token=folder_bytes(folder) / (meta["rows"] * meta["block_size"]), **cache_timer)
    print(f"   {section:7s} {label:26s} seed {seed}: val CE {x['val_ce']:.4f}  KL {kl:.4f}  {tps:,.0f} tok/s  "
          f"{tpcpu:,.0f} tok/CPU-s  (run {wall:.0f}s, load {x['loadavg']:.1f})"
          + (f"  cache built in {x['cache_build_s']:.1f}s" if "cache_build_s" in x else ""), flush=True)
    return x


def spread_of(values: list[float]) -> tuple[float, float]:
    """(mean, spread = max - min)."""
    return statistics.fmean(values), (max(values) - min(values)) if len(values) > 1 else 0.0


def report(runs: list[dict], quality: list[str], speed_rows: list[str], ks: list[int], ref: Reference,
           meta: dict) -> tuple[str, dict]:
    def rows_of(section, r):
        return [x for x in runs if x["section"] == section and x["row"] == r]

    def mean(section, r, key):
        return statistics.fmean(x[key] for x in rows_of(section, r))

    ctrl_ce = {x["seed"]: x["val_ce"] for x in rows_of("quality", CONTROL)}
    c_mean, c_spread = spread_of(list(ctrl_ce.values()))
    table = ["| row | val CE (mean ± spread) | KL(teacher‖student) | train tok/s | tok/CPU-s | margin vs control "
             "(smallest per seed) | larger spread | beats control |", "|---|---|---|---|---|---|---|---|"]
    verdicts = {}
    for r in quality:
        xs = rows_of("quality", r)
        m, s = spread_of([x["val_ce"] for x in xs])
        km, kspread = spread_of([x["kl"] for x in xs])
        cells = (f"| {xs[0]['label']} | {m:.4f} ± {s:.4f} | {km:.4f} ± {kspread:.4f} | {mean('quality', r, 'tokens_per_s'):,.0f} "
                 f"| {mean('quality', r, 'tokens_per_cpu_s'):,.0f} |")
        if r == CONTROL:
            table.append(cells + " — | — | — |")
            continue
        margin, paired, spread = c_mean - m, min(ctrl_ce[x["seed"]] - x["val_ce"] for x in xs), max(s, c_spread)
        verdicts[r] = {"margin": margin, "min_paired_margin": paired, "spread": spread, "beats": margin > spread}
        table.append(cells + f" {margin:+.4f} ({paired:+.4f}) | {spread:.4f} | {'yes' if margin > spread else 'NO'} |")
    table.append(f"| teacher (reference) | {ref.teacher_ce:.4f} | 0 | — | — | — | — | — |")

    cache_table = ["| top_k | cache bytes / token (8k+4) | cache build s (wall / CPU) | val CE lost vs live forward | "
                   "KL lost vs live forward | cached / live tok/s, quality student |", "|---|---|---|---|---|---|"]
    for k in ks:
        r = f"cached_k{k}"
        xs = rows_of("quality", r)
        build = next((x for x in runs if x["row"] == r and "cache_build_s" in x), {})
        cache_table.append(
            f"| {k} | {xs[0]['cache_bytes_per_token']:,.1f} ({8 * k + 4}) | {build.get('cache_build_s', float('nan')):.1f} / "
            f"{build.get('cache_build_cpu_s', float('nan')):.1f} | "
            f"{mean('quality', r, 'val_ce') - mean('quality', LIVE_FORWARD, 'val_ce'):+.4f} | "
            f"{mean('quality', r, 'kl') - mean('quality', LIVE_FORWARD, 'kl'):+.4f} | "
            f"{mean('quality', r, 'tokens_per_s') / mean('quality', LIVE_FORWARD, 'tokens_per_s'):.2f}x |")

    speed, speed_table = {}, []
    if speed_rows:
        live_w, live_c = mean("speed", LIVE_FORWARD, "tokens_per_s"), mean("speed", LIVE_FORWARD, "tokens_per_cpu_s")
        speed_table = ["| row | train tok/s (wall, median step; per seed) | tok/CPU-s | cached / live (wall / CPU) |",
                       "|---|---|---|---|"]
        for r in speed_rows:
            xs = rows_of("speed", r)
            w, c = mean("speed", r, "tokens_per_s"), mean("speed", r, "tokens_per_cpu_s")
            per_seed = ", ".join(f"{x['tokens_per_s']:,.0f}" for x in xs)
            ratio = "—" if r == LIVE_FORWARD else f"{w / live_w:.2f}x / {c / live_c:.2f}x"
            if r != LIVE_FORWARD:
                speed[int(r.removeprefix("cached_k"))] = (w / live_w, c / live_c)
            speed_table.append(f"| {xs[0]['label']} | {w:,.0f} ({per_seed}) | {c:,.0f} | {ratio} |")
    all_beat = all(v["beats"] for v in verdicts.values())
    speed_ok = bool(speed) and meta["speed_flops_ratio"] >= 4 and all(min(v) >= 1.5 for v in speed.values())
    q = meta["quality_student"]
    head = [f"teacher: llama {meta['teacher']} ({meta['teacher_params']:,} parameters), pretrained {meta['teacher_steps']} "
            f"steps, validation CE by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in meta["teacher_curve"]),
            f"quality student: {q['what']} ({q['params']:,} parameters; teacher / student training FLOPs per token "
            f"{q['flops_ratio']:.1f}x), {meta['steps']} steps x {BATCH} x {BLOCK} tokens per run",
            f"seeds {meta['seeds']}; {meta['n_train_blocks']} training / {meta['n_val_blocks']} validation blocks of {BLOCK}; "
            f"{meta['machine']}",
            "recipe: recipes/tiny/distill.yaml; every KD row: " + (" ".join(meta["set"]) or "as is (T=2, alpha_ce 0.5, weight_kd 0.5)")
            + "".join(f"; {r} also: {' '.join(v)}" for r, v in meta["tune"].items()),
            "spread = max - min over seeds; margin = control mean - row mean (positive: lower CE than the control); "
            "beats = margin > the larger of the row's and the control's spread"]
    parts = ["\n".join(head), "\n".join(table), "\n".join(cache_table)]
    if speed_table:
        parts.append(f"speed: fresh student llama {meta['speed_student']} ({meta['speed_params']:,} parameters; teacher / "
                     f"student training FLOPs per token {meta['speed_flops_ratio']:.1f}x), {meta['speed_steps']} steps per run\n\n"
                     + "\n".join(speed_table))
    tail = [f"KD rows beating the control by more than the spread: {sum(v['beats'] for v in verdicts.values())}/"
            f"{len(verdicts)} ({'PASS' if all_beat else 'FAIL'})",
            f"dense fp32 teacher logits would take {4 * ref.vocab:,} bytes / token (vocab {ref.vocab})",
            f"load average (1 min) at the end of each run: {min(x['loadavg'] for x in runs):.1f} .. "
            f"{max(x['loadavg'] for x in runs):.1f}"]
    if speed:
        tail.insert(1, "cached / live (forward KL) training speed, teacher >= 4x student: "
                    + ", ".join(f"k={k} {w:.2f}x wall, {c:.2f}x CPU" for k, (w, c) in speed.items())
                    + f" (claim >= 1.5x: {'PASS' if speed_ok else 'FAIL'})")
    parts.append("\n".join(tail))
    return "\n\n".join(parts) + "\n", {"verdicts": verdicts, "speed": speed, "all_beat": all_beat, "speed_ok": speed_ok}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds 1..N")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per quality run")
    ap.add_argument("--teacher", default="4x256", help="teacher LAYERSxHIDDEN")
    ap.add_argument("--teacher-steps", type=int, default=1200)
    ap.add_argument("--student-init", choices=("layers", "fresh"), default="layers",
                    help="quality student: teacher_layers (every --every-k block) or a fresh --student")
    ap.add_argument("--every-k", type=int, default=2)
    ap.add_argument("--student", default="2x128", help="fresh quality student LAYERSxHIDDEN (--student-init fresh)")
    ap.add_argument("--speed-student", default="2x128", help="fresh student of the speed section, LAYERSxHIDDEN")
    ap.add_argument("--speed-steps", type=int, default=30, help="steps per speed-section run (0: no speed section)")
    ap.add_argument("--top-k", default="8,32,128")
    ap.add_argument("--rows", default=",".join(LIVE_ROWS), help=f"live rows, of {','.join(LIVE_ROWS)} (control and forward always run)")
    ap.add_argument("--set", action="append", default=[], help="recipe override for every KD row, e.g. distill.temperature=1")
    ap.add_argument("--tune", action="append", default=[], help="ROW:KEY=VALUE, an override for one row (ROW cached: every k)")
    ap.add_argument("--max-docs", type=int, default=None, help="use only the first N corpus documents")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: steady timings on a small machine shared with other jobs)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 20 steps, a 60-step teacher, k=8, 200 documents")
    ap.add_argument("--fresh-teacher", action="store_true", help="pretrain the teacher even if a matching one exists")
    ap.add_argument("--out", type=Path, default=None, help="default outputs/bench/distill (--quick: .../quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.teacher_steps, args.top_k, args.speed_steps = 1, 20, 60, "8", 20
        args.max_docs = args.max_docs or 200
    out = args.out or ROOT / "outputs" / "bench" / "distill" / ("quick" if args.quick else "")
    asked = [r for r in args.rows.split(",") if r]
    if unknown := [r for r in asked if r not in LIVE_ROWS]:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {','.join(LIVE_ROWS)}")
    tune: dict[str, list[str]] = {}
    for t in args.tune:
        row, _, kv = t.partition(":")
        if (row not in LIVE_ROWS and row != "cached") or "=" not in kv:
            raise SystemExit(f"--tune {t!r}: want ROW:KEY=VALUE with ROW one of {','.join(LIVE_ROWS)},cached")
        tune.setdefault(row, []).append(kv)
    ks = [int(k) for k in args.top_k.split(",") if k]
    (tl, th), (sl, sh), (pl, ph) = dims(args.teacher), dims(args.student), dims(args.speed_student)
    seeds = list(range(1, args.seeds + 1))

    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    train_f, val_f = split_corpus(out / "data", max_docs=args.max_docs)
    data = [f"data.train_files=[{train_f}]", f"data.validation_files=[{val_f}]"]

    print(f"== teacher llama {tl}x{th}, {args.teacher_steps} pretrain steps", flush=True)
    teacher_dir, teacher_s, teacher_curve = build_teacher(out, train_f, val_f, tl, th, args.teacher_steps, args.fresh_teacher)
    print(f"   {teacher_dir} " + (f"(pretrained in {teacher_s:.0f}s)" if teacher_s else "(reused)"), flush=True)
    ref = Reference(teacher_dir, val_f)
    print(f"   teacher validation CE {ref.teacher_ce:.4f} on {len(ref.ids)} blocks", flush=True)

    from lmforge.stages import distill
    from lmforge.train.flops import flops_per_token

    # time the stage's own cache build (distill.train runs it when the cache folder is absent)
    cache_timer: dict = {}
    real_build = distill.build_cache

    def timed_build(*a, **kw):
        t, c = time.perf_counter(), time.process_time()
        real_build(*a, **kw)
        cache_timer.update(cache_build_s=time.perf_counter() - t, cache_build_cpu_s=time.process_time() - c)

    for k in ks:  # a cache left by an earlier bench run may hold another teacher's targets: always rebuild
        shutil.rmtree(out / f"kd_cache_k{k}", ignore_errors=True)

    base = [f"teacher.name_or_path={teacher_dir}", *data, "log.trackers=[]", "log.log_every=10", "eval.eval_every=0",
            "checkpoint.save_every=0"]
    fresh = ["student.init=null", "student.every_k=null"]
    q_student = ([f"student.every_k={args.every_k}"] if args.student_init == "layers"
                 else [*fresh, f"student.config={flow(llama_config(sl, sh))}"])
    s_student = [*fresh, f"student.config={flow(llama_config(pl, ph))}"]

    def rows(live: list[str]) -> list[tuple[str, str, list[str]]]:
        out_rows = []
        for r in live:
            label, over = LIVE_ROWS[r]
            out_rows.append((r, label, [*over, *([] if r == CONTROL else [*args.set, *tune.get(r, [])])]))
        for k in ks:
            out_rows.append((f"cached_k{k}", f"cached forward KL, k={k}", [
                "distill.mode=cached", f"distill.top_k={k}", f"distill.cache_dir={out / f'kd_cache_k{k}'}",
                *args.set, *tune.get("cached", [])]))
        return out_rows

    quality = rows([r for r in LIVE_ROWS if r in (CONTROL, LIVE_FORWARD) or r in asked])
    speed = rows([LIVE_FORWARD]) if args.speed_steps > 0 else []
    runs: list[dict] = []
    distill.build_cache = timed_build
    try:
        for seed in seeds:
            print(f"== seed {seed}", flush=True)
            for section, plan, steps, student in (("quality", quality, args.steps, q_student),
                                                  ("speed", speed, args.speed_steps, s_student)):
                for row, label, over in plan:
                    runs.append(run_one(section, row, label, [*base, f"train.max_steps={steps}", *student, *over], seed,
                                        out, ref, cache_timer))
                    (out / "distill_runs.json").write_text(json.dumps(runs, indent=1, default=str))
    finally:
        distill.build_cache = real_build

    from transformers import AutoConfig, AutoModelForCausalLM

    def cost(folder: Path) -> tuple[float, int]:
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        n = sum(p.numel() for p in m.parameters())
        return flops_per_token(n - m.get_input_embeddings().weight.numel(), m.config.num_hidden_layers,
                               m.config.hidden_size, BLOCK), n

    t_fpt, t_n = cost(teacher_dir)
    q_fpt, q_n = cost(out / "runs" / "quality" / CONTROL / f"seed{seeds[0]}" / "final")
    meta = {"teacher": f"{tl}x{th}", "teacher_params": t_n, "teacher_steps": args.teacher_steps, "teacher_curve": teacher_curve,
            "quality_student": {"what": (f"teacher_layers, student.every_k={args.every_k} (teacher blocks 0, {args.every_k}, ...)"
                                         if args.student_init == "layers"
                                         else f"fresh llama {sl}x{sh}"), "params": q_n, "flops_ratio": t_fpt / q_fpt},
            "steps": args.steps, "seeds": seeds, "n_val_blocks": len(ref.ids), "set": args.set, "tune": tune,
            "n_train_blocks": next((x["cache_rows"] for x in runs if "cache_rows" in x), "?"),
            "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
                       f"{torch.get_num_threads()} thread(s)"}
    if speed:
        s_fpt, s_n = cost(out / "runs" / "speed" / LIVE_FORWARD / f"seed{seeds[0]}" / "final")
        meta.update(speed_student=f"{pl}x{ph}", speed_params=s_n, speed_flops_ratio=t_fpt / s_fpt, speed_steps=args.speed_steps)
    text, verdict = report(runs, [r for r, _, _ in quality], [r for r, _, _ in speed], ks, ref, meta)
    total = time.perf_counter() - t_start
    text += f"total bench time {total / 60:.1f} min" + (f" (teacher pretrain {teacher_s / 60:.1f} min)" if teacher_s else
                                                        " (teacher reused)") + "\n"
    (out / "distill_bench.md").write_text(text)
    (out / "distill_bench.json").write_text(json.dumps({"meta": meta, "runs": runs, **verdict, "teacher_ce": ref.teacher_ce,
                                                        "total_s": total, "argv": sys.argv[1:] if argv is None else argv},
                                                       indent=1, default=str))
    print()
    print(text)
    print(f"written: {out}/distill_bench.{{md,json}}")
    return 0 if args.quick or (verdict["all_beat"] and verdict["speed_ok"]) else 1


if __name__ == "__main__":
    sys.exit(main())

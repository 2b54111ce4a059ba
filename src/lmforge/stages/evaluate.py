"""`lmforge evaluate RECIPE.yaml`: measure any model folder another stage wrote, or several side by side.

    recipe -> model folder(s) -> LM metrics (lm) · classification · generation · lm-evaluation-harness
           -> metrics.json, report.md, comparison.png (+ confusion_matrix_<model>.png)

``model.path`` is a plain model (pretrain, distill, a merged export, a pruned result), a PEFT adapter
(its base from ``adapter_config.json`` or ``model.base``), a quantized folder (``quant.json``: reloaded with
``lmforge.quant.methods.load``) or a sequence classifier (finetune task: classification). ``compare`` adds
more folders, measured the same way, one row each in the table and the chart.

What is measured is chosen by which groups have data (any combination):

- ``lm``: loss, perplexity, token accuracy, bits per byte on text documents (:mod:`lmforge.evaluation.lm`);
- ``classification``: loss, accuracy, macro-F1, confusion matrix on text/label records;
- ``generation``: exact match, ROUGE-L, chrF, BLEU of greedy completions of held-out SFT prompts;
- ``harness``: lm-evaluation-harness tasks on the model in memory (:mod:`lmforge.evaluation.harness`).

Outputs in ``output_dir``: ``metrics.json`` (every number, per model, and the comparison table),
``report.md`` (command, models, table, charts, examples, environment, resolved recipe), ``comparison.png``,
``confusion_matrix_<model>.png`` for classifiers, ``recipe.yaml``. A non-empty ``output_dir`` needs
``overwrite=true``; a refused run writes nothing.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from pathlib import Path
from typing import Any, ClassVar

from lmforge import outputs
from lmforge.config import RunConfig, UserError, dump, help_field, nested, to_dict
from lmforge.evaluation import compare, harness, loading, report
from lmforge.evaluation import lm as lm_text
from lmforge.evaluation.classify import ClassificationGroup
from lmforge.evaluation.generation import GenerationGroup
from lmforge.evaluation.lm import LMGroup

# ---------------------------------------------------------------------------------------------
# Recipe


@dataclasses.dataclass
class ModelGroup:
    path: str = help_field("", help="The model folder: plain, PEFT adapter, quantized (quant.json) or classifier.")
    base: str | None = help_field(None, help="Base model of an adapter folder (default: the one adapter_config.json names).")
    tokenizer: str | None = help_field(None, help="Tokenizer of model.path (default: the folder's own, else its base's).")
    name: str | None = help_field(None, help="Its row in the table (default: the folder's name, or its parent's for .../final).")
    dtype: str = help_field("float32", help="Weights' dtype when loading: float32, bfloat16, float16 (quantized folders keep theirs).")
    device: str = help_field("auto", help="auto (CUDA when there is one), cpu or cuda; quantized folders stay where they load.")

    def problems(self) -> list[str]:
        out = []
        if self.dtype not in ("float32", "bfloat16", "float16"):
            out.append(f"dtype: must be float32, bfloat16 or float16, got '{self.dtype}'")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            out.append(f"device: must be auto, cpu or cuda[:N], got '{self.device}'")
        if self.tokenizer and self.tokenizer.startswith((".", "/")) and not Path(self.tokenizer).exists():
            out.append(f"tokenizer: '{self.tokenizer}' does not exist; give a tokenizer folder")
        return out


@dataclasses.dataclass
class HarnessGroup:
    tasks: list[str] = help_field([], help="lm-evaluation-harness task, group or tag names (empty: no harness run).")
    include_path: list[str] = help_field([], help="Folders of task YAMLs of your own (searched before lm-eval's built-in tasks).")
    limit: float | None = help_field(None, help="Items per task: a count (>= 1), or a fraction below 1 (lm-eval's --limit).")
    num_fewshot: int | None = help_field(None, help="Few-shot examples per prompt (default: each task's own, else 0).")
    batch_size: int = help_field(8, help="Requests per forward pass (lm-eval's --batch_size).")
    bootstrap_iters: int = help_field(0, help="Bootstrap resamples for standard errors (0: none; lm-eval's default is 100000).")

    def problems(self) -> list[str]:
        out = [f"include_path: '{p}' is not a folder of task YAMLs" for p in self.include_path if not Path(p).is_dir()]
        if self.include_path and not self.tasks:
            out.append("include_path: only read with harness.tasks; name the tasks to run (e.g. lmforge_fixture_mc)")
        if self.limit is not None and (self.limit <= 0 or self.limit >= 1 and not float(self.limit).is_integer()):
            out.append(f"limit: a count >= 1 or a fraction in (0, 1), got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            out.append(f"num_fewshot: must be >= 0, got {self.num_fewshot}")
        if self.batch_size < 1:
            out.append(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.bootstrap_iters < 0:
            out.append(f"bootstrap_iters: must be >= 0, got {self.bootstrap_iters}")
        return out


@dataclasses.dataclass
class Config(RunConfig):
    STAGE: ClassVar[str] = "evaluate"
    model: ModelGroup = nested(ModelGroup)
    compare: list[str] = help_field([], help="More model folders measured the same way (CLI: --compare DIR [DIR ...]).")
    lm: LMGroup = nested(LMGroup)
    classification: ClassificationGroup = nested(ClassificationGroup)
    generation: GenerationGroup = nested(GenerationGroup)
    harness: HarnessGroup = nested(HarnessGroup)

    def problems(self) -> list[str]:
        out = super().problems()
        if self.resume != "none":
            out.append("resume: evaluate does not resume (it trains nothing); remove it, or pass overwrite=true to rerun")
        folders = [("model.path", self.model.path, self.model.base)] + [(f"compare[{i}]", d, None)
                                                                        for i, d in enumerate(self.compare)]
        kinds = {}
        for key, path, base in folders:
            bad = loading.folder_problems(path, base, key)
            out += bad
            if not bad:
                kinds[key] = loading.kind_of(path)
        given = [str(Path(p).resolve()) for _, p, _ in folders if p]
        if len(set(given)) < len(given):
            out.append("compare: a folder is listed twice (model.path is always measured)")
        if not any((self.lm.enabled, self.classification.enabled, self.generation.enabled, self.harness.tasks)):
            out.append("nothing to evaluate: give lm.files (or lm.path), classification.files, generation.files or harness.tasks")
        causal_groups = [g for g, on in (("lm", self.lm.enabled), ("generation", self.generation.enabled),
                                         ("harness", bool(self.harness.tasks))) if on]
        for key, kind in kinds.items():
            if kind == "classifier" and causal_groups:
                out.append(f"{key}: a sequence classifier has no language-model head; {', '.join(causal_groups)} "
                           "need a causal LM (evaluate a classifier with classification.files only)")
            if kind != "classifier" and self.classification.enabled:
                out.append(f"{key}: a causal LM ({kind}), but classification.files needs a sequence classifier "
                           "(finetune task: classification)")
        return out


def check(cfg: Config) -> None:
    """`lmforge check RECIPE` (and the start of every run): what needs more than the recipe's own keys."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("evaluate runs in one process; run `lmforge evaluate RECIPE.yaml` without accelerate launch")
    from lmforge.evaluation.metrics import need

    if cfg.classification.enabled:
        need("sklearn.metrics", "classification.files")
    for name, module in (("rouge_l", "rouge_score.rouge_scorer"), ("chrf", "sacrebleu"), ("bleu", "sacrebleu")):
        if cfg.generation.enabled and name in cfg.generation.metrics:
            need(module, f"generation metric {name}")
    if cfg.harness.tasks:  # every name known and its data loadable (a Hub task offline is refused here)
        harness.check_tasks(cfg.harness.tasks, cfg.harness.include_path or None)


def cli_overrides(argv: list[str]) -> list[str]:
    """`RECIPE.yaml [key=value ...] --compare DIR [DIR ...] [key=value ...]` -> the same with `compare=[DIR,...]`."""
    if "--compare" not in argv:
        return argv
    i = argv.index("--compare")
    if i == 0:
        raise UserError("--compare: the recipe comes first: lmforge evaluate RECIPE.yaml --compare DIR [DIR ...]")
    dirs = []
    j = i + 1
    while j < len(argv) and "=" not in argv[j] and not argv[j].startswith("--"):
        dirs.append(argv[j])
        j += 1
    if not dirs:
        raise UserError("--compare: give one or more model folders (lmforge evaluate RECIPE.yaml --compare DIR [DIR ...])")
    return argv[:i] + argv[j:] + [f"compare=[{','.join(dirs)}]"]


# ---------------------------------------------------------------------------------------------
# Output folder: the guard every stage has (overwrite=true replaces only a run's own folder, set aside until
# this run has written its result; one run per folder)


def claim_output_dir(cfg: Config) -> Path:
    out = Path(cfg.output_dir)
    non_empty = out.is_dir() and any(p.name != outputs.LOCK for p in out.iterdir())
    if non_empty and not cfg.overwrite:
        raise UserError(f"output_dir: '{out}' is not empty; pass overwrite=true to replace it, or choose another output_dir")
    if non_empty:
        outputs.refuse_foreign(out)
    holder = outputs.acquire(out)
    if holder is not None:
        raise UserError(f"output_dir: another lmforge run (pid {holder}) is writing into '{out}'; wait for it to finish "
                        "or choose another output_dir")
    if non_empty:
        outputs.release(out)
        outputs.set_aside(out)
        outputs.acquire(out)
    outputs.mark(out, Config.STAGE)
    dump(cfg, out / "recipe.yaml")
    return out


# ---------------------------------------------------------------------------------------------
# The stage


def evaluate_model(cfg: Config, path: str, base: str | None, name: str, tokenizer: str | None) -> dict[str, Any]:
    """Every enabled measurement of one model folder: {'name', 'path', 'kind', 'base', 'metrics': {flat}, ...}."""
    from accelerate.utils import set_seed

    from lmforge.evaluation import classify, generation

    start = time.perf_counter()
    print(f"evaluate: {name} ({path})", flush=True)
    m = loading.load(path, base, tokenizer, cfg.model.dtype, cfg.model.device)
    entry: dict[str, Any] = {"name": name, "path": path, "kind": m.kind, "base": m.base, "metrics": {}}
    set_seed(cfg.seed)
    if cfg.lm.enabled:
        scores = lm_text.score(m.model, m.tokenizer, cfg.lm, cfg.seed)
        entry["lm"], entry["lm_data"] = scores, lm_text.describe(cfg.lm)
        entry["metrics"].update({f"lm/{k}": v for k, v in scores.items()})
    if cfg.classification.enabled:
        scores = classify.score(m.model, m.tokenizer, m.label_names, cfg.classification)
        entry["classification"] = scores
        entry["metrics"].update({f"classification/{k}": scores[k] for k in ("loss", "accuracy", "macro_f1", "examples")})
    if cfg.generation.enabled:
        scores, shown = generation.score(m.model, m.tokenizer, cfg.generation)
        entry["generation"] = {"metrics": scores, "examples": shown}
        entry["metrics"].update({f"generation/{k}": v for k, v in scores.items()})
    if cfg.harness.tasks:
        h = cfg.harness
        res = harness.evaluate_tasks(m.model, m.tokenizer, h.tasks, h.include_path or None, h.limit, h.num_fewshot,
                                     h.batch_size, h.bootstrap_iters, cfg.seed)
        entry["harness"] = {"results": report.plain(res["results"]), "n-shot": report.plain(res.get("n-shot", {})),
                            "versions": report.plain(res.get("versions", {}))}
        entry["metrics"].update({f"harness/{k}": v for k, v in harness.flatten(res).items()})
    entry["seconds"] = time.perf_counter() - start
    del m
    gc.collect()
    return entry


def main(cfg: Config) -> dict[str, Any]:
    # ---- preflight: everything that can refuse the run, before anything is written ----
    check(cfg)
    out = claim_output_dir(cfg)
    start = time.perf_counter()

    # ---- measure each model (one in memory at a time) ----
    models = [(cfg.model.path, cfg.model.base, cfg.model.name, cfg.model.tokenizer)] + [(d, None, None, None) for d in cfg.compare]
    names: list[str] = []
    for path, _, name, _ in models:
        name = name or report.row_name(path)
        names.append(name if name not in names else f"{name}#{sum(n.split('#')[0] == name for n in names) + 1}")
    entries = [evaluate_model(cfg, path, base, name, tok) for (path, base, _, tok), name in zip(models, names)]

    # ---- write: metrics.json, PNGs, report.md ----
    plots = {}
    if compare.plot(entries, out / "comparison.png", title=f"lmforge evaluate: {', '.join(names)}"):
        plots["comparison"] = "comparison.png"
    for e in entries:
        if "classification" in e:
            c = e["classification"]
            file = f"confusion_matrix_{report.safe_name(e['name'])}.png"
            report.plot_confusion(c["confusion_matrix"], c["label_names"], out / file, title=f"{e['name']}: confusion matrix")
            e["confusion_png"] = file
    result = {"stage": "evaluate", "command": report.command(), "wall_seconds": time.perf_counter() - start,
              "environment": report.environment(), "models": entries, "table": compare.table_json(entries),
              "plots": plots}
    (out / "metrics.json").write_text(json.dumps(report.plain(result), indent=1) + "\n")
    (out / "report.md").write_text(report.markdown(result, to_dict(cfg)))
    outputs.discard_pending(out)
    outputs.release(out)

    print("\n" + compare.table(entries))
    print(f"\nevaluate done: {len(entries)} model(s) in {result['wall_seconds']:.1f} s")
    print(f"  metrics: {out / 'metrics.json'}")
    print(f"  report:  {out / 'report.md'}" + (f" ({out / 'comparison.png'})" if plots else ""))
    return result

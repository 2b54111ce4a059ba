"""`lmforge quantize RECIPE.yaml`: a smaller model from any model the other stages write, and a report
of what it cost.

    recipe -> model (fp32) + validation/calibration blocks -> quant.method (and quant.compare)
           -> each result saved, reloaded from disk, measured -> report.{md,json,png}

``quant.method`` (the result in ``final/``) and ``quant.compare`` (more results, in ``compare/<name>/``):

- a post-training method of :mod:`lmforge.quant.methods`: ``dynamic_int8``, ``int8_weight_only``,
  ``int4_weight_only``, ``int8_dynamic_int4_weight``, ``quanto_int8``, ``quanto_int4``, ``bnb_int8``,
  ``bnb_nf4`` (reload: ``lmforge.quant.methods.load(folder)``; the ``bnb_*`` folders also load with
  plain ``AutoModelForCausalLM.from_pretrained``);
- ``prune``: magnitude / Wanda / 2:4 (``quant.prune``), made permanent; saved as a plain
  ``save_pretrained`` model (zeros stored densely);
- ``qat`` (``quant.method`` only): quantization-aware training with torchao fake quantization
  (``quant.qat.scheme``) through the shared training loop (``optim``/``schedule``/``train``/... as in
  pretrain, any accelerate layout), then converted with the PTQ method of the same numerics. The PTQ
  result of that method is added to the comparison, so the report shows what training bought;
- ``gptq`` / ``awq`` (methods of :mod:`lmforge.quant.methods` through llm-compressor): int4 per group,
  calibrated on ``quant.calibration_blocks`` training blocks; saved in compressed-tensors format, so plain
  ``AutoModelForCausalLM.from_pretrained`` reloads them (with compressed-tensors installed).

Every result is measured after reloading its saved folder (what a user gets), on the recipe's validation
blocks, against the fp32 original and a bf16 copy (:mod:`lmforge.quant.report`).

Outputs in ``output_dir``: ``final/`` (the result of ``quant.method``, with the tokenizer and
``recipe.yaml``), ``compare/<name>/``, ``report.md``, ``report.json``, ``report.png``, ``recipe.yaml``;
with ``qat`` also the training run's ``metrics.jsonl``, ``training_curves.png``, ``checkpoints/``.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import shutil
from pathlib import Path
from typing import Any, ClassVar

import torch

from lmforge.cards import write_card
from lmforge.config import UserError, field_defaults, help_field, nested, to_dict
from lmforge.datasets.lm import LMDataConfig, build_lm_datasets, check_model_fits
from lmforge.models import ModelConfig, load_causal_lm, load_tokenizer
from lmforge.quant import measure, methods, prune, qat
from lmforge.quant.layers import linear_layers
from lmforge.quant.report import Row, write
from lmforge.train import loop
from lmforge.train.save import atomic_dir, write_extras
from lmforge.train.settings import TrainingRecipe
from lmforge.train.tasks import CausalLM

log = logging.getLogger("lmforge")

SPECIAL = ("prune", "qat")
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
TRAINING_GROUPS = ("optim", "schedule", "train", "eval", "checkpoint")  # read by quant.method qat only


def all_methods() -> list[str]:
    return methods.names() + list(SPECIAL)


@dataclasses.dataclass
class PruneGroup:
    method: str = help_field("wanda", help="magnitude | wanda | 2:4")
    sparsity: float = help_field(0.5, help="Fraction of weights zeroed, in [0, 1) (2:4: 0.5).")
    scope: str = help_field("per_layer", help="magnitude: per_layer | global.")
    score: str = help_field("magnitude", help="2:4: which weights of each group of four stay: magnitude | wanda.")


@dataclasses.dataclass
class QATGroup:
    scheme: str = help_field("int4_weight_only", help=f"Fake quantization trained against: {' | '.join(qat.SCHEMES)}.")
    group_size: int = help_field(32, help="Input weights sharing a scale: 32, 64 or 128.")


@dataclasses.dataclass
class QuantGroup:
    method: str = help_field("dynamic_int8", help="The result in final/: a PTQ method (gptq/awq included), prune or qat.")
    compare: list[str] = help_field([], help="More methods measured in the report (saved in compare/<name>/).")
    group_size: int | None = help_field(None, help="Methods with groups (int4_weight_only, gptq, awq: 32/64/128, default 128).")
    skip_modules: list[str] = help_field(["lm_head"], help="Layers kept in full precision (names, suffixes or globs).")
    calibration_blocks: int = help_field(16, help="Training blocks run through the model to calibrate: Wanda scores, gptq, awq.")
    prune: PruneGroup = nested(PruneGroup)
    qat: QATGroup = nested(QATGroup)

    def problems(self) -> list[str]:
        out = []
        known = all_methods()
        for key, name in [("method", self.method)] + [(f"compare[{i}]", n) for i, n in enumerate(self.compare)]:
            if name not in known:
                import difflib

                close = difflib.get_close_matches(name, known, n=1)
                out.append(f"{key}: {name!r} is not a method{f' (did you mean {close[0]!r}?)' if close else ''}; "
                           f"known: {', '.join(known)}")
        if "qat" in self.compare:
            out.append("compare: qat trains a model; make it quant.method (its PTQ twin is compared automatically)")
        if len(set(self.compare)) != len(self.compare) or self.method in self.compare:
            out.append("compare: a method is listed twice (quant.method is always in the report)")
        chosen = [self.method, *self.compare]
        if self.group_size is not None and not any(n in methods.METHODS and methods.get(n).group_sizes for n in chosen):
            out.append(f"group_size: none of {chosen} takes one; remove it (qat reads quant.qat.group_size)")
        for n in chosen:
            sizes = methods.get(n).group_sizes if n in methods.METHODS else ()
            if self.group_size is not None and sizes and self.group_size not in sizes:
                out.append(f"group_size: {n} takes one of {list(sizes)}, got {self.group_size}")
        if self.calibration_blocks < 1:
            users = [n for n in chosen if (n in methods.METHODS and methods.get(n).calibrated)
                     or (n == "prune" and self.prune_settings().needs_calibration)]
            why = f" ({', '.join(users)} calibrate{'s' if len(users) == 1 else ''} on that many training blocks)" if users else ""
            out.append(f"calibration_blocks: must be >= 1, got {self.calibration_blocks}{why}")
        if "prune" in chosen:
            out += [f"prune.{p}" for p in self.prune_settings().problems()]
        elif to_dict(self.prune) != to_dict(PruneGroup()):
            out.append("prune: only read when quant.method or quant.compare has prune; remove it")
        if self.method == "qat":
            if self.qat.scheme not in qat.SCHEMES:
                out.append(f"qat.scheme: {self.qat.scheme!r} is not one of {list(qat.SCHEMES)}")
            if self.qat.group_size not in qat.GROUP_SIZES:
                out.append(f"qat.group_size: must be one of {list(qat.GROUP_SIZES)}, got {self.qat.group_size}")
        elif to_dict(self.qat) != to_dict(QATGroup()):
            out.append("qat: only read by quant.method qat; remove it")
        return out

    def prune_settings(self) -> prune.PruneSettings:
        p = self.prune
        return prune.PruneSettings(method=p.method, sparsity=p.sparsity, scope=p.scope, score=p.score,
                                   skip_modules=list(self.skip_modules))

    def settings_for(self, name: str) -> methods.QuantSettings:
        takes = name in methods.METHODS and bool(methods.get(name).group_sizes)
        return methods.QuantSettings(group_size=self.group_size if takes else None, skip_modules=list(self.skip_modules))


@dataclasses.dataclass
class MeasureConfig:
    batch_size: int = help_field(4, help="Rows per batch for perplexity and the latency batch.")
    seq_len: int | None = help_field(None, help="Tokens per row for latency (default data.block_size).")
    warmup: int = help_field(3, help="Forward passes before timing.")
    repeats: int = help_field(10, help="Timed forward passes (the median is reported).")
    threads: int | None = help_field(None, help="CPU threads while timing (default: torch's current count).")
    generate_tokens: int = help_field(32, help="New tokens per sequence for generation tokens/s (0: skip).")
    eval_blocks: int | None = help_field(None, help="Validation blocks scored (default: all).")
    bf16_baseline: bool = help_field(True, help="Also measure a bfloat16 copy of the original.")

    def problems(self) -> list[str]:
        out = [f"{k}: must be >= 1, got {getattr(self, k)}" for k in ("batch_size", "repeats")
               if getattr(self, k) < 1]
        out += [f"{k}: must be >= 0, got {getattr(self, k)}" for k in ("warmup", "generate_tokens")
                if getattr(self, k) < 0]
        out += [f"{k}: must be >= 1, got {getattr(self, k)}" for k in ("seq_len", "threads", "eval_blocks")
                if getattr(self, k) is not None and getattr(self, k) < 1]
        return out


@dataclasses.dataclass
class Config(TrainingRecipe):
    STAGE: ClassVar[str] = "quantize"
    model: ModelConfig = nested(ModelConfig)
    data: LMDataConfig = nested(LMDataConfig)
    quant: QuantGroup = nested(QuantGroup)
    measure: MeasureConfig = nested(MeasureConfig)

    def problems(self) -> list[str]:
        out = super().problems()
        if not self.model.name_or_path:
            out.append("model.name_or_path: required: the model to quantize (e.g. outputs/tiny/pretrain/final)")
        elif self.model.config:
            out.append("model.config: quantize loads a trained model; give model.name_or_path only")
        else:
            out += model_folder_problems(self.model.name_or_path)
        if self.quant.method != "qat":
            defaults = field_defaults(TrainingRecipe)
            out += [f"{g}: only read by quant.method qat (it trains); remove it" for g in TRAINING_GROUPS
                    if to_dict(getattr(self, g)) != to_dict(defaults[g])]
            if self.resume != "none":
                out.append("resume: only quant.method qat trains and can resume; remove it")
        else:
            out += self.pretrain_only_problems()
        if self.measure.seq_len is not None and self.measure.seq_len > self.data.block_size:
            out.append(f"measure.seq_len: {self.measure.seq_len} is longer than data.block_size ({self.data.block_size})")
        return out


def model_folder_problems(name: str) -> list[str]:
    """A local model folder must hold a config and weights; an adapter folder is pointed to `lmforge export`."""
    path = Path(name)
    if not path.is_dir():
        return []  # a hub id (or missing: ModelConfig's own check says so)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return [f"model.name_or_path: '{path}' is a PEFT adapter, not a model; merge it into its base first "
                "(lmforge export FINETUNE_RECIPE.yaml writes <output_dir>/merged) and quantize that folder"]
    if not (path / "config.json").is_file():
        return [f"model.name_or_path: '{path}' has no config.json; give a model folder (e.g. outputs/tiny/pretrain/final)"]
    if (path / methods.QUANT_JSON).is_file():
        return [f"model.name_or_path: '{path}' is quantized already ({methods.QUANT_JSON}); quantize the original model"]
    if not any(f.suffix in WEIGHT_FILES for f in path.iterdir()):
        return [f"model.name_or_path: '{path}' has a config but no weights (*.safetensors / *.bin); was the save interrupted?"]
    return []


def check(cfg: Config) -> None:
    """`lmforge check`: every chosen method can run here (library, hardware)."""
    problems = []
    for name in [cfg.quant.method, *cfg.quant.compare]:
        if name in methods.METHODS:
            reason = methods.available(name)
            if reason:
                problems.append(f"quant: {reason}")
    if cfg.quant.method == "qat":
        reason = methods.available(qat.SCHEMES[cfg.quant.qat.scheme])
        if reason:
            problems.append(f"quant.qat: {reason}")
    if problems:
        raise UserError(problems)


# ---------------------------------------------------------------------------------------------
# Measuring


class Bench:
    """The fixed inputs every model is measured on, and the fp32 original's predictions."""

    def __init__(self, cfg: Config, val_ds, reference: torch.nn.Module):
        self.reference_model = reference
        m = cfg.measure
        self.batches = measurement_batches(cfg, val_ds)
        first = self.batches[0]
        seq = m.seq_len or first.shape[1]
        self.latency_ids = first[:, :seq]
        self.prompt_ids = first[:, : min(16, seq)]
        self.m = m
        self.threads = m.threads or torch.get_num_threads()
        self.reference = measure.next_token_predictions(reference, self.batches)

    def row(self, name: str, kind: str, model: torch.nn.Module, fp32_layers: dict[str, int], *,
            folder: Path | None = None, file_bytes: int | None = None, quantized_layers: list[str] | None = None,
            sparsity: float | None = None, note: str = "") -> Row:
        sizes = measure.parameter_bytes(model)
        layers = sizes.quantized_layers if quantized_layers is None else quantized_layers
        quantized = sum(sizes.layers.get(n, 0) for n in layers)
        m = self.m
        gen = (measure.generation_tokens_per_s(model, self.prompt_ids, m.generate_tokens, threads=self.threads)
               if m.generate_tokens else 0.0)
        latency = measure.forward_latency(model, self.latency_ids, m.warmup, m.repeats, self.threads)
        fp32_latency = latency if model is self.reference_model else measure.forward_latency(self.reference_model, self.latency_ids, m.warmup, m.repeats, self.threads)
        row = Row(
            name=name, kind=kind, folder=str(folder) if folder else None,
            file_bytes=file_bytes if file_bytes is not None else weight_bytes(folder),
            param_bytes=sizes.total, quantized_bytes=quantized,
            quantized_fp32_bytes=sum(fp32_layers.get(n, 0) for n in layers), other_bytes=sizes.total - quantized,
            latency_ms=latency, fp32_latency_ms=fp32_latency,
            generate_tokens_per_s=gen, perplexity=measure.perplexity(model, self.batches),
            top1_agreement=measure.agreement(self.reference, measure.next_token_predictions(model, self.batches)),
            sparsity=sparsity, reloaded=folder is not None, note=note)
        log.info("quantize: measured %s: ppl %.4f, latency %.2f ms", name, row.perplexity, row.latency_ms)
        return row


def weight_bytes(folder: Path | None) -> int:
    if folder is None:
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix in WEIGHT_FILES)


# ---------------------------------------------------------------------------------------------
# Making each result


def default_group_size(name: str) -> int:
    return 128 if name in ("int4_weight_only", "gptq", "awq") else 32


def settings_for(cfg: Config, name: str) -> methods.QuantSettings:
    """The recipe's settings for one method; the PTQ twin of a qat run takes the qat group size."""
    qc = cfg.quant
    if qc.method == "qat" and name == qat.SCHEMES[qc.qat.scheme] and name not in qc.compare:
        return methods.QuantSettings(group_size=qc.qat.group_size, skip_modules=list(qc.skip_modules))
    return qc.settings_for(name)


def calibration_batches(cfg: Config, train_ds) -> list[torch.Tensor]:
    """The first quant.calibration_blocks training blocks, in batches of measure.batch_size (Wanda, gptq, awq)."""
    n = min(cfg.quant.calibration_blocks, len(train_ds))
    ids = torch.stack([train_ds[i]["input_ids"] for i in range(n)]).long()
    return list(ids.split(cfg.measure.batch_size))


def _ptq(name: str, cfg: Config, original: torch.nn.Module, fp32_dir: Path, folder: Path, tokenizer,
         train_ds=None) -> torch.nn.Module:
    settings = settings_for(cfg, name)
    method = methods.get(name)
    source = fp32_dir if method.from_dir else copy.deepcopy(original)
    calibration = calibration_batches(cfg, train_ds) if method.calibrated else None
    q = methods.quantize(name, source, settings, calibration=calibration)
    with atomic_dir(folder) as tmp:
        methods.save(q, tmp)
        write_extras(tmp, tokenizer, cfg)
    del q
    gc.collect()
    return methods.load(folder)


def _prune(cfg: Config, original: torch.nn.Module, train_ds, folder: Path, tokenizer) -> tuple[torch.nn.Module, float]:
    settings = cfg.quant.prune_settings()
    model = copy.deepcopy(original)
    calibration = None
    if settings.needs_calibration:
        calibration = calibration_batches(cfg, train_ds)
    report = prune.prune(model, settings, calibration)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_extras(tmp, tokenizer, cfg, {"prune.json": json.dumps(
            {**dataclasses.asdict(settings), "overall": report.overall, "layers": report.layers}, indent=2) + "\n"})
    del model
    reloaded = reload(folder)
    return reloaded, prune.sparsity_report(reloaded, settings.skip_modules).overall


def _qat(cfg: Config, acc, original: torch.nn.Module, train_ds, val_ds, tokenizer, folder: Path) -> torch.nn.Module | None:
    """Train with fake quantization through the shared loop; on the main process, convert and save."""
    q = cfg.quant.qat
    model = copy.deepcopy(original)
    layers = qat.prepare(model, q.scheme, q.group_size, cfg.quant.skip_modules)
    log.info("qat: %d linear layers fake-quantized (%s, group %d)", len(layers), q.scheme, q.group_size)
    task = CausalLM(cfg.data.block_size)
    result = loop.run(acc, cfg, model, task, train_ds, val_ds, tokenizer=tokenizer, save_final=False)
    state = acc.get_state_dict(model)  # collective: full weights on every layout
    if not acc.is_main_process:
        return None
    converted = qat.convert(state, copy.deepcopy(original), q.scheme, q.group_size, cfg.quant.skip_modules)
    converted._lmforge_quant["qat"] = {"scheme": q.scheme, "group_size": q.group_size, "steps": result.step}
    with atomic_dir(folder) as tmp:
        methods.save(converted, tmp)
        write_extras(tmp, tokenizer, cfg)
    del converted, model
    gc.collect()
    return methods.load(folder)


# ---------------------------------------------------------------------------------------------


def compared(cfg: Config) -> list[str]:
    """quant.compare, plus the PTQ twin of a qat run (PTQ at the same bits shows what training bought)."""
    compare = list(cfg.quant.compare)
    if cfg.quant.method == "qat" and qat.SCHEMES[cfg.quant.qat.scheme] not in compare:
        compare.append(qat.SCHEMES[cfg.quant.qat.scheme])
    return compare


def preflight(cfg: Config) -> None:
    """Everything that can be checked against the model's architecture, before anything is written: the
    layers each method would touch (skip_modules), group sizes against their widths, the qat scheme."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name_or_path: cannot read a model config from '{cfg.model.name_or_path}' "
                        f"({str(e).strip().splitlines()[0]})") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.model.trust_remote_code)
    try:
        _check_layers(cfg, skeleton)
    except UserError as e:  # the library names its own settings; the recipe's keys live under quant.
        raise UserError([p if p.startswith("quant.") else f"quant.{p}" for p in e.problems]) from None


def _check_layers(cfg: Config, skeleton: torch.nn.Module) -> None:
    qc = cfg.quant
    for name in [qc.method, *compared(cfg)]:
        if name in methods.METHODS:
            settings = settings_for(cfg, name)
            targets = methods.target_layers(skeleton, settings)
            if methods.get(name).group_sizes:
                methods.check_group_size(targets, settings.group_size or default_group_size(name))
        elif name == "qat":
            qat.check(skeleton, qc.qat.scheme, qc.qat.group_size, qc.skip_modules)
        elif name == "prune":
            skip = qc.skip_modules
            layers = linear_layers(skeleton, skip)
            if qc.prune.method == "2:4":
                bad = [n for n, m in layers.items() if m.in_features % 4]
                if bad:
                    raise UserError(f"prune.method 2:4: the input width of {bad[0]} is not a multiple of 4")


def measurement_batches(cfg: Config, val_ds) -> list[torch.Tensor]:
    """The validation blocks every model is scored on, in batches of measure.batch_size."""
    m = cfg.measure
    n = len(val_ds) if m.eval_blocks is None else min(m.eval_blocks, len(val_ds))
    ids = torch.stack([val_ds[i]["input_ids"] for i in range(n)]).long()
    return list(ids.split(m.batch_size))


def reload(folder: str | Path) -> torch.nn.Module:
    """A saved result as a user loads it: methods.load for quantized folders, from_pretrained for pruned ones."""
    folder = Path(folder)
    if (folder / methods.QUANT_JSON).is_file():
        return methods.load(folder)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def main(cfg: Config) -> dict[str, Any] | None:
    check(cfg)
    preflight(cfg)
    qc = cfg.quant
    compare = compared(cfg)
    acc = loop.setup(cfg)  # guards output_dir (overwrite / set aside / lock) and, for qat, the training layout
    out = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.model)
    with acc.main_process_first():
        train_ds, val_ds = build_lm_datasets(cfg.data, tokenizer, cfg.seed)
    if val_ds is None or len(val_ds) == 0:
        raise UserError("data: no validation blocks to measure on; set data.validation_files or data.validation_ratio > 0")
    original = load_causal_lm(dataclasses.replace(cfg.model, dtype="float32"), tokenizer).eval()
    check_model_fits(original.config, cfg.data.block_size, [train_ds, val_ds])
    trained = None
    if qc.method == "qat":
        original.requires_grad_(True).train()
        trained = _qat(cfg, acc, original, train_ds, val_ds, tokenizer, out / "final")
        original.requires_grad_(False).eval()
        if not acc.is_main_process:
            return None
    elif not acc.is_main_process:
        return None  # post-training methods run on one process
    original.requires_grad_(False)

    fp32_dir = out / ".fp32"  # the from-folder methods (bitsandbytes, llm-compressor) quantize a saved model
    if any(n in methods.METHODS and methods.get(n).from_dir for n in [qc.method, *compare]):
        original.save_pretrained(fp32_dir, safe_serialization=True)
        tokenizer.save_pretrained(fp32_dir)  # llm-compressor (gptq, awq) loads the tokenizer beside the model

    bench = Bench(cfg, val_ds, original)
    fp32 = measure.parameter_bytes(original)
    rows = [bench.row("float32", "baseline", original, fp32.layers, file_bytes=fp32.total, quantized_layers=[])]
    if cfg.measure.bf16_baseline:
        bf16 = copy.deepcopy(original).to(torch.bfloat16)
        rows.append(bench.row("bfloat16", "baseline", bf16, fp32.layers, file_bytes=measure.parameter_bytes(bf16).total,
                              quantized_layers=[], note="every weight in bf16 (what `model.to(torch.bfloat16)` gives)"))
        del bf16

    for i, name in enumerate([qc.method, *compare]):
        folder = out / "final" if i == 0 else out / "compare" / name
        print(f"quantize: {name} -> {folder}", flush=True)
        if name == "qat":
            model, kind, label = trained, "qat", f"qat:{qc.qat.scheme}"
            note = (f"fake-quantized training ({qc.qat.scheme}, group {qc.qat.group_size}) for "
                    f"{cfg.train.max_steps} steps, then converted")
        elif name == "prune":
            model, sparsity = _prune(cfg, original, train_ds, folder, tokenizer)
            p = qc.prune
            label = f"prune:{p.method}" + ("" if p.method == "2:4" else f"@{p.sparsity:g}")
            prunable = list(linear_layers(original, qc.skip_modules))
            rows.append(bench.row(label, "prune", model, fp32.layers, folder=folder, quantized_layers=prunable,
                                  sparsity=sparsity, note="zeros stored densely: no smaller, no faster on CPU"))
            del model
            continue
        else:
            model, kind, label, note = _ptq(name, cfg, original, fp32_dir, folder, tokenizer, train_ds), "ptq", name, ""
        packed = None
        if name in methods.METHODS and methods.get(name).calibrated:
            # compressed-tensors layers hold weight_packed (int4, 8 per int32) until their first forward, which
            # dequantizes them to fp32 on a CPU (no int4 kernel): 4-bit on disk and when loaded, fp32 while running
            packed = [n for n, m in model.named_modules() if hasattr(m, "weight_packed")]
            note = (f"calibrated on {min(qc.calibration_blocks, len(train_ds))} training blocks; "
                    "dequantized to fp32 at the first forward on CPU")
        rows.append(bench.row(label, kind, model, fp32.layers, folder=folder, quantized_layers=packed, note=note))
        del model
        gc.collect()
    shutil.rmtree(fp32_dir, ignore_errors=True)

    settings = {"model": cfg.model.name_or_path, "method": qc.method, "compare": compare, "threads": bench.threads,
                "batch_size": cfg.measure.batch_size, "seq_len": int(bench.latency_ids.shape[1]),
                "eval_blocks": sum(len(b) for b in bench.batches), "skip_modules": qc.skip_modules,
                "group_size": qc.group_size}
    report = write(out, rows, settings)
    base = rows[0]
    for r in rows:
        if r.folder:
            how = (f"{r.name} of `{cfg.model.name_or_path}`: weights {r.file_bytes / 2**20:.2f} MB on disk vs "
                   f"{base.file_bytes / 2**20:.2f} MB in fp32; see ../report.md." if r.folder.endswith("final")
                   else f"{r.name} of `{cfg.model.name_or_path}`; see the stage's report.md.")
            write_card(r.folder, stage="quantize", recipe=to_dict(cfg), summary=how,
                       metrics={"perplexity": r.perplexity, "top1_agreement_with_fp32": r.top1_agreement,
                                "fp32_perplexity": base.perplexity},
                       tags=[r.kind, r.name] + ([] if r.kind == "prune" else ["quantized"]))
    from lmforge import outputs

    outputs.discard_pending(out)
    from lmforge.quant.report import table

    print("\n" + table(rows))
    print(f"\nquantize done: {qc.method} -> {out / 'final'}")
    print(f"  report:  {out / 'report.md'} ({out / 'report.png'})")
    print(f"  reload:  python -c \"from lmforge.quant import methods; m = methods.load('{out / 'final'}')\""
          if qc.method != "prune" else f"  reload:  AutoModelForCausalLM.from_pretrained('{out / 'final'}')")
    return report

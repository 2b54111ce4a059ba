"""`lmforge finetune RECIPE.yaml`: adapt a pretrained model with one PEFT method (or fully).

    recipe -> tokenizer -> SFT / classification data -> base model -> peft method -> train.loop.run -> final/

``task: sft`` trains a causal LM on prompt/completion or chat records, loss on the completion (assistant)
tokens only; ``task: classification`` trains ``AutoModelForSequenceClassification`` on text/label
records and reports accuracy and macro-F1 on the validation split.

``peft.method`` picks the method by name:

    lora, dora, qlora   LoRA (DoRA: use_dora; QLoRA: LoRA on a 4-bit NF4 base via bitsandbytes)
    prefix, prompt      prefix tuning, prompt tuning (peft's prefix_tuning / prompt_tuning)
    ia3                 (IA)^3 rescaling vectors
    adapter             bottleneck adapters, Houlsby or Pfeiffer (lmforge.peft, registered into peft)
    full                every weight trained (layer-wise LR decay: optim.layerwise_lr_decay)
    <any peft type>     loha, lokr, oft, vera, adalora, p_tuning, adaption_prompt, ...: the peft config
                        class gets peft.options as keyword arguments (plus r / target_modules when it has them)

Outputs in ``output_dir``: ``final/`` (the adapter alone: ``adapter_model.safetensors`` +
``adapter_config.json``, loadable with ``PeftModel.from_pretrained(base, final)``; the whole model for
``full``), the tokenizer and recipe beside it, ``metrics.jsonl``, ``summary.json`` (trainable vs total
parameters, data counts, classification metrics), ``training_curves.png``.
``lmforge export RECIPE.yaml`` (or ``export.merge=true``) merges LoRA/DoRA/IA3 into the base and saves a
plain model; ``lmforge generate DIR --prompt ...`` samples from either.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from lmforge.config import ConfigError, UserError, help_field, load, nested
from lmforge.data.sft import (
    ClassificationCollator,
    LengthGroupedBatches,
    SFTCollator,
    SFTDataConfig,
    build_classification_datasets,
    build_sft_datasets,
    describe_stats,
    pack_examples,
)
from lmforge.models import ModelConfig, keep_4bit_weights_as_stored, load_tokenizer
from lmforge.optim.param_groups import build_param_groups, check_groups
from lmforge.peft.save import finish_dir, save_adapter
from lmforge.train import loop
from lmforge.train.accel import is_deepspeed, is_sharded
from lmforge.train.settings import TrainingRecipe

log = logging.getLogger("lmforge")

# recipe name -> peft's name for it
ALIASES = {"lora": "lora", "dora": "lora", "qlora": "lora", "prefix": "prefix_tuning", "prompt": "prompt_tuning",
           "ia3": "ia3", "adapter": "bottleneck"}
# methods that prepend virtual tokens / cached prefixes: no packing, and nothing to merge
PROMPT_LEARNING = {"prefix_tuning", "prompt_tuning", "p_tuning", "multitask_prompt_tuning", "adaption_prompt", "cpt"}
MERGEABLE_HINT = "lora, dora, qlora, ia3 (and peft's loha, lokr, oft, boft, vera, ...)"


# ---------------------------------------------------------------------------------------------
# Recipe


@dataclasses.dataclass
class PeftSettings:
    method: str = help_field("lora", help="lora, dora, qlora, prefix, prompt, ia3, adapter, full, or any peft method name (loha, lokr, oft, vera, ...).")
    r: int = help_field(8, help="LoRA rank (also passed to other methods that have an `r`).")
    alpha: float = help_field(16.0, help="LoRA alpha (scale alpha / r; with use_rslora alpha / sqrt(r)).")
    dropout: float = help_field(0.05, help="LoRA dropout (bottleneck adapters: dropout inside the adapter).")
    target_modules: str | list[str] | None = help_field(
        None, help="Modules to adapt: a list of name suffixes, a regex, or 'all-linear' (null: the method's default; LoRA: all-linear).")
    use_dora: bool = help_field(False, help="LoRA: weight-decomposed LoRA (DoRA); method: dora sets it.")
    use_rslora: bool = help_field(False, help="LoRA: rank-stabilised scaling alpha / sqrt(r).")
    loraplus_lr_ratio: float | None = help_field(None, help="LoRA+: the B matrices learn this many times faster (e.g. 16); null: off.")
    num_virtual_tokens: int = help_field(20, help="prefix / prompt (/ p_tuning): number of virtual tokens.")
    prefix_projection: bool = help_field(False, help="prefix: reparameterise the prefix through an MLP.")
    prompt_init: Literal["random", "text"] = help_field("random", help="prompt: initialise the virtual tokens randomly or from prompt_init_text.")
    prompt_init_text: str = help_field("", help="prompt: text whose token embeddings initialise the virtual tokens.")
    adapter_type: Literal["houlsby", "pfeiffer"] = help_field("houlsby", help="adapter: houlsby (after attention and FFN) or pfeiffer (after FFN).")
    reduction_factor: int = help_field(16, help="adapter: bottleneck width = hidden size // reduction_factor.")
    non_linearity: Literal["relu", "gelu", "silu", "swish", "tanh"] = help_field("relu", help="adapter: activation in the bottleneck.")
    modules_to_save: list[str] = help_field([], help="Extra modules trained in full and saved with the adapter (classification heads are added automatically).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = help_field("nf4", help="qlora: 4-bit data type of the frozen base.")
    bnb_4bit_use_double_quant: bool = help_field(True, help="qlora: quantise the quantisation constants too.")
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = help_field("float32", help="qlora: dtype of the matmuls on the dequantised base.")
    options: dict[str, Any] = help_field({}, help="Extra keyword arguments for the peft config class (e.g. {init_lora_weights: pissa}).")

    @property
    def peft_type(self) -> str | None:
        """peft's lowercase method name (None for full fine-tuning)."""
        m = self.method.lower()
        return None if m == "full" else ALIASES.get(m, m)

    def problems(self) -> list[str]:
        out = []
        names = known_methods()
        if self.method.lower() not in names:
            close = difflib.get_close_matches(self.method.lower(), names, n=1)
            out.append(f"method: unknown method '{self.method}'" + (f"; did you mean '{close[0]}'?" if close else "")
                       + f"; choose one of {', '.join(names)}")
            return out
        if self.r < 1:
            out.append("r: must be >= 1")
        if not 0 <= self.dropout < 1:
            out.append("dropout: must be in [0, 1)")
        if self.num_virtual_tokens < 1:
            out.append("num_virtual_tokens: must be >= 1")
        if self.reduction_factor < 1:
            out.append("reduction_factor: must be >= 1")
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio <= 0:
            out.append("loraplus_lr_ratio: must be > 0 (or null)")
        if self.prompt_init == "text" and not self.prompt_init_text:
            out.append("prompt_init_text: required when prompt_init is 'text'")
        # a key set for a method that does not read it is an error, not a silent no-op
        m = self.method.lower()
        for key, methods in _ONLY_FOR.items():
            if m in methods or m not in _EXPLICIT:
                continue
            if getattr(self, key) != _DEFAULTS[key]:
                out.append(f"{key}: not read by method '{self.method}' (only by {', '.join(methods)}); remove it")
        if m == "full" and self.options:
            out.append("options: full fine-tuning has no peft config to pass them to; remove peft.options")
        return out


_LORA = ("lora", "dora", "qlora")
_EXPLICIT = {*ALIASES, "full"}
_ONLY_FOR = {
    "r": _LORA, "alpha": _LORA, "use_dora": _LORA, "use_rslora": _LORA, "loraplus_lr_ratio": _LORA,
    "dropout": (*_LORA, "adapter"), "target_modules": (*_LORA, "ia3", "adapter"),
    "num_virtual_tokens": ("prefix", "prompt"), "prefix_projection": ("prefix",),
    "prompt_init": ("prompt",), "prompt_init_text": ("prompt",),
    "adapter_type": ("adapter",), "reduction_factor": ("adapter",), "non_linearity": ("adapter",),
    "bnb_4bit_quant_type": ("qlora",), "bnb_4bit_use_double_quant": ("qlora",), "bnb_4bit_compute_dtype": ("qlora",),
    "modules_to_save": (*_LORA, "ia3", "adapter"),
}
_DEFAULTS = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
             for f in dataclasses.fields(PeftSettings)}


# our key -> the field names other peft config classes use for it
_GENERIC_FIELDS = {"r": ("r",), "alpha": ("alpha", "lora_alpha"), "dropout": ("module_dropout", "dropout", "lora_dropout"),
                   "target_modules": ("target_modules",), "num_virtual_tokens": ("num_virtual_tokens",)}


def known_methods() -> list[str]:
    """Recipe method names: ours plus every method peft has registered (bottleneck included)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import lmforge.peft  # noqa: F401  (registers BOTTLENECK)

    return sorted({*_EXPLICIT, *(str(t.value if hasattr(t, "value") else t).lower() for t in PEFT_TYPE_TO_CONFIG_MAPPING)})


@dataclasses.dataclass
class ExportConfig:
    merge: bool = help_field(False, help="After training, merge the adapter into the base and save a plain model (lora, dora, qlora, ia3, ...).")
    output_dir: str | None = help_field(None, help="Where the merged model goes (default: <output_dir>/merged).")
    dtype: Literal["float32", "bfloat16", "float16"] = help_field("float32", help="dtype of the merged model's weights.")


@dataclasses.dataclass
class Config(TrainingRecipe):
    STAGE: ClassVar[str] = "finetune"
    task: Literal["sft", "classification"] = help_field("sft", help="sft (causal LM on completions) or classification (sequence classification).")
    model: ModelConfig = nested(ModelConfig)
    data: SFTDataConfig = nested(SFTDataConfig)
    peft: PeftSettings = nested(PeftSettings)
    export: ExportConfig = nested(ExportConfig)

    def problems(self) -> list[str]:
        out = super().problems()
        if not self.model.name_or_path:
            out.append("model.name_or_path: required for finetune: the base model folder (e.g. outputs/tiny/pretrain/final) or hub id")
        pt = self.peft.peft_type
        if self.data.packing and self.task == "classification":
            out.append("data.packing: only for task: sft; set data.packing=false")
        if self.data.packing and pt in PROMPT_LEARNING:
            out.append(f"data.packing: peft.method={self.peft.method} prepends virtual tokens to every row, which packed "
                       "examples cannot share; set data.packing=false (length-grouped batching is used instead)")
        # train.* keys the pretraining objective reads but fine-tuning does not: refuse rather than ignore.
        tc = self.train
        pretrain_only = {
            "train.objective": tc.objective != "causal", "train.label_smoothing": tc.label_smoothing != 0,
            "train.curriculum.min_length": tc.curriculum.min_length is not None,
            "train.dropout": any(v is not None for v in (tc.dropout.embedding, tc.dropout.attention, tc.dropout.hidden)),
        }
        for key, is_set in pretrain_only.items():
            if is_set:
                out.append(f"{key}: not used by finetune (a pretrain setting); remove it from the recipe")
        if self.export.merge and (pt in PROMPT_LEARNING or pt == "bottleneck" or pt is None):
            out.append(f"export.merge: peft.method={self.peft.method} has nothing to merge into the base weights; "
                       f"merge works for {MERGEABLE_HINT}")
        return out


# ---------------------------------------------------------------------------------------------
# Model: base (optionally 4-bit) + the PEFT method


def quantization_config(cfg: Config):
    """BitsAndBytesConfig for qlora (the frozen base in 4 bits), else None."""
    if cfg.peft.method.lower() != "qlora":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise UserError("peft.method: qlora needs bitsandbytes; install lmforge[qlora] (pip install -e \".[qlora]\")") from None
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.peft.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.peft.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, cfg.peft.bnb_4bit_compute_dtype),
    )


def load_base_model(cfg: Config, tokenizer, label_names: list[str] | None = None, device=None,
                    quantize: bool = True, dtype: str | None = None):
    """The pretrained base: a causal LM (sft) or a sequence classifier with a fresh head (classification)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lmforge.models import _torch_dtype

    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype or cfg.model.dtype), "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    qc = quantization_config(cfg) if quantize else None
    if qc is not None:
        kwargs["quantization_config"] = qc
        kwargs["device_map"] = {"": device if device is not None else "cpu"}
    if cfg.task == "classification":
        cls = AutoModelForSequenceClassification
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={n: i for i, n in enumerate(label_names)}, pad_token_id=tokenizer.pad_token_id)
    else:
        cls = AutoModelForCausalLM
    try:
        model = cls.from_pretrained(cfg.model.name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name_or_path: cannot load '{cfg.model.name_or_path}' as a {cls.__name__.removeprefix('AutoModelFor')} "
                        f"model ({str(e).splitlines()[0]})") from None
    if qc is not None:
        keep_4bit_weights_as_stored(model)  # the frozen base stays bitwise what was loaded, on every CPU
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        log.warning("tokenizer has %d tokens, the model %d: resizing the embeddings (new rows start untrained)",
                    len(tokenizer), model.get_input_embeddings().num_embeddings)
        model.resize_token_embeddings(len(tokenizer))
    if cfg.task == "classification":
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct last-name parts of the model's linear layers (what target_modules usually names)."""
    from transformers.pytorch_utils import Conv1D

    names = set()
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model: torch.nn.Module, targets: str | list[str] | None) -> None:
    """Raise a one-line error when target_modules match no module, listing the model's linear modules."""
    if targets is None or targets == "all-linear":
        return
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        missing = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UserError(f"peft.target_modules: {missing} match no module of this {model.config.model_type} model; "
                        f"its linear modules are: {', '.join(linear_module_names(model))} (or use all-linear)")


def peft_config_for(cfg: Config, tokenizer=None):
    """The peft config object the recipe describes (None for full fine-tuning)."""
    from peft import TaskType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import lmforge.peft  # noqa: F401  (registers BOTTLENECK)

    p, m = cfg.peft, cfg.peft.method.lower()
    pt = p.peft_type
    if pt is None:
        return None
    task_type = TaskType.SEQ_CLS if cfg.task == "classification" else TaskType.CAUSAL_LM
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[pt.upper()]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    kw: dict[str, Any] = {}
    if m in _LORA:
        kw = dict(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=p.target_modules or "all-linear",
                  use_dora=p.use_dora or m == "dora", use_rslora=p.use_rslora)
    elif m == "prefix":
        kw = dict(num_virtual_tokens=p.num_virtual_tokens, prefix_projection=p.prefix_projection)
    elif m == "prompt":
        kw = dict(num_virtual_tokens=p.num_virtual_tokens, prompt_tuning_init=p.prompt_init.upper())
        if p.prompt_init == "text":
            kw.update(prompt_tuning_init_text=p.prompt_init_text,
                      tokenizer_name_or_path=cfg.model.tokenizer or cfg.model.name_or_path)
    elif m == "ia3":
        kw = dict(target_modules=p.target_modules)
        if p.target_modules is not None:  # feed-forward modules scale inputs, the rest outputs; default: none
            kw["feedforward_modules"] = p.options.get("feedforward_modules", [])
    elif m == "adapter":
        kw = dict(adapter_type=p.adapter_type, reduction_factor=p.reduction_factor, non_linearity=p.non_linearity,
                  dropout=p.dropout, target_modules=p.target_modules)
    else:  # any other peft method: our keys where its config has a field for them, the rest from peft.options
        for ours, value in dataclasses.asdict(p).items():
            if ours in ("method", "options", "modules_to_save") or value == _DEFAULTS[ours]:
                continue
            theirs = next((f for f in _GENERIC_FIELDS.get(ours, ()) if f in fields), None)
            if theirs is None:
                raise UserError(f"peft.{ours}: not read by peft's {config_cls.__name__} (method '{p.method}'); "
                                "remove it and pass that method's own keys under peft.options")
            kw[theirs] = value
        if "target_modules" in fields and "target_modules" not in kw and "target_modules" not in p.options:
            kw["target_modules"] = "all-linear" if pt in ("loha", "lokr", "oft", "boft", "vera", "adalora") else None
        if pt == "adalora" and "total_step" not in p.options:
            kw["total_step"] = cfg.train.max_steps
        if pt == "adaption_prompt":
            kw.setdefault("adapter_len", p.options.get("adapter_len", 10))
            kw.setdefault("adapter_layers", p.options.get("adapter_layers", 1))
    if p.modules_to_save and "modules_to_save" in fields:
        kw["modules_to_save"] = list(p.modules_to_save)
    unknown = sorted(set(p.options) - fields)
    if unknown:
        close = {k: difflib.get_close_matches(k, sorted(fields), n=1) for k in unknown}
        hints = "; ".join(f"'{k}'" + (f" (did you mean '{c[0]}'?)" if c else "") for k, c in close.items())
        raise UserError(f"peft.options: {hints} not a field of peft's {config_cls.__name__}")
    kw.update({k: v for k, v in p.options.items() if not (m == "ia3" and k == "feedforward_modules")})
    kw = {k: v for k, v in kw.items() if k in fields}
    try:
        return config_cls(task_type=task_type, **kw)
    except (TypeError, ValueError) as e:
        raise UserError(f"peft.options: peft's {config_cls.__name__} refused them: {str(e).splitlines()[0]}") from None


def apply_method(cfg: Config, model: torch.nn.Module, tokenizer=None) -> torch.nn.Module:
    """Wrap ``model`` with the recipe's PEFT method (base weights frozen), or leave it whole for ``full``."""
    pc = peft_config_for(cfg, tokenizer)
    if pc is None:
        model.requires_grad_(True)
        return model
    from peft import get_peft_model

    check_target_modules(model, getattr(pc, "target_modules", None) if cfg.peft.target_modules is not None else None)
    if cfg.peft.method.lower() == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input with grad
    try:
        return get_peft_model(model, pc)
    except (ValueError, KeyError, NotImplementedError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"peft.method: '{cfg.peft.method}' does not support this {model.config.model_type} model "
                        f"(peft says: {first}); choose another method, or set peft.target_modules") from None


def parameter_counts(model: torch.nn.Module) -> dict[str, Any]:
    """Trainable and total parameters (4-bit weights counted unpacked, ZeRO-3 shards at full size)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        total = trainable = 0
        for p in model.parameters():
            n = getattr(p, "ds_numel", p.numel())
            total += n
            trainable += n if p.requires_grad else 0
    return {"trainable": int(trainable), "total": int(total), "trainable_percent": 100.0 * trainable / max(total, 1)}


def param_groups(cfg: Config, model: torch.nn.Module) -> list[dict]:
    """The shared builder's groups; with LoRA+ each group's B matrices split off with lr_scale x ratio."""
    groups = build_param_groups(model, cfg.optim)
    ratio = cfg.peft.loraplus_lr_ratio
    if not ratio:
        return groups
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in groups:
        is_b = [p for p in g["params"] if ".lora_B." in names[id(p)] or ".lora_embedding_B." in names[id(p)]]
        rest = [p for p in g["params"] if not any(p is q for q in is_b)]
        if rest:
            out.append({**g, "params": rest})
        if is_b:
            out.append({**g, "name": g["name"] + "_lora_B", "params": is_b, "lr_scale": g.get("lr_scale", 1.0) * ratio})
    check_groups(model, out)
    for g in out:
        log.info("param group %-16s %10d params  lr x%g", g["name"], sum(p.numel() for p in g["params"]), g["lr_scale"])
    return out


# ---------------------------------------------------------------------------------------------
# Losses


def sft_loss(model: torch.nn.Module, batch: loop.Batch) -> dict[str, torch.Tensor]:
    """Next-token cross-entropy on the labelled (completion) positions, summed."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs:
        # packed rows: transformers builds the block-diagonal mask from position_ids only when no cache
        # exists, and decoder models create one (even in training) unless told not to
        inputs["use_cache"] = False
    logits = model(**inputs).logits  # (batch, virtual + seq, vocab)
    labels = batch["labels"]
    if logits.size(1) > labels.size(1):  # prompt tuning prepends its virtual tokens' outputs
        logits = logits[:, -labels.size(1):]
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum")
    mask = labels != -100
    with torch.no_grad():
        correct = ((logits.argmax(-1) == labels) & mask).sum()
    return {"loss_sum": loss_sum, "n_tokens": mask.sum(), "n_correct": correct}


def classification_loss(model: torch.nn.Module, batch: loop.Batch) -> dict[str, torch.Tensor]:
    """Cross-entropy over classes, summed over the examples ('tokens' are examples here)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()  # (batch, classes)
    labels = batch["labels"]
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    with torch.no_grad():
        correct = (logits.argmax(-1) == labels).sum()
    return {"loss_sum": loss_sum, "n_tokens": torch.tensor(labels.numel(), device=labels.device), "n_correct": correct}


def count_examples(batch: loop.Batch) -> torch.Tensor:
    return torch.tensor(batch["labels"].numel())


@torch.no_grad()
def classification_metrics(acc, model, dataset, collate, batch_size: int, n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 over the validation set (each rank a strided shard; same forwards on all ranks)."""
    import math

    from accelerate.utils import gather_object

    model.eval()
    n, world, rank = len(dataset), acc.num_processes, acc.process_index
    pairs = []
    for b in range(math.ceil(math.ceil(n / world) / batch_size)):
        slots = [rank + world * (b * batch_size + i) for i in range(batch_size)]
        idx = [s for s in slots if s < n] or [0]
        batch = {k: v.to(acc.device) for k, v in collate(loop.rows_of(dataset, idx)).items()}
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        if any(s < n for s in slots):
            pairs += list(zip(pred.tolist(), batch["labels"].tolist()))
    pairs = gather_object(pairs)
    return classification_scores(pairs, n_classes)


def classification_scores(pairs: list[tuple[int, int]], n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (mean over classes of 2PR/(P+R); a class never predicted nor present scores 0)."""
    tp, fp, fn = [0] * n_classes, [0] * n_classes, [0] * n_classes
    for pred, gold in pairs:
        if pred == gold:
            tp[gold] += 1
        else:
            fp[pred] += 1
            fn[gold] += 1
    f1 = [2 * tp[c] / max(2 * tp[c] + fp[c] + fn[c], 1) for c in range(n_classes)]
    return {"accuracy": sum(tp) / max(len(pairs), 1), "macro_f1": sum(f1) / n_classes, "examples": len(pairs)}


# ---------------------------------------------------------------------------------------------
# The stage


def main(cfg: Config) -> loop.RunResult:
    return train(cfg)[0]


def train(cfg: Config) -> tuple[loop.RunResult, torch.nn.Module, Any]:
    """The whole stage; returns (result, trained model, tokenizer) for tests and benchmarks."""
    # ---- setup: accelerator first (ZeRO-3 must exist before weights are created) ----
    acc = loop.setup(cfg)
    method = cfg.peft.method.lower()
    if method == "qlora" and is_deepspeed(acc):
        raise UserError("peft.method: qlora is not supported under DeepSpeed here; use accelerate_configs/ddp.yaml "
                        "or multi_cpu.yaml (the 4-bit base already fits where ZeRO would be needed)")
    tokenizer = load_tokenizer(cfg.model)

    # ---- data: tokenized records with completion-only labels (or class ids) ----
    label_names = None
    with acc.main_process_first():
        if cfg.task == "classification":
            train_ds, val_ds, label_names, stats = build_classification_datasets(cfg.data, tokenizer, cfg.seed)
            collate = ClassificationCollator(tokenizer.pad_token_id)
        else:
            train_ds, val_ds, stats = build_sft_datasets(cfg.data, tokenizer, cfg.seed)
            collate = SFTCollator(tokenizer.pad_token_id)
    if acc.is_main_process:
        print(f"data: {describe_stats(stats)}")

    # ---- model: pretrained base (4-bit for qlora) + the PEFT method ----
    model = load_base_model(cfg, tokenizer, label_names, device=acc.device)
    model = apply_method(cfg, model, tokenizer)
    counts = parameter_counts(model)
    log.info("peft.method=%s: %d trainable of %d parameters (%.4f%%)", method, counts["trainable"], counts["total"],
             counts["trainable_percent"])
    if acc.is_main_process:
        print(f"{method}: trainable params {counts['trainable']:,} of {counts['total']:,} ({counts['trainable_percent']:.4f}%)")

    # ---- batches: packed rows, length-grouped, or fixed order ----
    batches, batching = None, "fixed"
    packing = cfg.task == "sft" and cfg.data.packing
    if packing and not packing_supported(model, acc):
        packing = False
        log.warning("data.packing: this %s model attends across packed examples (it ignores restarting position_ids); "
                    "using length-grouped batches instead", model.config.model_type)
    if packing:
        train_ds = pack_examples(train_ds, cfg.data.max_seq_length)
        batching = f"packed ({len(train_ds)} rows of <= {cfg.data.max_seq_length} tokens)"
        log.info("packing: %s", batching)
    elif cfg.data.group_by_length or cfg.data.packing:
        batching = "length-grouped"
        batches = LengthGroupedBatches(train_ds, cfg.train.per_device_train_batch_size, collate, cfg.seed,
                                       acc.process_index, acc.num_processes)

    # ---- train ----
    is_sft = cfg.task == "sft"
    # end_training=False: the adapter save (a collective under ZeRO-3) and the classification metrics
    # below still need the process group; training is ended at the bottom of this function.
    result = loop.run(
        acc, cfg, model, train_ds, val_ds, collate=collate,
        loss_fn=sft_loss if is_sft else classification_loss,
        count_tokens=loop.count_causal_tokens if is_sft else count_examples,
        tokenizer=tokenizer, param_groups=param_groups(cfg, model), seq_len=cfg.data.max_seq_length,
        save_final=method == "full", batches=batches, end_training=False,
    )

    # ---- save the adapter; classification metrics; summary ----
    extra = {"labels.json": json.dumps({"label_names": label_names}, indent=1)} if label_names else None
    final_dir = result.final_dir
    if method != "full" and result.step >= cfg.train.max_steps:
        final_dir = save_adapter(acc, model, result.output_dir / "final", tokenizer, cfg, extra)
    elif final_dir is not None and extra and acc.is_main_process:
        for name, text in extra.items():
            (final_dir / name).write_text(text)
    cls_metrics = None
    if cfg.task == "classification" and val_ds is not None:
        cls_metrics = classification_metrics(acc, model, val_ds, collate, cfg.eval.per_device_eval_batch_size, len(label_names))
    if acc.is_main_process:
        summary_path = result.output_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        summary.update(task=cfg.task, method=method, parameter_counts=counts, data=stats, batching=batching,
                       final_dir=str(final_dir) if final_dir else None)
        if cls_metrics is not None:
            summary["classification"] = cls_metrics
            result.eval.update({"macro_f1": cls_metrics["macro_f1"], "class_accuracy": cls_metrics["accuracy"]})
        summary_path.write_text(json.dumps(summary, indent=1))
    result.final_dir = final_dir
    acc.wait_for_everyone()
    acc.end_training()

    if acc.is_main_process:
        print(f"\nfinetune ({method}, {cfg.task}) done: {result.step} steps, train loss {result.train_loss:.4f}"
              + (f", eval loss {result.eval['loss']:.4f}" if result.eval else "")
              + (f", accuracy {cls_metrics['accuracy']:.3f}, macro-F1 {cls_metrics['macro_f1']:.3f}" if cls_metrics else ""))
        print(f"  {'adapter' if method != 'full' else 'model'}: {final_dir}")
        print(f"  summary: {result.output_dir / 'summary.json'}")
    if cfg.export.merge and final_dir is not None and acc.is_main_process:
        export(cfg)
    return result, model, tokenizer


def packing_supported(model, acc) -> bool:
    """Packing relies on the model building a block-diagonal mask from restarting position_ids (transformers'
    masking utilities do, for most decoder models, when no KV cache is built): check it on two short
    sequences (a packed forward must equal the second sequence alone)."""
    if is_sharded(acc):
        return True  # parameters are sharded before prepare; trust the model family
    torch.manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    a, b = torch.randint(0, vocab, (1, 5)), torch.randint(0, vocab, (1, 7))
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        packed = model(input_ids=torch.cat([a, b], 1).to(dev),
                       position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None].to(dev), use_cache=False).logits
        alone = model(input_ids=b.to(dev)).logits
    model.train(was_training)
    return torch.allclose(packed[:, 5:].float(), alone.float(), atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Export: merge the adapter into the base


def export(cfg: Config) -> Path:
    """Merge ``output_dir/final`` (LoRA/DoRA/QLoRA/IA3/...) into a full-precision base; save a plain model."""
    from peft import PeftModel

    import lmforge.peft  # noqa: F401

    pt = cfg.peft.peft_type
    if pt is None:
        raise UserError("peft.method: full fine-tuning already saved a plain model in output_dir/final; nothing to merge")
    if pt in PROMPT_LEARNING or pt == "bottleneck":
        raise UserError(f"peft.method: {cfg.peft.method} cannot be merged into the base weights (it adds "
                        f"{'virtual tokens' if pt in PROMPT_LEARNING else 'non-linear modules'}); merge works for {MERGEABLE_HINT}. "
                        "Ship the adapter folder and load it with PeftModel.from_pretrained")
    final = Path(cfg.output_dir) / "final"
    if not (final / "adapter_config.json").is_file():
        raise UserError(f"output_dir: no adapter in '{final}'; run `lmforge finetune` with this recipe first")
    tokenizer = load_tokenizer(dataclasses.replace(cfg.model, tokenizer=str(final)))
    labels = json.loads((final / "labels.json").read_text())["label_names"] if (final / "labels.json").exists() else None
    # QLoRA: merge into the full-precision base (merging into 4-bit weights would round the update away)
    base = load_base_model(cfg, tokenizer, labels, quantize=False, dtype="float32")
    merged = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
    merged = merged.to(getattr(torch, cfg.export.dtype))
    out = Path(cfg.export.output_dir or Path(cfg.output_dir) / "merged")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(tmp, safe_serialization=True)
    finish_dir(tmp, out, tokenizer, cfg, {"labels.json": json.dumps({"label_names": labels})} if labels else None)
    print(f"merged {cfg.peft.method} adapter into the base: {out}")
    return out


def export_cli(argv: list[str]) -> int:
    """`lmforge export RECIPE.yaml [key=value ...]`: merge a finished finetune run's adapter into its base."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lmforge export FINETUNE_RECIPE.yaml [key.path=value ...]\n\n"
              "Merges output_dir/final (lora, dora, qlora, ia3, ...) into model.name_or_path and writes a plain\n"
              "model to export.output_dir (default: <output_dir>/merged).")
        return 0 if argv else 2
    cfg = load(Config, argv[0], argv[1:])
    export(cfg)
    return 0


def check(cfg: Config) -> None:
    """`lmforge check`: build the peft config (catches bad peft.options) without loading a model."""
    try:
        peft_config_for(cfg)
    except UserError as e:
        raise ConfigError(e.problems) from None

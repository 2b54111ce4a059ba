"""The PEFT method table: one row per recipe method name (what peft calls it, which ``peft.*`` keys it
reads, whether it can be merged into the base or packed, whether its base is 4-bit), the peft config
builder, and applying a method to a model. A stage asks the table (``method_for(name)``) instead of
testing the method's name; a new method is one row here.

    lora, dora, qlora   LoRA (DoRA: use_dora; QLoRA: LoRA on a 4-bit NF4 base via bitsandbytes)
    prefix, prompt      prefix tuning, prompt tuning (peft's prefix_tuning / prompt_tuning)
    ia3                 (IA)^3 rescaling vectors
    adapter             bottleneck adapters, Houlsby or Pfeiffer (lmforge.peft, registered into peft)
    full                every weight trained (layer-wise LR decay: optim.layerwise_lr_decay)
    <any peft type>     loha, lokr, oft, vera, adalora, p_tuning, adaption_prompt, ...: the peft config
                        class gets peft.options as keyword arguments (plus r / target_modules when it has them)
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from typing import Any, Literal

import torch

from lmforge.config import UserError, field_defaults, help_field
from lmforge.optim.param_groups import build_param_groups, check_groups

log = logging.getLogger("lmforge")

# peft types that prepend virtual tokens / cached prefixes: no packing, and nothing to merge
PROMPT_LEARNING = {"prefix_tuning", "prompt_tuning", "p_tuning", "multitask_prompt_tuning", "adaption_prompt", "cpt"}
MERGEABLE_HINT = "lora, dora, qlora, ia3 (and peft's loha, lokr, oft, boft, vera, ...)"


# ---------------------------------------------------------------------------------------------
# The recipe group `peft`


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
    def info(self) -> Method:
        return method_for(self.method)

    @property
    def peft_type(self) -> str | None:
        """peft's lowercase method name (None for full fine-tuning)."""
        return method_for(self.method).peft_type

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
        # a key set for a method that does not read it is an error, not a silent no-op (our own methods;
        # any other peft method gets our keys mapped onto its config's fields, or an error there)
        m = method_for(self.method)
        if m.name in METHODS:
            defaults = field_defaults(PeftSettings)
            for key in _KEYS:
                if key not in m.reads and getattr(self, key) != defaults[key]:
                    users = [n for n, row in METHODS.items() if key in row.reads]
                    out.append(f"{key}: not read by method '{self.method}' (only by {', '.join(users)}); remove it")
        if m.peft_type is None and self.options:
            out.append("options: full fine-tuning has no peft config to pass them to; remove peft.options")
        return out


# ---------------------------------------------------------------------------------------------
# The method table


@dataclasses.dataclass(frozen=True)
class Method:
    name: str                       # the recipe's name
    peft_type: str | None           # peft's lowercase name (None: full fine-tuning)
    reads: tuple[str, ...] = ()     # the peft.* keys it reads (ours; other peft methods: mapped by field name)
    mergeable: bool = False         # merge_and_unload() folds it into the base weights
    kbit: bool = False              # the frozen base is loaded in 4 bits

    @property
    def prompt_learning(self) -> bool:
        """Prepends virtual tokens or cached prefixes: rows cannot be packed, and nothing can be merged."""
        return self.peft_type in PROMPT_LEARNING

    @property
    def packable(self) -> bool:
        return not self.prompt_learning


_LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "use_dora", "use_rslora", "loraplus_lr_ratio", "modules_to_save")
_QLORA_KEYS = (*_LORA_KEYS, "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")
METHODS: dict[str, Method] = {
    "lora": Method("lora", "lora", _LORA_KEYS, mergeable=True),
    "dora": Method("dora", "lora", _LORA_KEYS, mergeable=True),
    "qlora": Method("qlora", "lora", _QLORA_KEYS, mergeable=True, kbit=True),
    "prefix": Method("prefix", "prefix_tuning", ("num_virtual_tokens", "prefix_projection")),
    "prompt": Method("prompt", "prompt_tuning", ("num_virtual_tokens", "prompt_init", "prompt_init_text")),
    "ia3": Method("ia3", "ia3", ("target_modules", "modules_to_save"), mergeable=True),
    "adapter": Method("adapter", "bottleneck", ("dropout", "target_modules", "adapter_type", "reduction_factor",
                                                "non_linearity", "modules_to_save")),
    "full": Method("full", None),
}
# every PeftSettings key but the method name and the free-form options
_KEYS = [f.name for f in dataclasses.fields(PeftSettings) if f.name not in ("method", "options")]
# our key -> the field names other peft config classes use for it
_GENERIC_FIELDS = {"r": ("r",), "alpha": ("alpha", "lora_alpha"), "dropout": ("module_dropout", "dropout", "lora_dropout"),
                   "target_modules": ("target_modules",), "num_virtual_tokens": ("num_virtual_tokens",)}


def method_for(name: str) -> Method:
    """The table row of a recipe method name; any other peft type gets a row of its own."""
    m = name.lower()
    if m in METHODS:
        return METHODS[m]
    return Method(m, m, tuple(_GENERIC_FIELDS), mergeable=m not in PROMPT_LEARNING and m != "bottleneck")


def known_methods() -> list[str]:
    """Recipe method names: ours plus every method peft has registered (bottleneck included)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import lmforge.peft  # noqa: F401  (registers BOTTLENECK)

    return sorted({*METHODS, *(str(t.value if hasattr(t, "value") else t).lower() for t in PEFT_TYPE_TO_CONFIG_MAPPING)})


# ---------------------------------------------------------------------------------------------
# The peft config, applied to a model


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


def peft_config_for(cfg, tokenizer=None):
    """The peft config object the recipe describes (None for full fine-tuning)."""
    from peft import TaskType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import lmforge.peft  # noqa: F401  (registers BOTTLENECK)

    p, m = cfg.peft, cfg.peft.method.lower()
    pt = method_for(m).peft_type
    if pt is None:
        return None
    task_type = TaskType.SEQ_CLS if cfg.task == "classification" else TaskType.CAUSAL_LM
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[pt.upper()]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    kw: dict[str, Any] = {}
    if m in ("lora", "dora", "qlora"):
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
            if ours in ("method", "options", "modules_to_save") or value == field_defaults(PeftSettings)[ours]:
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


def apply_method(cfg, model: torch.nn.Module, tokenizer=None) -> torch.nn.Module:
    """Wrap ``model`` with the recipe's PEFT method (base weights frozen), or leave it whole for ``full``."""
    pc = peft_config_for(cfg, tokenizer)
    if pc is None:
        model.requires_grad_(True)
        return model
    from peft import get_peft_model

    check_target_modules(model, getattr(pc, "target_modules", None) if cfg.peft.target_modules is not None else None)
    if method_for(cfg.peft.method).kbit:
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


def param_groups(cfg, model: torch.nn.Module) -> list[dict]:
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



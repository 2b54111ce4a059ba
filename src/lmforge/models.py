"""Every model and tokenizer loader: built from a config (`model.config`) or loaded from a path/hub id.

    load_tokenizer        the recipe's tokenizer (pad token set for causal LMs)
    load_causal_lm        AutoModelForCausalLM, fresh (seeded by the caller) or pretrained
    load_masked_lm        AutoModelForMaskedLM (pretrain with train.objective: mlm)
    load_pretrained       a pretrained causal LM or sequence classifier, optionally 4-bit (QLoRA)
    load_for_generation   a model folder or an adapter folder + its base, in eval mode

All of them honour ``model.dtype``, ``model.attn_implementation`` and ``model.trust_remote_code``.

``model.config`` takes any ``transformers`` ``model_type`` and its kwargs, e.g.
``{model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}``; ``model.name_or_path`` takes a
local directory (our own ``final/`` outputs included) or, with internet, a hub id.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lmforge.config import UserError, help_field, nested
from lmforge.init_weights import InitConfig, apply_init


@dataclasses.dataclass
class ModelConfig:
    name_or_path: str | None = help_field(None, help="Local model directory or hub id to load weights from.")
    config: dict[str, Any] = help_field(
        {}, help="Build a fresh model: {model_type: llama, hidden_size: ..., ...} (any transformers model_type)."
    )
    tokenizer: str | None = help_field(None, help="Tokenizer directory or hub id (default: name_or_path).")
    trust_remote_code: bool = help_field(False, help="Allow model code from the hub; only for models you trust.")
    attn_implementation: str | None = help_field(None, help="'sdpa', 'eager', 'flash_attention_2', ... (default: transformers' choice).")
    dtype: str = help_field("float32", help="Weights' dtype when loading: float32, bfloat16, float16, auto.")
    init: InitConfig = nested(InitConfig)

    def problems(self) -> list[str]:
        out = []
        if bool(self.name_or_path) == bool(self.config):
            out.append("name_or_path / config: give exactly one (a model to load, or a config to build from)")
        if self.config and "model_type" not in self.config:
            out.append("config.model_type: required when building from a config (e.g. llama, gpt2, mistral)")
        elif self.config:
            out += config_key_problems(self.config)
        if self.name_or_path and _looks_local(self.name_or_path) and not Path(self.name_or_path).exists():
            out.append(f"name_or_path: '{self.name_or_path}' does not exist; give an existing model folder or a hub id")
        if not self.tokenizer and not self.name_or_path:
            out.append("tokenizer: required when the model is built from a config (a tokenizer folder or hub id)")
        if self.tokenizer and _looks_local(self.tokenizer) and not Path(self.tokenizer).exists():
            out.append(f"tokenizer: '{self.tokenizer}' does not exist; give a tokenizer folder or a hub id")
        if self.name_or_path and (self.init.scheme != "hf" or self.init.embedding_std is not None):
            out.append("init: only read when the model is built from model.config; remove it (name_or_path loads trained weights)")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            out.append(f"dtype: must be float32, bfloat16, float16 or auto, got '{self.dtype}'")
        return out


def config_key_problems(config: dict[str, Any]) -> list[str]:
    """``model.config`` checked against the transformers config class of its model_type: an unknown
    model_type gets the closest names, a key the class does not know (a typo would otherwise be stored
    on the config and ignored, training the default size) gets a did-you-mean."""
    import difflib
    import inspect

    from transformers import CONFIG_MAPPING

    model_type = str(config["model_type"])
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3, cutoff=0.6)
        return [f"config.model_type: '{model_type}' is not a transformers model type"
                + (f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "; e.g. llama, gpt2, mistral, qwen2, bert")]
    cls = CONFIG_MAPPING[model_type]
    known = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {}))
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            known |= set(inspect.signature(klass.__init__).parameters) - {"self", "kwargs"}
    out = []
    base = cls().to_dict()
    for key, value in config.items():
        if key not in known and not _changes_config(cls, base, key, value):
            close = difflib.get_close_matches(key, sorted(known), n=1)
            out.append(f"config.{key}: not a {cls.__name__} key" + (f"; did you mean '{close[0]}'?" if close else "")
                       + " (a misspelt key would be ignored)")
    return out


def _changes_config(cls, base: dict, key: str, value: Any) -> bool:
    """A key the class folds into another field (transformers 5: rope_theta -> rope_parameters) is real.
    Numbers are also tried changed, since a recipe may give the default value itself."""
    probes = [value] + ([value * 2 + 1] if isinstance(value, (int, float)) and not isinstance(value, bool) else [])
    expect = {k: v for k, v in base.items() if k != key}
    for probe in probes:
        try:
            after = cls(**{key: probe}).to_dict()
        except Exception:  # the class rejected the value: let from_config say why
            return True
        after.pop(key, None)
        if after != expect:
            return True
    return False


def _looks_local(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (./x, /x, a/b/c, ~) is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def torch_dtype(name: str):
    """Recipe dtype name -> torch dtype ('auto' passes through to transformers)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]


def _load_kwargs(cfg: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
    """What every from_pretrained/from_config call of a recipe's model passes."""
    kw: dict[str, Any] = {"dtype": torch_dtype(dtype or cfg.dtype), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    return kw


def _tensor_parallel_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Under accelerate_configs/tp.yaml: from_pretrained shards each layer on accelerate's TP mesh
    (transformers' ``tp_plan='auto'``); nothing otherwise. A model built from a config is refused."""
    from lmforge.train.accel import tp_size

    if tp_size() <= 1:
        return {}
    if cfg.config:
        raise UserError("model.config: tensor parallelism (accelerate_configs/tp.yaml) shards weights while loading them "
                        "(from_pretrained(tp_plan='auto')); give model.name_or_path (e.g. a pretrain run's final/), "
                        "or use fsdp.yaml to train a model from a config")
    from accelerate.state import AcceleratorState

    mesh = AcceleratorState().device_mesh
    return {"tp_plan": "auto", "device_mesh": mesh["tp"] if mesh is not None else None}


def _fit_vocab(model, tokenizer) -> None:
    if tokenizer is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))


def build_model_config(cfg: ModelConfig, vocab_size: int | None = None, **overrides: Any):
    """The transformers config the model will be built from (no weights allocated)."""
    from transformers import AutoConfig

    if cfg.config:
        kwargs = dict(cfg.config)
        model_type = kwargs.pop("model_type")
        if vocab_size is not None and "vocab_size" not in kwargs:
            kwargs["vocab_size"] = vocab_size
        try:
            hf_config = AutoConfig.for_model(model_type, **kwargs)
        except ValueError as e:
            raise UserError(f"model.config.model_type: {e}") from None
    else:
        hf_config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    for k, v in overrides.items():
        setattr(hf_config, k, v)
    return hf_config


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise UserError(f"model.tokenizer: cannot load '{name}' ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        # Causal LMs often ship without a pad token; padding positions are masked out of the loss anyway.
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(cfg: ModelConfig, tokenizer=None, **config_overrides: Any):
    """A causal LM: fresh from ``cfg.config`` (seeded by the caller) or pretrained from ``name_or_path``."""
    from transformers import AutoModelForCausalLM

    kw = {**_load_kwargs(cfg), **_tensor_parallel_kwargs(cfg)}
    vocab = len(tokenizer) if tokenizer is not None else None
    if cfg.config:
        hf_config = build_model_config(cfg, vocab_size=vocab, **config_overrides)
        if tokenizer is not None:
            for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(tokenizer, attr, None) is not None and attr not in cfg.config:
                    setattr(hf_config, attr, getattr(tokenizer, attr))
        model = AutoModelForCausalLM.from_config(hf_config, **kw)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **config_overrides, **kw)
        except OSError as e:
            raise UserError(f"model.name_or_path: cannot load '{cfg.name_or_path}' ({str(e).splitlines()[0]})") from None
    _fit_vocab(model, tokenizer)
    if cfg.config and (cfg.init.scheme != "hf" or cfg.init.embedding_std is not None):
        # after _fit_vocab, so rows added for the tokenizer are drawn by the scheme too
        import logging

        for family, how in apply_init(model, cfg.init).items():
            logging.getLogger("lmforge").info("model.init %s: %s", family, how)
    return model


def load_masked_lm(cfg: ModelConfig, tokenizer=None, **config_overrides: Any):
    """A masked LM (``AutoModelForMaskedLM``): fresh from ``model.config`` or loaded from ``model.name_or_path``."""
    from transformers import AutoModelForMaskedLM

    kw = _load_kwargs(cfg)
    vocab = len(tokenizer) if tokenizer is not None else None
    try:
        if cfg.config:
            hf_config = build_model_config(cfg, vocab_size=vocab, **config_overrides)
            if tokenizer is not None and "pad_token_id" not in cfg.config:
                hf_config.pad_token_id = tokenizer.pad_token_id
            model = AutoModelForMaskedLM.from_config(hf_config, **kw)
        else:
            model = AutoModelForMaskedLM.from_pretrained(cfg.name_or_path, **config_overrides, **kw)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise UserError("train.objective mlm: this model type has no masked-LM head; use an encoder config "
                            "(model_type: bert, roberta, ...)") from None
        raise
    _fit_vocab(model, tokenizer)
    return model


def bnb_4bit_config(quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "float32"):
    """transformers' ``BitsAndBytesConfig`` for a frozen 4-bit base (QLoRA); one-line error without bitsandbytes."""
    import torch

    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise UserError("peft.method: qlora needs bitsandbytes; install lmforge[qlora] (pip install -e \".[qlora]\")") from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype))


def load_pretrained(cfg: ModelConfig, tokenizer, *, task: str = "causal_lm", label_names: list[str] | None = None,
                    quantization_config=None, device=None, dtype: str | None = None):
    """A pretrained base from ``model.name_or_path``: a causal LM, or (``task='classification'``) a
    sequence classifier with a fresh head for ``label_names``; 4-bit when ``quantization_config`` is given."""
    import logging

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kw = {**_load_kwargs(cfg, dtype), **_tensor_parallel_kwargs(cfg)}
    if quantization_config is not None:
        kw["quantization_config"] = quantization_config
        kw["device_map"] = {"": device if device is not None else "cpu"}
    if task == "classification":
        cls = AutoModelForSequenceClassification
        kw.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                  label2id={n: i for i, n in enumerate(label_names)}, pad_token_id=tokenizer.pad_token_id)
    else:
        cls = AutoModelForCausalLM
    try:
        model = cls.from_pretrained(cfg.name_or_path, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name_or_path: cannot load '{cfg.name_or_path}' as a {cls.__name__.removeprefix('AutoModelFor')} "
                        f"model ({str(e).splitlines()[0]})") from None
    if quantization_config is not None:
        keep_4bit_weights_as_stored(model)  # the frozen base stays bitwise what was loaded, on every CPU
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        logging.getLogger("lmforge").warning(
            "tokenizer has %d tokens, the model %d: resizing the embeddings (new rows start untrained)",
            len(tokenizer), model.get_input_embeddings().num_embeddings)
        model.resize_token_embeddings(len(tokenizer))
    if task == "classification":
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _from_pretrained(cls, name: str, kw: dict):
    try:
        return cls.from_pretrained(name, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"MODEL_DIR: cannot load a model from '{name}' ({str(e).strip().splitlines()[0]}); a model folder "
                        "needs config.json and its weights (model.safetensors)") from None


def load_for_generation(model_dir: str | Path, base: str | None = None, dtype: str = "float32"):
    """(model, tokenizer) from a model folder or an adapter folder (+ the base it names, or ``base``), in eval mode."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"MODEL_DIR: '{path}' does not exist; give a model or adapter folder (e.g. outputs/tiny/finetune_lora/final)")
    kw = {"dtype": torch_dtype(dtype)}
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.is_file():
        from peft import PeftModel

        import lmforge.peft  # noqa: F401  (registers bottleneck adapters)

        base = base or json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        if not base or not Path(base).exists() and base.startswith((".", "/")):
            raise UserError(f"--base: the adapter names base model '{base}', which is not there; pass --base PATH")
        model = PeftModel.from_pretrained(_from_pretrained(AutoModelForCausalLM, base, kw), str(path))
    elif (path / "config.json").is_file():
        model = _from_pretrained(AutoModelForCausalLM, str(path), kw)
    else:
        raise UserError(f"MODEL_DIR: '{path}' holds neither a model (config.json) nor an adapter (adapter_config.json)")
    tok_dir = path if (path / "tokenizer_config.json").is_file() else Path(base or path)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer

def keep_4bit_weights_as_stored(model) -> int:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights; returns how many layers it touched.

    On a CPU with AVX512-BF16, bitsandbytes (0.49+) rewrites a ``Linear4bit``'s weight in place on
    its first eval-mode, no-grad forward into a kernel-friendly layout: the absmax scales become
    bf16 and the double quantisation is undone, and saving converts back by quantising the absmax
    again. So a frozen QLoRA base changes in memory (absmax, nested_absmax and the dequantised
    weight, by ~3e-4), evaluation runs on other numbers than training, and a layer whose output
    width is not a multiple of 32 fails with "N must be divisible by block_n". The flag this sets is
    the one bitsandbytes reads to choose that path; with it off, every forward dequantises the
    stored weights, exactly as training does, on every CPU."""
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n

"""Model and tokenizer from a recipe: built from a config (`model.config`) or loaded from a path/hub id.

``model.config`` takes any ``transformers`` ``model_type`` and its kwargs, e.g.
``{model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}``; ``model.name_or_path`` takes a
local directory (our own ``final/`` outputs included) or, with internet, a hub id.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lmforge.config import UserError, help_field


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

    def problems(self) -> list[str]:
        out = []
        if bool(self.name_or_path) == bool(self.config):
            out.append("name_or_path / config: give exactly one (a model to load, or a config to build from)")
        if self.config and "model_type" not in self.config:
            out.append("config.model_type: required when building from a config (e.g. llama, gpt2, mistral)")
        if self.name_or_path and _looks_local(self.name_or_path) and not Path(self.name_or_path).exists():
            out.append(f"name_or_path: '{self.name_or_path}' does not exist; give an existing model folder or a hub id")
        if not self.tokenizer and not self.name_or_path:
            out.append("tokenizer: required when the model is built from a config (a tokenizer folder or hub id)")
        if self.tokenizer and _looks_local(self.tokenizer) and not Path(self.tokenizer).exists():
            out.append(f"tokenizer: '{self.tokenizer}' does not exist; give a tokenizer folder or a hub id")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            out.append(f"dtype: must be float32, bfloat16, float16 or auto, got '{self.dtype}'")
        return out


def _looks_local(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (./x, /x, a/b/c, ~) is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]


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

    extra = {}
    if cfg.attn_implementation:
        extra["attn_implementation"] = cfg.attn_implementation
    vocab = len(tokenizer) if tokenizer is not None else None
    if cfg.config:
        hf_config = build_model_config(cfg, vocab_size=vocab, **config_overrides)
        if tokenizer is not None:
            for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(tokenizer, attr, None) is not None and attr not in cfg.config:
                    setattr(hf_config, attr, getattr(tokenizer, attr))
        model = AutoModelForCausalLM.from_config(
            hf_config, trust_remote_code=cfg.trust_remote_code, dtype=_torch_dtype(cfg.dtype), **extra
        )
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.name_or_path, trust_remote_code=cfg.trust_remote_code, dtype=_torch_dtype(cfg.dtype),
                **config_overrides, **extra,
            )
        except OSError as e:
            raise UserError(f"model.name_or_path: cannot load '{cfg.name_or_path}' ({str(e).splitlines()[0]})") from None
    if vocab is not None and model.get_input_embeddings().num_embeddings < vocab:
        model.resize_token_embeddings(vocab)
    return model


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

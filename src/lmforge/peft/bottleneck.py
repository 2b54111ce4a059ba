"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) as a peft tuner.

peft 0.21 has no bottleneck adapter and the ``adapters`` package pins transformers 4.x, so this
module adds one through peft's own extension API (``register_peft_method``). Once
``lmforge.peft`` is imported, ``get_peft_model(model, BottleneckConfig(...))``,
``PeftModel.save_pretrained`` and ``PeftModel.from_pretrained(base, path)`` work as for any
built-in method; the saved ``adapter_config.json`` says ``"peft_type": "BOTTLENECK"``.

Each adapter wraps an output projection and adds a small residual MLP to its output::

    y = base(x)                                  # (batch, seq, hidden)
    y + up(dropout(act(down(y))))                # down: hidden -> hidden // reduction_factor

``up`` starts at zero, so a fresh adapter is the identity and training starts from the base model.
Placement: ``houlsby`` wraps the attention output projection and the FFN output projection of every
block (two adapters per layer); ``pfeiffer`` wraps only the FFN output projection. Both put the
adapter before the block's residual addition, as in the papers. The adapters are non-linear, so
they cannot be merged into the base weights (``merge_and_unload`` raises and says so).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import PeftType
from torch import nn

NAME = "bottleneck"

# model_type -> (attention output projection, FFN output projection), as peft module-name suffixes.
OUTPUT_PROJECTIONS: dict[str, tuple[str, str]] = {
    **{t: ("o_proj", "down_proj") for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2",
        "granite", "smollm3", "cohere")},
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "dense_4h_to_h"),
    "opt": ("self_attn.out_proj", "fc2"),
    "gpt_bigcode": ("attn.c_proj", "mlp.c_proj"),
    "starcoder2": ("o_proj", "mlp.c_proj"),
    "falcon": ("self_attention.dense", "dense_4h_to_h"),
    "phi": ("self_attn.dense", "fc2"),
    "bert": ("attention.output.dense", "output.dense"),
}

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}


def _register_peft_type() -> Any:
    """Add ``PeftType.BOTTLENECK`` (peft's registry only accepts names of its enum)."""
    key = NAME.upper()
    if key in PeftType.__members__:
        return PeftType[key]
    member = str.__new__(PeftType, key)
    member._name_, member._value_ = key, key
    member.__objclass__ = PeftType
    member.__init__(key)
    PeftType._member_map_[key] = member
    PeftType._value2member_map_[key] = member
    PeftType._member_names_.append(key)
    type.__setattr__(PeftType, key, member)  # EnumType.__setattr__ refuses new members
    return member


BOTTLENECK = _register_peft_type()


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of bottleneck adapters (see the module docstring)."""

    adapter_type: str = field(default="houlsby", metadata={"help": "'houlsby' (after attention and FFN) or 'pfeiffer' (after FFN only)."})
    reduction_factor: int = field(default=16, metadata={"help": "Bottleneck width = hidden size // reduction_factor."})
    non_linearity: str = field(default="relu", metadata={"help": f"One of {', '.join(ACTIVATIONS)}."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout inside the adapter (on the bottleneck)."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffixes) or a regex to wrap; default: from adapter_type and model type."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to wrap."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Only these layer indices."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Layer-list name, with layers_to_transform."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules trained and saved in full."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = BOTTLENECK
        if self.adapter_type not in ("houlsby", "pfeiffer"):
            raise ValueError(f"adapter_type must be 'houlsby' or 'pfeiffer', got {self.adapter_type!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {', '.join(ACTIVATIONS)}, got {self.non_linearity!r}")
        if self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be >= 1, got {self.reduction_factor}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)


def default_target_modules(model_type: str, adapter_type: str) -> list[str] | None:
    pair = OUTPUT_PROJECTIONS.get(model_type)
    if pair is None:
        return None
    return list(pair) if adapter_type == "houlsby" else [pair[1]]


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """A projection with one residual bottleneck MLP per adapter name added to its output."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_act", "bottleneck_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig):
        super().__init__()
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict({})
        self.bottleneck_up = nn.ModuleDict({})
        self.bottleneck_dropout = nn.ModuleDict({})
        self.bottleneck_act: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())
        if self.out_features is None:
            raise ValueError(f"bottleneck adapters wrap linear projections, not {type(base_layer).__name__}")
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BottleneckConfig) -> None:
        hidden = self.out_features
        width = max(1, hidden // config.reduction_factor)
        down, up = nn.Linear(hidden, width), nn.Linear(width, hidden)
        nn.init.normal_(down.weight, std=hidden ** -0.5)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)  # identity at initialisation
        nn.init.zeros_(up.bias)
        self.bottleneck_down[adapter_name] = down
        self.bottleneck_up[adapter_name] = up
        self.bottleneck_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.bottleneck_act[adapter_name] = config.non_linearity
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "bottleneck adapters are non-linear and cannot be merged into the base weights; "
            "load them with PeftModel.from_pretrained(base, path) after `import lmforge.peft`"
        )

    def unmerge(self) -> None:
        warnings.warn("bottleneck adapters are never merged; nothing to unmerge", stacklevel=2)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # (batch, seq, hidden)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.bottleneck_down:
                continue
            down, up = self.bottleneck_down[name], self.bottleneck_up[name]
            h = ACTIVATIONS[self.bottleneck_act[name]](down(result.to(down.weight.dtype)))  # (batch, seq, width)
            result = result + up(self.bottleneck_dropout[name](h)).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


class BottleneckModel(BaseTuner):
    """The peft tuner that injects :class:`BottleneckLayer` around the target projections."""

    prefix: str = "bottleneck_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping = {k: list(v) for k, v in OUTPUT_PROJECTIONS.items()}

    def _prepare_adapter_config(self, peft_config: BottleneckConfig, model_config: dict) -> BottleneckConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type", "?")
            targets = default_target_modules(model_type, peft_config.adapter_type)
            if targets is None:
                raise ValueError(
                    f"bottleneck adapters: no default placement for model type '{model_type}'; set target_modules to "
                    "the names of its attention output and FFN output projections"
                )
            peft_config.target_modules = set(targets)
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key) -> None:
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = BottleneckLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self):
        raise ValueError(
            "bottleneck adapters are non-linear and cannot be merged into the base weights; "
            "ship the adapter folder and load it with PeftModel.from_pretrained(base, path) after `import lmforge.peft`"
        )


def register() -> None:
    """Make ``bottleneck`` a peft method (idempotent; runs on ``import lmforge.peft``)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    if BOTTLENECK not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=NAME, config_cls=BottleneckConfig, model_cls=BottleneckModel, prefix="bottleneck_")

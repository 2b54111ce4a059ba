"""Quantization-aware training with torchao: fake-quantize the linear layers, train, convert.

    from lmforge.quant import qat
    qat.prepare(model, "int4_weight_only", group_size=64)     # nn.Linear -> torchao FakeQuantizedLinear
    ... train with the shared loop (any layout) ...
    model = qat.convert(trained_state, plain_model, "int4_weight_only", group_size=64)   # real int4
    methods.save(model, "outputs/qat/final")

``prepare`` uses torchao's ``QATConfig(weight_config=..., activation_config=..., step="prepare")``. The
fake-quantization configs are given explicitly, chosen so that the simulated numerics are *exactly*
those of the PTQ method the model is converted with on this machine (checked in the tests: the
prepared model's logits equal the converted model's to float rounding):

| scheme                     | fake quantization (training)                              | converted with (``methods``) |
|----------------------------|-----------------------------------------------------------|------------------------------|
| ``int4_weight_only``       | weights uint4 asymmetric per group, zero point in the float domain (the tinygemm scheme) | ``int4_weight_only`` (CPU ``Int4OpaqueTensor``, 2 weights per byte) |
| ``int8_dynamic_int4_weight`` | activations int8 asymmetric per token; weights int4 symmetric per group | ``int8_dynamic_int4_weight`` (``IntxUnpackedToInt8Tensor``: int4 values held one per int8 byte on CPU) |

torchao's own ``QATConfig(base_config=...)`` infers fake quantizers only for ``Int4WeightOnlyConfig``
(whose kernels need CUDA) and targets the preshuffled MSLK numerics, which the CPU int4 kernel does
not use; hence the explicit configs.

Conversion goes through the trained state dict rather than ``QATConfig(step="convert")`` on the
trained module: under ZeRO-3 / FSDP the trained module holds shards, while
``accelerate.Accelerator.get_state_dict`` gathers full weights on every layout. A
``FakeQuantizedLinear`` keeps the parameter names of the ``nn.Linear`` it replaced (its fake
quantizers hold no parameters unless range learning is on, which is not offered), so the state dict
loads straight into the untouched model, which is then quantized by the PTQ method: the same result
as torchao's convert step (swap back to ``nn.Linear``, apply the base config).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lmforge.config import UserError
from lmforge.quant import methods

# scheme -> the PTQ method that converts it (same numerics)
SCHEMES: dict[str, str] = {
    "int4_weight_only": "int4_weight_only",
    "int8_dynamic_int4_weight": "int8_dynamic_int4_weight",
}
GROUP_SIZES = (32, 64, 128)


def fake_quantize_configs(scheme: str, group_size: int):
    """(activation config or None, weight config) for torchao's ``QATConfig``."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.quant_primitives import ZeroPointDomain

    if scheme == "int4_weight_only":
        weight = IntxFakeQuantizeConfig(torch.uint4, group_size=group_size, is_symmetric=False,
                                        zero_point_domain=ZeroPointDomain.FLOAT, zero_point_precision=torch.float32)
        return None, weight
    if scheme == "int8_dynamic_int4_weight":
        act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
        return act, IntxFakeQuantizeConfig(torch.int4, group_size=group_size, is_symmetric=True)
    raise UserError(f"qat.scheme: {scheme!r} is not one of {list(SCHEMES)}")


def settings_for(scheme: str, group_size: int, skip_modules: list[str]) -> methods.QuantSettings:
    return methods.QuantSettings(group_size=group_size, skip_modules=list(skip_modules))


def check(model: nn.Module, scheme: str, group_size: int, skip_modules: list[str]) -> None:
    """One-line errors before training: the scheme, the group size against every target layer's width."""
    if scheme not in SCHEMES:
        raise UserError(f"qat.scheme: {scheme!r} is not one of {list(SCHEMES)}")
    if group_size not in GROUP_SIZES:
        raise UserError(f"qat.group_size: must be one of {list(GROUP_SIZES)}, got {group_size}")
    reason = methods.available(SCHEMES[scheme])
    if reason:
        raise UserError(f"qat.scheme {scheme}: {reason}")
    targets = methods.target_layers(model, settings_for(scheme, group_size, skip_modules))
    methods.check_group_size(targets, group_size)


def prepare(model: nn.Module, scheme: str, group_size: int, skip_modules: list[str]) -> list[str]:
    """Swap the target ``nn.Linear`` layers for torchao ``FakeQuantizedLinear`` in place; their names."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    check(model, scheme, group_size, skip_modules)
    targets = methods.target_layers(model, settings_for(scheme, group_size, skip_modules))
    act, weight = fake_quantize_configs(scheme, group_size)
    quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"),
              filter_fn=lambda _m, fqn: fqn in targets)
    return sorted(targets)


def fake_quantized_layers(model: nn.Module) -> list[str]:
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    return [name for name, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)]


def convert(state: Mapping[str, torch.Tensor], plain_model: nn.Module, scheme: str, group_size: int,
            skip_modules: list[str]) -> nn.Module:
    """Load the trained (fake-quantized) weights into ``plain_model`` and quantize it for real."""
    missing, unexpected = plain_model.load_state_dict(dict(state), strict=False)
    # tied output weights may be absent from a gathered state dict; anything else is a real mismatch
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"QAT state dict does not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    plain_model.tie_weights()
    return methods.quantize(SCHEMES[scheme], plain_model, settings_for(scheme, group_size, skip_modules))

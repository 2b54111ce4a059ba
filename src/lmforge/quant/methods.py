"""Post-training weight quantization, chosen by name from a small registry.

    from lmforge.quant import methods
    reason = methods.available("int4_weight_only")       # None, or one line saying why not here
    qmodel = methods.quantize("int4_weight_only", model, methods.QuantSettings(group_size=64))
    methods.save(qmodel, "outputs/q4")                   # a folder a fresh process reloads
    qmodel = methods.load("outputs/q4")

| name               | library (pip)             | weights                                   | save format                                   |
|--------------------|---------------------------|-------------------------------------------|-----------------------------------------------|
| `dynamic_int8`     | torchao                   | int8 per output row, activations int8 per token at run time | `model.pt` (torch.save state dict, loaded weights_only) |
| `int8_weight_only` | torchao                   | int8 per output row                       | `model.pt`                                    |
| `int4_weight_only` | torchao                   | int4 per group (32/64/128), 2 per byte    | `model.pt`                                    |
| `int8_dynamic_int4_weight` | torchao           | int4 per group (symmetric; default 32), held one per int8 byte on CPU; activations int8 per token | `model.pt` |
| `quanto_int8`      | optimum-quanto            | int8 per output row                       | `model.safetensors` + `quanto_map.json`       |
| `quanto_int4`      | optimum-quanto            | int4 per group of 128 (or per row), 2 per byte | `model.safetensors` + `quanto_map.json`  |
| `bnb_int8`         | bitsandbytes              | LLM.int8 (int8 per row)                   | `save_pretrained` (plain `from_pretrained` reloads it) |
| `bnb_nf4`          | bitsandbytes              | NF4 in blocks of 64, 2 per byte           | `save_pretrained`                             |
| `gptq`             | llmcompressor (+ compressed-tensors) | int4 symmetric per group (32/64/128), GPTQ-calibrated, 8 per int32 | compressed-tensors `save_pretrained` (plain `from_pretrained` reloads it) |
| `awq`              | llmcompressor (+ compressed-tensors) | the same, after AWQ's activation-aware scaling | the same                            |

Every method quantizes the ``nn.Linear`` layers minus ``skip_modules`` (default ``["lm_head"]``);
embeddings and norms stay in full precision. The in-memory methods change the model in place and
return it; the ``bnb_*`` methods quantize while loading, so they take the folder of a saved model, and so
do ``gptq`` / ``awq``, which also take ``calibration`` (batches of token ids) and need the folder's tokenizer:

    methods.quantize("gptq", "outputs/tiny/pretrain/final", methods.QuantSettings(group_size=32),
                     calibration=[ids[:4], ids[4:8]])

llm-compressor is an optional install (``LLMC_INSTALL``: its metadata caps transformers at 5.17, below
lmforge's pin; it runs on 5.24 installed with ``--no-deps``); on a CPU the reloaded compressed-tensors
layers are dequantized to fp32 at the first forward (no CPU int4 kernel).
Every save folder holds ``config.json`` and ``quant.json`` (method, settings, library versions).

What runs where (torch 2.13 CPU build, torchao 0.18, optimum-quanto 0.2.7, bitsandbytes 0.50.2,
found on an AVX2-only CPU; nothing below needs AVX-512):

- ``torch.ao.quantization.quantize_dynamic`` still runs in torch 2.13 but warns "torch.ao.quantization
  is deprecated and will be removed in 2.10 ... please migrate to use torchao eager mode quantize_";
  ``dynamic_int8`` therefore uses its successor, torchao's ``Int8DynamicActivationInt8WeightConfig``.
- int4 in torchao 0.18 on CPU: only ``torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig``
  runs (``Int4OpaqueTensor``: real 2-per-byte packing, ATen's ``_weight_int4pack_mm_for_cpu``, fp32
  or bf16 activations). The others fail on a CPU here:
  ``Int4WeightOnlyConfig`` plain / preshuffled: "ImportError: Requires mslk >= 1.0.0" (CUDA kernels);
  tile_packed_to_4d: "Only bfloat16 is supported", then in bf16 "Torch not compiled with CUDA enabled";
  plain_int32: "Int4PlainInt32Tensor does not support device 'cpu' yet";
  ``Int8DynamicActivationInt4WeightConfig`` (prototype DA8W4): "DA8W4 on CPU requires the
  da8w4_linear_cpu kernel to be built and available" (the PyPI wheel ships no CPU C++ kernels);
  ``Int8DynamicActivationIntxWeightConfig`` with opaque_aten_kleidiai: "ATEN target requires
  torch.backends.kleidiai.is_available()" (KleidiAI is Arm-only), opaque_torchao_*: "TorchAO kernel
  library is not loaded". ``IntxWeightOnlyConfig(weight_dtype=torch.int4)`` runs but stores each
  int4 value in an int8 (no size gain over int8), so it is not offered. ``int8_dynamic_int4_weight``
  (``Int8DynamicActivationIntxWeightConfig``, default packing) stores its int4 values the same way, so
  it is no smaller than int8 here either; it is offered as the convert target of 8da4w
  quantization-aware training (``lmforge.quant.qat``) and to compare QAT with PTQ at the same bits.
- optimum-quanto's int4 unpacking on CPU is a C++ extension compiled on first use (``quanto_cpp``,
  about 4 minutes on 2 cores, cached next to the package); int8 needs no compiled kernel.
- bitsandbytes 0.50 runs NF4 and LLM.int8 on CPU (``device_map="cpu"``).

Save paths that round-trip (a fresh process gets bitwise the same logits):
torch.save of the state dict of a torchao-quantized model, reloaded with ``weights_only=True`` into a
model built from ``config.json`` (``load_state_dict(assign=True)``), for all three torchao methods;
quanto's own state dict in safetensors plus its quantization map (``requantize``); transformers'
``save_pretrained`` / ``from_pretrained`` for bitsandbytes. Not used: ``save_pretrained`` of a model
quantized in memory by ``quantize_`` fails ("Attempted to access the data pointer on an invalid
python storage"); transformers' ``TorchAoConfig`` (quantize at ``from_pretrained``) round-trips
int8 through safetensors but rejects the CPU int4 tensor ("Unsupported tensor type: Int4OpaqueTensor").
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lmforge.config import UserError
from lmforge.quant.layers import linear_layers

INSTALL = "pip install 'lmforge[quant]'"
QUANT_JSON = "quant.json"


@dataclasses.dataclass
class QuantSettings:
    """What a quantization method may be told; each method checks it reads only what it understands."""

    group_size: int | None = None  # int4_weight_only only: 32, 64 or 128 input weights share a scale (None: 128)
    skip_modules: list[str] = dataclasses.field(default_factory=lambda: ["lm_head"])  # kept in full precision


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    package: str  # the import name of the library it needs; `pip` is its PyPI name
    pip: str
    grouping: str  # how weights share scales, said in an error when group_size is given but not read
    quantize: Callable[..., nn.Module]  # (model, settings) -> model, or (model dir, settings) for from_dir
    save: Callable[[nn.Module, Path], None]
    load: Callable[[Path, dict], nn.Module]
    from_dir: bool = False
    group_sizes: tuple[int, ...] = ()  # empty: group_size is not a setting of this method
    check: Callable[[], str | None] = lambda: None  # kernel / hardware check once the library imports
    install: str = INSTALL  # the command that installs `pip`, said when it does not import
    calibrated: bool = False  # quantize takes (model dir, settings, calibration batches)


# --------------------------------------------------------------------------------------------
# Public API


def names() -> list[str]:
    return list(METHODS)


def get(name: str) -> Method:
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"quantization method {name!r} is unknown{hint}; known: {', '.join(METHODS)}")
    return METHODS[name]


def available(name: str) -> str | None:
    """None when ``name`` can run here, else one line saying why not (the package or the hardware)."""
    method = get(name)
    try:
        _import(method.package)
    except ImportError as e:
        return f"{name} needs {method.pip}, which does not import here ({e}); {method.install}"
    return method.check()


def quantize(name: str, source: nn.Module | str | Path, settings: QuantSettings | None = None,
             calibration: list[torch.Tensor] | None = None) -> nn.Module:
    """Quantize ``source`` (a causal LM, or the folder it was saved to) with method ``name``.

    An in-memory model is changed in place and returned; a folder is loaded first. The result is in
    eval mode with gradients off, and remembers how it was made so :func:`save` can write it.
    ``calibration`` (``gptq``, ``awq`` only): batches of token ids run through the model to calibrate.
    """
    method = get(name)
    settings = settings or QuantSettings()
    problems = _settings_problems(method, settings)
    if method.calibrated and not calibration:
        problems.append(f"calibration: {name} calibrates on data; pass calibration=[token id batches] "
                        "(the quantize stage takes quant.calibration_blocks training blocks)")
    elif calibration and not method.calibrated:
        problems.append(f"calibration: {name} does not read calibration data; remove it")
    if problems:
        raise UserError(problems)
    reason = available(name)
    if reason:
        raise UserError(reason)
    if method.from_dir:
        if isinstance(source, nn.Module):
            raise UserError(f"{name} quantizes while loading: pass the folder of a saved model, not a model object")
        args = (calibration,) if method.calibrated else ()
        model = method.quantize(_model_dir(source), settings, *args)
    else:
        if not isinstance(source, nn.Module):
            from transformers import AutoModelForCausalLM

            source = AutoModelForCausalLM.from_pretrained(_model_dir(source))
        model = method.quantize(source, settings)
    model.eval().requires_grad_(False)
    model._lmforge_quant = {"method": name, "settings": dataclasses.asdict(settings)}
    return model


def save(model: nn.Module, out_dir: str | Path) -> Path:
    """Write a model made by :func:`quantize` to ``out_dir`` so that :func:`load` (any process) reloads it."""
    record = getattr(model, "_lmforge_quant", None)
    if record is None:
        raise UserError("save() takes a model made by lmforge.quant.methods.quantize()")
    method = get(record["method"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method.save(model, out)
    versions = {pkg: _version(pkg) for pkg in ("torch", "transformers", method.pip)}
    (out / QUANT_JSON).write_text(json.dumps({**record, "versions": versions}, indent=2) + "\n")
    return out


def load(path: str | Path) -> nn.Module:
    """Reload a folder written by :func:`save`; the model is in eval mode with gradients off."""
    path = Path(path)
    if not (path / QUANT_JSON).is_file():
        raise UserError(f"{path} has no {QUANT_JSON}: not a folder written by lmforge.quant.methods.save()")
    record = json.loads((path / QUANT_JSON).read_text())
    reason = available(record["method"])
    if reason:
        raise UserError(reason)
    model = get(record["method"]).load(path, record)
    model.eval().requires_grad_(False)
    model._lmforge_quant = {"method": record["method"], "settings": record["settings"]}
    return model


# --------------------------------------------------------------------------------------------
# Checks shared by the methods


def _settings_problems(method: Method, settings: QuantSettings) -> list[str]:
    gs = settings.group_size
    if gs is None:
        return []
    if not method.group_sizes:
        return [f"group_size: {method.name} does not take one ({method.grouping}); remove group_size"]
    if gs not in method.group_sizes:
        return [f"group_size: {method.name} takes one of {list(method.group_sizes)}, got {gs}"]
    return []


def target_layers(model: nn.Module, settings: QuantSettings) -> dict[str, nn.Linear]:
    """The linear layers to quantize; refuses to quantize an lm_head that shares the embedding's weight."""
    targets = linear_layers(model, settings.skip_modules)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight and out_emb in targets.values():
        raise UserError(
            "skip_modules: the output layer shares its weight with the input embedding (tie_word_embeddings), "
            "quantizing it would quantize the embedding too; keep 'lm_head' in skip_modules"
        )
    return targets


def check_group_size(targets: dict[str, nn.Linear], group_size: int) -> None:
    bad = {name: layer.in_features for name, layer in targets.items() if layer.in_features % group_size}
    if bad:
        widths = sorted(set(bad.values()))
        fits = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)]
        shown = ", ".join(f"{n} ({w})" for n, w in list(bad.items())[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(f"group_size: {group_size} does not divide the input width of {len(bad)} layer(s): {shown}; "
                        + (f"use group_size {fits[0]}" if fits else "keep them in full precision with skip_modules")
                        + (" or add them to skip_modules" if fits else ""))


def _model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a saved model folder (no config.json)")
    return path


def _skeleton(path: Path) -> nn.Module:
    """A model of the saved architecture, to receive a quantized state dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def _save_config(model: nn.Module, out: Path) -> None:
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)


def _import(package: str):
    if package != "torchao":
        return importlib.import_module(package)
    # torchao's PyPI wheel carries CUDA-only .so files (one built for Python 3.10) and logs a warning
    # for each it cannot load; on a CPU-only torch that is expected, so it is not shown.
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        module = importlib.import_module("torchao")
        importlib.import_module("torchao.prototype.quantization.int4")  # registers Int4OpaqueTensor
    finally:
        log.setLevel(level)
    return module


def _version(pip_name: str) -> str:
    try:
        return importlib.metadata.version(pip_name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# torchao: quantize_ with a config, save as a torch.save state dict


def _torchao_config(name: str, settings: QuantSettings):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    # set_inductor_config=False: otherwise torchao changes torch._inductor's global settings
    if name == "dynamic_int8":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if name == "int8_weight_only":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if name == "int8_dynamic_int4_weight":
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig
        from torchao.quantization.granularity import PerGroup

        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                     weight_granularity=PerGroup(settings.group_size or 32))
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=settings.group_size or 128, set_inductor_config=False)


def _torchao_quantize(name: str) -> Callable[[nn.Module, QuantSettings], nn.Module]:
    def run(model: nn.Module, settings: QuantSettings) -> nn.Module:
        from torchao.quantization import quantize_

        targets = target_layers(model, settings)
        if name in ("int4_weight_only", "int8_dynamic_int4_weight"):
            check_group_size(targets, settings.group_size or (128 if name == "int4_weight_only" else 32))
            on = {p.device.type for layer in targets.values() for p in layer.parameters()}
            if on != {"cpu"}:
                raise UserError(f"int4_weight_only packs weights for the CPU int4 kernel; the model is on {sorted(on)}")
        quantize_(model, _torchao_config(name, settings), filter_fn=lambda _m, fqn: fqn in targets)
        return model

    return run


def _torchao_save(model: nn.Module, out: Path) -> None:
    _save_config(model, out)
    torch.save(model.state_dict(), out / "model.pt")


def _torchao_load(path: Path, record: dict) -> nn.Module:
    _import("torchao")  # registers torchao's tensor subclasses as safe for weights_only loading
    model = _skeleton(path)
    state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model


def _int4_kernel() -> str | None:
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return f"int4_weight_only needs ATen's CPU int4 kernel (_weight_int4pack_mm_for_cpu), missing in torch {torch.__version__}"
    return None


# --------------------------------------------------------------------------------------------
# optimum-quanto: quantize + freeze, save its state dict (safetensors) and quantization map


def _quanto_quantize(weights: str) -> Callable[[nn.Module, QuantSettings], nn.Module]:
    def run(model: nn.Module, settings: QuantSettings) -> nn.Module:
        from optimum.quanto import freeze
        from optimum.quanto import quantize as quanto_quantize

        targets = target_layers(model, settings)
        # include patterns are fnmatch patterns; module names have no wildcard characters
        quanto_quantize(model, weights=weights, include=list(targets))
        freeze(model)  # replaces the float weights by their quantized, packed form
        return model

    return run


def _quanto_save(model: nn.Module, out: Path) -> None:
    from optimum.quanto import quantization_map
    from safetensors.torch import save_file

    _save_config(model, out)
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied weight: tie_weights() restores it on load
            continue
        seen.add(tensor.data_ptr())
        state[key] = tensor.contiguous()
    save_file(state, out / "model.safetensors")
    (out / "quanto_map.json").write_text(json.dumps(quantization_map(model), indent=2) + "\n")


def _quanto_load(path: Path, record: dict) -> nn.Module:
    from optimum.quanto import requantize
    from safetensors.torch import load_file

    model = _skeleton(path)
    qmap = json.loads((path / "quanto_map.json").read_text())
    requantize(model, load_file(path / "model.safetensors"), qmap, device=torch.device("cpu"))
    model.tie_weights()
    return model


def _quanto_kernel() -> str | None:
    """quanto unpacks int4 with a C++ extension it compiles on first use: that needs ninja and a compiler."""
    from optimum.quanto.library.extensions import get_extension

    build = Path(get_extension("quanto_cpp").build_directory)
    version = build / "pytorch_version.txt"
    if version.is_file() and version.read_text().strip() == torch.__version__ and any(build.glob("quanto_cpp*.so")):
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None or importlib.util.find_spec("ninja") is None:
        return "quanto_int4 compiles optimum-quanto's CPU unpack kernel on first use, which needs a C++ compiler and ninja (pip install ninja)"
    return None


# --------------------------------------------------------------------------------------------
# bitsandbytes: transformers quantizes while loading (BitsAndBytesConfig), save_pretrained round-trips


def _bnb_quantize(bits: int) -> Callable[[Path, QuantSettings], nn.Module]:
    def run(path: Path, settings: QuantSettings) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        targets = target_layers(skeleton, settings)
        # transformers matches these as anchored regexes: escape to name exactly the layers kept
        keep = [re.escape(n) for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n not in targets]
        dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if bits == 4:
            bnb = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=keep
            )
        else:
            bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map="cpu", dtype=dtype)

    return run


def _bnb_save(model: nn.Module, out: Path) -> None:
    model.save_pretrained(out)


def _bnb_load(path: Path, record: dict) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu")


# --------------------------------------------------------------------------------------------
# llm-compressor: GPTQ / AWQ with calibration data (oneshot), saved in compressed-tensors format


# llm-compressor's metadata caps transformers (0.14.0.1: <=5.17, every older release lower) below lmforge's pin,
# so pip refuses it with constraints.txt; installed without its dependencies it runs on transformers 5.24.
LLMC_VERSION = "0.14.0.1"
LLMC_INSTALL = f"pip install 'lmforge[gptq]' && pip install --no-deps llmcompressor=={LLMC_VERSION}"


def _llmc_quantize(algorithm: str) -> Callable[[Path, QuantSettings, list[torch.Tensor]], nn.Module]:
    """GPTQ (Hessian-based error correction) or AWQ (activation-aware scaling, then round-to-nearest), both
    int4 symmetric weights per group of group_size (default 128), activations left in full precision (W4A16)."""

    def run(path: Path, settings: QuantSettings, calibration: list[torch.Tensor]) -> nn.Module:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor import oneshot
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        targets = target_layers(model, settings)
        group_size = settings.group_size or 128
        check_group_size(targets, group_size)
        keep = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in targets]
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size))
        if algorithm == "gptq":
            from llmcompressor.modifiers.quantization import GPTQModifier

            recipe = [GPTQModifier(config_groups={"group_0": scheme}, ignore=keep)]
        else:  # AWQ's smoothing searches its scales against the quantization that follows it
            from llmcompressor.modifiers.quantization import QuantizationModifier
            from llmcompressor.modifiers.transform.awq import AWQModifier

            recipe = [AWQModifier(), QuantizationModifier(config_groups={"group_0": scheme}, ignore=keep)]
        try:  # oneshot insists on a processor when given data, though it only saves it
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            raise UserError(f"{algorithm}: llm-compressor needs the model's tokenizer in {path}") from None
        batches = [{"input_ids": ids.long(), "attention_mask": torch.ones_like(ids, dtype=torch.long)}
                   for ids in calibration]
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        with _no_pinned_memory(), _quiet_loguru():
            oneshot(model=model, processor=tokenizer, dataset=loader, recipe=recipe,
                    num_calibration_samples=sum(len(b) for b in calibration), log_dir=None)
        return model

    return run


class _no_pinned_memory:
    """llm-compressor 0.14's AWQ pins its cached activations for faster host-to-GPU copies, unconditionally;
    on a CPU-only torch pin_memory() raises "Cannot access accelerator device when none is available".
    Without an accelerator there is no copy to speed up, so pinning is skipped (nothing else changes)."""

    def __enter__(self):
        from llmcompressor.pipelines.cache import IntermediatesCache

        self.cls, self.original = IntermediatesCache, IntermediatesCache.__dict__.get("_pin_intermediate")
        if not torch.accelerator.is_available() and self.original is not None:
            IntermediatesCache._pin_intermediate = classmethod(lambda cls, value: None)
        return self

    def __exit__(self, *exc):
        if self.original is not None:
            self.cls._pin_intermediate = self.original


class _quiet_loguru:
    """llm-compressor logs every step through loguru ("No accelerator available! Compressing model on CPU
    instead" once a layer); shown only with `lmforge -v` (LMFORGE_VERBOSE=1, as lmforge.quiet_third_party)."""

    def __enter__(self):
        from loguru import logger

        if os.environ.get("LMFORGE_VERBOSE", "").lower() not in ("1", "true", "yes"):
            logger.disable("llmcompressor")
            logger.disable("compressed_tensors")
        return self

    def __exit__(self, *exc):
        from loguru import logger

        logger.enable("llmcompressor")
        logger.enable("compressed_tensors")


def _llmc_save(model: nn.Module, out: Path) -> None:
    import warnings

    with warnings.catch_warnings():  # oneshot leaves the layers "offloaded" to the CPU they are on: nothing to warn of
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(out, save_compressed=True)  # llm-compressor's wrapper: packed int4 + scales
    recipe = out / "recipe.yaml"  # llm-compressor's modifier recipe; lmforge's stage writes its own recipe.yaml
    if recipe.is_file():
        recipe.rename(out / "llmcompressor_recipe.yaml")


def _llmc_load(path: Path, record: dict) -> nn.Module:
    from transformers import AutoModelForCausalLM

    # transformers reads the compressed-tensors quantization_config in config.json (needs compressed-tensors only)
    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu")


# --------------------------------------------------------------------------------------------
# The registry

_PER_ROW = "one scale per output row"
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("dynamic_int8", "torchao", "torchao", _PER_ROW + ", activations per token",
               _torchao_quantize("dynamic_int8"), _torchao_save, _torchao_load),
        Method("int8_weight_only", "torchao", "torchao", _PER_ROW,
               _torchao_quantize("int8_weight_only"), _torchao_save, _torchao_load),
        Method("int4_weight_only", "torchao", "torchao", "groups of group_size input weights",
               _torchao_quantize("int4_weight_only"), _torchao_save, _torchao_load,
               group_sizes=(32, 64, 128), check=_int4_kernel),
        Method("int8_dynamic_int4_weight", "torchao", "torchao", "groups of group_size input weights",
               _torchao_quantize("int8_dynamic_int4_weight"), _torchao_save, _torchao_load, group_sizes=(32, 64, 128)),
        Method("quanto_int8", "optimum.quanto", "optimum-quanto", _PER_ROW,
               _quanto_quantize("qint8"), _quanto_save, _quanto_load),
        Method("quanto_int4", "optimum.quanto", "optimum-quanto",
               "quanto picks groups of 128, or fewer dividing in_features, or one scale per row",
               _quanto_quantize("qint4"), _quanto_save, _quanto_load, check=_quanto_kernel),
        Method("bnb_int8", "bitsandbytes", "bitsandbytes", "LLM.int8: " + _PER_ROW,
               _bnb_quantize(8), _bnb_save, _bnb_load, from_dir=True),
        Method("bnb_nf4", "bitsandbytes", "bitsandbytes", "NF4 in blocks of 64",
               _bnb_quantize(4), _bnb_save, _bnb_load, from_dir=True),
        Method("gptq", "llmcompressor", "llmcompressor", "int4 groups of group_size input weights",
               _llmc_quantize("gptq"), _llmc_save, _llmc_load, from_dir=True, group_sizes=(32, 64, 128),
               install=LLMC_INSTALL, calibrated=True),
        Method("awq", "llmcompressor", "llmcompressor", "int4 groups of group_size input weights",
               _llmc_quantize("awq"), _llmc_save, _llmc_load, from_dir=True, group_sizes=(32, 64, 128),
               install=LLMC_INSTALL, calibrated=True),
    ]
}

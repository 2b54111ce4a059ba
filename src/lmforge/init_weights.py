"""Weight-initialisation schemes for a model built from ``model.config`` (``model.init.scheme``).

    hf                 as built: the model class's own ``_init_weights`` (nothing is redrawn)
    normal             every Linear / Conv1D / Embedding weight ~ N(0, std); biases 0; norms at identity
    xavier_uniform     Linear / Conv1D weights ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out)); embeddings ~ N(0, std)
    xavier_normal      Linear / Conv1D weights ~ N(0, sqrt(2 / (fan_in + fan_out))); embeddings ~ N(0, std)
    scaled_residual    as normal, but each residual branch's output projection ~ N(0, std / sqrt(N)), N = the
                       number of such projections (2 per attention + MLP block, so std / sqrt(2 * n_layers) as
                       in GPT-2, Radford et al. 2019, section 2.3)
    small_embeddings   as hf, but the token embedding ~ N(0, embedding_std), default 1e-4 (the scale of
                       RWKV's "small init embedding", there uniform +-1e-4): the first norm rescales them
                       to unit size, so early updates turn their directions quickly

``embedding_std``, when set, is the token embedding's std under every scheme (position embeddings keep
``std``). A token embedding tied to the output head is drawn once, so the tie holds.

Why this is hand-written: transformers gives every model class an ``_init_weights`` of its own (mostly
N(0, initializer_range)) but no way to pick another scheme, and ``torch.nn.init`` knows tensors, not
which tensor is a model's residual output projection. The families are found generically, by module
type (``nn.Linear``, transformers' ``Conv1D``, ``nn.Embedding``, any ``*Norm`` class) and by the
name's suffix for the output projections (:data:`RESIDUAL_OUTPUTS`); everything else (Mamba's
``A_log``, a conv kernel) is left as built and reported as ``other``.

Meant for attention + MLP decoders: a state-space model's special tensors (Mamba's ``dt_proj`` bias) get
no special treatment under the non-hf schemes.

Call :func:`apply_init` right after the model is built with the run's seed: it draws from torch's
global RNG in module order, so the same seed gives the same weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import TYPE_CHECKING, Literal

from lmforge.config import UserError, help_field, only_for

if TYPE_CHECKING:
    from torch import nn

SCHEMES = ("hf", "normal", "xavier_uniform", "xavier_normal", "scaled_residual", "small_embeddings")
SMALL_EMBEDDING_STD = 1e-4

# The last components of a module name that mark a residual branch's output projection, i.e. the
# layer whose output is added to the residual stream.
#   o_proj, down_proj            Llama, Mistral, Qwen2, Gemma, Phi-3
#   c_proj                       GPT-2, GPT-BigCode (attn.c_proj and mlp.c_proj, both Conv1D)
#   *.dense, dense_4h_to_h       GPT-NeoX, Falcon, Bloom, Phi (attention.dense, self_attn.dense)
#   out_proj, fc2, fc_out        OPT, GPT-J, Mamba (mixer.out_proj)
RESIDUAL_OUTPUTS: tuple[str, ...] = (
    "o_proj", "down_proj", "c_proj",
    "attention.dense", "self_attention.dense", "self_attn.dense", "dense_4h_to_h",
    "out_proj", "fc2", "fc_out",
)


@dataclasses.dataclass
class InitConfig:
    scheme: Literal["hf", "normal", "xavier_uniform", "xavier_normal", "scaled_residual", "small_embeddings"] = help_field(
        "hf", help="Weight init of a model built from model.config: hf (the model's own), normal, xavier_uniform, "
                   "xavier_normal, scaled_residual (GPT-2: output projections std/sqrt(2*n_layers)), small_embeddings.")
    std: float = help_field(0.02, help="Std of N(0, std) for normal and scaled_residual weights, and of the embeddings "
                                       "under normal / xavier_* / scaled_residual.")
    embedding_std: float | None = help_field(
        None, help="Std of the token embedding under every scheme when set; "
                   f"small_embeddings defaults it to {SMALL_EMBEDDING_STD:g}.")

    def problems(self) -> list[str]:
        out = []
        if self.scheme not in SCHEMES:
            out.append(f"scheme: must be one of {', '.join(SCHEMES)}, got '{self.scheme}'")
        if not (math.isfinite(self.std) and self.std > 0):
            out.append(f"std: must be > 0, got {self.std}")
        if self.embedding_std is not None and not (math.isfinite(self.embedding_std) and self.embedding_std > 0):
            out.append(f"embedding_std: must be > 0 (or null for the scheme's default), got {self.embedding_std}")
        if self.scheme in SCHEMES:
            out += only_for(self, self.scheme, {"std": ("normal", "xavier_uniform", "xavier_normal", "scaled_residual")},
                            "init.scheme")
        return out


# --------------------------------------------------------------------------------------------
# Finding the tensor families (torch is imported inside, so recipe parsing stays light)


def _is_linear(module: nn.Module) -> bool:
    from torch import nn
    from transformers.pytorch_utils import Conv1D  # GPT-2's Linear with a transposed (in, out) weight

    return isinstance(module, (nn.Linear, Conv1D))


def _is_norm(module: nn.Module) -> bool:
    import torch

    return "Norm" in type(module).__name__ and isinstance(getattr(module, "weight", None), torch.Tensor)


def _is_residual_output(name: str) -> bool:
    return any(name == s or name.endswith("." + s) for s in RESIDUAL_OUTPUTS)


@contextlib.contextmanager
def _writable(params: list[nn.Parameter]):
    """Under ZeRO-3 (zero.Init) a parameter holds only its shard: gather it, let rank 0 draw, broadcast."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield
    else:
        yield


FAMILIES = ("token_embedding", "embeddings", "lm_head", "residual_out", "linear", "norm")


def _families(model: nn.Module) -> tuple[dict[str, list[tuple[str, nn.Module]]], bool]:
    """({family: [(name, module)]}, whether the head is tied); a tied head's weight is the token embedding's."""
    from torch import nn

    tokens = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is tokens.weight
    fams: dict[str, list[tuple[str, nn.Module]]] = {k: [] for k in FAMILIES}
    for name, module in model.named_modules():
        if module is tokens:
            fams["token_embedding"].append((name, module))
        elif module is head:
            if not tied:
                fams["lm_head"].append((name, module))
        elif isinstance(module, nn.Embedding):
            fams["embeddings"].append((name, module))
        elif _is_linear(module):
            fams["residual_out" if _is_residual_output(name) else "linear"].append((name, module))
        elif _is_norm(module):
            fams["norm"].append((name, module))
    return fams, tied


# --------------------------------------------------------------------------------------------
# Drawing


def _embedding(module: nn.Embedding, std: float) -> None:
    from torch import nn

    nn.init.normal_(module.weight, 0.0, std)
    if getattr(module, "padding_idx", None) is not None:
        module.weight[module.padding_idx].zero_()  # as nn.Embedding and every _init_weights do


def _linear(module: nn.Module, how: str, std: float) -> None:
    from torch import nn

    # Conv1D stores (in, out), Linear (out, in); xavier's fan_in + fan_out is the same either way
    if how == "normal":
        nn.init.normal_(module.weight, 0.0, std)
    elif how == "xavier_uniform":
        nn.init.xavier_uniform_(module.weight)
    else:
        nn.init.xavier_normal_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def _norm(module: nn.Module) -> float:
    """Back to identity (weight 1, bias 0); returns the weight's value. Gemma-style norms scale by
    (1 + weight) and are built with weight 0, so an all-zero weight stays 0."""
    import torch
    from torch import nn

    identity = 0.0 if bool(torch.all(module.weight == 0)) else 1.0
    nn.init.constant_(module.weight, identity)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return identity


def _n(items: list) -> str:
    return f"{len(items)} tensor{'s' if len(items) != 1 else ''}"


def apply_init(model: nn.Module, cfg: InitConfig) -> dict[str, str]:
    """Re-initialise ``model`` in place by ``cfg.scheme``; returns {tensor family: what it was drawn from}."""
    import torch

    with torch.no_grad():
        return _apply(model, cfg)


def _apply(model: nn.Module, cfg: InitConfig) -> dict[str, str]:
    fams, tied = _families(model)
    tokens = fams["token_embedding"][0][1]
    emb_std = cfg.embedding_std if cfg.embedding_std is not None else (
        SMALL_EMBEDDING_STD if cfg.scheme == "small_embeddings" else cfg.std)
    tok_note = ", tied with the output head" if tied else ""
    report: dict[str, str] = {}

    if cfg.scheme in ("hf", "small_embeddings"):
        report["all"] = f"as built by {type(model).__name__}._init_weights"
        if cfg.scheme == "small_embeddings" or cfg.embedding_std is not None:
            with _writable([tokens.weight]):
                _embedding(tokens, emb_std)
            report["token_embedding"] = f"N(0, {emb_std:g}){tok_note}"
        return report

    out_std = cfg.std
    if cfg.scheme == "scaled_residual":
        if not fams["residual_out"]:
            raise UserError(
                f"init.scheme: scaled_residual found no residual output projection in {type(model).__name__} (looked for "
                f"modules named {', '.join(RESIDUAL_OUTPUTS)}); use init.scheme: normal, or add its output projections' "
                "names to RESIDUAL_OUTPUTS in lmforge/init_weights.py")
        out_std = cfg.std / math.sqrt(len(fams["residual_out"]))  # N residual branches: 2 per attention + MLP block
    how = "normal" if cfg.scheme in ("normal", "scaled_residual") else cfg.scheme
    drawn: set[int] = set()

    def draw(module: nn.Module, fn, *args):
        params = list(module.parameters(recurse=False))
        with _writable(params):  # under ZeRO-3 the full tensor exists only inside this block
            result = fn(module, *args)
        drawn.update(id(p) for p in params)
        return result

    draw(tokens, _embedding, emb_std)
    report["token_embedding"] = f"N(0, {emb_std:g}){tok_note}"
    for _, m in fams["embeddings"]:
        draw(m, _embedding, cfg.std)
    if fams["embeddings"]:
        report["embeddings"] = f"N(0, {cfg.std:g}), {_n(fams['embeddings'])} (positions, token types)"
    rule = {"normal": f"N(0, {cfg.std:g})", "xavier_uniform": "U(+-sqrt(6/(fan_in+fan_out)))",
            "xavier_normal": "N(0, sqrt(2/(fan_in+fan_out)))"}[how]
    for _, m in fams["lm_head"]:
        draw(m, _linear, how, cfg.std)
    if fams["lm_head"]:
        report["lm_head"] = f"{rule}, bias 0"
    linears = fams["linear"] + (fams["residual_out"] if cfg.scheme != "scaled_residual" else [])
    for _, m in linears:
        draw(m, _linear, how, cfg.std)
    report["linear"] = f"{rule}, biases 0, {_n(linears)}"
    if cfg.scheme == "scaled_residual":
        for _, m in fams["residual_out"]:
            draw(m, _linear, "normal", out_std)
        outs = fams["residual_out"]
        names = ", ".join(sorted({n.rsplit(".", 1)[-1] for n, _ in outs}))
        report["residual_out"] = f"N(0, {cfg.std:g}/sqrt({len(outs)}) = {out_std:.3g}), biases 0, {_n(outs)} ({names})"
    identities = {draw(m, _norm) for _, m in fams["norm"]}
    if fams["norm"]:
        weight = {frozenset({1.0}): "weight 1", frozenset({0.0}): "weight 0 (they scale by 1 + weight)"}.get(
            frozenset(identities), "weight 1 or 0")
        report["norm"] = f"identity ({weight}, bias 0), {_n(fams['norm'])}"
    other = [n for n, p in model.named_parameters() if id(p) not in drawn]
    if other:
        report["other"] = f"as built, {_n(other)} (e.g. {other[0]})"
    return report

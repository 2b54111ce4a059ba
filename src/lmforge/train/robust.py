"""Noise-based regularisers the loop plugs in (recipe group ``train``): gradient noise and stochastic depth.

- **Gradient noise** (``train.grad_noise``, Neelakantan et al. 2015, "Adding Gradient Noise Improves
  Learning for Very Deep Networks"): after clipping and before ``optimizer.step()``, every gradient
  gets ``N(0, σ_t²)`` added with ``σ_t² = η / (1 + t)^γ``, t the 0-based optimizer step.
- **Stochastic depth / LayerDrop** (``train.stochastic_depth``, Huang et al. 2016; Fan et al. 2019):
  in training mode each decoder block is skipped (its forward returns its input hidden states) with
  probability ``p_l``: ``linear`` ``p_l = rate·(l+1)/L`` (deeper blocks are dropped more often),
  ``uniform`` ``p_l = rate``. In eval mode every block runs.

Both draw from their own ``torch.Generator`` seeded from (recipe seed, step counter), never from the
global RNG, so a resumed run draws exactly the noise and the drops the uninterrupted run drew, and
the data order, dropout masks and every other consumer of the global RNG are untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import types
from collections.abc import Iterable
from typing import Any, Literal

import torch

from lmforge.config import UserError, help_field


def _generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (a tag, the seed, counters): stable across processes and
    machines (a hash of their repr, not Python's salted ``hash``), and distinct for distinct parts."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)


# ---------------------------------------------------------------------------------------------
# Gradient noise


@dataclasses.dataclass
class GradNoiseConfig:
    eta: float = help_field(0.0, help="Gradient noise scale η: variance η/(1+t)^γ at step t (0: off; the paper uses 0.01-1).")
    gamma: float = help_field(0.55, help="Decay exponent γ of the noise variance (Neelakantan et al. use 0.55).")

    def problems(self) -> list[str]:
        out = []
        if not self.eta >= 0:
            out.append(f"eta: must be >= 0 (0 turns gradient noise off), got {self.eta}")
        if not self.gamma >= 0:
            out.append(f"gamma: must be >= 0, got {self.gamma}")
        return out


def grad_noise_sigma(eta: float, gamma: float, step: int) -> float:
    """σ_t = sqrt(η / (1 + t)^γ), t = 0-based optimizer step."""
    return math.sqrt(eta / (1 + step) ** gamma)


@torch.no_grad()
def add_grad_noise(params: Iterable[torch.nn.Parameter], eta: float, gamma: float, step: int, seed: int,
                   rank: int = 0) -> float:
    """Add N(0, σ²), σ² = η/(1 + step)^γ, to every ``.grad`` of ``params`` in place; return σ.

    Call it after gradient clipping and before ``optimizer.step()`` (noise on the clipped gradient,
    as in the paper); ``step`` is the 0-based optimizer step. Parameters without a gradient are
    skipped. The noise comes from a CPU generator seeded from (seed, step, rank), drawn in fp32 in
    ``params`` order and then moved to each gradient's device and dtype: the same on every device,
    the same after a resume, and no global RNG is consumed. (One fp32 draw per gradient element on
    the CPU per step: fine for the models this repo trains; a multi-billion-parameter run would
    want an on-device generator.)

    Under DDP every rank holds the same, already averaged gradient, and every rank must add the
    *same* noise to it, or the replicas drift apart: pass the same ``rank`` (the default 0) on every
    rank. DeepSpeed steps the optimizer inside ``backward``, so there is no point to add noise there.
    """
    if eta == 0:
        return 0.0
    sigma = grad_noise_sigma(eta, gamma, step)
    gen = _generator("grad_noise", seed, step, rank)
    for p in params:
        if p.grad is None:
            continue
        noise = torch.randn(p.grad.shape, generator=gen, dtype=torch.float32)  # CPU, fp32: device-independent
        p.grad.add_((noise * sigma).to(p.grad))
    return sigma


# ---------------------------------------------------------------------------------------------
# Stochastic depth (LayerDrop)


@dataclasses.dataclass
class StochasticDepthConfig:
    rate: float = help_field(0.0, help="Drop probability of the deepest block (linear) or of every block (uniform); 0: off.")
    schedule: Literal["linear", "uniform"] = help_field(
        "linear", help="linear: block l of L is dropped with probability rate·(l+1)/L (Huang et al.); uniform: rate.")

    def problems(self) -> list[str]:
        out = []
        if not 0 <= self.rate < 1:
            out.append(f"rate: must be in [0, 1) (0 turns stochastic depth off), got {self.rate}")
        if self.schedule not in ("linear", "uniform"):
            out.append(f"schedule: must be 'linear' or 'uniform', got '{self.schedule}'")
        return out


def drop_probabilities(rate: float, schedule: str, num_layers: int) -> list[float]:
    """Per-block drop probability: linear ``rate·(l+1)/L``, uniform ``rate``."""
    if schedule == "linear":
        return [rate * (i + 1) / num_layers for i in range(num_layers)]
    if schedule == "uniform":
        return [rate] * num_layers
    raise UserError(f"train.stochastic_depth.schedule: must be 'linear' or 'uniform', got '{schedule}'")


def decoder_blocks(model: torch.nn.Module, key: str = "train.stochastic_depth",
                   fix: str = "set train.stochastic_depth.rate: 0") -> tuple[str, torch.nn.ModuleList]:
    """(dotted name, ModuleList of decoder blocks) of a causal LM, also through a peft PeftModel
    (``get_base_model()``); the discovery is the layer-wise LR decay's (:func:`find_layers`), its error
    led by ``key``, the feature that asked."""
    from lmforge.optim.param_groups import find_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return find_layers(base, key, fix)


def _sd_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward installed on each block: identity when the controller drops it, the block otherwise.

    Module-level and bound with ``types.MethodType`` (not a closure over the block), so a
    ``copy.deepcopy`` of the model rebinds it to the copy's block."""
    inner = self._lmforge_sd_inner  # the forward that was there before (an accelerate hook's, or the class's)
    ctrl, index = self._lmforge_sd
    if not (self.training and ctrl.is_dropped(index)):
        out = inner(*args, **kwargs)
        self._lmforge_sd_tuple = len(out) if isinstance(out, tuple) else 0
        return out
    hidden = args[0] if args else kwargs["hidden_states"]
    # Same structure as the block returns: transformers 5.x decoder layers return the hidden states
    # tensor; older ones a tuple (hidden, attentions / cache...), whose extras a skipped block lacks.
    n = getattr(self, "_lmforge_sd_tuple", 0)
    return (hidden,) + (None,) * (n - 1) if n else hidden


class StochasticDepth:
    """LayerDrop on ``blocks``: block l is skipped with probability ``probs[l]`` in training mode.

    The decisions for counter k are a pure function of (seed, k): ``L`` uniforms from a generator
    seeded with (seed, k), block l dropped when ``u_l < probs[l]``. Call :meth:`set_step` with the
    micro-batch index before each training forward (the loop's ``state["micro_batches"] + i``,
    which checkpoints already save), so a resumed run drops exactly the blocks the uninterrupted run
    dropped. Every block of one forward, and a gradient-checkpointing recompute in the backward
    that follows it, sees the same decisions. Under DDP every rank passes the same counter and so
    drops the same blocks; a dropped block's parameters get no gradient in that micro-batch, so DDP
    needs ``find_unused_parameters=True``.

    The blocks are not wrapped: each gets an instance-level ``forward`` (removed by :meth:`disable`),
    so module names, ``state_dict`` keys and saved checkpoints are those of the plain model. (A
    forward hook could not skip the computation: a pre-hook only rewrites inputs and a post-hook
    runs after the block has been computed.)
    """

    def __init__(self, blocks: torch.nn.ModuleList, probs: list[float], seed: int):
        if len(probs) != len(blocks):
            raise ValueError(f"{len(probs)} drop probabilities for {len(blocks)} blocks")
        self.blocks, self.probs, self.seed = list(blocks), [float(p) for p in probs], seed
        self.step: int | None = None
        self._decisions: tuple[int, list[bool]] | None = None
        for i, block in enumerate(self.blocks):
            if "_lmforge_sd" in block.__dict__:
                raise RuntimeError("stochastic depth is already enabled on this model; call disable() first")
            block._lmforge_sd_inner = block.forward  # bound: the class forward, or a hook's instance override
            block._lmforge_sd = (self, i)
            block.forward = types.MethodType(_sd_forward, block)

    @classmethod
    def maybe(cls, cfg: StochasticDepthConfig, model: torch.nn.Module, seed: int) -> StochasticDepth | None:
        """Enable on ``model`` (before ``accelerator.prepare``), or None when ``cfg.rate`` is 0."""
        return enable_stochastic_depth(model, cfg.rate, cfg.schedule, seed) if cfg.rate > 0 else None

    def set_step(self, step: int) -> None:
        """Use the decisions of counter ``step`` (the micro-batch index) for the next training forward(s)."""
        self.step = int(step)

    def dropped(self, step: int) -> list[bool]:
        """Which blocks counter ``step`` drops (pure: the same on every call, rank and resume)."""
        u = torch.rand(len(self.probs), generator=_generator("stochastic_depth", self.seed, int(step)),
                       dtype=torch.float64)
        return [bool(x < p) for x, p in zip(u.tolist(), self.probs)]

    def is_dropped(self, index: int) -> bool:
        if self.step is None:
            raise RuntimeError("stochastic depth: call set_step(micro_batch_index) before a training forward "
                               "(the drop decisions are a function of it, so that resume is exact)")
        if self._decisions is None or self._decisions[0] != self.step:
            self._decisions = (self.step, self.dropped(self.step))
        return self._decisions[1][index]

    def disable(self) -> None:
        """Put every block's own forward back (the model is the plain model again)."""
        for block in self.blocks:
            if block.__dict__.get("_lmforge_sd", (None,))[0] is not self:
                continue
            inner = block._lmforge_sd_inner
            del block.forward, block._lmforge_sd, block._lmforge_sd_inner
            block.__dict__.pop("_lmforge_sd_tuple", None)
            if getattr(inner, "__func__", None) is not type(block).forward:  # an instance override was there: restore it
                block.forward = inner
        self.blocks = []


def enable_stochastic_depth(model: torch.nn.Module, rate: float, schedule: str, seed: int) -> StochasticDepth:
    """Install LayerDrop on the decoder blocks of ``model`` (Llama/Mistral/Qwen2 ``model.layers``, GPT-2
    ``transformer.h``, GPT-NeoX ``gpt_neox.layers``, ... also inside a PeftModel); return the
    controller, whose ``probs`` are the per-block drop probabilities (:func:`drop_probabilities`).
    Enable before ``accelerator.prepare``."""
    if not 0 <= rate < 1:
        raise UserError(f"train.stochastic_depth.rate: must be in [0, 1), got {rate}")
    _, blocks = decoder_blocks(model)
    return StochasticDepth(blocks, drop_probabilities(rate, schedule, len(blocks)), seed)

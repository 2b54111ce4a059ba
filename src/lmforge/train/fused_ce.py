"""Fused linear cross-entropy: the LM head and the token loss in one pass that never holds the logits.

A causal LM's last step turns hidden states (N tokens, H) into logits (N, V) and takes the
cross-entropy. For a 32k-128k vocabulary the logits, their log-softmax and their gradient are the
largest tensors of the whole step (N·V·4 bytes each in fp32: 2048 tokens × 128k vocab = 1 GiB).
:func:`fused_linear_cross_entropy` goes over the tokens chunk by chunk and, for each chunk,

    1) computes the chunk's logits (chunk, V) in float32 (bf16/fp16 inputs are upcast, so every
       product and sum is fp32 on every CPU kind),
    2) adds the chunk's summed cross-entropy (label smoothing as ``F.cross_entropy`` defines it),
    3) turns the logits buffer in place into d loss / d logits = softmax - (1-ε)·one_hot - ε/V and
       immediately forms d loss / d hidden for the chunk and accumulates d loss / d weight (and bias)
       in fp32,

so at most one (chunk, V) buffer exists at a time and backward does no recomputation: it scales
the stored gradients by ``grad_output``. Ignored tokens (``ignore_index``) add nothing to the loss
or the gradients, so they are dropped before chunking (an SFT batch whose prompts are masked pays
only for its completion tokens). This is the technique of Liger-Kernel's
``LigerFusedLinearCrossEntropyLoss`` and Apple's Cut Cross-Entropy (Wijmans et al., 2024).

Why it is hand-written: both of those are Triton kernels (CUDA/ROCm only) and there is no
well-kept CPU implementation to depend on; the chunked torch version below is ~100 lines and
exact to fp32 rounding. On CUDA, :func:`fused_linear_ce` uses liger-kernel when it is installed
(``pip install liger-kernel``), and this implementation otherwise.

Memory (fp32 weights): one (chunk, V) fp32 buffer + the stored grads (N×H for hidden, V×H for the
weight: the weight's gradient exists anyway after backward). With bf16/fp16 weights add an fp32
copy of the weight and an fp32 gradient accumulator during the forward (2 × 2·V·H bytes), the
price of fp32 accumulation.

In training (``train.loss_impl: fused_linear_ce``) :class:`lmforge.train.tasks.FusedHead` runs the
model through its (DDP / DeepSpeed / compiled) wrapper with ``logits_to_keep=1``, takes the body's
``last_hidden_state`` from a forward hook, and calls :func:`fused_linear_ce` on it with the head's
weight; evaluation keeps the logits path (accuracy needs the argmax; no gradients are held there).
ZeRO-3 and FSDP are refused: the head's weight is a shard outside its own forward.
Verify a new architecture once: the fused loss on one batch must equal the model's logits-based
loss (``tests/test_fused_ce.py`` does this for Llama, GPT-2 and GPT-NeoX).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from collections.abc import Callable

import torch

from lmforge.config import UserError

log = logging.getLogger("lmforge")
Batch = dict[str, torch.Tensor]

# The (chunk, V) fp32 logits buffer is the working set; 64 MiB is 524 rows of a 32k vocabulary
# or 131 rows of 128k — big enough for efficient matmuls (on the AVX2 bench, 4 x 512 at vocab 32k,
# chunks of 256 to 2048 rows timed within noise of each other), small next to the (N, V) logits.
DEFAULT_CHUNK_BYTES = 64 * 2**20


def choose_chunk_size(n_tokens: int, vocab: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one fp32 (chunk, V) buffer fits in ``budget_bytes``.

    The chunks are balanced (N = 1100 with room for 524 rows gives 3 chunks of 367, not
    524 + 524 + 52), and there is always at least one row."""
    rows = max(1, budget_bytes // (4 * max(vocab, 1)))
    if rows >= n_tokens:
        return max(n_tokens, 1)
    n_chunks = math.ceil(n_tokens / rows)
    return math.ceil(n_tokens / n_chunks)


# ---------------------------------------------------------------------------------------------
# The chunked forward (loss and, when asked, the gradients)


def _chunked_loss_and_grads(
    hidden: torch.Tensor,  # (N, H), only tokens that count (ignored ones were dropped)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (N,), all in [0, V)
    label_smoothing: float,
    chunk_size: int,
    need: tuple[bool, bool, bool],  # grads wanted for (hidden, weight, bias)
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Summed CE over all rows, and fp32 d(sum)/d(hidden, weight, bias) for those in ``need``."""
    n, vocab = hidden.shape[0], weight.shape[0]
    eps = float(label_smoothing)
    f32 = torch.float32
    w32 = weight.float()  # no copy when the weight is fp32
    b32 = bias.float() if bias is not None else None
    loss = torch.zeros((), dtype=f32, device=hidden.device)
    grad_h = torch.empty(n, hidden.shape[1], dtype=f32, device=hidden.device) if need[0] else None
    grad_w = torch.zeros_like(w32, dtype=f32) if need[1] else None
    grad_b = torch.zeros(vocab, dtype=f32, device=hidden.device) if need[2] and bias is not None else None
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h = hidden[start:end].float()  # (c, H)
        y = labels[start:end].unsqueeze(1)  # (c, 1)
        # 1) logits in fp32
        z = torch.addmm(b32, h, w32.T) if b32 is not None else h @ w32.T  # (c, V)
        # 2) loss_i = lse_i - (1-ε)·z_{i,y} - ε·mean_j z_ij  (= (1-ε)·CE + ε·mean_j(-log p_j))
        tok = -(1.0 - eps) * z.gather(1, y).squeeze(1)  # (c,)
        if eps:
            tok = tok - eps * z.mean(1)
        m = z.amax(1, keepdim=True)  # (c, 1)
        z.sub_(m).exp_()  # z := exp(z - max), in place: the only (c, V) buffer
        s = z.sum(1, keepdim=True)  # (c, 1)
        loss += (tok + (m + s.log()).squeeze(1)).sum()
        if not any(need):
            continue
        # 3) z := d loss / d logits = softmax - (1-ε)·one_hot - ε/V, then the chain rule
        z.div_(s)
        if eps:
            z.sub_(eps / vocab)
        z.scatter_add_(1, y, torch.full_like(y, -(1.0 - eps), dtype=f32))
        if grad_h is not None:
            torch.mm(z, w32, out=grad_h[start:end])  # (c, H)
        if grad_w is not None:
            grad_w.addmm_(z.T, h)  # (V, H)
        if grad_b is not None:
            grad_b += z.sum(0)
        del z
    return loss, grad_h, grad_w, grad_b


def _counted_loss(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,
    labels: torch.Tensor,  # (N,)
    ignore_index: int,
    label_smoothing: float,
    chunk_size: int | None,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Drops the ignored tokens (they add nothing to loss or grads), then the chunked loop.

    Returns (kept indices or None when all count, loss, grads of the kept rows/weight/bias)."""
    keep = (labels != ignore_index).nonzero().squeeze(1)  # (n_counted,): one host sync
    if keep.numel() == labels.numel():
        keep, h, y = None, hidden, labels
    else:
        h, y = hidden.index_select(0, keep), labels.index_select(0, keep)
    chunk = chunk_size or choose_chunk_size(h.shape[0], weight.shape[0])
    # A custom Function runs under the caller's autocast too; its own matmuls must stay fp32.
    with torch.autocast(hidden.device.type, enabled=False):
        return (keep, *_chunked_loss_and_grads(h, weight, bias, y, label_smoothing, chunk, need))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """loss_sum = Σ_i CE(hidden_i @ weightᵀ + bias, labels_i) over the non-ignored i, gradients
    computed in the forward (see the module docstring); backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, chunk_size):
        # hidden (N, H), weight (V, H), bias (V,) or None, labels (N,)
        keep, loss, gh, gw, gb = _counted_loss(
            hidden, weight, bias, labels, ignore_index, label_smoothing, chunk_size, tuple(ctx.needs_input_grad[:3])
        )
        if gh is not None and keep is not None:
            full = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            gh = full.index_copy_(0, keep, gh.to(hidden.dtype))
        ctx.grads = (
            gh.to(hidden.dtype) if gh is not None else None,
            gw.to(weight.dtype) if gw is not None else None,
            gb.to(bias.dtype) if gb is not None else None,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy: backward ran twice on one forward; run the forward again")
        grads, ctx.grads = ctx.grads, None  # scaled in place below, and freed after this call
        gh, gw, gb = (g.mul_(grad_output) if g is not None else None for g in grads)  # fp32 scale
        return gh, gw, gb, None, None, None, None


def _check_inputs(hidden, weight, labels, bias, ignore_index, label_smoothing, chunk_size) -> None:
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (vocab, {hidden.shape[-1]}) to match hidden {tuple(hidden.shape)}, got {tuple(weight.shape)}"
            " (a (0,)-shaped weight is a ZeRO-3 partition: gather it first)"
        )
    if labels.shape != hidden.shape[:-1] or labels.is_floating_point():
        raise ValueError(f"labels must be integers of shape {tuple(hidden.shape[:-1])}, got {labels.dtype} {tuple(labels.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise UserError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size is not None and chunk_size < 1:
        raise UserError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    counted = labels[labels != ignore_index]
    if counted.numel() and (counted.min() < 0 or counted.max() >= weight.shape[0]):
        raise UserError(
            f"labels must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}; got values in "
            f"[{int(counted.min())}, {int(counted.max())}] (does the tokenizer's vocabulary match the model's?)"
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F.cross_entropy(hidden @ weight.T + bias, labels, reduction='sum', ...), n_tokens)``
    without the (N, V) logits.

    hidden (N, H) — or (..., H) with labels (...) — weight (V, H), bias (V,) or None. Returns the
    fp32 loss sum (a 0-dim tensor that backpropagates into hidden, weight and bias; a weight tied
    to the input embedding gets both contributions through autograd) and the number of labels
    that are not ``ignore_index`` (a 0-dim int64 tensor). ``chunk_size`` overrides
    :func:`choose_chunk_size` (tokens per chunk, counted after dropping ignored ones)."""
    _check_inputs(hidden, weight, labels, bias, ignore_index, label_smoothing, chunk_size)
    flat_h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    flat_y = labels.reshape(-1)  # (N,)
    n_tokens = (flat_y != ignore_index).sum()
    tensors = (flat_h, weight) if bias is None else (flat_h, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        loss = FusedLinearCrossEntropy.apply(flat_h, weight, bias, flat_y, ignore_index, label_smoothing, chunk_size)
    else:  # eval / no_grad: the loss alone, no gradient work
        no_grads = (False, False, False)
        loss = _counted_loss(flat_h, weight, bias, flat_y, ignore_index, label_smoothing, chunk_size, no_grads)[1]
    return loss, n_tokens


# ---------------------------------------------------------------------------------------------
# Any loss of the logits, chunk by chunk (distillation: CE + a divergence to the teacher's logits)


class ChunkedHeadLoss(torch.autograd.Function):
    """loss = Σ_chunks chunk_loss(hidden[chunk] @ weightᵀ + bias, chunk) for a loss that is a sum over rows.

    For each chunk of rows the chunk's fp32 logits are built on detached leaves and ``chunk_loss`` —
    any differentiable function of them, e.g. CE plus a KL to the teacher's logits of the same rows —
    is differentiated right away by ``torch.autograd.grad`` into d/d hidden (rows) and d/d weight (bias);
    the chunk's graph is then dropped. So, as in :class:`FusedLinearCrossEntropy`, the (N, V) logits never
    exist whole and backward recomputes nothing (it scales the stored gradients); autograd gives the
    per-chunk derivative of whatever divergence ``chunk_loss`` uses, where the CE path above writes its
    own closed form. Hand-written for the reason that module's docstring gives (no CPU library does it).
    ``chunk_loss(logits (c, V) fp32, rows: slice) -> (loss 0-dim, parts (P,) detached)``; the summed
    parts are the second output (non-differentiable), for logging the terms of the loss apart."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_loss, chunk_size):
        n = hidden.shape[0]
        f32 = torch.float32
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros(hidden.shape, dtype=f32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=f32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=f32, device=bias.device) if need_b and bias is not None else None
        w = weight.detach().float().requires_grad_(need_w)
        b = bias.detach().float().requires_grad_(need_b) if bias is not None else None
        total = torch.zeros((), dtype=f32, device=hidden.device)
        parts = None
        with torch.enable_grad(), torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                rows = slice(start, min(start + chunk_size, n))
                h = hidden[rows].detach().float().requires_grad_(need_h)
                z = torch.addmm(b, h, w.T) if b is not None else h @ w.T  # (c, V) fp32
                loss, chunk_parts = chunk_loss(z, rows)
                parts = chunk_parts if parts is None else parts + chunk_parts
                total += loss.detach()
                wrt = [t for t, want in ((h, need_h), (w, need_w), (b, need_b and b is not None)) if want]
                if wrt and loss.requires_grad:
                    grads = iter(torch.autograd.grad(loss, wrt))
                    if need_h:
                        grad_h[rows] = next(grads)
                    if need_w:
                        grad_w += next(grads)
                    if need_b and b is not None:
                        grad_b += next(grads)
                del z, loss
        ctx.grads = (grad_h.to(hidden.dtype) if grad_h is not None else None,
                     grad_w.to(weight.dtype) if grad_w is not None else None,
                     grad_b.to(bias.dtype) if grad_b is not None else None)
        parts = parts if parts is not None else torch.zeros(0, device=hidden.device)
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, grad_output, _grad_parts):
        if ctx.grads is None:
            raise RuntimeError("ChunkedHeadLoss: backward ran twice on one forward; run the forward again")
        grads, ctx.grads = ctx.grads, None
        gh, gw, gb = (g.mul_(grad_output) if g is not None else None for g in grads)
        return gh, gw, gb, None, None


def chunked_head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      chunk_loss: Callable, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, summed parts) of :class:`ChunkedHeadLoss` over hidden (N, H) rows. A divergence keeps about
    eight (chunk, V) fp32 buffers alive at a time (both models' logits, their log-softmax and softmax, the
    autograd intermediates), so ``chunk_size`` defaults to :func:`choose_chunk_size` with an eighth of its
    budget: the whole working set stays near the CE path's one buffer."""
    if chunk_size is not None and chunk_size < 1:
        raise UserError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    chunk = chunk_size or choose_chunk_size(hidden.shape[0], weight.shape[0], DEFAULT_CHUNK_BYTES // 8)
    return ChunkedHeadLoss.apply(hidden, weight, bias, chunk_loss, max(chunk, 1))


# ---------------------------------------------------------------------------------------------
# Dispatcher: liger-kernel's Triton kernel on CUDA when installed, ours otherwise


@functools.cache
def _liger_loss(ignore_index: int, label_smoothing: float):
    """A ``LigerFusedLinearCrossEntropyLoss`` (reduction='sum'), or None when not importable."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # e.g. a triton that does not match the installed torch
        log.warning("liger-kernel is installed but does not import (%s); using lmforge's fused CE", exc)
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum")


def fused_linear_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fused_linear_cross_entropy`, or liger-kernel's fused kernel on CUDA when installed.

    Same arguments and result. Liger ignores ``chunk_size`` (it picks its own) and computes the
    logits in the input dtype before its fp32 softmax, so with bf16 inputs its loss differs from
    ours by bf16 rounding of the logits."""
    if hidden.device.type == "cuda":
        liger = _liger_loss(ignore_index, float(label_smoothing))
        if liger is not None:
            _check_inputs(hidden, weight, labels, bias, ignore_index, label_smoothing, chunk_size)
            flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
            return liger(weight, flat_h, flat_y, bias).float(), (flat_y != ignore_index).sum()
    return fused_linear_cross_entropy(hidden, weight, labels, bias, ignore_index, label_smoothing, chunk_size)


# ---------------------------------------------------------------------------------------------
# Final hidden states and the LM head of a transformers causal LM (plain or peft-wrapped)

# Config attributes of architectures whose forward changes the logits after the head (Gemma 2/3
# soft-capping, Cohere's and Granite's scaling); hidden @ weight.T would not be their logits.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise UserError(
            "hidden_and_head: pass the unwrapped model; under DDP the fused loss must run inside the "
            "wrapped module's forward for gradients to be reduced (see lmforge.train.fused_ce)"
        )
    try:
        from peft import PeftModel
    except ImportError:
        return model
    if not isinstance(model, PeftModel):
        return model
    if model.active_peft_config.is_prompt_learning:
        raise UserError(
            f"the fused cross-entropy does not support prompt-learning adapters "
            f"({model.active_peft_config.peft_type}: PeftModel.forward prepends virtual tokens); use the logits loss"
        )
    return model.get_base_model()  # the transformers model, with the adapter layers inside it


def _head_linear(head: torch.nn.Module | None, name: str) -> torch.nn.Module:
    """The nn.Linear that computes the logits (peft's modules_to_save copy when lm_head is trained)."""
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        ModulesToSaveWrapper = ()  # noqa: N806
    if isinstance(head, ModulesToSaveWrapper):
        head = head.modules_to_save[head.active_adapters[0]] if head.active_adapters else head.original_module
    if not isinstance(head, torch.nn.Linear) or type(head).__module__.startswith("bitsandbytes"):
        raise UserError(
            f"{name}: the output layer is {type(head).__name__}, not a plain nn.Linear (an adapter or quantised "
            "layer on lm_head?); the fused cross-entropy needs the head's weight as it is — leave lm_head out of "
            "the adapter's target_modules or use the logits loss"
        )
    return head


def body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """(the model body whose output's ``last_hidden_state`` feeds the head, the head nn.Linear) of a
    transformers causal LM, optionally peft-wrapped; a UserError when the fused loss cannot be used."""
    lm = _unwrap_peft(model)
    name = type(lm).__name__
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(getattr(lm, "config", None), attr, None)
        if value not in (None, 0, 1, 0.0, 1.0):
            raise UserError(f"{name} transforms its logits after the head (config.{attr}={value}); use the logits loss")
    get_head = getattr(lm, "get_output_embeddings", None)
    body = getattr(lm, "base_model", lm)
    if get_head is None or body is lm:
        raise UserError(f"{name} is not a transformers model with a language-model head (get_output_embeddings)")
    return body, _head_linear(get_head(), name)


def hidden_and_head(
    model: torch.nn.Module,
) -> tuple[Callable[[Batch], torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """``(hidden_fn, weight, bias)`` of a transformers causal LM, optionally wrapped in a peft
    ``PeftModel`` (LoRA-style adapters; the head must be left as it is).

    ``hidden_fn(batch)`` runs the model body — ``model.base_model``: LlamaModel, GPT2Model,
    GPTNeoXModel ..., final norm included — on the batch (its ``labels`` are dropped) and returns
    the last hidden states (batch, seq, H) without computing logits; ``weight`` (V, H) and ``bias``
    (V,) or None are the output layer's (``model.get_output_embeddings()``), so
    ``hidden_fn(batch) @ weight.T + bias`` are the model's logits."""
    body, head = body_and_head(model)

    def hidden_fn(batch: Batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = body(**inputs, use_cache=False, return_dict=True)
        return out.last_hidden_state  # (batch, seq, H)

    return hidden_fn, head.weight, head.bias

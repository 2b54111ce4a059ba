"""Knowledge distillation (teacher -> student): the pure-tensor core, no training loop.

Every loss here follows the loop's convention: it returns the SUM of per-position losses over the
loss positions, never a mean, and the loop divides by the token count of the whole global batch.
A loss position is where ``mask`` is True: a bool tensor shaped like the logits without their last
dim, usually ``labels[:, 1:] != -100`` aligned with ``logits[:, :-1]`` (position t predicts token
t+1). Positions outside the mask are dropped before anything is computed, so whatever the logits
hold there (padding, prompt tokens) changes neither the loss nor any gradient.

Notation, per position: p = softmax(teacher_logits / T) the teacher, q = softmax(student_logits / T)
the student, KL(a || b) = sum_v a_v (log a_v - log b_v). All arithmetic is in float32 from
log-softmax; the teacher side is always detached, so no gradient reaches the teacher.

Sections: 1) soft-target losses on full logits, 2) sparse top-k targets for a cached teacher,
3) hidden-state losses and the layer map, 4) vocabulary checks, 5) a student initialised from the
teacher's layers (DistilBERT style).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from lmforge.config import UserError

SoftTargetKind = Literal["forward", "reverse", "symmetric", "jsd", "skew", "skew_reverse"]
SOFT_TARGET_KINDS: tuple[str, ...] = ("forward", "reverse", "symmetric", "jsd", "skew", "skew_reverse")
HiddenKind = Literal["mse", "cosine"]
HIDDEN_KINDS: tuple[str, ...] = ("mse", "cosine")

# The "rest" bucket of a sparse target is floored here when it is empty (k = vocab) or underflows:
# exp(-1e4) is exactly 0 in float32, so a floored bucket carries no mass, and -1e4 still fits in
# fp16/bf16 should a cache store the values in half precision.
REST_LOGMASS_FLOOR = -1.0e4
_FINITE_MIN = torch.finfo(torch.float32).min


# ----------------------------------------------------------------------------------------------
# helpers shared by the losses


def _check_mask(mask: torch.Tensor, leading: torch.Size, what: str) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (labels != -100 after the shift), got {mask.dtype}")
    if mask.shape != leading:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but {what} has leading dims {tuple(leading)}")


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape[-1] != teacher.shape[-1]:
        hint = (" Trim both logits to shared_vocab_size(...) rows first (padded embedding rows)."
                if what == "logits" else " Pass projection=make_projection(student_width, teacher_width).")
        raise ValueError(f"student {what} have last dim {student.shape[-1]} but teacher {what} have "
                         f"{teacher.shape[-1]}.{hint}")
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(f"student {what} shape {tuple(student.shape)} and teacher {what} shape "
                         f"{tuple(teacher.shape)} differ before the last dim")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) in float32, with -inf (a zero probability) replaced by the most
    negative finite float so that 0 * log 0 terms are 0 and gradients stay finite."""
    out = F.log_softmax(logits.float() / temperature, dim=-1)
    return out.clamp(min=_FINITE_MIN)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) over the last dim; (..., V) -> (...).

    Both inputs are finite log-probabilities (see ``_log_probs``): where a_v underflows to 0 the term
    is exactly 0, where b_v is 0 but a_v is not, the term is huge (the true value is +inf)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) for 0 <= w <= 1, stable; the end points return an input exactly."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


# ----------------------------------------------------------------------------------------------
# 1) soft-target losses on full logits


def soft_target_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    kind: SoftTargetKind,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Sum over masked positions of a divergence between teacher and student, times T**2.

    ``loss = T**2 * sum_{positions in mask} D(p, q)`` with p, q the teacher and student softmax at
    temperature T. The T**2 factor (Hinton et al., 2015) keeps the gradient scale independent of T.
    ``kind`` chooses D:

    - ``forward``:   KL(p || q), mass-covering; the classic KD loss.
    - ``reverse``:   KL(q || p), mode-seeking (MiniLLM).
    - ``symmetric``: (KL(p || q) + KL(q || p)) / 2, the MEAN of the two, which is torchtune's
      ``SymmetricKLWithChunkedOutputLoss`` at its default ``sym_kd_ratio=0.5``; the mean keeps the
      loss on the same scale as ``forward`` and ``reverse``.
    - ``jsd``:       the generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2023, Eq. 1) as
      TRL's ``GKDTrainer.generalized_jsd_loss`` computes it: M = beta * p + (1 - beta) * q,
      D = beta * KL(p || M) + (1 - beta) * KL(q || M). beta = 0.5 is the ordinary JSD. The end points
      follow TRL exactly: beta = 0 is forward KL(p || q), beta = 1 is reverse KL(q || p). (Taken
      literally the formula tends to 0 at both ends; for small beta it is about beta * KL(p || q) and
      near 1 about (1 - beta) * KL(q || p), so the end points are its limits divided by the weight.)
    - ``skew``:      skew forward KL of DistiLLM (Ko et al., 2024): KL(p || alpha * p + (1 - alpha) * q);
      alpha = 0 is forward KL, alpha = 1 is 0. The mixture bounds the log-ratio by -log(alpha).
    - ``skew_reverse``: skew reverse KL of DistiLLM: KL(q || alpha * q + (1 - alpha) * p).

    Shapes: logits (batch, seq, vocab) -- any leading dims, as long as ``mask`` has them -- and
    ``mask`` (batch, seq) bool. Student and teacher vocab must be equal (trim padded rows with
    :func:`shared_vocab_size` first); the teacher logits are detached. Returns a float32 scalar.
    """
    if kind not in SOFT_TARGET_KINDS:
        raise ValueError(f"unknown soft-target kind {kind!r}; choose one of {', '.join(SOFT_TARGET_KINDS)}")
    _check_pair(student_logits, teacher_logits, "logits")
    _check_mask(mask, student_logits.shape[:-1], "the logits")
    _check_temperature(temperature)
    _check_unit("beta", beta)
    _check_unit("alpha", alpha)

    # Only the loss positions are computed: (batch, seq, vocab) -> (n, vocab), n = mask.sum()
    log_q = _log_probs(student_logits[mask], temperature)
    log_p = _log_probs(teacher_logits.detach()[mask], temperature)

    if kind == "forward":
        per_pos = _kl(log_p, log_q)
    elif kind == "reverse":
        per_pos = _kl(log_q, log_p)
    elif kind == "symmetric":
        per_pos = 0.5 * (_kl(log_p, log_q) + _kl(log_q, log_p))
    elif kind == "jsd":
        if beta == 0.0:
            per_pos = _kl(log_p, log_q)
        elif beta == 1.0:
            per_pos = _kl(log_q, log_p)
        else:
            log_m = _log_mix(log_p, log_q, beta)  # (n, vocab)
            per_pos = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    elif kind == "skew":
        per_pos = _kl(log_p, _log_mix(log_p, log_q, alpha))
    else:  # skew_reverse
        per_pos = _kl(log_q, _log_mix(log_q, log_p, alpha))
    # per_pos: (n,)
    return per_pos.sum() * temperature**2


# ----------------------------------------------------------------------------------------------
# 2) sparse top-k targets for a cached teacher


def _complement_logsumexp(log_probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log sum_{v not in indices} exp(log_probs_v): (..., V), (..., k) -> (...).

    Summing the complement directly avoids the cancellation in log(1 - sum of top-k). A floor
    entry keeps it finite (and its gradient free of NaN) when the complement is empty."""
    chosen = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(-1, indices, True)
    rest = log_probs.masked_fill(chosen, float("-inf"))
    floor = rest.new_full((*rest.shape[:-1], 1), REST_LOGMASS_FLOOR)
    return torch.logsumexp(torch.cat([rest, floor], dim=-1), dim=-1)


def topk_logprobs(
    teacher_logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's k most likely tokens per position, to cache instead of full logits.

    Returns ``(values, indices, rest_logmass)``:
    values (batch, seq, k) float32 = log p_v at temperature T for the top-k v, largest first;
    indices (batch, seq, k) int64; rest_logmass (batch, seq) float32 = log(1 - sum_topk p_v), the
    log of the mass on every other token, computed as a log-sum-exp over those tokens (no
    cancellation) and floored at ``REST_LOGMASS_FLOOR`` (exactly zero mass) when k covers the vocab.
    The temperature is baked into the values: use the same T in :func:`sparse_forward_kl`.
    """
    _check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, vocab={vocab}], got {k}")
    with torch.no_grad():
        log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (batch, seq, vocab)
        values, indices = log_p.topk(k, dim=-1)  # (batch, seq, k) each
        rest = _complement_logsumexp(log_p, indices).clamp(min=REST_LOGMASS_FLOOR)  # (batch, seq)
    return values, indices.long(), rest


def sparse_forward_kl(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    rest_logmass: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Forward KL against a sparse teacher: top-k tokens plus one "rest" bucket; sum, times T**2.

    The teacher distribution over k + 1 outcomes is P = (p_{i_1}, ..., p_{i_k}, p_rest) from
    :func:`topk_logprobs`; the student's is aggregated the same way, Q = (q_{i_1}, ..., q_{i_k},
    q_rest) with q_rest = 1 - sum_j q_{i_j} (a log-sum-exp over the other tokens). The loss is
    ``T**2 * sum_{positions in mask} KL(P || Q)``. With k = vocab it is the dense forward KL; with
    smaller k it is a lower bound of it (merging outcomes never increases a KL) and is >= 0.

    Shapes: student_logits (batch, seq, vocab); values, indices (batch, seq, k); rest_logmass and
    mask (batch, seq). ``temperature`` must be the one the values were computed at.
    """
    _check_temperature(temperature)
    _check_mask(mask, student_logits.shape[:-1], "student_logits")
    if values.shape != indices.shape or values.shape[:-1] != mask.shape or rest_logmass.shape != mask.shape:
        raise ValueError(f"sparse targets do not fit: values {tuple(values.shape)}, indices {tuple(indices.shape)}, "
                         f"rest_logmass {tuple(rest_logmass.shape)}, mask {tuple(mask.shape)}")
    vocab = student_logits.shape[-1]
    if indices.numel() and (int(indices.max()) >= vocab or int(indices.min()) < 0):
        raise ValueError(f"sparse target indices reach {int(indices.max())} but the student vocab is {vocab}; "
                         "trim the teacher to shared_vocab_size(...) before caching")

    log_q = _log_probs(student_logits[mask], temperature)  # (n, vocab)
    idx = indices[mask]  # (n, k)
    log_q_top = log_q.gather(-1, idx)  # (n, k)
    log_q_rest = _complement_logsumexp(log_q, idx)  # (n,)
    log_big_q = torch.cat([log_q_top, log_q_rest[:, None]], dim=-1)  # (n, k + 1)
    log_big_p = torch.cat([values.detach()[mask].float(), rest_logmass.detach()[mask].float()[:, None]], dim=-1)
    log_big_p = log_big_p.clamp(min=_FINITE_MIN)  # a cache may hold -inf for an empty rest bucket
    return _kl(log_big_p, log_big_q).sum() * temperature**2


# ----------------------------------------------------------------------------------------------
# 3) hidden-state losses and the layer map


def make_projection(student_width: int, teacher_width: int) -> torch.nn.Linear | None:
    """A learned map from the student's hidden width to the teacher's (TinyBERT's W_h, no bias), or
    None when the widths are equal. It is a student parameter: give it to the optimizer."""
    if student_width == teacher_width:
        return None
    return torch.nn.Linear(student_width, teacher_width, bias=False)


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor,
    kind: HiddenKind = "mse",
    projection: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Sum over masked positions of a distance between (projected) student and teacher states.

    With h_s the student state (after ``projection``, if given) and h_t the teacher's, per position:
    ``mse``: mean_d (h_s,d - h_t,d)^2 (mean over features, so the scale does not grow with width);
    ``cosine``: 1 - cos(h_s, h_t). The loss is the sum of that over the positions in ``mask``.

    Shapes: student_hidden (batch, seq, d_s), teacher_hidden (batch, seq, d_t), mask (batch, seq)
    bool; d_s must equal d_t unless ``projection`` maps d_s -> d_t. The teacher side is detached.
    """
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"unknown hidden-state loss kind {kind!r}; choose one of {', '.join(HIDDEN_KINDS)}")
    _check_mask(mask, student_hidden.shape[:-1], "student_hidden")
    h_s = student_hidden[mask]  # (n, d_s)
    if projection is not None:
        h_s = projection(h_s)  # (n, d_t)
    h_t = teacher_hidden.detach()[mask]  # (n, d_t)
    _check_pair(h_s, h_t, "hidden states")
    h_s, h_t = h_s.float(), h_t.float()
    if kind == "mse":
        per_pos = (h_s - h_t).pow(2).mean(-1)
    else:
        per_pos = 1.0 - F.cosine_similarity(h_s, h_t, dim=-1, eps=1e-8)
    return per_pos.sum()


def layer_map(
    n_student: int, n_teacher: int, mapping: Sequence[Sequence[int]] | Mapping[int, int] | None = None
) -> list[tuple[int, int]]:
    """Pairs (student index, teacher index) into the models' ``output_hidden_states`` tuples.

    Convention: indices address the Hugging Face ``hidden_states`` tuple directly, whose length is
    n_layers + 1: index 0 is the embedding output and index i (1..n) the output of block i (block
    i - 1 counted from 0). So ``hidden_states[s]`` of the student is matched with
    ``hidden_states[t]`` of the teacher.

    Default (``mapping=None``), the uniform map of TinyBERT: every student block s = 1..n_student
    takes teacher block t = round(s * n_teacher / n_student) (halves round up, at least 1), so the
    last student block always meets the last teacher block; the embedding pair (0, 0) is not
    included (pass it in ``mapping`` to add it). A given ``mapping`` (pairs, or a dict student ->
    teacher) is checked against 0..n_student and 0..n_teacher; a UserError names every bad pair.
    """
    if n_student < 1 or n_teacher < 1:
        raise UserError(f"layer_map: layer counts must be >= 1, got student {n_student}, teacher {n_teacher}")
    if mapping is None:
        # round(s * n_t / n_s), halves up, in integer arithmetic
        return [(s, max(1, (2 * s * n_teacher + n_student) // (2 * n_student))) for s in range(1, n_student + 1)]

    pairs = list(mapping.items()) if isinstance(mapping, Mapping) else list(mapping)
    out, problems = [], []
    for pair in pairs:
        try:
            s, t = pair
        except (TypeError, ValueError):
            problems.append(f"layer_map: {pair!r} is not a (student, teacher) pair")
            continue
        if isinstance(s, bool) or isinstance(t, bool) or not isinstance(s, int) or not isinstance(t, int):
            problems.append(f"layer_map: pair ({s!r}, {t!r}) must hold two integers")
        elif not (0 <= s <= n_student and 0 <= t <= n_teacher):
            problems.append(
                f"layer_map: pair ({s}, {t}) is out of range: student indices are 0..{n_student} and teacher "
                f"indices 0..{n_teacher} (0 = embedding output, i = output of block i)")
        else:
            out.append((s, t))
    if problems:
        raise UserError(problems)
    return out


# ----------------------------------------------------------------------------------------------
# 4) vocabulary checks


def shared_vocab_size(student_vocab_rows: int, teacher_vocab_rows: int, tokenizer_len: int) -> int:
    """The number of logit columns both models share: min(student rows, teacher rows).

    Embedding matrices are often padded past the tokenizer (Qwen2.5-7B has 152064 rows, -0.5B
    151936, for 151665 tokens); the extra rows are never targets, so both logits are trimmed to
    ``logits[..., :n]`` with n the smaller row count. That is sound only while both models cover
    every token of the (shared) tokenizer; a UserError says which one does not.
    """
    problems = [f"the {who} model has {rows} vocabulary rows but the tokenizer has {tokenizer_len} tokens; "
                "the models cannot share this tokenizer"
                for who, rows in (("student", student_vocab_rows), ("teacher", teacher_vocab_rows))
                if rows < tokenizer_len]
    if problems:
        raise UserError(problems)
    return min(student_vocab_rows, teacher_vocab_rows)


def check_same_tokenizer(student_tok, teacher_tok) -> None:
    """Raise a UserError unless both tokenizers map every id to the same token string.

    Token-level distillation compares distributions column by column, so the vocabularies must be
    identical (same size, same token at every id, added tokens included). The message gives both
    sizes and the first id where they differ with both strings. Normalizers and pre-tokenizers are
    not compared."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    s_len, t_len = len(student_tok), len(teacher_tok)
    s_by_id = {i: tok for tok, i in s_vocab.items()}
    t_by_id = {i: tok for tok, i in t_vocab.items()}
    if s_len == t_len and s_by_id == t_by_id:
        return
    first = next((i for i in range(max(s_len, t_len, len(s_by_id), len(t_by_id)))
                  if s_by_id.get(i) != t_by_id.get(i)), None)
    where = ("" if first is None else
             f"; first difference at id {first}: student {s_by_id.get(first, '<none>')!r}, "
             f"teacher {t_by_id.get(first, '<none>')!r}")
    raise UserError(f"student and teacher tokenizers differ: student has {s_len} tokens, teacher {t_len}{where}. "
                    "Token-level distillation needs the same tokenizer")


# ----------------------------------------------------------------------------------------------
# 5) a student initialised from the teacher's layers

_N_LAYER_ATTRS = ("num_hidden_layers", "n_layer", "num_layers")


def _num_layers(config) -> tuple[str, int] | None:
    for attr in _N_LAYER_ATTRS:
        n = getattr(config, attr, None)
        if isinstance(n, int):
            return attr, n
    return None


def _find_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(dotted name, ModuleList of transformer blocks): the one ModuleList holding num_hidden_layers
    modules -- ``model.layers`` (Llama, Mistral), ``transformer.h`` (GPT-2), ``gpt_neox.layers``.
    The same discovery as the layer-wise LR decay in ``optim/param_groups.py``, kept here so this
    module does not depend on where that one lives."""
    found_n = _num_layers(getattr(model, "config", None))
    n = found_n[1] if found_n else None
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    found = [(name, m) for name, m in lists if n is None or len(m) == n]
    if len(found) == 1:
        return found[0]
    seen = ", ".join(f"{name} [{len(m)}]" for name, m in lists) or "none"
    raise UserError(f"student_from_teacher_layers: {'several candidate' if found else 'no'} list of "
                    f"{n if n is not None else '?'} transformer blocks found in {type(model).__name__}; "
                    f"ModuleLists seen: {seen}. Initialise the student from a config instead")


def student_from_teacher_layers(teacher_model: torch.nn.Module, every_k: int) -> torch.nn.Module:
    """A shallower copy of the teacher (DistilBERT's initialisation): keep every k-th block.

    The student has the teacher's class and config except num layers = ceil(n / k); its block j is
    a copy of teacher block j * k (so blocks 0, k, 2k, ...), and every other weight (embeddings,
    final norm, LM head) is copied as is. Per-layer config lists (``layer_types``) are subsampled
    the same way. The student is a new module on the teacher's device and dtype, in its train/eval
    mode; the teacher is not modified.
    """
    if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
        raise UserError(f"student_from_teacher_layers: every_k must be an integer >= 1, got {every_k!r}")
    prefix, layers = _find_layers(teacher_model)
    n_teacher = len(layers)
    keep = list(range(0, n_teacher, every_k))  # teacher block of each student block, len ceil(n / k)

    config = copy.deepcopy(teacher_model.config)
    attr, _ = _num_layers(config)
    setattr(config, attr, len(keep))
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n_teacher:
        config.layer_types = [layer_types[i] for i in keep]

    first = next(teacher_model.parameters())
    student = type(teacher_model)(config).to(device=first.device, dtype=first.dtype)

    # Fill every student tensor from its teacher source: `prefix.j.rest` <- `prefix.{keep[j]}.rest`.
    block_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    teacher_state = teacher_model.state_dict()
    state = {}
    for key in student.state_dict():
        m = block_key.match(key)
        source = f"{prefix}.{keep[int(m.group(1))]}.{m.group(2)}" if m else key
        state[key] = teacher_state[source]
    student.load_state_dict(state, strict=True)
    if getattr(teacher_model, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher_model.generation_config)
    student.train(teacher_model.training)
    return student

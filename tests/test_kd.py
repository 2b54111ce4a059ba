"""Knowledge-distillation core: every divergence against a hand computation on a 3-token vocab, the
T**2 factor, masking, the sum reduction, KL direction, the JSD end points, gradients, sparse top-k
targets, hidden-state losses, the layer map, vocabulary checks and the student-from-teacher init."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from lmforge.config import UserError
from lmforge.train.kd import (
    REST_LOGMASS_FLOOR,
    SOFT_TARGET_KINDS,
    check_same_tokenizer,
    hidden_state_loss,
    layer_map,
    make_projection,
    shared_vocab_size,
    soft_target_loss,
    sparse_forward_kl,
    student_from_teacher_layers,
    topk_logprobs,
)

# One position, vocab 3: teacher p and student q, given as logits log(p) so softmax returns them.
P = [0.7, 0.2, 0.1]
Q = [0.5, 0.3, 0.2]
ONE = torch.ones(1, 1, dtype=torch.bool)


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([[[math.log(x) for x in probs]]], dtype=torch.float32)  # (1, 1, 3)


def kl(a: list[float], b: list[float]) -> float:
    """Reference KL(a || b) in plain Python."""
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def mix(w: float, a: list[float], b: list[float]) -> list[float]:
    return [w * x + (1 - w) * y for x, y in zip(a, b)]


def at_temperature(probs: list[float], t: float) -> list[float]:
    """softmax(log(probs) / t) = probs**(1/t), renormalised."""
    powered = [x ** (1 / t) for x in probs]
    return [x / sum(powered) for x in powered]


def loss(kind: str, p=P, q=Q, **kw) -> float:
    return soft_target_loss(logits_of(q), logits_of(p), ONE, kind, **kw).item()


# ---------------------------------------------------------------------------------------------
# hand computations


def test_forward_kl_by_hand():
    # KL(p || q), written out
    expected = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    assert loss("forward") == pytest.approx(expected, rel=1e-5)


def test_reverse_kl_by_hand():
    # KL(q || p), written out
    expected = 0.5 * math.log(0.5 / 0.7) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.1)
    assert loss("reverse") == pytest.approx(expected, rel=1e-5)


def test_direction_matters():
    peaked, flat = [0.9, 0.05, 0.05], [0.34, 0.33, 0.33]
    forward, reverse = loss("forward", p=peaked, q=flat), loss("reverse", p=peaked, q=flat)
    assert forward == pytest.approx(kl(peaked, flat), rel=1e-5)  # about 0.69
    assert reverse == pytest.approx(kl(flat, peaked), rel=1e-5)  # about 0.91
    assert reverse - forward > 0.2


def test_symmetric_is_the_mean_of_both_directions():
    assert loss("symmetric") == pytest.approx(0.5 * (kl(P, Q) + kl(Q, P)), rel=1e-5)


@pytest.mark.parametrize("beta", [0.3, 0.5, 0.9])
def test_jsd_by_hand(beta):
    m = mix(beta, P, Q)  # M = beta * p_teacher + (1 - beta) * q_student
    expected = beta * kl(P, m) + (1 - beta) * kl(Q, m)
    assert loss("jsd", beta=beta) == pytest.approx(expected, rel=1e-5)


def test_jsd_end_points_are_forward_and_reverse_kl():
    assert loss("jsd", beta=0.0) == pytest.approx(kl(P, Q), rel=1e-5)
    assert loss("jsd", beta=1.0) == pytest.approx(kl(Q, P), rel=1e-5)
    # ... and are the limits divided by the weight, which pins the role of beta
    eps = 1e-3
    assert loss("jsd", beta=eps) / eps == pytest.approx(kl(P, Q), rel=2e-2)
    assert loss("jsd", beta=1 - eps) / eps == pytest.approx(kl(Q, P), rel=2e-2)


def test_skew_kls_by_hand():
    alpha = 0.1
    assert loss("skew", alpha=alpha) == pytest.approx(kl(P, mix(alpha, P, Q)), rel=1e-5)
    assert loss("skew_reverse", alpha=alpha) == pytest.approx(kl(Q, mix(alpha, Q, P)), rel=1e-5)
    assert loss("skew", alpha=0.0) == pytest.approx(kl(P, Q), rel=1e-5)
    assert loss("skew_reverse", alpha=0.0) == pytest.approx(kl(Q, P), rel=1e-5)
    assert loss("skew", alpha=1.0) == pytest.approx(0.0, abs=1e-7)


def test_temperature_scales_the_distributions_and_multiplies_by_t_squared():
    t = 2.0
    p_t, q_t = at_temperature(P, t), at_temperature(Q, t)
    assert loss("forward", temperature=t) == pytest.approx(t**2 * kl(p_t, q_t), rel=1e-5)
    assert loss("reverse", temperature=t) == pytest.approx(t**2 * kl(q_t, p_t), rel=1e-5)
    m = mix(0.5, p_t, q_t)
    assert loss("jsd", temperature=t) == pytest.approx(t**2 * 0.5 * (kl(p_t, m) + kl(q_t, m)), rel=1e-5)
    assert loss("forward", temperature=t) != pytest.approx(loss("forward"), rel=1e-2)


# ---------------------------------------------------------------------------------------------
# reduction, masking, gradients, stability


def random_logits(seed: int, shape=(2, 5, 11)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g) * 2


@pytest.mark.parametrize("kind", SOFT_TARGET_KINDS)
def test_sum_reduction_doubling_the_batch_doubles_the_loss(kind):
    s, t = random_logits(1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    single = soft_target_loss(s, t, mask, kind, temperature=1.5)
    double = soft_target_loss(torch.cat([s, s]), torch.cat([t, t]), torch.cat([mask, mask]), kind, temperature=1.5)
    assert double.item() == pytest.approx(2 * single.item(), rel=1e-5)
    # ... and it is a sum of per-position values: one position alone is less than the whole
    one = torch.zeros_like(mask)
    one[0, 0] = True
    assert soft_target_loss(s, t, one, kind).item() < soft_target_loss(s, t, mask, kind).item()


@pytest.mark.parametrize("kind", SOFT_TARGET_KINDS)
def test_masked_positions_change_nothing(kind):
    s, t = random_logits(2)
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, False, False]])
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = torch.randn(int((~mask).sum()), 11) * 50  # garbage where nothing is learned
    t2[~mask] = float("-inf")
    s.requires_grad_(True)
    s2.requires_grad_(True)
    a = soft_target_loss(s, t, mask, kind)
    b = soft_target_loss(s2, t2, mask, kind)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    a.backward()
    b.backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-6)
    assert (s.grad[~mask] == 0).all()
    # dropping positions from the mask removes exactly their contribution
    parts = []
    for i, j in mask.nonzero().tolist():
        only = torch.zeros_like(mask)
        only[i, j] = True
        parts.append(soft_target_loss(s, t, only, kind).item())
    assert a.item() == pytest.approx(sum(parts), rel=1e-5)


@pytest.mark.parametrize("kind", SOFT_TARGET_KINDS)
def test_zero_when_student_equals_teacher(kind):
    s, _ = random_logits(3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert soft_target_loss(s, s.clone(), mask, kind, temperature=2.0).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("kind", SOFT_TARGET_KINDS)
def test_gradient_reaches_the_student_and_not_the_teacher(kind):
    s, t = random_logits(4)
    s.requires_grad_(True)
    t.requires_grad_(True)
    soft_target_loss(s, t, torch.ones(2, 5, dtype=torch.bool), kind).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("kind", SOFT_TARGET_KINDS)
def test_no_nan_when_probabilities_underflow(kind):
    # teacher: an exact zero (-inf) and a probability that underflows in float32; student: huge logits
    teacher = torch.tensor([[[0.0, float("-inf"), -200.0, 30.0]]])
    student = torch.tensor([[[1e4, 0.0, -1e4, 5.0]]], requires_grad=True)
    out = soft_target_loss(student, teacher, ONE, kind, beta=0.5, alpha=0.1)
    out.backward()
    assert torch.isfinite(out) and out.item() >= 0
    assert torch.isfinite(student.grad).all()
    # bf16 logits are computed in float32 too
    assert soft_target_loss(student.detach().bfloat16(), teacher.bfloat16(), ONE, kind).dtype == torch.float32


def test_bad_inputs_are_explicit_errors():
    s, t = random_logits(5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="last dim 11 but teacher logits have 12"):
        soft_target_loss(s, torch.randn(2, 5, 12), mask, "forward")
    with pytest.raises(ValueError, match="must be a bool"):
        soft_target_loss(s, t, torch.ones(2, 5, dtype=torch.long), "forward")
    with pytest.raises(ValueError, match="unknown soft-target kind 'kl'"):
        soft_target_loss(s, t, mask, "kl")
    with pytest.raises(ValueError, match="beta"):
        soft_target_loss(s, t, mask, "jsd", beta=1.5)


# ---------------------------------------------------------------------------------------------
# sparse top-k targets


def test_topk_rest_logmass_is_the_mass_left_over():
    s, t = random_logits(6)
    values, indices, rest = topk_logprobs(t, k=4, temperature=2.0)
    assert values.shape == indices.shape == (2, 5, 4) and rest.shape == (2, 5)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    full = torch.log_softmax(t / 2.0, dim=-1)
    assert torch.allclose(values, full.gather(-1, indices))
    assert torch.allclose(rest, torch.log1p(-values.exp().sum(-1)), atol=1e-5)
    _, _, empty = topk_logprobs(t, k=11)
    assert (empty == REST_LOGMASS_FLOOR).all()


def test_sparse_forward_kl_with_k_equal_vocab_is_the_dense_forward_kl():
    s, t = random_logits(7)
    mask = torch.tensor([[True, True, False, True, True], [True, False, True, True, True]])
    for temperature in (1.0, 2.0):
        targets = topk_logprobs(t, k=11, temperature=temperature)
        sparse = sparse_forward_kl(s, *targets, mask, temperature=temperature)
        dense = soft_target_loss(s, t, mask, "forward", temperature=temperature)
        assert sparse.item() == pytest.approx(dense.item(), abs=1e-5)


def test_sparse_forward_kl_with_small_k_is_close_non_negative_and_a_lower_bound():
    g = torch.Generator().manual_seed(8)
    t = torch.randn(2, 5, 50, generator=g) * 4  # peaked teacher: little mass outside the top 8
    s = t + 0.5 * torch.randn(2, 5, 50, generator=g)
    s.requires_grad_(True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    dense = soft_target_loss(s, t, mask, "forward").item()
    sparse = sparse_forward_kl(s, *topk_logprobs(t, k=8), mask)
    assert 0 <= sparse.item() <= dense + 1e-6
    assert sparse.item() == pytest.approx(dense, rel=0.25)
    sparse.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # zero when the student is the teacher
    assert sparse_forward_kl(t, *topk_logprobs(t, k=8), mask).item() == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# hidden states and the layer map


def test_hidden_state_losses_by_hand():
    hs = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])  # (1, 3, 2)
    ht = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    # mse: mean over features, summed over positions: (1 + 1) / 2 + (1 + 1) / 2
    assert hidden_state_loss(hs, ht, mask, "mse").item() == pytest.approx(2.0)
    # cosine: orthogonal -> 1, parallel -> 0
    assert hidden_state_loss(hs, ht, mask, "cosine").item() == pytest.approx(1.0, abs=1e-6)
    assert hidden_state_loss(hs, hs, mask, "mse").item() == 0.0


def test_hidden_state_loss_with_projection():
    assert make_projection(8, 8) is None
    proj = make_projection(4, 6)
    assert isinstance(proj, torch.nn.Linear) and proj.weight.shape == (6, 4) and proj.bias is None
    g = torch.Generator().manual_seed(9)
    hs = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    ht = torch.randn(2, 3, 6, generator=g, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    out = hidden_state_loss(hs, ht, mask, "mse", projection=proj)
    expected = ((proj(hs) - ht) ** 2).mean(-1)[mask].sum()
    assert out.item() == pytest.approx(expected.item(), rel=1e-5)
    out.backward()
    assert proj.weight.grad is not None and hs.grad is not None and ht.grad is None
    with pytest.raises(ValueError, match="make_projection"):
        hidden_state_loss(hs, ht, mask, "mse")


def test_layer_map_default_is_uniform_and_ends_on_the_last_layer():
    assert layer_map(2, 4) == [(1, 2), (2, 4)]
    assert layer_map(3, 12) == [(1, 4), (2, 8), (3, 12)]
    assert layer_map(4, 6) == [(1, 2), (2, 3), (3, 5), (4, 6)]  # 1.5 -> 2, 4.5 -> 5: halves round up
    assert layer_map(4, 2) == [(1, 1), (2, 1), (3, 2), (4, 2)]  # never the embedding output
    assert layer_map(3, 3) == [(1, 1), (2, 2), (3, 3)]


def test_layer_map_checks_a_given_mapping():
    assert layer_map(2, 4, [(0, 0), (2, 4)]) == [(0, 0), (2, 4)]
    assert layer_map(2, 4, {1: 1, 2: 3}) == [(1, 1), (2, 3)]
    with pytest.raises(UserError) as err:
        layer_map(2, 4, [(1, 2), (3, 9), (2, -1)])
    assert len(err.value.problems) == 2
    assert "(3, 9)" in str(err.value) and "(2, -1)" in str(err.value) and "0..2" in str(err.value)
    with pytest.raises(UserError, match="two integers"):
        layer_map(2, 4, [(1, 1.5)])


# ---------------------------------------------------------------------------------------------
# vocabulary


def test_padded_teacher_vocab_is_trimmed_to_the_shared_rows():
    assert shared_vocab_size(151936, 152064, 151665) == 151936  # Qwen2.5 0.5B student, 7B teacher
    n = shared_vocab_size(128, 136, 120)
    s, _ = random_logits(10, shape=(1, 4, 128))
    teacher = torch.cat([s, torch.full((1, 4, 8), -5.0)], dim=-1)  # same model plus padded rows
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="shared_vocab_size"):
        soft_target_loss(s, teacher, mask, "forward")
    assert soft_target_loss(s[..., :n], teacher[..., :n], mask, "forward").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UserError, match="student model has 100 vocabulary rows but the tokenizer has 120"):
        shared_vocab_size(100, 136, 120)


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0])


def test_tokenizer_mismatch_names_sizes_and_the_first_differing_token():
    base = ["<unk>", "the", "cat", "sat", "on", "mat"]
    check_same_tokenizer(word_tokenizer(base), word_tokenizer(list(base)))
    with pytest.raises(UserError) as err:
        check_same_tokenizer(word_tokenizer(base), word_tokenizer(["<unk>", "the", "dog", "sat", "on", "mat", "rug"]))
    msg = str(err.value)
    assert "student has 6 tokens, teacher 7" in msg
    assert "id 2" in msg and "'cat'" in msg and "'dog'" in msg
    with pytest.raises(UserError, match="id 6: student '<none>', teacher 'rug'"):
        check_same_tokenizer(word_tokenizer(base), word_tokenizer(base + ["rug"]))


# ---------------------------------------------------------------------------------------------
# student initialised from the teacher's layers

TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False),
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_positions=32),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
}
BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


@pytest.mark.parametrize(("model_type", "every_k"), [("llama", 2), ("gpt2", 2), ("gpt2", 3), ("gpt_neox", 2)])
def test_student_from_teacher_layers(model_type, every_k):
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=128, **TINY[model_type]))
    teacher.eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = student_from_teacher_layers(teacher, every_k)

    n_student = math.ceil(4 / every_k)
    assert student.config.num_hidden_layers == n_student and teacher.config.num_hidden_layers == 4
    blocks = BLOCKS[model_type]
    s_sd, t_sd = student.state_dict(), teacher.state_dict()
    for key, value in s_sd.items():
        if key.startswith(blocks + "."):
            j, rest = key[len(blocks) + 1:].split(".", 1)
            source = f"{blocks}.{int(j) * every_k}.{rest}"  # block 0 <- 0, block 1 <- k
        else:
            source = key  # embeddings, final norm, lm head
        assert torch.equal(value, t_sd[source]), key
    layer0 = [k for k in s_sd if k.startswith(f"{blocks}.0.")]
    layer1 = [k for k in s_sd if k.startswith(f"{blocks}.1.")]
    assert layer0 and layer1
    assert all(torch.equal(s_sd[k], t_sd[k.replace(f"{blocks}.1.", f"{blocks}.{every_k}.")]) for k in layer1)
    assert not all(torch.equal(s_sd[k], t_sd[k]) for k in layer1)  # block 1 is not teacher block 1
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # teacher untouched
    assert not student.training

    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s_logits, t_logits = student(ids).logits, teacher(ids).logits
    assert s_logits.shape == t_logits.shape == (2, 8, 128)
    assert not torch.allclose(s_logits, t_logits, atol=1e-3)
    # the two plug straight into the losses
    mask = torch.ones(2, 8, dtype=torch.bool)
    assert soft_target_loss(s_logits, t_logits, mask, "forward").item() > 0


def test_student_from_teacher_layers_rejects_a_bad_k():
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=128, **TINY["gpt2"]))
    with pytest.raises(UserError, match="every_k"):
        student_from_teacher_layers(teacher, 0)

"""The fused linear cross-entropy against plain ``F.cross_entropy(hidden @ weight.T + bias)``:
loss and gradients, ignored labels, label smoothing, odd chunkings, bf16/fp16, tied weights,
grad_output scaling, that no (N, V) tensor ever exists, and whole models (Llama, GPT-2, GPT-NeoX,
a LoRA PeftModel) through ``hidden_and_head``.

"Within r relative" means max|ours - ref| <= r * max|ref| per tensor: gradient entries near zero
make an element-wise relative error meaningless.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lmforge.config import UserError
from lmforge.train.fused_ce import (
    DEFAULT_CHUNK_BYTES,
    choose_chunk_size,
    fused_linear_ce,
    fused_linear_cross_entropy,
    hidden_and_head,
)

N, H, V = 37, 16, 100


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def make(dtype=torch.float32, bias=True, seed=0, n=N, h=H, v=V):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).mul(3).to(dtype).requires_grad_()  # logits ~ N(0, 9)
    b = torch.randn(v, generator=g).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, labels


def reference(hidden, weight, bias, labels, label_smoothing=0.0):
    """Plain fp32 CE on fp32 copies of the inputs: (loss, grads of hidden, weight, bias)."""
    leaves = [t.detach().float().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    h, w, b = leaves
    logits = h @ w.T + (b if b is not None else 0)  # (N, V)
    loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum", label_smoothing=label_smoothing)
    loss.backward()
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


def fused(hidden, weight, bias, labels, **kw):
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    loss, n = fused_linear_cross_entropy(hidden, weight, labels, bias, **kw)
    loss.backward()
    return loss.detach(), n, [t.grad if t is not None else None for t in (hidden, weight, bias)]


def assert_matches(hidden, weight, bias, labels, rel=1e-5, grad_rel=None, label_smoothing=0.0, **kw):
    ref_loss, ref_grads = reference(hidden, weight, bias, labels, label_smoothing)
    loss, n, grads = fused(hidden, weight, bias, labels, label_smoothing=label_smoothing, **kw)
    assert loss.dtype == torch.float32
    assert int(n) == int((labels != -100).sum())
    assert abs(float(loss) - float(ref_loss)) <= rel * max(abs(float(ref_loss)), 1e-30), (float(loss), float(ref_loss))
    for name, g, r, t in zip(("hidden", "weight", "bias"), grads, ref_grads, (hidden, weight, bias)):
        if t is None:
            continue
        assert g.dtype == t.dtype, name
        if r.abs().max() == 0:
            assert g.abs().max() == 0, name
        else:
            assert rel_err(g, r) <= (grad_rel or rel), (name, rel_err(g, r))
    return loss, grads


# ---------------------------------------------------------------------------------------------
# fp32: exact up to fp32 rounding


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 36, 37, 1000, None])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_fp32_matches_cross_entropy_with_ignored_labels(chunk_size, label_smoothing):
    hidden, weight, bias, labels = make()
    labels[::3] = -100
    assert_matches(hidden, weight, bias, labels, label_smoothing=label_smoothing, chunk_size=chunk_size)


def test_no_bias_and_no_ignored_labels():
    hidden, weight, _, labels = make(bias=False)
    assert_matches(hidden, weight, None, labels, chunk_size=7)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_a_whole_chunk_of_ignored_labels_and_all_ignored(label_smoothing):
    hidden, weight, bias, labels = make(n=40)
    labels[8:24] = -100  # chunks 2 and 3 of 8 rows (before compaction) have no counted token
    labels[-1] = -100
    assert_matches(hidden, weight, bias, labels, label_smoothing=label_smoothing, chunk_size=8)
    # nothing counted: loss 0, every gradient exactly 0, as F.cross_entropy(reduction='sum')
    labels[:] = -100
    loss, grads = assert_matches(hidden, weight, bias, labels, label_smoothing=label_smoothing, chunk_size=8)
    assert float(loss) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)


def test_other_ignore_index_and_leading_dims():
    hidden, weight, bias, labels = make(n=36)
    labels[:5] = 7  # a real class, not ignored with ignore_index=-1 below
    labels[10:14] = -1
    ref_loss, ref_grads = reference(hidden, weight, bias, torch.where(labels == -1, -100, labels))
    loss, n = fused_linear_cross_entropy(hidden.view(4, 9, H), weight, labels.view(4, 9), bias, ignore_index=-1, chunk_size=10)
    loss.backward()
    loss = loss.detach()
    assert int(n) == 32 and abs(float(loss - ref_loss)) <= 1e-5 * float(ref_loss)
    assert rel_err(hidden.grad, ref_grads[0]) <= 1e-5


def test_grad_output_scaling():
    hidden, weight, bias, labels = make()
    labels[::4] = -100
    _, _, grads1 = fused(hidden, weight, bias, labels, chunk_size=6)
    grads1 = [g.clone() for g in grads1]
    for t in (hidden, weight, bias):
        t.grad = None
    loss, _ = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=6)
    (loss * 3).backward()
    for g1, g3 in zip(grads1, (hidden.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(g3, 3 * g1, rtol=1e-6, atol=0)


def test_backward_twice_is_refused_not_doubled():
    hidden, weight, bias, labels = make()
    loss, _ = fused_linear_cross_entropy(hidden, weight, labels, bias)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_tied_weight_gets_embedding_and_head_gradients():
    g = torch.Generator().manual_seed(1)
    emb = torch.nn.Embedding(V, H)
    proj = torch.nn.Linear(H, H)
    ids = torch.randint(0, V, (N,), generator=g)
    labels = torch.roll(ids, -1)
    labels[-1] = -100

    def grads(loss_of):
        emb.zero_grad(set_to_none=True)
        proj.zero_grad(set_to_none=True)
        loss_of(torch.tanh(proj(emb(ids)))).backward()  # hidden (N, H) from the same embedding
        return [p.grad.clone() for p in (emb.weight, proj.weight, proj.bias)]

    ref = grads(lambda h: F.cross_entropy(h @ emb.weight.T, labels, reduction="sum"))
    ours = grads(lambda h: fused_linear_cross_entropy(h, emb.weight, labels, chunk_size=9)[0])
    for a, b in zip(ours, ref):
        assert rel_err(a, b) <= 1e-5


def test_frozen_head_and_no_grad():
    hidden, weight, _, labels = make(bias=False)
    weight.requires_grad_(False)  # LoRA: the head is frozen, only hidden needs a gradient
    ref_loss, (ref_gh, _, _) = reference(hidden, weight, None, labels)
    loss, _ = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=10)
    loss.backward()
    assert weight.grad is None and rel_err(hidden.grad, ref_gh) <= 1e-5
    with torch.no_grad():
        loss_eval, n = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=10)
    assert not loss_eval.requires_grad and int(n) == N
    assert abs(float(loss_eval - ref_loss)) <= 1e-5 * float(ref_loss)


def test_fp32_under_bf16_autocast_stays_fp32():
    """The Function's matmuls opt out of the caller's autocast: fp32 inputs give the fp32 result."""
    hidden, weight, bias, labels = make()
    ref_loss, _ = reference(hidden, weight, bias, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=8)
    assert abs(float(loss - ref_loss)) <= 1e-5 * float(ref_loss)


# ---------------------------------------------------------------------------------------------
# bf16 / fp16 inputs: the loss is fp32 arithmetic on the given values; the gradients are
# rounded once to the parameter dtype (bf16: 2^-8 relative), on every CPU kind alike.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_low_precision_inputs(dtype, label_smoothing):
    hidden, weight, bias, labels = make(dtype=dtype, n=64, h=32, v=300)
    labels[::5] = -100
    loss, _ = assert_matches(
        hidden, weight, bias, labels, rel=1e-4, grad_rel=1e-2, label_smoothing=label_smoothing, chunk_size=24
    )
    # More accurate than the plain low-precision path, whose logits are rounded to bf16/fp16.
    ref_loss, _ = reference(hidden, weight, bias, labels, label_smoothing)
    with torch.no_grad():
        plain = F.cross_entropy(hidden @ weight.T + bias, labels, reduction="sum", label_smoothing=label_smoothing)
    assert abs(float(loss - ref_loss)) <= abs(float(plain.float() - ref_loss))


# ---------------------------------------------------------------------------------------------
# Memory, structurally: no (N, V) tensor is ever produced. Peak-RSS measurement belongs to a
# benchmark (allocator caching makes in-process CPU numbers unreliable); instead every aten op's
# output is inspected during forward and backward.


class LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_the_logits():
    n, h, v, chunk = 300, 16, 1000, 64
    hidden, weight, bias, labels = make(n=n, h=h, v=v)
    labels[::7] = -100
    with LargestOutput() as ours:
        loss, _ = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=chunk)
        loss.backward()
    assert ours.largest <= max(chunk * v, v * h, n * h) < n * v // 4
    with LargestOutput() as plain:  # the probe sees the (N, V) logits of the plain path
        F.cross_entropy(hidden @ weight.T + bias, labels, reduction="sum").backward()
    assert plain.largest >= n * v


def test_chunk_size_policy():
    assert choose_chunk_size(2048, 32000) * 32000 * 4 <= DEFAULT_CHUNK_BYTES
    assert choose_chunk_size(2048, 32000) == 512  # 64 MiB holds 524 rows: four balanced chunks
    assert choose_chunk_size(2048, 32000, budget_bytes=128 * 2**20) == 1024  # 1048 rows fit: two chunks
    assert choose_chunk_size(100, 512) == 100  # small problems are one chunk
    assert choose_chunk_size(10, 10**9) == 1  # at least one row
    assert choose_chunk_size(0, 512) == 1
    for n in (1, 999, 2100, 4097):
        c = choose_chunk_size(n, 128_256)
        k = -(-n // c)  # chunks
        assert c * 128_256 * 4 <= DEFAULT_CHUNK_BYTES and k * c - n < k  # balanced: each chunk within a row of c


def test_input_errors():
    hidden, weight, bias, labels = make()
    labels[0] = V  # out of the vocabulary
    with pytest.raises(UserError, match="tokenizer"):
        fused_linear_cross_entropy(hidden, weight, labels, bias)
    with pytest.raises(ValueError, match="ZeRO-3"):
        fused_linear_cross_entropy(hidden, torch.empty(0), labels, bias)
    with pytest.raises(UserError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, labels.clamp(max=V - 1), bias, chunk_size=0)


def test_dispatcher_on_cpu_is_ours():
    hidden, weight, bias, labels = make()
    a, na = fused_linear_ce(hidden, weight, labels, bias, chunk_size=5)
    b, nb = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=5)
    assert float(a) == float(b) and int(na) == int(nb)


# ---------------------------------------------------------------------------------------------
# Whole models: hidden_and_head + fused CE == the model's own logits + CE


def tiny_model(arch: str, tied: bool = False):
    import transformers as tf

    common = dict(vocab_size=512, max_position_embeddings=64, tie_word_embeddings=tied)
    cfg = {
        "llama": lambda: tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, **common),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=512, tie_word_embeddings=tied),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, **common),
    }[arch]()
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()  # eval: no dropout


def tiny_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0  # right padding
    labels = ids.clone()
    labels[:, :5] = -100  # a "prompt"
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logits_loss(model, batch, label_smoothing=0.0):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum",
                           label_smoothing=label_smoothing)


def fused_loss(model, batch, label_smoothing=0.0, chunk_size=7):
    hidden_fn, weight, bias = hidden_and_head(model)
    hidden = hidden_fn(batch)  # (B, T, H)
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    return fused_linear_cross_entropy(hidden, weight, labels, bias, label_smoothing=label_smoothing, chunk_size=chunk_size)


def loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_model_grads(model, batch, label_smoothing=0.0):
    ref_loss, ref = loss_and_grads(model, lambda: logits_loss(model, batch, label_smoothing))
    loss, ours = loss_and_grads(model, lambda: fused_loss(model, batch, label_smoothing)[0])
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss
    assert ours.keys() == ref.keys() and ref
    for name in ref:
        assert rel_err(ours[name], ref[name]) <= 1e-5, (name, rel_err(ours[name], ref[name]))


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("gpt2", True), ("gpt_neox", False)])
def test_model_loss_and_parameter_grads_match(arch, tied):
    model = tiny_model(arch, tied)
    _, weight, _ = hidden_and_head(model)
    assert weight is model.get_output_embeddings().weight
    assert (weight is model.get_input_embeddings().weight) == tied
    assert_same_model_grads(model, tiny_batch(), label_smoothing=0.1 if arch == "llama" else 0.0)


def test_peft_lora_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           lora_dropout=0.0, init_lora_weights=False))
    _, weight, _ = hidden_and_head(model)
    assert not weight.requires_grad  # the frozen head: only hidden's gradient is computed
    assert_same_model_grads(model, tiny_batch())
    assert any("lora_A" in n for n, p in model.named_parameters() if p.grad is not None)


def test_peft_modules_to_save_head_and_refusals():
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    _, weight, _ = hidden_and_head(model)
    assert weight.requires_grad and weight is model.base_model.model.lm_head.modules_to_save["default"].weight
    assert_same_model_grads(model, tiny_batch())

    lora_head = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(UserError, match="lm_head"):
        hidden_and_head(lora_head)
    prompt = get_peft_model(tiny_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(UserError, match="prompt-learning"):
        hidden_and_head(prompt)

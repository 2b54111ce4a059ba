"""Distillation with ``train.loss_impl: fused_linear_ce``: the CE + divergence taken chunk by chunk over the loss
tokens (``fused_ce.chunked_head_loss``), neither model's logits held whole, equal to the logits path — the loss,
each logged part and every student gradient — for every divergence, with ignored labels, a teacher with padded
vocabulary rows, hidden states and cached top-k targets; and the stage trains with it to the same weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.train.fused_ce import chunked_head_loss
from lmforge.train.kd import SOFT_TARGET_KINDS, topk_logprobs
from lmforge.train.kd_task import KD, KDParts
from lmforge.train.tasks import FusedHead


def tiny(vocab: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def models():
    teacher = tiny(72, 3, 0).eval().requires_grad_(False)  # 72 rows: 8 padded past the shared 64
    student = tiny(64, 2, 1).train()
    return teacher, student


def batch(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (3, 17), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    labels[2, 11:] = -100  # padding at the end
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def run(task: KD, student, b) -> tuple[dict, dict[str, torch.Tensor]]:
    import lmforge.train.fused_ce as fused_ce

    student.zero_grad(set_to_none=True)
    task.bind(student)
    calls, real = [], fused_ce.chunked_head_loss
    fused_ce.chunked_head_loss = lambda *a, **k: calls.append(1) or real(*a, **k)
    seen = {}
    hook = student.lm_head.register_forward_hook(lambda m, i, o: seen.update(rows=o.shape[1]))  # returns None
    try:
        out = task.loss(student, b)
    finally:
        fused_ce.chunked_head_loss = real
        hook.remove()
    # the fused path: the chunked loss ran and the head saw one position per row (logits_to_keep=1)
    assert bool(calls) == (task.fused is not None)
    assert seen["rows"] == (1 if task.fused is not None else b["input_ids"].shape[1])
    out["loss_sum"].backward()
    return out, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def check_equal(kw: dict, models, b=None, chunk: int = 7) -> None:
    teacher, student = models
    b = b or batch()
    plain = KD(teacher, vocab=64, parts=KDParts(1, 1, 1), **kw)
    fused = KD(teacher, vocab=64, parts=KDParts(1, 1, 1), fused=FusedHead(chunk), **kw)
    a, ga = run(plain, student, b)
    f, gf = run(fused, student, b)
    for key in ("loss_sum", "n_tokens", "ce_sum", "kd_sum", "hidden_sum"):
        torch.testing.assert_close(f[key].float(), a[key].float(), rtol=1e-5, atol=1e-6, msg=key)
    assert a["kd_sum"] > 0
    assert sorted(gf) == sorted(ga)
    for n, g in ga.items():
        torch.testing.assert_close(gf[n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", SOFT_TARGET_KINDS)
def test_every_divergence_equals_the_logits_path(kind, models):
    check_equal({"kind": kind, "temperature": 2.0, "alpha_ce": 0.5, "weight_kd": 0.5, "beta": 0.3, "skew_alpha": 0.2}, models)


def test_hidden_state_loss_and_a_chunk_bigger_than_the_batch(models):
    check_equal({"kind": "forward", "temperature": 1.5, "alpha_ce": 0.3, "weight_kd": 0.7, "hidden": "mse",
                 "layer_pairs": [(1, 1), (2, 3)]}, models, chunk=1000)


def test_cached_top_k_targets_equal_the_logits_path(models):
    teacher, student = models
    b = batch(5)
    with torch.no_grad():
        values, indices, rest = topk_logprobs(teacher(input_ids=b["input_ids"]).logits[..., :64], 8, 2.0)
    b = {**b, "kd_values": values, "kd_indices": indices, "kd_rest": rest}
    kw = {"kind": "forward", "temperature": 2.0, "alpha_ce": 0.5, "weight_kd": 0.5, "cached": True}
    plain = KD(None, vocab=64, **kw)
    fused = KD(None, vocab=64, fused=FusedHead(5), **kw)
    a, ga = run(plain, student, b)
    f, gf = run(fused, student, b)
    torch.testing.assert_close(f["loss_sum"], a["loss_sum"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f["kd_sum"], a["kd_sum"], rtol=1e-5, atol=1e-6)
    for n, g in ga.items():
        torch.testing.assert_close(gf[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_chunked_head_loss_gradients_match_autograd_on_the_whole_logits():
    torch.manual_seed(0)
    h = torch.randn(11, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    bias = torch.randn(20, requires_grad=True)
    y = torch.randint(0, 20, (11,))

    def chunk_loss(z, rows):
        loss = torch.nn.functional.cross_entropy(z, y[rows], reduction="sum") + (z.softmax(-1) ** 2).sum()
        return loss, loss.detach()[None]

    total, parts = chunked_head_loss(h, w, bias, chunk_loss, chunk_size=4)
    (total * 3).backward()
    got = [t.grad.clone() for t in (h, w, bias)]
    for t in (h, w, bias):
        t.grad = None
    z = h @ w.T + bias
    ref = torch.nn.functional.cross_entropy(z, y, reduction="sum") + (z.softmax(-1) ** 2).sum()
    (ref * 3).backward()
    torch.testing.assert_close(total, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts[0], ref.detach(), rtol=1e-5, atol=1e-5)
    for g, t in zip(got, (h, w, bias), strict=True):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-5)


def test_the_stage_trains_with_the_fused_loss_to_the_same_student(tmp_path):
    from conftest import ROOT
    from test_distill import _reset_accelerate

    from lmforge.config import load
    from lmforge.stages import distill, pretrain

    fast = ["log.trackers=[]", "eval.eval_every=0", "checkpoint.save_every=0", "log.log_every=1"]
    cfg = load(pretrain.Config, ROOT / "recipes" / "tiny" / "pretrain.yaml",
               [f"output_dir={tmp_path / 'teacher'}", *fast, "train.max_steps=2", "model.config.num_hidden_layers=4"])
    try:
        pretrain.main(cfg)
    finally:
        _reset_accelerate()
    finals = {}
    for impl in ("logits", "fused_linear_ce"):
        cfg = load(distill.Config, ROOT / "recipes" / "tiny" / "distill.yaml",
                   [f"teacher.name_or_path={tmp_path / 'teacher' / 'final'}", f"output_dir={tmp_path / impl}", *fast,
                    "train.max_steps=3", f"train.loss_impl={impl}", "train.loss_chunk_tokens=300"])
        try:
            distill.train(cfg)
        finally:
            _reset_accelerate()
        finals[impl] = load_file(tmp_path / impl / "final" / "model.safetensors")
    for k, v in finals["logits"].items():
        torch.testing.assert_close(finals["fused_linear_ce"][k], v, rtol=1e-4, atol=1e-5, msg=k)

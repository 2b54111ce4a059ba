"""lmforge.quant.measure, and the tiny trained model the quantization and pruning tests share.

The model learns a Markov chain in which every token has 4 equally likely successors (best possible
perplexity 4, chance 256); zeroing its linear layers (lm_head aside) takes perplexity from about 7.6
to about 21, so perplexity moves when they are damaged.

The tests run torch on one thread: a tiny model gains nothing from more, and on a shared 2-core
machine two OpenMP threads competing with other processes made training 5x slower.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.quant import measure

VOCAB = 256


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              tie_word_embeddings=False)
    return LlamaConfig(**{**kw, **overrides})


def markov_batches(n: int, batch: int = 16, seq: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """n (batch, seq) batches of a fixed chain: each token is followed by one of its 4 successors."""
    successors = torch.randint(0, VOCAB, (VOCAB, 4), generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.empty(batch, seq, dtype=torch.long)
        x[:, 0] = torch.randint(0, VOCAB, (batch,), generator=g)
        for t in range(1, seq):
            x[:, t] = successors[x[:, t - 1], torch.randint(0, 4, (batch,), generator=g)]
        out.append(x)
    return out


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def _trained() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x in markov_batches(60, seed=0):  # ~2-4 s on one thread
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def trained_tiny() -> LlamaForCausalLM:
    """A fresh copy of the tiny Llama trained on the chain (perplexity about 7)."""
    return copy.deepcopy(_trained())


def eval_batches() -> list[torch.Tensor]:
    return markov_batches(4, batch=8, seed=99)


# --------------------------------------------------------------------------------------------


def test_perplexity_is_token_weighted_and_ignores_masked_labels():
    model = trained_tiny()
    a, b = eval_batches()[:2]
    labels_b = b.clone()
    labels_b[:, :20] = -100  # labels 20..31 are scored: 12 per row; batch a scores 31
    with torch.no_grad():
        loss_a = model(a, labels=a).loss.item()  # HF shifts labels inside and averages over scored tokens
        loss_b = model(b, labels=labels_b).loss.item()
    n_a, n_b = 8 * 31, 8 * 12
    expected = math.exp((loss_a * n_a + loss_b * n_b) / (n_a + n_b))
    got = measure.perplexity(model, [(a, a), {"input_ids": b, "labels": labels_b}])
    assert got == pytest.approx(expected, rel=1e-5)
    assert measure.perplexity(model, [a]) == pytest.approx(math.exp(loss_a), rel=1e-5)


def test_training_makes_perplexity_meaningful():
    untrained = LlamaForCausalLM(tiny_config()).eval()
    assert measure.perplexity(untrained, eval_batches()) > 150
    assert measure.perplexity(trained_tiny(), eval_batches()) < 12


def test_top1_agreement():
    model = trained_tiny()
    assert measure.top1_agreement(model, model, eval_batches()) == 1.0
    other = LlamaForCausalLM(tiny_config()).eval()
    assert measure.top1_agreement(model, other, eval_batches()) < 0.2


def test_parameter_bytes_of_a_float_model_and_tied_weights():
    model = trained_tiny()
    sizes = measure.parameter_bytes(model)
    assert sizes.total == 4 * sum(p.numel() for p in model.parameters())
    assert sizes.quantized == 0 and sizes.quantized_layers == [] and sizes.other == sizes.total
    assert sizes.layers["model.embed_tokens"] == 4 * VOCAB * 128
    assert sizes.layers["model.layers.0.mlp.up_proj"] == 4 * 256 * 128

    tied = LlamaForCausalLM(tiny_config(tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert measure.parameter_bytes(tied).total == 4 * sum(p.numel() for p in tied.parameters())  # counted once


def test_dir_size(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 5)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert measure.dir_size(tmp_path) == 15
    assert measure.dir_size(tmp_path / "a") == 10


def test_latency_and_generation_speed_restore_the_thread_count():
    model = trained_tiny()
    ids = eval_batches()[0][:2, :8]
    before = torch.get_num_threads()
    assert measure.forward_latency(model, ids, warmup=1, repeats=3, threads=1) > 0
    assert measure.generation_tokens_per_s(model, ids, new_tokens=4, threads=1) > 0
    assert torch.get_num_threads() == before

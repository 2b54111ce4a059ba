"""Regularisation and objectives, unit by unit against their formulas: label smoothing, dropout
knobs, MLM 80/10/10 masking, the length curriculum, early stopping, EMA."""

from __future__ import annotations

import pytest
import torch
from conftest import TOKENIZER
from transformers import AutoConfig, AutoTokenizer

from lmforge.config import ConfigError, UserError, from_dict
from lmforge.datasets.mlm import MLMMasker, ensure_mask_token, mask_tokens
from lmforge.train.ema import EMA, EMAConfig
from lmforge.train.regularize import (
    CurriculumBatches,
    CurriculumConfig,
    DropoutConfig,
    EarlyStoppingConfig,
    curriculum_length,
    dropout_overrides,
    early_stop,
)
from lmforge.train.settings import TrainConfig
from lmforge.train.tasks import CausalLM, token_loss

# ---- label smoothing -----------------------------------------------------------------------------


def test_label_smoothing_matches_formula_and_ignores_masked_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, 3, 0], [-100, -100, 6, 5, 4]])
    eps = 0.1
    out = token_loss(logits, labels, eps)
    logp = logits.log_softmax(-1)
    expect = 0.0
    for b in range(2):
        for t in range(5):
            if labels[b, t] == -100:
                continue
            nll = -logp[b, t, labels[b, t]]
            smooth = -logp[b, t].mean()
            expect += (1 - eps) * nll + eps * smooth
    assert out["loss_sum"].item() == pytest.approx(expect.item(), rel=1e-6)
    assert out["n_tokens"].item() == 7
    # garbage logits at ignored positions change nothing
    logits2 = logits.clone()
    logits2[0, 2] = 1e4
    logits2[1, 0] = -1e4
    assert token_loss(logits2, labels, eps)["loss_sum"].item() == pytest.approx(out["loss_sum"].item(), rel=1e-9)


def test_label_smoothing_only_in_training_mode():
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 11)

        def forward(self, input_ids):
            return type("Out", (), {"logits": self.emb(input_ids)})()

    model = Tiny()
    batch = {"input_ids": torch.randint(0, 11, (2, 6)), "labels": torch.randint(0, 11, (2, 6))}
    plain, smooth = CausalLM(label_smoothing=0.0).loss, CausalLM(label_smoothing=0.2).loss
    model.train()
    assert smooth(model, batch)["loss_sum"].item() != pytest.approx(plain(model, batch)["loss_sum"].item())
    model.eval()
    assert smooth(model, batch)["loss_sum"].item() == pytest.approx(plain(model, batch)["loss_sum"].item())


# ---- dropout -------------------------------------------------------------------------------------


def test_dropout_knobs_map_to_each_architecture():
    gpt2 = AutoConfig.for_model("gpt2")
    assert dropout_overrides(DropoutConfig(embedding=0.1, attention=0.2, hidden=0.3), gpt2) == {
        "embd_pdrop": 0.1, "attn_pdrop": 0.2, "resid_pdrop": 0.3}
    assert dropout_overrides(DropoutConfig(attention=0.1), AutoConfig.for_model("llama")) == {"attention_dropout": 0.1}
    bert = AutoConfig.for_model("bert")
    assert dropout_overrides(DropoutConfig(attention=0.1, hidden=0.2), bert) == {
        "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.2}
    with pytest.raises(UserError, match="model_type 'llama' has no hidden dropout"):
        dropout_overrides(DropoutConfig(hidden=0.1), AutoConfig.for_model("llama"))
    with pytest.raises(UserError, match="same value"):
        dropout_overrides(DropoutConfig(embedding=0.1, hidden=0.2), bert)
    assert dropout_overrides(DropoutConfig(), None) == {}


def test_dropout_reaches_the_built_model():
    from lmforge.models import ModelConfig, load_causal_lm

    cfg = ModelConfig(config={"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 64},
                      tokenizer=str(TOKENIZER))
    model = load_causal_lm(cfg, None, **dropout_overrides(DropoutConfig(embedding=0.25), AutoConfig.for_model("gpt2")))
    assert model.transformer.drop.p == 0.25


# ---- MLM masking ---------------------------------------------------------------------------------


def test_mlm_masking_is_80_10_10_of_15_percent_and_skips_special_tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (200, 500), generator=g)
    ids[:, ::50] = 3  # a special token
    out = mask_tokens(ids, mask_id=5, vocab_size=1000, special_ids=[0, 3, 5], probability=0.15,
                      generator=torch.Generator().manual_seed(1))
    chosen = out["labels"] != -100
    n = chosen.sum().item()
    assert n / (~(ids == 3)).sum().item() == pytest.approx(0.15, abs=0.005)
    assert not chosen[ids == 3].any()
    assert torch.equal(out["labels"][chosen], ids[chosen])
    masked = (out["input_ids"] == 5) & chosen
    kept = (out["input_ids"] == ids) & chosen
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.01)
    # 10% random tokens (of which ~1/1000 draw the original id back) and 10% kept
    assert kept.sum().item() / n == pytest.approx(0.1 + 0.1 / 1000, abs=0.01)
    assert torch.equal(out["input_ids"][~chosen], ids[~chosen])


def test_mlm_masks_are_deterministic_dynamic_and_fixed_for_validation():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    assert tok.mask_token is None
    assert ensure_mask_token(tok, "[MASK]") == 512 and len(tok) == 513
    masker = MLMMasker(tok, 0.15, seed=7)

    class Blocks:
        def get(self, k):
            return {"input_ids": torch.arange(5, 5 + 4 * 64).reshape(4, 64) % 500 + 5}

    train = masker.train_batches(Blocks(), rank=0)
    assert torch.equal(train.get(3)["input_ids"], train.get(3)["input_ids"])
    assert not torch.equal(train.get(3)["labels"], train.get(4)["labels"])  # new masks each micro-batch
    rows = [{"input_ids": torch.arange(10, 74)}, {"input_ids": torch.arange(80, 144)}]
    a, b = masker.collate_eval(rows), masker.collate_eval(rows[::-1])
    assert torch.equal(a["labels"][0], b["labels"][1])  # a block's eval mask depends on its content only


def test_mlm_objective_needs_an_encoder():
    from lmforge.models import ModelConfig, load_masked_lm

    cfg = ModelConfig(config={"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                              "intermediate_size": 64, "vocab_size": 64}, tokenizer=str(TOKENIZER))
    with pytest.raises(UserError, match="no masked-LM head"):
        load_masked_lm(cfg)


# ---- curriculum ----------------------------------------------------------------------------------


def test_curriculum_length_grows_through_divisors_and_keeps_tokens():
    assert [curriculum_length(s, 16, 128, 100) for s in (0, 10, 40, 50, 99, 100, 500)] == [16, 16, 32, 64, 64, 128, 128]

    class Blocks:
        def get(self, k):
            return {"input_ids": torch.arange(4 * 128).reshape(4, 128), "labels": torch.arange(4 * 128).reshape(4, 128)}

    cur = CurriculumBatches(Blocks(), CurriculumConfig(min_length=32, steps=10), 128, gradient_accumulation_steps=2)
    first = cur.get(0)  # step 0
    assert first["input_ids"].shape == (16, 32) and torch.equal(first["input_ids"].flatten(), torch.arange(512))
    assert cur.get(2 * 10)["input_ids"].shape == (4, 128)  # micro-batch 20 = step 10: full length
    with pytest.raises(UserError, match="must divide data.block_size"):
        CurriculumBatches(Blocks(), CurriculumConfig(min_length=48, steps=10), 128, 1)


# ---- early stopping ------------------------------------------------------------------------------


def test_early_stopping_patience_and_min_delta():
    cfg = EarlyStoppingConfig(patience=2, min_delta=0.05)
    state: dict = {}
    decisions = [early_stop(cfg, state, loss) for loss in (3.0, 2.9, 2.88, 2.87, 2.7, 2.69, 2.68)]
    # 2.88 and 2.87 improve by < 0.05 on 2.9: two bad evals -> stop; the counter survives in state
    assert decisions == [False, False, False, True, False, False, True]
    assert state["stopped_early"] and state["early_stopping_best"] == 2.7
    assert not early_stop(EarlyStoppingConfig(), {}, 1.0)


# ---- EMA -----------------------------------------------------------------------------------------


def test_ema_follows_the_formula_with_warmup_every_n_and_swaps_back():
    model = torch.nn.Linear(3, 2)
    w0 = [p.detach().clone() for p in model.parameters()]
    ema = EMA(model, EMAConfig(decay=0.9, every=2, warmup=True))
    ref = [w.clone() for w in w0]
    n = 0
    for step in range(1, 7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * step)
        ema.update(model, step)
        if step % 2 == 0:
            d = min(0.9, (1 + n) / (10 + n))
            ref = [d * r + (1 - d) * p.detach() for r, p in zip(ref, model.parameters())]
            n += 1
    for s, r in zip(ema.shadow, ref):
        torch.testing.assert_close(s, r)
    raw = [p.detach().clone() for p in model.parameters()]
    with ema.swapped_in(model):
        for p, r in zip(model.parameters(), ref):
            torch.testing.assert_close(p.detach(), r)
    for p, r in zip(model.parameters(), raw):
        assert torch.equal(p.detach(), r)
    other = EMA(model, EMAConfig(decay=0.9))
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3 and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))


@pytest.mark.parametrize("raw, expect", [
    ({"objective": "casual"}, "did you mean 'causal'"),
    ({"label_smoothing": 1.0}, "label_smoothing: must be in"),
    ({"ema": {"use_for_eval": True}}, "use_for_eval: needs train.ema.decay"),
    ({"early_stopping": {"patience": 0}}, "patience: must be >= 1"),
    ({"curriculum": {"min_length": 16}}, "steps: must be > 0"),
    ({"dropout": {"attention": 1.5}}, "attention: must be in"),
])
def test_train_recipe_mistakes_are_named(raw, expect):
    with pytest.raises(ConfigError, match=expect):
        from_dict(TrainConfig, raw)


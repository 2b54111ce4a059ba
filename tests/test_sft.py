"""SFT data: exactly which positions are trained, packing without cross-example attention, batching."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, TOKENIZER

from lmforge.config import UserError
from lmforge.datasets.batching import LengthGroupedBatches
from lmforge.datasets.sft import (
    SFTCollator,
    SFTDataConfig,
    build_classification_datasets,
    build_sft_datasets,
    encode_chat,
    encode_prompt_completion,
    pack_examples,
)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def test_prompt_completion_mask_is_exactly_the_completion_and_eos(tok):
    enc = encode_prompt_completion(tok, "Question: Add 2 and 3.\nAnswer: ", "5")
    p = tok("Question: Add 2 and 3.\nAnswer: ", add_special_tokens=False)["input_ids"]
    c = tok("5", add_special_tokens=False)["input_ids"]
    assert enc["input_ids"] == p + c + [tok.eos_token_id]
    assert enc["labels"] == [-100] * len(p) + c + [tok.eos_token_id]
    full = encode_prompt_completion(tok, "Q ", "A", completion_only=False)
    assert full["labels"] == full["input_ids"]


def test_chat_mask_is_exactly_the_assistant_turns(tok):
    msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    enc = encode_chat(tok, msgs)
    trained = [tok.decode([t]) for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]
    assert "".join(trained) == "hello<|endoftext|>a2<|endoftext|>"
    # every trained position carries its own token as label; the rest -100
    for t, lab in zip(enc["input_ids"], enc["labels"]):
        assert lab in (-100, t)
    # positions: right after each <|assistant|> marker up to and including EOS
    a_id = tok.convert_tokens_to_ids("<|assistant|>")
    starts = [i + 1 for i, t in enumerate(enc["input_ids"]) if t == a_id]
    ends = [i for i, t in enumerate(enc["input_ids"]) if t == tok.eos_token_id]
    want = {j for s, e in zip(starts, ends) for j in range(s, e + 1)}
    assert {i for i, lab in enumerate(enc["labels"]) if lab != -100} == want


def test_chat_mask_without_generation_markers_matches(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    marked = encode_chat(tok, msgs)
    tok2 = type(tok).from_pretrained(str(TOKENIZER))
    tok2.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    def trained(enc):
        return [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]

    # the unmarked template renders an extra newline after each EOS (no trim_blocks): not trained
    assert trained(encode_chat(tok2, msgs)) == trained(marked)


def test_chat_record_without_assistant_turn_is_one_line_error(tok, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError) as e:
        build_sft_datasets(SFTDataConfig(train_files=[str(f)], validation_ratio=0), tok, 0)
    (msg,) = e.value.problems
    assert msg.startswith("data.messages_key: ") and "line 1" in msg and "without an assistant turn" in msg


def test_one_class_label_column_is_an_error(tok, tmp_path):
    f = tmp_path / "one.jsonl"
    f.write_text("".join(json.dumps({"text": f"t {i}", "label": "pos"}) + "\n" for i in range(4)))
    with pytest.raises(UserError, match=r"^data\.label_key: the column 'label' has only one class \('pos'\)"):
        build_classification_datasets(SFTDataConfig(train_files=[str(f)], validation_ratio=0), tok, 0)


def test_sft_records_given_to_classification_and_back_are_errors(tok):
    with pytest.raises(UserError, match=r"^data\.train_files: .*task: classification needs 'text' and 'label'"):
        build_classification_datasets(SFTDataConfig(train_files=[str(FIXTURES / "sft" / "train.jsonl")]), tok, 0)
    with pytest.raises(UserError, match=r"^data\.train_files: .*text/label records are for task: classification"):
        build_sft_datasets(SFTDataConfig(train_files=[str(FIXTURES / "classify" / "train.jsonl")]), tok, 0)


def test_fixture_datasets_and_truncation_counts(tok):
    cfg = SFTDataConfig(train_files=[str(FIXTURES / "sft" / "train.jsonl"), str(FIXTURES / "sft" / "chat.jsonl")],
                        validation_ratio=0.1, max_seq_length=24)
    train, val, stats = build_sft_datasets(cfg, tok, 0)
    t = stats["train"]
    assert t["records"] == 288 + 144 and t["kept"] + t["dropped_no_trained_token"] == t["records"]
    assert t["truncated"] > 0 and t["dropped_no_trained_token"] > 0  # long prompts leave no completion at 24 tokens
    assert max(len(x) for x in train["input_ids"]) <= 24 and len(val) > 0


def test_packed_rows_give_the_same_logits_as_separate_examples(tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)).eval()
    import datasets

    exs = [encode_prompt_completion(tok, f"Question: Add {i} and 3.\nAnswer: ", str(i + 3)) for i in range(5)]
    ds = datasets.Dataset.from_dict({k: [e[k] for e in exs] for k in exs[0]})
    packed = pack_examples(ds, 64)
    assert len(packed) < len(ds) and sum(len(r) for r in packed["input_ids"]) == sum(len(e["input_ids"]) for e in exs)
    batch = SFTCollator(tok.pad_token_id)(list(packed))
    assert "attention_mask" not in batch and batch["input_ids"].shape[1] % 8 == 0
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        row, pos = packed[0], packed[0]["position_ids"]
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for s, e in zip(starts, starts[1:]):
            alone = model(input_ids=torch.tensor([row["input_ids"][s:e]])).logits
            torch.testing.assert_close(logits[0, s:e], alone[0], atol=1e-5, rtol=1e-5)
            assert row["labels"][s] == -100  # never trained to predict the next example's first token


def test_length_grouped_batches_are_deterministic_and_split_across_ranks(tok):
    cfg = SFTDataConfig(train_files=[str(FIXTURES / "sft" / "train.jsonl")], validation_ratio=0)
    train, _, _ = build_sft_datasets(cfg, tok, 0)
    coll = SFTCollator(tok.pad_token_id)
    one = LengthGroupedBatches(train, 8, coll, seed=1, rank=0, world=1)
    r0, r1 = (LengthGroupedBatches(train, 4, coll, seed=1, rank=r, world=2) for r in (0, 1))
    for k in (0, 7, one.per_epoch + 3):  # across an epoch boundary too
        assert sorted(one.indices(k)) == sorted(r0.indices(k) + r1.indices(k))
        assert one.indices(k) == LengthGroupedBatches(train, 8, coll, seed=1, rank=0, world=1).indices(k)
    lengths = [len(x) for x in train["input_ids"]]
    spread = [max(lengths[i] for i in one.indices(k)) - min(lengths[i] for i in one.indices(k)) for k in range(10)]
    assert sum(spread) / len(spread) < 4  # similar lengths together
    b = one.get(0)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] % 8 == 0

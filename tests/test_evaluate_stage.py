"""`lmforge evaluate` on tiny models built here: perplexity and bits per byte equal a hand count (documents
and packed blocks, any batch size), classification metrics equal hand counts, ROUGE-L a hand-worked pair,
the two offline lm-evaluation-harness fixture tasks score 1 on a model rigged to be right and 0 on one rigged
to be wrong, plain / adapter / quantized / classifier folders evaluate, --compare gives a row per model, the
tiny recipe runs, and bad input is one line that writes nothing."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CORPUS, FIXTURES, ROOT, TOKENIZER
from test_bad_inputs import run_cli, tree_digest
from test_finetune import build_tiny_base
from transformers import AutoTokenizer, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from lmforge.config import load
from lmforge.evaluation import generation as gen
from lmforge.evaluation import harness, lm, metrics
from lmforge.stages import evaluate

RECIPE = ROOT / "recipes" / "tiny" / "evaluate.yaml"
HARNESS = FIXTURES / "harness"
SFT_VAL = FIXTURES / "sft" / "validation.jsonl"
CLASSIFY_VAL = FIXTURES / "classify" / "validation.jsonl"
NO_HARNESS = ["harness.tasks=[]", "harness.include_path=[]"]


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is as fast when the machine is idle and 10-30x faster when another job
    holds the second core (OpenMP threads of a 64-wide matmul spin waiting for it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(out, *overrides):
    return evaluate.main(load(evaluate.Config, RECIPE, [f"output_dir={out}", *overrides]))


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random 2-layer llama of the fixture tokenizer, saved as pretrain's final/ is."""
    return build_tiny_base(tmp_path_factory.mktemp("eval_base") / "base")


@pytest.fixture(scope="module")
def base(base_dir):
    return LlamaForCausalLM.from_pretrained(base_dir).eval()


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory, tok):
    """A LoRA adapter on the base with non-zero B (so it changes the model), as finetune's final/ holds it."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("eval_adapter") / "final"
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    model.save_pretrained(out)  # adapter_config.json names the base folder
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def quant_dir(base_dir, tmp_path_factory, tok):
    from lmforge.quant import methods

    out = tmp_path_factory.mktemp("eval_quant") / "final"
    q = methods.quantize("int8_weight_only", LlamaForCausalLM.from_pretrained(base_dir))
    methods.save(q, out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def classifier_dir(base_dir, tmp_path_factory):
    """finetune task: classification (LoRA + trained head, labels.json) for a few steps of recipes/tiny/classify_lora."""
    from lmforge.stages import finetune

    out = tmp_path_factory.mktemp("eval_classifier")
    cfg = load(finetune.Config, ROOT / "recipes" / "tiny" / "classify_lora.yaml", [
        f"model.name_or_path={base_dir}", f"output_dir={out}", "train.max_steps=4", "train.per_device_train_batch_size=8",
        "eval.eval_every=0", "eval.max_eval_batches=1", "log.trackers=[]", "schedule.warmup_steps=0", "optim.learning_rate=3e-2"])
    try:
        finetune.train(cfg)
    finally:
        _reset_accelerate()
    return out / "final"


# ---------------------------------------------------------------------------------------------
# Language-model metrics against a hand count


def validation_texts() -> list[str]:
    """The documents pretrain holds out with validation_ratio 0.05 and seed 42 (datasets' split, done here)."""
    import datasets

    ds = datasets.load_dataset("json", data_files=[str(CORPUS)], split="train")
    return list(ds.train_test_split(test_size=0.05, seed=42)["test"]["text"])


@torch.no_grad()
def hand_documents(model, tok, texts: list[str], block: int) -> tuple[float, int, int]:
    """(Σ NLL, tokens, correct) of every document token after [BOS], in windows of `block` overlapping by one."""
    nll, n, correct = 0.0, 0, 0
    for text in texts:
        stream = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        for s in range(0, len(stream) - 1, block - 1):
            x = torch.tensor([stream[s:s + block]])
            logits = model(x).logits[0, :-1]
            nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            correct += int((logits.argmax(-1) == x[0, 1:]).sum())
            n += x.shape[1] - 1
    return nll, n, correct


def test_documents_perplexity_and_bits_per_byte_equal_a_hand_count_at_any_batch_size(base_dir, base, tok, tmp_path):
    texts = validation_texts()
    nll, n, correct = hand_documents(base, tok, texts, 128)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    got = {}
    for bs in (1, 7):  # batch 7: rows of different lengths padded together
        r = run(tmp_path / f"bs{bs}", f"model.path={base_dir}", *NO_HARNESS, f"lm.batch_size={bs}")
        got[bs] = r["models"][0]["metrics"]
    for m in got.values():
        assert m["lm/tokens"] == n and m["lm/bytes"] == n_bytes
        assert m["lm/loss"] == pytest.approx(nll / n, rel=1e-5)
        assert m["lm/perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
        assert m["lm/bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
        assert m["lm/token_accuracy"] == pytest.approx(correct / n, abs=1e-9)
    assert got[1]["lm/loss"] == pytest.approx(got[7]["lm/loss"], rel=1e-6)
    assert got[1]["lm/perplexity"] > 100  # a random model of a 512-token vocabulary


def test_packed_blocks_are_pretrains_and_score_like_a_hand_count(base_dir, base, tok, tmp_path):
    from lmforge.datasets.lm import LMDataConfig, build_lm_datasets

    _, val = build_lm_datasets(LMDataConfig(train_files=[str(CORPUS)], validation_ratio=0.05, block_size=64), tok, 42)
    cfg = lm.LMGroup(files=[str(CORPUS)], validation_ratio=0.05, block_size=64, packing=True)
    ids = val[:]["input_ids"]  # (blocks, 64)
    assert torch.equal(lm.packed_blocks(cfg, tok, 42)[:]["input_ids"], ids)  # the blocks pretrain evaluates
    with torch.no_grad():
        logits = base(ids).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum").item()
    n = ids[:, 1:].numel()
    n_bytes = sum(len(tok.decode(row[1:], skip_special_tokens=True).encode()) for row in ids.tolist())
    m = run(tmp_path / "packed", f"model.path={base_dir}", *NO_HARNESS, "lm.packing=true", "lm.block_size=64",
            "lm.batch_size=5")["models"][0]["metrics"]
    assert m["lm/tokens"] == n and m["lm/bytes"] == n_bytes
    assert m["lm/perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert m["lm/bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


def test_document_windows_score_every_token_once(tok):
    texts = ["a b c d e f g h i j k l m n o p", "short", ""]
    rows = lm.document_windows(texts, tok, 4)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    scored = [t for r in rows for t in r["labels"] if t != -100]
    assert scored == [t for doc in ids for t in doc]  # each document token once, in order
    assert all(len(r["input_ids"]) <= 4 and r["labels"][0] == -100 for r in rows)
    assert rows[0]["input_ids"][0] == tok.bos_token_id and rows[1]["input_ids"][0] == rows[0]["input_ids"][-1]


# ---------------------------------------------------------------------------------------------
# Metric formulas on hand-made cases


def test_classification_metrics_against_hand_counts():
    gold = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    pred = [0, 0, 1, 1, 2, 2, 2, 2, 0, 1]
    m = metrics.classification_metrics(pred, gold, ["a", "b", "c"])
    # counts: a tp2 fp1 fn1 -> F1 4/6; b tp1 fp2 fn1 -> 2/5; c tp3 fp1 fn2 -> 6/9
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 1, 3]]
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["macro_f1"] == pytest.approx((4 / 6 + 2 / 5 + 6 / 9) / 3)
    # a class never predicted nor present scores 0, as lmforge.train.tasks.classification_scores says
    from lmforge.train.tasks import classification_scores

    four = metrics.classification_metrics(pred, gold, ["a", "b", "c", "d"])
    assert four["macro_f1"] == pytest.approx(classification_scores(list(zip(pred, gold)), 4)["macro_f1"])


def test_rouge_l_of_a_hand_worked_pair_and_the_other_generation_metrics():
    # LCS("the cat on the mat", "the cat sat on the mat") = 5 words: P = 5/5, R = 5/6, F = 2PR/(P+R) = 10/11
    assert metrics.rouge_l(["the cat on the mat"], ["the cat sat on the mat"]) == pytest.approx(10 / 11)
    assert metrics.rouge_l(["The Cat."], ["the cat"]) == 1.0  # rouge-score lower-cases and drops punctuation
    assert metrics.exact_match([" 61 ", "tekcop", "x"], ["61", "tekcop", "y"]) == pytest.approx(2 / 3)
    long = ["return a new string containing the entire wrapped paragraph"]
    assert metrics.bleu(long, long) == pytest.approx(100.0) and metrics.chrf(long, long) == pytest.approx(100.0)
    assert metrics.chrf(["abc"], ["xyz"]) < 5


# ---------------------------------------------------------------------------------------------
# A model rigged to be right (or wrong): its logits put +30 (or -30) on the token that follows the same context
# in the given token sequences. It recomputes the whole input on every call, so generation runs without a cache.


class Rigged(LlamaForCausalLM):
    K = 64  # context tokens looked up (longest match first)

    def rig(self, sequences: list[list[int]], right: bool) -> Rigged:
        self.table, self.sign = {}, 1.0 if right else -1.0
        for s in sequences:
            for t in range(1, len(s)):
                for k in range(1, min(self.K, t) + 1):
                    self.table.setdefault(tuple(s[t - k:t]), s[t])
        return self.eval()

    def _next(self, ids: list[int]) -> int | None:
        for k in range(min(self.K, len(ids)), 0, -1):
            if tuple(ids[-k:]) in self.table:
                return self.table[tuple(ids[-k:])]
        return None

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)  # (batch, seq, vocab)
        for i, row in enumerate(input_ids.tolist()):
            for j in range(len(row)):
                nxt = self._next(row[: j + 1])
                if nxt is not None:
                    logits[i, j, nxt] = 30.0 * self.sign
        return CausalLMOutputWithPast(logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids}


def rigged(base_dir, sequences, right: bool) -> Rigged:
    return Rigged.from_pretrained(base_dir).rig(sequences, right)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_both_fixture_harness_tasks_run_offline_right_and_wrong(base_dir, tok):
    mc = [tok(r["context"] + " " + r["choices"][r["label"]])["input_ids"] for r in rows(HARNESS / "mc.jsonl")]
    gn = [tok(r["context"] + " " + r["target"] + ".")["input_ids"] for r in rows(HARNESS / "gen.jsonl")]
    for right in (True, False):
        want = 1.0 if right else 0.0
        got = harness.run_harness(rigged(base_dir, mc, right), tok, ["lmforge_fixture_mc"], str(HARNESS))
        assert got == {"lmforge_fixture_mc/acc": want, "lmforge_fixture_mc/acc_norm": want}
        model = rigged(base_dir, gn, right).train()
        got = harness.run_harness(model, tok, ["lmforge_fixture_gen"], str(HARNESS), limit=10, batch_size=4)
        assert got == {"lmforge_fixture_gen/exact_match": want}
        assert model.training  # put back as it was: the training loop calls this between steps


def test_generation_scores_a_right_model_on_held_out_sft_prompts(base_dir, tok):
    from lmforge.datasets.sft import encode_prompt_completion

    records = rows(SFT_VAL)
    full = [encode_prompt_completion(tok, r["prompt"], r["completion"])["input_ids"] for r in records]
    cfg = gen.GenerationGroup(files=[str(SFT_VAL)], max_new_tokens=24, batch_size=6, show=2)
    scores, shown = gen.score(rigged(base_dir, full, True), tok, cfg)
    assert scores["examples"] == len(records) == 40
    assert scores["exact_match"] == 1.0 and scores["rouge_l"] == 1.0 and scores["chrf"] == pytest.approx(100.0)
    assert shown[0] == {"prompt": records[0]["prompt"], "reference": records[0]["completion"],
                        "prediction": records[0]["completion"]}
    wrong, _ = gen.score(rigged(base_dir, full, False), tok, cfg)
    assert wrong["exact_match"] == 0.0


# ---------------------------------------------------------------------------------------------
# Model folders of every kind


def test_a_classifier_folder_gives_hand_counted_metrics_and_a_confusion_matrix(classifier_dir, tmp_path, tok):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    names = json.loads((classifier_dir / "labels.json").read_text())["label_names"]
    r = run(tmp_path / "cls", f"model.path={classifier_dir}", "lm.files=[]", *NO_HARNESS,
            f"classification.files=[{CLASSIFY_VAL}]", "classification.max_seq_length=64", "classification.batch_size=7")
    entry = r["models"][0]
    assert entry["kind"] == "classifier"
    # by hand: one record at a time (no padding), counts of (gold, predicted)
    base = json.loads((classifier_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), pad_token_id=tok.pad_token_id), str(classifier_dir)).eval()
    counts = [[0] * len(names) for _ in names]
    with torch.no_grad():
        for rec in rows(CLASSIFY_VAL):
            ids = torch.tensor([tok(rec["text"])["input_ids"][:64]])
            counts[names.index(rec["label"])][int(model(input_ids=ids).logits.argmax(-1))] += 1
    c = entry["classification"]
    assert c["confusion_matrix"] == counts and c["label_names"] == names and c["examples"] == 60
    assert c["accuracy"] == pytest.approx(sum(counts[i][i] for i in range(len(names))) / 60)
    f1 = [2 * counts[k][k] / max(sum(counts[k]) + sum(row[k] for row in counts), 1) for k in range(len(names))]
    assert c["macro_f1"] == pytest.approx(sum(f1) / len(names))
    out = tmp_path / "cls"
    assert (out / entry["confusion_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![confusion matrix]({entry['confusion_png']})" in (out / "report.md").read_text()


@torch.no_grad()
def test_compare_gives_a_row_per_model_for_plain_adapter_and_quantized_folders(base_dir, adapter_dir, quant_dir, tok, tmp_path):
    from peft import PeftModel

    argv = evaluate.cli_overrides([str(RECIPE), "lm.limit=4", "--compare", str(adapter_dir), str(quant_dir), "seed=42"])
    assert argv == [str(RECIPE), "lm.limit=4", "seed=42", f"compare=[{adapter_dir},{quant_dir}]"]
    out = tmp_path / "cmp"
    r = run(out, f"model.path={base_dir}", "model.name=base", *NO_HARNESS, *argv[1:])
    table = json.loads((out / "metrics.json").read_text())["table"]
    names = [row["model"] for row in table["rows"]]
    assert names == ["base", adapter_dir.parent.name, quant_dir.parent.name]  # .../<name>/final -> <name>
    kinds = [e["kind"] for e in r["models"]]
    assert kinds == ["causal", "adapter", "quantized"] and len(table["rows"]) == 3
    ppl = {e["kind"]: e["metrics"]["lm/perplexity"] for e in r["models"]}
    texts = validation_texts()[:4]
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    nll, n, _ = hand_documents(peft, tok, texts, 128)
    assert ppl["adapter"] == pytest.approx(math.exp(nll / n), rel=1e-4) and ppl["adapter"] != pytest.approx(ppl["causal"])
    assert ppl["quantized"] == pytest.approx(ppl["causal"], rel=0.02)  # int8 weights: close to fp32
    md = (out / "report.md").read_text()
    assert all(f"| {row['model']} |" in md for row in table["rows"])
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_tiny_recipe_runs_lm_metrics_and_both_harness_tasks(base_dir, tmp_path, capsys):
    out = tmp_path / "tiny"
    rc, _ = run_cli(capsys, "evaluate", str(RECIPE), f"model.path={base_dir}", f"output_dir={out}", "lm.limit=3",
                    "harness.limit=6")
    assert rc == 0
    result = json.loads((out / "metrics.json").read_text())
    m = result["models"][0]["metrics"]
    for key in ("lm/loss", "lm/perplexity", "lm/token_accuracy", "lm/bits_per_byte", "harness/lmforge_fixture_mc/acc",
                "harness/lmforge_fixture_mc/acc_norm", "harness/lmforge_fixture_gen/exact_match"):
        assert math.isfinite(m[key]), key
    assert result["models"][0]["harness"]["results"]["lmforge_fixture_mc"]["sample_len"] == 6
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "report.md", "comparison.png", "recipe.yaml"}
    md = (out / "report.md").read_text()
    assert "## Environment" in md and "transformers" in md and "## Recipe (resolved)" in md and "Wall time" in md
    # a second run into the same folder is refused without overwrite, and changes nothing
    before = tree_digest(out)
    rc, err = run_cli(capsys, "evaluate", str(RECIPE), f"model.path={base_dir}", f"output_dir={out}", *NO_HARNESS)
    assert rc == 2 and "is not empty; pass overwrite=true" in err and tree_digest(out) == before


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


@pytest.fixture
def workdir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    return out


@pytest.fixture(scope="module")
def orphan_adapter(adapter_dir, tmp_path_factory):
    """The adapter, copied with its base renamed away: adapter_config.json names a folder that is not there."""
    import shutil

    out = tmp_path_factory.mktemp("orphan") / "final"
    shutil.copytree(adapter_dir, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(out.parent / "gone" / "base")
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


CASES = {
    "missing folder": (["model.path=/nonexistent/final"], "model.path: '/nonexistent/final' does not exist"),
    "unknown metric": ([f"generation.files=[{SFT_VAL}]", "generation.metrics=[rouge]"],
                       "generation.metrics: 'rouge' is not a generation metric (did you mean 'rouge_l'?)"),
    "nothing to evaluate": (["lm.files=[]", *NO_HARNESS], "nothing to evaluate: give lm.files"),
    "classification of a causal LM": ([f"classification.files=[{CLASSIFY_VAL}]"], "needs a sequence classifier"),
    "tokens without text": (["lm.files=[]", f"lm.path={FIXTURES}", "lm.validation_ratio=0"], "lm.packing: a dataset from `lmforge data` holds tokens only"),
    "resume": (["resume=auto"], "resume: evaluate does not resume"),
    "harness limit": (["harness.limit=1.5"], "harness.limit: a count >= 1 or a fraction in (0, 1)"),
    "unknown task": (["harness.tasks=[lmforge_fixture_mcq]"],
                     "harness.tasks: 'lmforge_fixture_mcq' is not an lm-eval task, group or tag (did you mean 'lmforge_fixture_mc'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, base_dir, workdir, capsys):
    overrides, message = CASES[case]
    before = tree_digest(workdir)
    rc, err = run_cli(capsys, "evaluate", str(RECIPE), f"model.path={base_dir}", f"output_dir={workdir}", "overwrite=true",
                      *overrides)
    assert rc == 2 and message in err, err
    assert "Traceback" not in err and all(line.startswith("error: ") for line in err.strip().splitlines())
    assert len(err.strip().splitlines()) == 1, err
    assert tree_digest(workdir) == before


def test_an_adapter_without_its_base_is_one_line(orphan_adapter, workdir, capsys):
    rc, err = run_cli(capsys, "evaluate", str(RECIPE), f"model.path={orphan_adapter}", f"output_dir={workdir}")
    assert rc == 2 and f"model.base: the adapter in '{orphan_adapter}' needs its base model" in err and "set model.base" in err
    assert len(err.strip().splitlines()) == 1

"""`lmforge distill` on SFT data and its generating modes, on a tiny teacher: the KD and CE terms see completion
tokens only; mode sequence writes the teacher's greedy completions as a load_from_disk folder, trains on them,
reuses the folder and refuses one made for another teacher / data / sampling setting; mode on_policy samples the
student on a seeded fraction lambda of the steps and leaves the teacher untouched; bad inputs are one line each."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, ROOT, TOKENIZER

from lmforge import cli
from lmforge.config import ConfigError, UserError, load
from lmforge.datasets.batching import IGNORE_INDEX, RankBatches
from lmforge.datasets.sft import SFTCollator, SFTDataConfig, build_sft_datasets
from lmforge.stages import distill, pretrain
from lmforge.train import kd_generate
from lmforge.train.kd import soft_target_loss, student_from_teacher_layers
from lmforge.train.kd_generate import OnPolicyBatches, SamplingConfig, generate_completions, on_policy_step
from lmforge.train.kd_task import KD, ON_POLICY_KEY

RECIPES = ROOT / "recipes" / "tiny"
LIVE, SEQUENCE, ON_POLICY = RECIPES / "distill.yaml", RECIPES / "distill_sequence.yaml", RECIPES / "distill_on_policy.yaml"
FAST = ["log.trackers=[]", "eval.eval_every=0", "checkpoint.save_every=0", "log.log_every=1"]
TEMPLATE = FIXTURES / "tokenizer" / "chat_template.jinja"


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 4-layer, width-64 llama pretrained for 30 steps on the fixture corpus (the pattern of test_distill.py)."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = load(pretrain.Config, RECIPES / "pretrain.yaml",
               [f"output_dir={out}", *FAST[:3], "log.log_every=10", "train.max_steps=30", "model.config.num_hidden_layers=4"])
    pretrain.main(cfg)
    _reset_accelerate()
    return out / "final"


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    """40 prompt/completion and 8 chat records to train on, 16 to validate on (a generation pass takes seconds)."""
    d = tmp_path_factory.mktemp("sft")
    for name, n in (("train.jsonl", 40), ("chat.jsonl", 8), ("validation.jsonl", 16)):
        (d / name).write_text("".join((FIXTURES / "sft" / name).read_text().splitlines(keepends=True)[:n]))
    return d


def sft_data(files) -> list[str]:
    return [f"data.train_files=[{files / 'train.jsonl'}, {files / 'chat.jsonl'}]",
            f"data.validation_files=[{files / 'validation.jsonl'}]"]


def cfg_for(recipe, teacher, out, *over):
    return load(distill.Config, recipe, [f"teacher.name_or_path={teacher}", f"output_dir={out}", *FAST, *over])


def run(recipe, teacher, out, *over):
    try:
        return distill.train(cfg_for(recipe, teacher, out, *over))
    finally:
        _reset_accelerate()


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_losses(out):
    return [r["loss"] for r in rows(out / "metrics.jsonl") if r["split"] == "train"]


def tiny_llama(seed: int, layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=1,
                         bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config)


def fixture_rows(n: int):
    """The first n fixture prompt/completion records, encoded as finetune encodes them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = SFTDataConfig(train_files=[str(FIXTURES / "sft" / "train.jsonl")], validation_ratio=0.0, max_seq_length=96)
    train_ds, _, _ = build_sft_datasets(cfg, tok, 0)
    return train_ds.select(range(n)), tok


# ---------------------------------------------------------------------------------------------
# SFT data: both terms on completion tokens only


def test_sft_kd_loss_ignores_prompt_positions_and_counts_completion_tokens():
    """A hand check: the teacher's logits at prompt (and padding) positions change nothing; at a completion
    position they do; the KD part is the per-position KL over completion positions, summed, times T**2."""
    ds, tok = fixture_rows(4)
    batch = SFTCollator(tok.pad_token_id)([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in ds])
    student, teacher = tiny_llama(0).eval(), tiny_llama(1).eval()
    student.train()  # training mode: the KD loss (eval mode reports plain CE)
    target = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # (batch, seq): the token each position predicts
    trained = target != IGNORE_INDEX

    class Edited(torch.nn.Module):
        """The teacher with its logits replaced by noise where ``where`` is True."""

        def __init__(self, where):
            super().__init__()
            self.where = where

        def forward(self, **inputs):
            out = teacher(**inputs)
            noise = torch.randn_like(out.logits) * 10
            out.logits = torch.where(self.where[..., None], noise, out.logits)
            return out

    def loss_with(t):
        task = KD(t, vocab=512, kind="forward", temperature=2.0, alpha_ce=0.5, weight_kd=0.5)
        with torch.no_grad():
            return task.loss(student, batch)

    base = loss_with(teacher)
    assert torch.equal(loss_with(Edited(~trained))["loss_sum"], base["loss_sum"])  # prompt + padding positions
    one = torch.zeros_like(trained)
    one[0, int(trained[0].nonzero()[0])] = True
    assert not torch.equal(loss_with(Edited(one))["loss_sum"], base["loss_sum"])  # one completion position

    # the token count is the completion tokens (what the loop normalises by), and the parts add up by hand
    completion_tokens = sum(sum(t != IGNORE_INDEX for t in r["labels"][1:]) for r in ds)
    assert int(base["n_tokens"]) == completion_tokens == int(KD(teacher).count_tokens(batch))
    prompt_tokens = sum(sum(t == IGNORE_INDEX for t in r["labels"]) for r in ds)
    assert prompt_tokens > completion_tokens  # the check above would be weak without many prompt positions
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kd_by_hand = 0.0
    for b, t in trained.nonzero().tolist():
        p = F.softmax(t_logits[b, t] / 2.0, -1)
        kd_by_hand += float((p * (p.log() - F.log_softmax(s_logits[b, t] / 2.0, -1))).sum()) * 4.0
    ce_by_hand = F.cross_entropy(s_logits[trained], target[trained], reduction="sum")
    assert float(base["kd_sum"]) == pytest.approx(kd_by_hand, rel=1e-4)
    assert float(base["ce_sum"]) == pytest.approx(float(ce_by_hand), rel=1e-5)
    assert float(base["loss_sum"]) == pytest.approx(0.5 * kd_by_hand + 0.5 * float(ce_by_hand), rel=1e-4)


def test_live_distill_on_sft_records(teacher_dir, sft_files, tmp_path):
    result, _, _ = run(LIVE, teacher_dir, tmp_path, "data.kind=sft", *sft_data(sft_files), f"data.chat_template={TEMPLATE}",
                       "data.max_seq_length=96", "train.max_steps=4")
    summary = json.loads((tmp_path / "summary.json").read_text())["distill"]
    assert summary["data_kind"] == "sft" and summary["data"]["train"]["kept"] == 48
    assert summary["data"]["train"]["formats"] == {"chat": 8, "prompt_completion": 40}
    parts = rows(tmp_path / "distill_metrics.jsonl")
    assert all(math.isfinite(r["ce"]) and r["kd"] > 0 for r in parts)
    assert all(r["tokens"] < 8 * 40 for r in parts)  # completion tokens of 8 records, not whole rows
    assert math.isfinite(result.eval["loss"]) and math.isfinite(summary["teacher_eval"]["loss"])


# ---------------------------------------------------------------------------------------------
# mode sequence


@pytest.fixture(scope="module")
def sequence_run(teacher_dir, sft_files, tmp_path_factory):
    out, seqs = tmp_path_factory.mktemp("seq"), tmp_path_factory.mktemp("seqdir") / "kd_sequences"
    result, _, _ = run(SEQUENCE, teacher_dir, out, *sft_data(sft_files), f"distill.sequence_dir={seqs}",
                       "distill.sampling.max_new_tokens=8", "train.max_steps=16")
    return out, seqs, result


def test_sequences_are_the_teachers_greedy_completions(sequence_run, teacher_dir, sft_files):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, seqs, _ = sequence_run
    ds = datasets.load_from_disk(str(seqs))
    assert set(ds.column_names) == {"prompt", "completion", "prompt_ids", "completion_ids", "source_row", "sample"}
    assert len(ds) == 48 and ds["source_row"] == list(range(48)) and set(ds["sample"]) == {0}
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    prompts = {json.loads(line)["prompt"] for line in (sft_files / "train.jsonl").read_text().splitlines()}
    for row in ds:
        ids = torch.tensor([row["prompt_ids"]])
        with torch.no_grad():
            out = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        assert row["completion_ids"] == (new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new)
        assert row["completion"] == tok.decode(row["completion_ids"], skip_special_tokens=True)
        if row["prompt"].startswith("Question:"):  # prompt/completion records: the prompt as written
            assert row["prompt"] in prompts and row["prompt_ids"] == tok(row["prompt"], add_special_tokens=False)["input_ids"]
        else:  # chat records: the conversation up to the first assistant turn
            assert row["prompt"].endswith("<|assistant|>")


def test_sequence_mode_trains_on_them(sequence_run):
    out, seqs, result = sequence_run
    losses = train_losses(out)
    assert result.step == 16 and losses[-1] < losses[0]
    parts = rows(out / "distill_metrics.jsonl")
    assert parts[-1]["ce"] < parts[0]["ce"] and all(r["kd"] > 0 for r in parts)  # CE + KD (the recipe's weights)
    assert all(r["tokens"] <= 8 * 8 for r in parts)  # at most max_new_tokens completion tokens per row
    summary = json.loads((out / "summary.json").read_text())["distill"]
    assert summary["sequences"]["sequence_dir"] == str(seqs) and not summary["sequences"]["reused"]
    assert summary["sequences"]["rows"] == 48


def test_sequences_are_reused_and_refused_when_made_for_something_else(sequence_run, teacher_dir, sft_files, tmp_path,
                                                                       monkeypatch):
    _, seqs, _ = sequence_run
    common = [*sft_data(sft_files), f"distill.sequence_dir={seqs}", "distill.sampling.max_new_tokens=8"]

    def no_generation(*a, **k):
        raise AssertionError("the sequences were generated again")

    monkeypatch.setattr(distill, "build_sequences", no_generation)
    result, _, _ = run(SEQUENCE, teacher_dir, tmp_path / "again", *common, "train.max_steps=1")
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["distill"]["sequences"]["reused"]

    other_teacher = tmp_path / "other_teacher"
    shutil.copytree(teacher_dir, other_teacher)
    (sft_files / "fewer.jsonl").write_text("".join((sft_files / "train.jsonl").read_text().splitlines(keepends=True)[:20]))
    cases = [
        (["distill.sampling.max_new_tokens=6"], "distill.sampling.max_new_tokens (8 there, 6 here)"),
        (["distill.sampling.do_sample=true"], "distill.sampling.do_sample (False there, True here)"),
        ([f"data.train_files=[{sft_files / 'fewer.jsonl'}]"], "training data (other prompts there, these prompts here)"),
        ([f"teacher.name_or_path={other_teacher}"], f"teacher ({teacher_dir.resolve()} there, {other_teacher.resolve()} here)"),
    ]
    for i, (over, what) in enumerate(cases):
        out = tmp_path / f"refused{i}"
        with pytest.raises(UserError) as e:
            run(SEQUENCE, teacher_dir, out, *common, *over)
        (line,) = e.value.problems
        assert line.startswith(f"distill.sequence_dir: '{seqs}' was made for another {what}"), line
        assert line.endswith("; delete it or set distill.sequence_dir to a new folder")
        assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()

    with pytest.raises(UserError) as e:  # generation past the teacher's 256 positions
        run(SEQUENCE, teacher_dir, tmp_path / "refused_long", *common[:-1], "distill.sampling.max_new_tokens=250")
    (line,) = e.value.problems
    assert line.startswith("distill.sampling.max_new_tokens: the longest prompt (") and "plus 250 new tokens passes the " \
        "teacher's 256 positions" in line

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("not mine")
    with pytest.raises(UserError) as e:
        run(SEQUENCE, teacher_dir, tmp_path / "refused_stray", *common[:-2], f"distill.sequence_dir={stray}")
    (line,) = e.value.problems
    assert line.startswith(f"distill.sequence_dir: '{stray}' exists but holds no teacher completions (kd_sequences.json)")
    assert (stray / "notes.txt").read_text() == "not mine"


# ---------------------------------------------------------------------------------------------
# mode on_policy


def test_on_policy_steps_are_a_seeded_fraction_lambda():
    for fraction in (0.25, 0.5, 0.8):
        picks = [on_policy_step(42, s, fraction) for s in range(4000)]
        assert abs(sum(picks) / len(picks) - fraction) < 0.03
        assert picks == [on_policy_step(42, s, fraction) for s in range(4000)]  # a pure function of (seed, step)
        assert picks != [on_policy_step(7, s, fraction) for s in range(4000)]
    assert not any(on_policy_step(42, s, 0.0) for s in range(200)) and all(on_policy_step(42, s, 1.0) for s in range(200))


def test_on_policy_batches_sample_the_student_seeded_in_eval_mode_and_touch_no_rng():
    ds, tok = fixture_rows(8)
    student = tiny_llama(3).train()
    modes = []
    student.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    collate = SFTCollator(tok.pad_token_id)
    base = RankBatches(ds, 4, collate, 0, 0, 1)
    source = OnPolicyBatches(base, student, collate, fraction=1.0, seed=5, gradient_accumulation_steps=2,
                             sampling=SamplingConfig(max_new_tokens=6), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                             max_length=96)
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    first = source.get(3)
    assert torch.equal(torch.get_rng_state(), rng)  # the training RNG stream is untouched
    assert modes and not any(modes) and student.training  # generated in eval mode, back to train after
    again = source.get(3)
    assert all(torch.equal(first[k], again[k]) for k in first)  # seeded by (seed, k): resumes sample alike
    assert ON_POLICY_KEY in first and source.generated == [2]  # micro-batch 3 is step 2 of gas 2 (1-based)
    data = base.get(3)
    for i, r in enumerate(base.indices(3)):
        prompt = kd_generate.prompt_ids(ds[r])
        n = len(prompt)
        assert first["input_ids"][i, :n].tolist() == prompt and (first["labels"][i, :n] == IGNORE_INDEX).all()
        assert 1 <= int((first["labels"][i] != IGNORE_INDEX).sum()) <= 6  # the student's tokens only
    assert not torch.equal(first["input_ids"], data["input_ids"][:, :first["input_ids"].shape[1]])
    off = OnPolicyBatches(base, student, collate, fraction=0.0, seed=5, gradient_accumulation_steps=2,
                          sampling=SamplingConfig(), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_length=96)
    assert all(torch.equal(off.get(3)[k], data[k]) for k in data) and ON_POLICY_KEY not in off.get(3)


def test_generated_completions_stop_at_eos_and_stay_in_the_shared_vocab():
    model = tiny_llama(4).eval()
    head = torch.nn.Linear(32, 512)  # logits = its bias: token 5 first, then token 3
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[5], head.bias[3] = 10.0, 5.0
    model.lm_head = head
    greedy = SamplingConfig(max_new_tokens=4, do_sample=False)
    assert generate_completions(model, [[3, 4], [7]], greedy, pad_id=1, eos_id=5, seed=0) == [[5], [5]]
    out = generate_completions(model, [[3, 4], [7]], greedy, pad_id=1, eos_id=0, seed=0, vocab=5)
    assert out == [[3, 3, 3, 3], [3, 3, 3, 3]]  # ids from 5 on are past the shared vocabulary: never emitted


@pytest.fixture(scope="module")
def on_policy_run(teacher_dir, sft_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("on_policy")
    seen = {}
    real = distill.load_teacher

    def spy(cfg, device):
        seen["teacher"] = real(cfg, device)
        return seen["teacher"]

    mp = pytest.MonkeyPatch()
    mp.setattr(distill, "load_teacher", spy)
    try:
        result, student, _ = run(ON_POLICY, teacher_dir, out, *sft_data(sft_files), "distill.sampling.max_new_tokens=8",
                                 "train.max_steps=12")
    finally:
        mp.undo()
    return out, result, student, seen["teacher"]


def test_on_policy_picks_lambda_of_the_steps_and_trains_on_the_students_tokens(on_policy_run):
    out, result, _, _ = on_policy_run
    picked = [s for s in range(1, 13) if on_policy_step(42, s - 1, 0.5)]
    assert 0 < len(picked) < 12  # seed 42 mixes both kinds of step in 12
    summary = json.loads((out / "summary.json").read_text())["distill"]
    assert summary["on_policy"]["steps"] == picked and summary["on_policy"]["fraction"] == 0.5
    parts = rows(out / "distill_metrics.jsonl")
    assert [r["step"] for r in parts if r["on_policy_tokens"] > 0] == picked
    for r in parts:
        if r["step"] in picked:  # only the student's generated tokens, and no CE on them
            assert r["on_policy_tokens"] == r["tokens"] <= 8 * 8 and r["ce"] is None
        else:
            assert r["on_policy_tokens"] == 0 and math.isfinite(r["ce"])
        assert math.isfinite(r["kd"]) and r["kd"] > 0
    assert all(math.isfinite(x) for x in train_losses(out)) and result.step == 12


def test_on_policy_resume_samples_what_an_uninterrupted_run_samples(teacher_dir, sft_files, tmp_path):
    common = [*sft_data(sft_files), "distill.sampling.max_new_tokens=4", "train.max_steps=4", "checkpoint.save_every=2"]
    run(ON_POLICY, teacher_dir, tmp_path / "whole", *common)
    run(ON_POLICY, teacher_dir, tmp_path / "parts", *common, "train.stop_at_step=2")
    run(ON_POLICY, teacher_dir, tmp_path / "parts", *common, "resume=auto")
    assert train_losses(tmp_path / "parts") == train_losses(tmp_path / "whole")  # bitwise: same steps, same samples
    assert rows(tmp_path / "parts" / "distill_metrics.jsonl") == rows(tmp_path / "whole" / "distill_metrics.jsonl")


def test_on_policy_kd_falls_and_the_teacher_is_unchanged(on_policy_run, teacher_dir, sft_files):
    """The student's JSD to the teacher on the validation completions falls from its init (every 2nd teacher block)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, student, teacher = on_policy_run
    stored = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert not teacher.training
    for name, p in teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, name
        assert torch.equal(p.detach().cpu(), stored.state_dict()[name]), name

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    cfg = SFTDataConfig(train_files=[str(sft_files / "validation.jsonl")], validation_ratio=0.0, max_seq_length=128)
    val, _, _ = build_sft_datasets(cfg, tok, 0)
    batch = SFTCollator(tok.pad_token_id)([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in val])
    mask = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX) != IGNORE_INDEX

    def jsd(model):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            return float(soft_target_loss(model.eval()(**inputs).logits, stored.eval()(**inputs).logits, mask, "jsd")
                         / mask.sum())

    before, after = jsd(student_from_teacher_layers(stored, 2)), jsd(student)
    print(f"validation JSD to the teacher: init {before:.5f}, after 12 on-policy KD steps {after:.5f}")
    assert after < before


# ---------------------------------------------------------------------------------------------
# bad inputs: one line each, nothing written


BAD = [
    (LIVE, ["distill.mode=on_policy"], "distill.mode: on_policy generates completions for the data's prompts, and data.kind "
     "blocks (packed pretraining blocks) has no prompts; set data.kind=sft with prompt/completion or chat records"),
    (LIVE, ["distill.mode=sequence"], "distill.mode: sequence generates completions for the data's prompts, and data.kind "
     "blocks (packed pretraining blocks) has no prompts; set data.kind=sft with prompt/completion or chat records"),
    (SEQUENCE, ["distill.sampling.max_new_tokens=0"], "distill.sampling.max_new_tokens: must be >= 1, got 0"),
    (ON_POLICY, ["distill.sampling.temperature=0"], "distill.sampling.temperature: must be > 0, got 0.0"),
    (ON_POLICY, ["distill.sampling.top_p=1.5"], "distill.sampling.top_p: must be in (0, 1], got 1.5"),
    (SEQUENCE, ["distill.sampling.num_return_sequences=0"], "distill.sampling.num_return_sequences: must be >= 1, got 0"),
    (SEQUENCE, ["distill.sampling.temperature=0.7"], "distill.sampling.temperature: only read with do_sample true (greedy "
     "decoding ignores it); remove it or set do_sample=true"),
    (SEQUENCE, ["distill.sampling.num_return_sequences=2"], "distill.sampling.num_return_sequences: 2 greedy completions of "
     "a prompt are all the same; set do_sample=true or num_return_sequences=1"),
    (ON_POLICY, ["distill.on_policy_fraction=1.5"], "distill.on_policy_fraction: must be in [0, 1], got 1.5"),
    (ON_POLICY, ["distill.on_policy_fraction=-0.1"], "distill.on_policy_fraction: must be in [0, 1], got -0.1"),
    (LIVE, ["distill.sequence_dir=/tmp/x"], "distill.sequence_dir: only read by mode sequence, not 'live'; remove it"),
    (SEQUENCE, ["distill.on_policy_fraction=0.5"], "distill.on_policy_fraction: only read by mode on_policy, not 'sequence'; "
     "remove it"),
    (ON_POLICY, ["distill.top_k=8"], "distill.top_k: only read by mode cached, not 'on_policy'; remove it"),
    (LIVE, ["distill.sampling.max_new_tokens=8"], "distill.sampling.max_new_tokens: only read by mode sequence / on_policy, "
     "not 'live'; remove it"),
    (ON_POLICY, ["distill.sampling.num_return_sequences=2"], "distill.sampling.num_return_sequences: only read by mode "
     "sequence, not 'on_policy'; remove it"),
    (ON_POLICY, ["distill.alpha_ce=0.5", "distill.weight_kd=0"], "distill.weight_kd: mode on_policy trains the KD term on "
     "the student's own samples (no CE there); set distill.weight_kd > 0"),
    (SEQUENCE, ["data.completion_only_loss=false"], "data.completion_only_loss: mode sequence splits each record into prompt "
     "and completion at its first trained token; set data.completion_only_loss=true"),
    (LIVE, ["data.kind=sft", "distill.mode=cached"], "distill.mode: cached stores top-k targets for packed blocks, not "
     "data.kind sft; use distill.mode live, sequence or on_policy for SFT data"),
    (LIVE, ["data.max_seq_length=64"], "data.max_seq_length: only read by kind sft, not 'blocks'; remove it"),
    (SEQUENCE, ["data.packing=true"], "data.packing: not supported by distill yet (the teacher would need the block-diagonal "
     "masks finetune checks); set data.packing=false (length-grouped batches are used)"),
]


@pytest.mark.parametrize("recipe, over, expected", BAD, ids=[" ".join(o) for _, o, _ in BAD])
def test_bad_inputs_are_one_line(recipe, over, expected, teacher_dir, sft_files, tmp_path):
    data = sft_data(sft_files) + ([f"data.chat_template={TEMPLATE}"] if "data.kind=sft" in over else [])
    with pytest.raises(ConfigError) as e:
        cfg_for(recipe, teacher_dir, tmp_path / "out", *(data if recipe != LIVE or "data.kind=sft" in over else []), *over)
    assert [p.split(": ", 1)[1] for p in e.value.problems] == [expected]
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_exits_2_with_one_line(teacher_dir, tmp_path, capsys):
    rc = cli.main(["distill", str(ON_POLICY), f"teacher.name_or_path={teacher_dir}", f"output_dir={tmp_path / 'out'}",
                   "distill.on_policy_fraction=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert err[0].endswith("distill.on_policy_fraction: must be in [0, 1], got 2.0")
    assert not (tmp_path / "out").exists()

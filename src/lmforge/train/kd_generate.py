"""Generated completions for distillation: the teacher's for sequence-level KD, the student's for on-policy KD.

    SamplingConfig     the recipe group ``distill.sampling``: max_new_tokens, do_sample, temperature, top_p, ...
    generate_completions   prompts (token ids) -> completions (token ids, through the first EOS), seeded
    build_sequences    sequence-level KD (Kim & Rush, 2016): the teacher's completions for every training
                       prompt, written as a ``datasets`` folder (``load_from_disk``)
    sequence_rows      that folder -> SFT training rows (input_ids, labels: -100 on the prompt)
    on_policy_step     whether optimizer step s is on-policy: a seeded coin per step, a pure function of (seed, s)
    OnPolicyBatches    a batch source (``get(k)``) that, on on-policy steps, replaces the data's completions by
                       the student's own samples (GKD, Agarwal et al., 2023)

Prompts come from SFT rows (``datasets.sft``): the prompt of a row is its tokens before the first trained
label (``labels != -100``), so prompt/completion and chat records split the same way (a chat record's
prompt is the conversation up to its first assistant turn). Completions are what the model wrote after
the prompt, ending with its EOS when it stopped within ``max_new_tokens`` and cut there otherwise; a
training row is ``prompt + completion`` cut to ``max_length``, labels -100 on the prompt, so the CE and KD
terms count the completion tokens only.

Generation runs in eval mode under ``torch.no_grad`` and restores the model's train/eval mode after. It is
seeded without touching the training RNG streams (``torch.random.fork_rng``): the draws of a call depend
on its seed only, so reruns and resumed runs sample the same completions from the same weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import help_field
from lmforge.datasets.batching import IGNORE_INDEX, rows_of
from lmforge.train.kd_task import ON_POLICY_KEY

SEQUENCE_META = "kd_sequences.json"  # the fingerprint file inside a sequence folder
_SALT_STEP, _SALT_SAMPLE = 0x6B64_5354, 0x6B64_534D  # keep these seed streams apart from the batch samplers'


@dataclasses.dataclass
class SamplingConfig:
    max_new_tokens: int = help_field(64, help="Tokens generated per completion at most (a completion also ends at EOS).")
    do_sample: bool = help_field(True, help="Sample (true) or decode greedily (false).")
    temperature: float = help_field(1.0, help="do_sample: the sampling temperature (> 0); not distill.temperature, the KD softmax's.")
    top_p: float = help_field(1.0, help="do_sample: nucleus sampling, keep the smallest token set of this mass (0, 1]; 1: off.")
    num_return_sequences: int = help_field(1, help="mode sequence: completions generated per prompt (each a training row).")
    batch_size: int = help_field(16, help="mode sequence: prompts per generate call (with do_sample the draws depend on it).")

    def problems(self) -> list[str]:
        out = []
        if self.max_new_tokens < 1:
            out.append(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            out.append(f"temperature: must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            out.append(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.num_return_sequences < 1:
            out.append(f"num_return_sequences: must be >= 1, got {self.num_return_sequences}")
        if self.batch_size < 1:
            out.append(f"batch_size: must be >= 1, got {self.batch_size}")
        if not self.do_sample:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            out += [f"{key}: only read with do_sample true (greedy decoding ignores it); remove it or set do_sample=true"
                    for key in ("temperature", "top_p") if getattr(self, key) != defaults[key]]
            if self.num_return_sequences > 1:
                out.append(f"num_return_sequences: {self.num_return_sequences} greedy completions of a prompt are all the "
                           "same; set do_sample=true or num_return_sequences=1")
        return out


# ---------------------------------------------------------------------------------------------
# Prompts, completions, training rows


def prompt_ids(row: dict) -> list[int]:
    """The tokens of an SFT row before its first trained label (its prompt); [] when the row has none."""
    labels = list(row["labels"])
    first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    return [int(t) for t in list(row["input_ids"])[:first]]


def completion_row(prompt: Sequence[int], completion: Sequence[int], max_length: int) -> dict[str, list[int]]:
    """``prompt + completion`` cut to ``max_length``; labels -100 on the prompt (as ``datasets.sft`` encodes)."""
    ids = (list(prompt) + list(completion))[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + list(completion))[:max_length]
    return {"input_ids": ids, "labels": labels}


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Draws inside depend on ``seed`` only; the CPU (and this CUDA device's) RNG state is restored after."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield


def derive_seed(*parts: int) -> int:
    """One 32-bit seed from integers (numpy's SeedSequence: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _generation_config(sampling: SamplingConfig, pad_id: int, eos_id: int, n: int, vocab: int | None, rows: int):
    from transformers import GenerationConfig

    kw: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "do_sample": sampling.do_sample,
                          "num_return_sequences": n, "pad_token_id": pad_id, "eos_token_id": eos_id, "use_cache": True,
                          # explicit, so a model's own generation_config (top_k 50, a repetition penalty) changes nothing
                          "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    if sampling.do_sample:
        kw.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    if vocab is not None and rows > vocab:  # padded LM-head rows are no tokens: never emit them
        kw["suppress_tokens"] = list(range(vocab, rows))
    return GenerationConfig(**kw)


@torch.no_grad()
def generate_completions(model: torch.nn.Module, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                         pad_id: int, eos_id: int, seed: int, num_return_sequences: int = 1,
                         vocab: int | None = None) -> list[list[int]]:
    """Completions of ``prompts`` (left-padded into one batch), ``num_return_sequences`` per prompt in order
    (prompt 0's first, ...): each the generated ids through the first EOS, without padding.

    ``model`` is a plain (unwrapped) causal LM; it runs in eval mode and is put back in its former mode.
    ``vocab`` (the shared vocabulary size) keeps generated ids below it when the LM head has padded rows."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate_completions: empty prompt")
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (batch, width), left-padded
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    rows = head.weight.shape[0] if head is not None and getattr(head, "weight", None) is not None else 0
    config = _generation_config(sampling, pad_id, eos_id, num_return_sequences, vocab, rows)
    was_training = model.training
    model.eval()
    try:
        with seeded(seed, device):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    finally:
        model.train(was_training)
    completions = []
    for row in out[:, width:].tolist():  # (batch * n, new)
        completions.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return completions


# ---------------------------------------------------------------------------------------------
# Sequence-level KD: the teacher's completions, once, in a dataset folder


def prompts_fingerprint(prompts: Sequence[Sequence[int]]) -> str:
    """sha256 of the prompts' token ids, in order (row i of a sequence folder answers prompt i)."""
    h = hashlib.sha256(f"prompts={len(prompts)}".encode())
    for p in prompts:
        h.update(np.asarray(list(p) + [-1], dtype=np.int64).tobytes())  # -1 ends a prompt
    return h.hexdigest()


def build_sequences(folder: Path, teacher: torch.nn.Module, prompts: Sequence[Sequence[int]], tokenizer,
                    sampling: SamplingConfig, fingerprint: dict[str, Any], seed: int, vocab: int | None = None,
                    progress: bool = True) -> None:
    """The teacher's completions of every prompt -> ``folder`` (``save_to_disk``) with ``SEQUENCE_META``.

    Rows, ``num_return_sequences`` per prompt in prompt order: ``prompt`` and ``completion`` (text; special
    tokens dropped from the completion), ``prompt_ids``, ``completion_ids``, ``source_row`` (the prompt's row
    in the training data) and ``sample`` (0..n-1). Prompts are generated longest first in batches of
    ``sampling.batch_size`` (little padding); batch b is seeded with (seed, b). Written to ``folder.tmp``
    and renamed when complete."""
    import datasets
    from tqdm.auto import tqdm

    n = sampling.num_return_sequences
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    found: dict[int, list[list[int]]] = {}
    starts = range(0, len(order), sampling.batch_size)
    for b, start in enumerate(tqdm(starts, desc="teacher completions", disable=not progress)):
        idx = order[start:start + sampling.batch_size]
        outs = generate_completions(teacher, [prompts[i] for i in idx], sampling, pad_id=tokenizer.pad_token_id,
                                    eos_id=tokenizer.eos_token_id, seed=derive_seed(seed, b, _SALT_SAMPLE),
                                    num_return_sequences=n, vocab=vocab)
        for j, i in enumerate(idx):
            found[i] = outs[j * n:(j + 1) * n]
    cols: dict[str, list] = {"prompt": [], "completion": [], "prompt_ids": [], "completion_ids": [], "source_row": [],
                             "sample": []}
    for i, p in enumerate(prompts):
        for s, c in enumerate(found[i]):
            cols["prompt"].append(tokenizer.decode(list(p)))
            cols["completion"].append(tokenizer.decode(c, skip_special_tokens=True))
            cols["prompt_ids"].append(list(p))
            cols["completion_ids"].append(c)
            cols["source_row"].append(i)
            cols["sample"].append(s)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    features = datasets.Features({
        "prompt": datasets.Value("string"), "completion": datasets.Value("string"),
        "prompt_ids": datasets.Sequence(datasets.Value("int32")), "completion_ids": datasets.Sequence(datasets.Value("int32")),
        "source_row": datasets.Value("int64"), "sample": datasets.Value("int32")})
    datasets.Dataset.from_dict(cols, features=features).save_to_disk(str(tmp))
    (tmp / SEQUENCE_META).write_text(json.dumps({"fingerprint": fingerprint}, indent=1))
    if folder.exists():
        shutil.rmtree(folder)  # only an empty folder reaches here (the stage checked it)
    tmp.rename(folder)


def sequence_rows(sequences, max_length: int):
    """A sequence folder's rows as SFT training rows (input_ids, labels), cut to ``max_length``, in memory
    (the folder itself gets no cache files)."""
    def to_row(r):
        return completion_row(r["prompt_ids"], r["completion_ids"], max_length)

    return sequences.map(to_row, remove_columns=sequences.column_names, keep_in_memory=True, desc="sequence rows")


# ---------------------------------------------------------------------------------------------
# On-policy KD: the student's own completions on a seeded fraction of the steps


def on_policy_step(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step ``step`` (0-based) trains on the student's own completions: a coin with
    P(on-policy) = ``fraction``, seeded by (seed, step) alone, so reruns and resumes decide alike."""
    if fraction <= 0:
        return False
    return bool(np.random.default_rng([seed, step, _SALT_STEP]).random() < fraction)


class OnPolicyBatches:
    """A batch source over SFT rows (``base``: a RankBatches / LengthGroupedBatches, for its ``indices(k)``):
    micro-batch k belongs to optimizer step k // gas; on an on-policy step each row's completion is replaced
    by one the ``student`` samples for its prompt now, and the batch carries ``ON_POLICY_KEY``.

    ``student`` is the unwrapped module the loop trains (the same parameters the prepared wrapper updates),
    so every micro-batch of a step samples from the weights at the start of that step. Generation has no
    collectives: each rank samples its own rows. ``generated`` lists the steps (1-based, as the loop counts
    them) that this source made on-policy."""

    def __init__(self, base, student: torch.nn.Module, collate: Callable[[list[dict]], dict], *, fraction: float,
                 seed: int, gradient_accumulation_steps: int, sampling: SamplingConfig, pad_id: int, eos_id: int,
                 max_length: int, vocab: int | None = None, rank: int = 0):
        self.base, self.dataset, self.student, self.collate = base, base.dataset, student, collate
        self.fraction, self.seed, self.gas, self.sampling = fraction, seed, gradient_accumulation_steps, sampling
        self.pad_id, self.eos_id, self.max_length, self.vocab, self.rank = pad_id, eos_id, max_length, vocab, rank
        self.generated: list[int] = []

    def is_on_policy(self, step: int) -> bool:
        return on_policy_step(self.seed, step, self.fraction)

    def get(self, k: int) -> dict[str, torch.Tensor]:
        rows = rows_of(self.dataset, self.base.indices(k))
        step = k // self.gas
        if not self.is_on_policy(step):
            return self.collate(rows)
        prompts = [prompt_ids(r) for r in rows]
        completions = generate_completions(self.student, prompts, self.sampling, pad_id=self.pad_id, eos_id=self.eos_id,
                                           seed=derive_seed(self.seed, k, self.rank, _SALT_SAMPLE), vocab=self.vocab)
        batch = self.collate([completion_row(p, c, self.max_length) for p, c in zip(prompts, completions)])
        batch[ON_POLICY_KEY] = torch.tensor(True)
        if not self.generated or self.generated[-1] != step + 1:
            self.generated.append(step + 1)
        return batch

"""Generation on held-out SFT prompts: greedy completions scored against the references.

Records are the finetune stage's (``lmforge.datasets.sft``): prompt/completion (the prompt is encoded exactly
as in training, ``[bos] + prompt tokens``; the reference is the completion) or chat (every message but the
last, rendered with the chat template and its generation prompt; the reference is the last, assistant,
message). The model decodes greedily until EOS or ``max_new_tokens``; the prediction is the decoded new
tokens without special tokens. Metrics: :data:`lmforge.evaluation.metrics.GENERATION_METRICS`.
"""

from __future__ import annotations

import dataclasses

import torch

from lmforge.config import UserError, help_field, missing_files
from lmforge.datasets.batching import IGNORE_INDEX


@dataclasses.dataclass
class GenerationGroup:
    files: list[str] = help_field([], help="JSONL prompt/completion or chat records (held-out SFT data; empty: no generation metrics).")
    prompt_key: str = help_field("prompt", help="Column of the prompt (prompt/completion records).")
    completion_key: str = help_field("completion", help="Column of the reference (prompt/completion records).")
    messages_key: str = help_field("messages", help="Column of the chat messages (chat records).")
    chat_template: str | None = help_field(None, help="A Jinja chat template or a .jinja file for chat records (default: the tokenizer's).")
    metrics: list[str] = help_field(["exact_match", "rouge_l", "chrf", "bleu"], help="exact_match, rouge_l, chrf, bleu.")
    max_new_tokens: int = help_field(32, help="Most new tokens per completion (greedy; stops at EOS).")
    max_examples: int | None = help_field(None, help="Score only the first N records.")
    batch_size: int = help_field(8, help="Prompts per generate call (left-padded).")
    show: int = help_field(5, help="Examples (prompt, reference, prediction) written to metrics.json and report.md.")

    @property
    def enabled(self) -> bool:
        return bool(self.files)

    def problems(self) -> list[str]:
        from pathlib import Path

        from lmforge.evaluation.metrics import metric_problems

        out = missing_files("files", self.files)
        out += metric_problems(self.metrics)
        if self.enabled and not self.metrics:
            out.append("metrics: empty; name at least one of exact_match, rouge_l, chrf, bleu")
        out += [f"{k}: must be >= 1, got {getattr(self, k)}" for k in ("max_new_tokens", "batch_size")
                if getattr(self, k) < 1]
        if self.max_examples is not None and self.max_examples < 1:
            out.append(f"max_examples: must be >= 1, got {self.max_examples}")
        if self.show < 0:
            out.append(f"show: must be >= 0, got {self.show}")
        if self.chat_template and self.chat_template.endswith(".jinja") and not Path(self.chat_template).is_file():
            out.append(f"chat_template: '{self.chat_template}' does not exist; give a template file or the template text")
        return out


def prompts(cfg: GenerationGroup, tokenizer) -> list[dict]:
    """[{'prompt_ids', 'prompt', 'reference'}] from the records of generation.files."""
    from lmforge.datasets.sft import (
        SFTDataConfig,
        detect_format,
        encode_prompt_completion,
        expand,
        read_records,
        set_chat_template,
    )

    keys = SFTDataConfig(prompt_key=cfg.prompt_key, completion_key=cfg.completion_key, messages_key=cfg.messages_key,
                         chat_template=cfg.chat_template)
    set_chat_template(tokenizer, keys)
    out = []
    for path in expand(cfg.files):
        rows = read_records(path)
        fmt = detect_format(rows, keys, path)
        if fmt == "classification":
            raise UserError(f"generation.files: {path}: text/label records are for classification.files, not generation")
        if fmt == "chat" and not tokenizer.chat_template:
            raise UserError("generation.chat_template: chat records need a chat template and the tokenizer has none; "
                            "set generation.chat_template")
        for r in rows:
            if fmt == "chat":
                messages = r[cfg.messages_key]
                if not messages or messages[-1].get("role") != "assistant":
                    raise UserError(f"generation.files: {r['_where']}: the last message must be the assistant's (the reference)")
                ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
                prompt, reference = tokenizer.decode(ids), str(messages[-1]["content"])
            else:
                prompt, reference = str(r[cfg.prompt_key]), str(r[cfg.completion_key])
                enc = encode_prompt_completion(tokenizer, prompt, reference)  # the prompt exactly as finetune trained it
                ids = enc["input_ids"][: sum(1 for x in enc["labels"] if x == IGNORE_INDEX)]
            out.append({"prompt_ids": list(ids), "prompt": prompt, "reference": reference})
    return out[: cfg.max_examples] if cfg.max_examples is not None else out


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions (new tokens only, special tokens dropped, stripped), prompts left-padded per batch."""
    from lmforge.datasets.batching import PadCollator
    from lmforge.evaluation.lm import model_device

    pad = PadCollator(tokenizer.pad_token_id, pad_to_multiple_of=1, padding_side="left")
    device = model_device(model)
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = {k: v.to(device) for k, v in pad([{"input_ids": p} for p in prompt_ids[start:start + batch_size]]).items()}
        new = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)[:, batch["input_ids"].shape[1]:]  # (batch, new)
        out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


def score(model, tokenizer, cfg: GenerationGroup) -> tuple[dict[str, float], list[dict]]:
    """(metrics, the first generation.show examples with their predictions)."""
    from lmforge.evaluation.metrics import generation_metrics

    items = prompts(cfg, tokenizer)
    if not items:
        raise UserError(f"generation.files: no record in {cfg.files}")
    predictions = generate(model, tokenizer, [i["prompt_ids"] for i in items], cfg.max_new_tokens, cfg.batch_size)
    metrics = generation_metrics(predictions, [i["reference"] for i in items], cfg.metrics)
    shown = [{"prompt": i["prompt"], "reference": i["reference"], "prediction": p}
             for i, p in list(zip(items, predictions))[: cfg.show]]
    return metrics, shown

"""`lmforge generate MODEL_DIR --prompt TEXT`: a quick look at what a (fine-tuned) model writes.

MODEL_DIR is a plain model folder (``pretrain``'s or ``finetune``'s ``final/``, an exported ``merged/``)
or an adapter folder (``adapter_config.json``): then the base named in it (or ``--base``) is loaded
and the adapter applied. The prompt is fed as is — exactly how prompt/completion SFT data was
formatted — or, with ``--chat``, rendered with the tokenizer's chat template as one user turn.

    lmforge generate outputs/tiny/finetune_lora/final --prompt $'Question: Add 2 and 3.\\nAnswer: '
    lmforge generate outputs/tiny/finetune_lora/final --chat --prompt 'Add 2 and 3.' --max-new-tokens 16
"""

from __future__ import annotations

import argparse

import torch

from lmforge.config import UserError
from lmforge.models import load_for_generation


@torch.no_grad()
def generate(model, tokenizer, prompt: str, *, chat: bool = False, system: str | None = None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> str:
    """The model's continuation of ``prompt`` (special tokens dropped); greedy when temperature is 0."""
    if chat:
        if not tokenizer.chat_template:
            raise UserError("--chat: this tokenizer has no chat template; drop --chat and format the prompt yourself")
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids  # as SFT formatted its prompts
    input_ids = torch.tensor([list(ids)])  # (1, prompt_len)
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None, top_k=None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lmforge generate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="model folder or adapter folder")
    ap.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for several)")
    ap.add_argument("--chat", action="store_true", help="render the prompt as a user turn with the chat template")
    ap.add_argument("--system", default=None, help="system message (with --chat)")
    ap.add_argument("--base", default=None, help="base model for an adapter folder (default: the one it names)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens: must be >= 1")
    model, tokenizer = load_for_generation(args.model_dir, args.base, args.dtype)
    for prompt in args.prompt:
        text = generate(model, tokenizer, prompt, chat=args.chat, system=args.system, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        print(f"--- prompt: {prompt!r}\n{text}")
    return 0

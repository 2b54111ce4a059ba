"""`lmforge inspect attention MODEL_DIR --text TEXT`: heatmaps of a causal LM's attention on one text.

MODEL_DIR is a model folder or an adapter folder, as for ``lmforge generate``. The text is tokenized as
``generate`` feeds a prompt (BOS first when the tokenizer adds one) and run once with eager attention, so
the weights are the softmax probabilities each query token (row) puts on each key token (column).

    lmforge inspect attention outputs/tiny/pretrain/final --text 'def add(a, b):'             # layers x heads
    lmforge inspect attention outputs/tiny/pretrain/final --text 'def add(a, b):' --layer 1   # one layer's heads
    lmforge inspect attention outputs/tiny/pretrain/final --text 'def add(a, b):' --layer 1 --head 0 --out a.png

With only ``--layer`` the PNG shows every head of that layer, with only ``--head`` that head in every layer,
with neither a grid of layers x heads (at most 8 x 8, evenly spaced when the model has more, and it says
so). The PNG goes to ``attention[_L{layer}][_H{head}].png`` in the current folder unless ``--out`` says
otherwise; an existing file is kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from lmforge.config import UserError
from lmforge.models import load_for_generation

MAX_ROWS = 8  # layers shown in the layers x heads grid (evenly spaced when the model has more)
MAX_COLS = 8  # heads shown in a grid row


def _token_ids(tokenizer, text: str) -> list[int]:
    """As ``lmforge generate`` feeds a prompt: no special tokens but the BOS the tokenizer asks for."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def _label(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([token_id])
    return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423") or f"<{token_id}>"  # ␣ marks a space


@torch.no_grad()
def attention_maps(model, tokenizer, text: str, max_tokens: int | None = None) -> tuple[list[str], torch.Tensor]:
    """(token labels, attention probabilities of shape (layers, heads, seq, seq)), row = query, column = key."""
    if not text.strip():
        raise UserError("--text: is empty; give the text whose attention to show, e.g. --text 'def add(a, b):'")
    ids = _token_ids(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if hasattr(model, "set_attn_implementation"):  # sdpa / flash kernels never materialise the probabilities
        model.set_attn_implementation("eager")
    input_ids = torch.tensor([ids])  # (1, seq)
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_attentions=True, use_cache=False)
    if not out.attentions:
        raise UserError(f"MODEL_DIR: {type(model).__name__} returns no attention weights (it may have no attention layers); "
                        "inspect attention needs a transformer with softmax attention")
    maps = torch.stack([a[0] for a in out.attentions]).float().cpu()  # (layers, heads, seq, seq)
    return [_label(tokenizer, i) for i in ids], maps


def _check_index(name: str, value: int | None, count: int, what: str) -> None:
    if value is not None and not 0 <= value < count:
        raise UserError(f"--{name}: {value} is out of range; this model has {count} {what} (0..{count - 1})")


def _pick(count: int, most: int) -> list[int]:
    """``count`` indices, or ``most`` of them evenly spaced, first and last included."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def panels_for(layer: int | None, head: int | None, n_layers: int, n_heads: int) -> tuple[list[tuple[int, int]], int, str]:
    """Which (layer, head) maps to draw, how many per row, and a note when the grid was capped."""
    if layer is not None and head is not None:
        return [(layer, head)], 1, ""
    if layer is not None or head is not None:  # one layer's heads, or one head in every layer: rows of MAX_COLS
        count, what = (n_heads, "heads") if layer is not None else (n_layers, "layers")
        picked = _pick(count, MAX_ROWS * MAX_COLS)
        note = (f"showing {len(picked)} of {count} {what} (at most {MAX_ROWS * MAX_COLS}): {', '.join(map(str, picked))}"
                if len(picked) < count else "")
        panels = [(layer, i) for i in picked] if layer is not None else [(i, head) for i in picked]
        return panels, min(len(panels), MAX_COLS), note
    layers, heads = _pick(n_layers, MAX_ROWS), _pick(n_heads, MAX_COLS)
    note = ""
    if len(layers) < n_layers or len(heads) < n_heads:
        note = (f"showing layers {', '.join(map(str, layers))} of {n_layers} and heads {', '.join(map(str, heads))} "
                f"of {n_heads} (at most {MAX_ROWS} x {MAX_COLS} maps); pass --layer L or --head H to see the others")
    return [(i, h) for i in layers for h in heads], len(heads), note


def plot(tokens: list[str], maps: torch.Tensor, panels: list[tuple[int, int]], cols: int, path: Path, title: str) -> None:
    """One heatmap per (layer, head), ``cols`` to a row, on one 0..1 colour scale; token labels on the outer axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq = len(tokens)
    rows = math.ceil(len(panels) / cols)
    cell = max(6.0, 0.14 * seq) if len(panels) == 1 else 3.2 if len(panels) <= 8 else 2.4  # inches per map
    fontsize = min(9.0, 0.8 * cell * 72 / seq)  # a label's height must fit its row
    labels = fontsize >= 3.0  # below that they are noise: the maps alone
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 1.5, cell * rows + 1.0), squeeze=False, layout="constrained")
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.axis("off")
            continue
        layer, head = panels[k]
        r, c = divmod(k, cols)
        image = ax.imshow(maps[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"layer {layer} head {head}", fontsize=8)
        ax.set_xticks(range(seq) if labels else [])
        ax.set_yticks(range(seq) if labels else [])
        if labels:
            bottom = r == rows - 1 or k + cols >= len(panels)  # nothing drawn below this map
            ax.set_xticklabels(tokens if bottom else [], rotation=90, fontsize=fontsize)
            ax.set_yticklabels(tokens if c == 0 else [], fontsize=fontsize)
        ax.tick_params(length=0)
    axes[0][0].set_ylabel("query", fontsize=8)
    axes[-1][0].set_xlabel("key (attended to)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def attention_cli(args: argparse.Namespace) -> int:
    layer, head = args.layer, args.head
    suffix = (f"_L{layer}" if layer is not None else "") + (f"_H{head}" if head is not None else "")
    out = Path(args.out) if args.out else Path(f"attention{suffix}.png")
    if out.suffix.lower() != ".png":
        raise UserError(f"--out: '{out}' does not end in .png; give a PNG path, e.g. --out attention.png")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out: '{out}' exists; pass --overwrite to replace it, or choose another --out")
    if args.max_tokens < 1:
        raise UserError("--max-tokens: must be >= 1")
    if not args.text.strip():
        raise UserError("--text: is empty; give the text whose attention to show, e.g. --text 'def add(a, b):'")

    model, tokenizer = load_for_generation(args.model_dir, args.base, args.dtype)
    n_tokens = len(_token_ids(tokenizer, args.text))
    if n_tokens > args.max_tokens:  # causal attention: the first tokens' maps do not depend on the rest
        print(f"note: the text is {n_tokens} tokens; showing the first {args.max_tokens} (--max-tokens)")
    tokens, maps = attention_maps(model, tokenizer, args.text, max_tokens=args.max_tokens)
    n_layers, n_heads = maps.shape[:2]
    _check_index("layer", layer, n_layers, "layers")
    _check_index("head", head, n_heads, "heads")

    panels, cols, note = panels_for(layer, head, n_layers, n_heads)
    if note:
        print(f"note: {note}")
    where = (f"layer {layer}" if layer is not None else "all layers") + (f", head {head}" if head is not None else "")
    title = f"{Path(args.model_dir).name or args.model_dir}: attention, {where} ({len(tokens)} tokens)"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(tokens, maps, panels, cols, out, title)
    print(out)
    return 0


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lmforge inspect", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="what", required=True, metavar="attention")
    att = sub.add_parser("attention", help="heatmaps of the attention probabilities on one text")
    att.add_argument("model_dir", help="model folder or adapter folder")
    att.add_argument("--text", required=True, help="the text to run through the model")
    att.add_argument("--layer", type=int, default=None, help="one layer (default: a grid of layers x heads)")
    att.add_argument("--head", type=int, default=None,
                     help="one head (with --layer: one map; alone: that head in every layer)")
    att.add_argument("--out", default=None, help="PNG to write (default: attention[_L{layer}][_H{head}].png here)")
    att.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    att.add_argument("--max-tokens", type=int, default=64, help="show at most this many tokens (labels stay readable)")
    att.add_argument("--base", default=None, help="base model for an adapter folder (default: the one it names)")
    att.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    return attention_cli(args)

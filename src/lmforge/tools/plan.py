"""`lmforge plan RECIPE.yaml --gpus N --gpu-memory 80GB [--nodes M]`: which hardware layout fits, before you rent it.

    recipe -> parameter count (meta weights, nothing allocated) -> bytes per device for each layout
           -> table -> the fastest layout that fits, with its `accelerate launch` command

The recipe is read with its own stage's schema (so overrides work as for the stage itself:
``lmforge plan recipes/llama-125m/pretrain.yaml train.per_device_train_batch_size=32 --gpus 8``).

Memory per device, in bytes. P = parameters, N = data-parallel ranks (gpus x nodes), w = bytes of a
weight in the compute dtype (2 under bf16/fp16, 4 in fp32), L = the largest single module's own
parameters (DeepSpeed's "largest layer"), AdamW keeps two fp32 moments (8 bytes/param):

    layout            weights                     gradients                 optimizer
    DDP               4P (+2P autocast copies)    4P + 4P DDP buckets(*)    8P
    ZeRO-1            wP                          wP + 4P/N (fp32 part)     12P/N
    ZeRO-2            wP                          wP/N + 4P/N               12P/N
    ZeRO-3            wP/N + 2wL (gathered)       4P/N                      12P/N
    ZeRO-3 + offload  2wL on the GPU; everything else in CPU RAM (DeepSpeed: 18P/nodes x 1.5 per node)
    FSDP FULL_SHARD   4P/N + w(root + 2 blocks)   4P/N + w(root + block)    8P/N
    FSDP SHARD_GRAD_OP 4P/N + wP                  4P/N + w*block            8P/N

(*) with one device there is no DDP and no bucket copy: 16 bytes/param in fp32, what
tests/test_plan.py measures as the peak RSS of a CPU run.
ZeRO's sharded part is DeepSpeed's own accounting (``estimate_zero2/3_model_states_mem_needs``): fp32
master weights 4 + AdamW moments 8 + the fp32 gradient partition 4, plus the 16-bit gradients (whole
under ZeRO-1, partitioned under ZeRO-2, reduced straight into the fp32 partition under ZeRO-3). With
w = 2, ZeRO-2 is DeepSpeed's ``2P + 18P/N`` and ZeRO-3 its ``4L + 18P/N`` exactly; tests/test_plan.py
checks that against DeepSpeed's estimators.
accelerate's DDP and FSDP keep fp32 weights (autocast / FSDP MixedPrecision cast to bf16 on the fly).

Activations, per layer of a Llama-style block with SDPA attention, in elements of the activation dtype:
``s*b*(8h + 2h_kv + 4I)``: each of the two RMSNorms keeps its input, the normalised input and its output
(3h each), attention keeps q (h), k and v (h_kv each) and its output (h), the MLP its gate, activation,
up and product (4I); eager attention adds ``2*b*heads*s^2``. (Counted against autograd's saved tensors
of a real forward: within 1% per layer.) The LM head keeps the logits plus
an fp32 copy and its gradient: ``b*s*V*(a + 8)`` bytes. With gradient checkpointing only each layer's
input (``s*b*h``) is kept, plus one layer recomputed at a time. One more layer's worth is added as the
backward working set. This is the textbook estimate (Korthikanti et al. 2022, adapted to SwiGLU and
GQA); allocator fragmentation and communication buffers are covered by the headroom (10% of the
device plus 1 GiB for the CUDA context).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Any

from lmforge.config import UserError, apply_overrides, from_dict, read_yaml

GiB = 1024**3
HEADROOM_FRACTION = 0.10
CONTEXT_BYTES = 1 * GiB  # CUDA context + NCCL buffers, roughly

# ---------------------------------------------------------------------------------------------
# The model's shape, from its config, without allocating weights


@dataclasses.dataclass
class ModelShape:
    model_type: str
    params: int          # unique parameters (tied embeddings counted once)
    largest_layer: int   # the largest module's own parameters (DeepSpeed's definition)
    block: int           # one transformer block (FSDP's wrap unit)
    root: int            # parameters outside the blocks (embeddings, final norm, LM head)
    layers: int
    hidden: int
    kv_hidden: int
    intermediate: int
    heads: int
    vocab: int


def _attr(cfg, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def shape_from_config(hf_config) -> ModelShape:
    """Count parameters of ``AutoModelForCausalLM.from_config(hf_config)`` on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config)
    model.tie_weights()  # init_empty_weights re-creates each registered Parameter, undoing the embedding tie
    unique = {id(p): p.numel() for p in model.parameters()}  # meta tensors share data_ptr 0: use id
    params = sum(unique.values())
    seen: set[int] = set()
    largest = 0
    for m in model.modules():  # DeepSpeed's model_to_params: a module's own parameters, shared ones once
        own = [p for p in m.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        largest = max(largest, sum(p.numel() for p in own))
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:  # fall back to the longest ModuleList (the stack of layers)
        import torch

        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        blocks = list(max(lists, key=len)) if lists else []
    block = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(n for i, n in unique.items() if i not in in_blocks)

    hidden = int(_attr(hf_config, "hidden_size", "n_embd", "d_model", default=0))
    heads = int(_attr(hf_config, "num_attention_heads", "n_head", default=1))
    kv_heads = int(_attr(hf_config, "num_key_value_heads", default=heads))
    return ModelShape(
        model_type=str(getattr(hf_config, "model_type", "?")), params=params, largest_layer=largest,
        block=block, root=root, layers=int(_attr(hf_config, "num_hidden_layers", "n_layer", default=len(blocks))),
        hidden=hidden, kv_hidden=hidden * kv_heads // max(heads, 1),
        intermediate=int(_attr(hf_config, "intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden),
        heads=heads, vocab=int(_attr(hf_config, "vocab_size", default=0)),
    )


def shape_from_recipe(model_cfg, vocab_size: int | None = None) -> ModelShape:
    """The recipe's model as the stage builds it: vocabulary grown to the tokenizer's size when smaller."""
    from lmforge.models import build_model_config, load_tokenizer

    vocab = vocab_size
    if vocab is None:
        try:
            vocab = len(load_tokenizer(model_cfg))
        except (UserError, OSError, ValueError) as e:
            print(f"note: tokenizer not available here ({str(e).splitlines()[0]}); using the model config's "
                  "vocab_size (pass --vocab-size N to set it)", file=sys.stderr)
    hf_config = build_model_config(model_cfg, vocab_size=vocab)  # as the stage builds it
    if vocab is not None and vocab > (getattr(hf_config, "vocab_size", 0) or 0):
        hf_config.vocab_size = vocab  # the stage resizes the embeddings up to the tokenizer
    return shape_from_config(hf_config)


# ---------------------------------------------------------------------------------------------
# Bytes per device for each layout


@dataclasses.dataclass
class Layout:
    name: str
    config_file: str          # under accelerate_configs/
    speed: float              # relative throughput, for ranking only (DDP = 1.0)
    note: str = ""


# Fastest first. Rough single-node ranking: more sharding = more communication per step; offload adds
# PCIe traffic and a CPU optimizer step. Recomputation (gradient checkpointing) costs about a third more
# compute, so a layout is first tried without it.
LAYOUTS = [
    Layout("DDP", "ddp.yaml", 1.00, "full replica per device"),
    Layout("ZeRO-1", "deepspeed_zero1.yaml", 0.98, "optimizer states sharded"),
    Layout("ZeRO-2", "deepspeed_zero2.yaml", 0.96, "+ gradients sharded"),
    Layout("FSDP SHARD_GRAD_OP", "fsdp_shard_grad_op.yaml", 0.93, "ZeRO-2-like in PyTorch FSDP"),
    Layout("FSDP FULL_SHARD", "fsdp.yaml", 0.87, "ZeRO-3-like in PyTorch FSDP"),
    Layout("ZeRO-3", "deepspeed_zero3.yaml", 0.85, "+ weights sharded"),
    Layout("ZeRO-3 + offload", "deepspeed_zero3_offload.yaml", 0.40, "states in CPU RAM"),
]
RECOMPUTE_SPEED = 0.75


@dataclasses.dataclass
class Estimate:
    layout: Layout
    weights: float
    grads: float
    optimizer: float
    activations: float
    activations_ckpt: float
    cpu_per_node: float = 0.0

    @property
    def model_states(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations

    @property
    def total_ckpt(self) -> float:
        return self.model_states + self.activations_ckpt


def activation_bytes(shape: ModelShape, seq: int, micro_batch: int, act_bytes: int, checkpointing: bool,
                     eager_attention: bool = False) -> float:
    """Activation memory of one forward+backward on one device (see the module docstring)."""
    s, b = seq, micro_batch
    per_layer = s * b * (8 * shape.hidden + 2 * shape.kv_hidden + 4 * shape.intermediate)
    if eager_attention:
        per_layer += 2 * b * shape.heads * s * s
    per_layer *= act_bytes
    head = b * s * shape.vocab * (act_bytes + 8)  # logits, their fp32 copy, the gradient of the loss
    embed = s * b * shape.hidden * act_bytes
    if checkpointing:
        kept = shape.layers * s * b * shape.hidden * act_bytes + per_layer  # layer inputs + one recomputed
    else:
        kept = shape.layers * per_layer
    return kept + per_layer + head + embed  # + one layer of backward working set


def estimate(shape: ModelShape, *, n_gpus: int, n_nodes: int, precision: str, seq: int, micro_batch: int,
             eager_attention: bool = False) -> list[Estimate]:
    """Per-device bytes of every layout in LAYOUTS (see the table in the module docstring)."""
    P, N, L = shape.params, n_gpus * n_nodes, shape.largest_layer
    w = 4 if precision == "fp32" else 2
    autocast_copies = 0 if precision == "fp32" else 2 * P  # accelerate's autocast caches bf16 weight copies
    master_and_adam = 12 * P / N  # fp32 master weights + AdamW moments, sharded (ZeRO-1 and up)
    acts = {ck: activation_bytes(shape, seq, micro_batch, w, ck, eager_attention) for ck in (False, True)}
    rows = {
        "DDP": (4 * P + autocast_copies, (8 if N > 1 else 4) * P, 8 * P),
        "ZeRO-1": (w * P, w * P + 4 * P / N, master_and_adam),
        "ZeRO-2": (w * P, w * P / N + 4 * P / N, master_and_adam),
        "ZeRO-3": (w * P / N + 2 * w * L, 4 * P / N, master_and_adam),
        "ZeRO-3 + offload": (2 * w * L, 0.0, 0.0),
        "FSDP FULL_SHARD": (4 * P / N + w * (shape.root + 2 * shape.block), 4 * P / N + w * (shape.root + shape.block),
                            8 * P / N),
        "FSDP SHARD_GRAD_OP": (4 * P / N + w * P, 4 * P / N + w * shape.block, 8 * P / N),
    }
    out = []
    for lay in LAYOUTS:
        wt, gr, op = rows[lay.name]
        cpu = 18 * P / n_nodes * 1.5 if lay.name == "ZeRO-3 + offload" else 0.0  # DeepSpeed's estimate
        out.append(Estimate(lay, wt, gr, op, acts[False], acts[True], cpu))
    return out


@dataclasses.dataclass
class Choice:
    estimate: Estimate
    checkpointing: bool


def recommend(estimates: list[Estimate], usable: float, cpu_usable: float | None = None) -> Choice | None:
    """The fastest (layout, recompute?) whose total fits in ``usable`` bytes (and CPU RAM for offload)."""
    options = []
    for e in estimates:
        if cpu_usable is not None and e.cpu_per_node > cpu_usable:
            continue
        if e.total <= usable:
            options.append((e.layout.speed, Choice(e, False)))
        elif e.total_ckpt <= usable:
            options.append((e.layout.speed * RECOMPUTE_SPEED, Choice(e, True)))
    if not options:
        return None
    return max(options, key=lambda t: t[0])[1]  # max() keeps the first of equals: LAYOUTS order breaks ties


def usable_bytes(gpu_memory: float) -> float:
    return gpu_memory * (1 - HEADROOM_FRACTION) - CONTEXT_BYTES


def launch_command(choice: Choice, recipe: str, stage: str, n_gpus: int, n_nodes: int, precision: str,
                   overrides: list[str]) -> str:
    cfg = f"accelerate_configs/{choice.estimate.layout.config_file}"
    extra = list(overrides)
    if choice.checkpointing:
        extra.append("train.gradient_checkpointing=true")
    tail = " ".join([recipe, *extra])
    if choice.estimate.layout.name == "DDP" and n_gpus * n_nodes == 1:  # one device: no launcher needed
        mp = f" train.mixed_precision={precision}" if precision != "fp32" else ""
        return f"lmforge {stage} {tail}{mp}"
    if n_nodes > 1:
        return (f"ACCELERATE_CONFIG={cfg} sbatch --nodes {n_nodes} --gpus-per-node {n_gpus} "
                f"scripts/slurm_multinode.sh {stage} {tail}")
    mp = f" --mixed_precision {precision}" if precision != "fp32" else ""
    return f"accelerate launch --config_file {cfg} --num_processes {n_gpus}{mp} -m lmforge {stage} {tail}"


# ---------------------------------------------------------------------------------------------
# The command line


def parse_bytes(text: str) -> float:
    """'80GB', '80G', '80GiB', '24 gb', '512MB' -> bytes (GB/GiB both read as GiB, as GPU data sheets mean)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise UserError(f"memory size '{text}': expected a number with a unit, e.g. 80GB, 24GiB, 512MB")
    scale = {"": GiB, "k": 1024, "m": 1024**2, "g": GiB, "t": 1024**4}[m.group(2)]
    return float(m.group(1)) * scale


def _fmt(b: float) -> str:
    return f"{b / GiB:8.2f}"


def _peft_method(recipe: str, overrides: list[str]) -> str | None:
    """The recipe's ``peft.method`` when it trains only adapters (lora, ia3, ...), else None."""
    method = (apply_overrides(read_yaml(recipe), overrides).get("peft") or {}).get("method")
    return None if method in (None, "", "none", "full") else str(method)


def _recipe_config(recipe: str, overrides: list[str]) -> tuple[str, Any, Any, int]:
    """(stage, model config, train config, sequence length) of a training recipe.

    Only the sections the plan needs are parsed (strictly, with the stage's own dataclasses): the data
    files of a recipe need not exist on the machine where you plan it. `lmforge check` validates the rest."""
    import typing

    from lmforge.recipe import import_stage, recipe_stage

    raw = apply_overrides(read_yaml(recipe), overrides)
    stage = recipe_stage(recipe)
    hints = typing.get_type_hints(import_stage(stage).Config)
    if not {"model", "train", "data"} <= set(hints):
        raise UserError(f"{recipe}: the '{stage}' stage does not train a model; plan needs a training recipe")
    # The two sections, parsed strictly by the stage's own dataclasses (errors read `train.key: ...`).
    Part = dataclasses.make_dataclass("PlanPart", [(k, hints[k], dataclasses.field(default_factory=hints[k]))
                                                   for k in ("model", "train")])
    part = from_dict(Part, {k: raw[k] for k in ("model", "train") if k in raw}, source=recipe)
    model, train = part.model, part.train
    data_raw, data_cls = raw.get("data") or {}, hints["data"]
    defaults = {f.name: f.default for f in dataclasses.fields(data_cls)}
    for key in ("block_size", "max_seq_length", "max_length", "seq_len"):
        v = data_raw.get(key, defaults.get(key))
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return stage, model, train, v
    raise UserError(f"{recipe}: data.block_size (or data.max_seq_length): plan needs the sequence length")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmforge plan", description="Per-GPU memory of the recipe under each hardware layout; the fastest that fits.",
        epilog="example: lmforge plan recipes/llama-125m/pretrain.yaml --gpus 8 --gpu-memory 80GB",
    )
    p.add_argument("recipe", help="a training recipe (pretrain, finetune, ...)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, as for the stage")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB, 24GB (default 80GB)")
    p.add_argument("--cpu-memory", default=None, help="CPU RAM per node, checked for ZeRO-3 + offload (default: unchecked)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="default: the recipe's train.mixed_precision, else bf16")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size when the tokenizer is not available offline")
    return p


def cli(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come after the options too
    if args.gpus < 1 or args.nodes < 1:
        raise UserError("--gpus and --nodes: must be >= 1")
    stage, model_cfg, train_cfg, seq = _recipe_config(args.recipe, args.overrides)
    precision = args.precision or {"bf16": "bf16", "fp16": "fp16", "no": "fp32"}.get(train_cfg.mixed_precision or "", "bf16")
    gpu_mem = parse_bytes(args.gpu_memory)
    cpu_mem = parse_bytes(args.cpu_memory) if args.cpu_memory else None
    mb = train_cfg.per_device_train_batch_size
    shape = shape_from_recipe(model_cfg, args.vocab_size)
    eager = (model_cfg.attn_implementation or "sdpa") == "eager"
    rows = estimate(shape, n_gpus=args.gpus, n_nodes=args.nodes, precision=precision, seq=seq, micro_batch=mb,
                    eager_attention=eager)
    usable = usable_bytes(gpu_mem)

    # ---- report ----
    N = args.gpus * args.nodes
    print(f"lmforge plan: {args.recipe} ({stage})")
    print(f"  model: {shape.model_type}, {shape.params / 1e6:,.2f}M parameters, {shape.layers} layers, hidden {shape.hidden}, "
          f"vocab {shape.vocab}; largest layer {shape.largest_layer / 1e6:,.2f}M")
    print(f"  batch: micro-batch {mb} x sequence {seq} per device, {precision}, AdamW")
    print(f"  hardware: {args.nodes} node(s) x {args.gpus} GPU(s) = {N} rank(s); {gpu_mem / GiB:.0f} GiB per GPU, "
          f"{usable / GiB:.1f} GiB usable (10% headroom + 1 GiB context)")
    print()
    print(f"  {'per GPU, GiB':<20}{'weights':>9}{'grads':>9}{'optim':>9}{'activ.':>9}{'total':>9}"
          f"{'+ckpt act':>10}{'total':>9}  fits")
    for e in rows:
        fits = "yes" if e.total <= usable else ("with ckpt" if e.total_ckpt <= usable else "no")
        if e.cpu_per_node:
            cpu_note = f"  (CPU RAM/node {e.cpu_per_node / GiB:.1f} GiB"
            cpu_note += ", too much)" if cpu_mem is not None and e.cpu_per_node > cpu_mem else ")"
            fits += cpu_note
        print(f"  {e.layout.name:<20}{_fmt(e.weights)}{_fmt(e.grads)}{_fmt(e.optimizer)}{_fmt(e.activations)}"
              f" {_fmt(e.total)}{_fmt(e.activations_ckpt)} {_fmt(e.total_ckpt)}  {fits}")
    print()
    peft = _peft_method(args.recipe, args.overrides)
    if peft:
        print(f"  note: peft.method={peft}: these figures are for full training; with adapters only their "
              "parameters have gradients and optimizer states, so the need is lower (about weights + activations)")
    choice = recommend(rows, usable, cpu_mem)
    if choice is None:
        smallest = min(rows, key=lambda e: e.total_ckpt)
        print(f"  nothing fits: the smallest is {smallest.layout.name} with gradient checkpointing at "
              f"{smallest.total_ckpt / GiB:.1f} GiB per GPU; add GPUs/nodes, lower "
              "train.per_device_train_batch_size (raise gradient_accumulation_steps to keep the batch), or shorten sequences")
        return 1
    e = choice.estimate
    how = " with gradient checkpointing" if choice.checkpointing else ""
    print(f"  recommended: {e.layout.name}{how} ({e.layout.note}), "
          f"{(e.total_ckpt if choice.checkpointing else e.total) / GiB:.2f} GiB of {usable / GiB:.1f} GiB usable per GPU")
    print("    " + launch_command(choice, args.recipe, stage, args.gpus, args.nodes, precision, args.overrides))
    sys.stdout.flush()
    return 0


def estimate_recipe(recipe: str, overrides: list[str] | None = None, *, n_gpus: int = 1, n_nodes: int = 1,
                    precision: str = "bf16", vocab_size: int | None = None) -> tuple[ModelShape, list[Estimate]]:
    """The model shape and per-layout estimates of a recipe, for tests and benchmarks."""
    _, model_cfg, train_cfg, seq = _recipe_config(recipe, overrides or [])
    shape = shape_from_recipe(model_cfg, vocab_size)
    return shape, estimate(shape, n_gpus=n_gpus, n_nodes=n_nodes, precision=precision, seq=seq,
                           micro_batch=train_cfg.per_device_train_batch_size,
                           eager_attention=(model_cfg.attn_implementation or "sdpa") == "eager")

"""The one training loop every training stage shares (pretrain, finetune, distill, QAT).

A stage builds its model, datasets and :class:`~lmforge.train.tasks.Task`, then calls :func:`run`. The
loop knows nothing about hardware: ``accelerate`` decides devices, precision and the distributed
layout (DDP, DeepSpeed ZeRO, FSDP) from the accelerate config the job was launched with.

    acc = setup(cfg)                        # Accelerator, seed, output_dir guard, logging
    ... build model / data / task on `acc` ...
    result = run(acc, cfg, model, task, train_ds, val_ds)

``cfg`` is a stage recipe built on ``train.settings.TrainingRecipe``: the groups ``optim``,
``schedule``, ``train``, ``eval``, ``checkpoint``, ``log`` and the top-level keys ``output_dir``,
``seed``, ``resume``, ``overwrite``.

Loss normalisation: ``task.loss(model, batch)`` returns the *sum* of per-token losses and the token
count. The loop divides by the number of loss tokens in the whole accumulated global batch (all
micro-batches of all ranks), so gradient accumulation and data parallelism give the same gradient
as one big batch — not a mean of per-micro-batch means.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from lmforge import outputs
from lmforge.cards import command_line, environment_md, write_card
from lmforge.config import UserError, dump, to_dict
from lmforge.datasets.batching import RankBatches
from lmforge.optim.optimizers import build_optimizer, scaled_learning_rate
from lmforge.optim.param_groups import build_param_groups
from lmforge.optim.plateau import Plateau
from lmforge.optim.schedules import apply_lr, make_schedule
from lmforge.train import checkpoint
from lmforge.train.accel import full_numel, is_deepspeed, is_sharded, layout_info, make_accelerator
from lmforge.train.adversarial import Adversarial
from lmforge.train.ema import EMA
from lmforge.train.evaluate import evaluate
from lmforge.train.flops import flops_per_token, model_dims, peak_flops
from lmforge.train.grad_flow import GradFlow, plot_grad_flow
from lmforge.train.metrics import MetricsLog, available_trackers, flat_config
from lmforge.train.plots import plot_training
from lmforge.train.regularize import check_finite, early_stop
from lmforge.train.robust import StochasticDepth, add_grad_noise
from lmforge.train.save import save_model
from lmforge.train.tasks import Task

log = logging.getLogger("lmforge")



# ---------------------------------------------------------------------------------------------
# Setup: accelerator, seed, output folder


def setup(cfg) -> Any:
    """Create the Accelerator, seed everything, and guard ``output_dir``. Call before building the model
    (under DeepSpeed ZeRO-3 the Accelerator must exist first so weights are created sharded)."""
    from accelerate.utils import set_seed

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    out = Path(cfg.output_dir)
    # Every rank checks before anyone writes, so ranks agree.
    non_empty = out.is_dir() and any(p.name != outputs.LOCK for p in out.iterdir())
    if non_empty and cfg.resume == "none" and not cfg.overwrite:
        raise UserError(
            f"output_dir: '{out}' is not empty; pass resume=auto to continue that run, "
            "overwrite=true to replace it, or choose another output_dir"
        )
    replace = non_empty and cfg.overwrite and cfg.resume == "none"
    if replace:
        outputs.refuse_foreign(out)
    if cfg.resume == "auto" and non_empty:
        _check_resume(cfg, out)
    trackers = available_trackers(cfg.log.trackers)
    if cfg.train.malloc_mmap_threshold_kb is not None:  # before the model's weights exist
        from lmforge.train.malloc import set_mmap_threshold

        set_mmap_threshold(cfg.train.malloc_mmap_threshold_kb)
    from lmforge.train.precision import resolve_mixed_precision

    precision, why = resolve_mixed_precision(cfg.train.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")
    acc = make_accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps, mixed_precision=precision,
        project_dir=str(out), log_with=trackers, micro_batch_size=cfg.train.per_device_train_batch_size,
        max_grad_norm=cfg.optim.max_grad_norm,  # under DeepSpeed the engine clips: the recipe sets its value
        find_unused_parameters=cfg.train.stochastic_depth.rate > 0,  # a skipped block gets no gradient
    )
    if not acc.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    acc.lmforge_precision_reason = why  # read back into summary.json by run()
    log.info("mixed precision: %s (train.mixed_precision=%s: %s)", acc.mixed_precision, cfg.train.mixed_precision, why)
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    # one run per folder: the main process holds a lock for the life of the run; every rank learns the answer
    holder = outputs.acquire(out) if acc.is_main_process else None
    busy = acc.reduce(torch.tensor(float(holder is not None), device=acc.device), reduction="sum")
    if float(busy):
        raise UserError(f"output_dir: another lmforge run (pid {holder or '?'}) is writing into '{out}'; wait for it "
                        "to finish or choose another output_dir")
    if acc.is_main_process:
        if replace:  # set aside, not deleted: a failure before the new result exists puts it back
            outputs.release(out)
            outputs.set_aside(out)
            outputs.acquire(out)
        outputs.mark(out, getattr(cfg, "STAGE", "run"))
        dump(cfg, out / "recipe.yaml")
    acc.wait_for_everyone()
    set_seed(cfg.seed)
    return acc


def _check_resume(cfg, out: Path) -> None:
    """``resume=auto`` onto an existing run: refuse a changed recipe (naming the keys), say when there is
    nothing to do, and refuse to "continue" a finished run that kept no checkpoint."""
    ckpt = checkpoint.latest(out / "checkpoints")
    saved_path = ckpt / "recipe.yaml" if ckpt is not None else out / "recipe.yaml"
    if saved_path.exists():
        diff = outputs.changed_keys(outputs.read_recipe(saved_path), to_dict(cfg), defaults=to_dict(type(cfg)()))
        if diff:
            shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
            raise UserError(f"resume=auto: the recipe differs from the run in '{out}' ({saved_path.relative_to(out)}) "
                            f"in {shown}; resume with the same values, or start a new run (another output_dir, or overwrite=true)")
    summary = out / "summary.json"
    if not summary.exists():
        return
    s, T = json.loads(summary.read_text()), cfg.train.max_steps
    if (out / "final").exists() and (s.get("step", 0) >= T or s.get("stopped_early")):
        how = "stopped early" if s.get("stopped_early") and s.get("step", 0) < T else "complete"
        raise outputs.NothingToDo(f"{out}: the run is {how} already (step {s.get('step')} of train.max_steps={T}, "
                                  "final/ written); nothing to do. Raise train.max_steps to train further")
    if ckpt is None and s.get("step", 0) < T and not s.get("stopped_early") and s.get("final_dir"):
        raise UserError(f"resume=auto: the run in '{out}' finished at step {s.get('step')} and kept no checkpoint "
                        f"(checkpoint.save_every: 0), so it cannot continue to train.max_steps={T}; start a new run from "
                        f"its final/ (model.name_or_path={out / 'final'} and another output_dir)")


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path | None
    step: int
    train_loss: float | None
    eval: dict[str, float] = field(default_factory=dict)
    first_train_loss: float | None = None


def _param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def run(
    acc, cfg, model: torch.nn.Module, task: Task, train_data, eval_data=None, *,
    tokenizer=None,
    param_groups: list[dict] | None = None,
    batches: Any = None,
    save_final: bool = True,
    extra_files: dict[str, str] | None = None,
    end_training: bool = True,
    eval_parts: dict[str, Any] | None = None,
) -> RunResult:
    """Train ``model`` on ``task`` to ``cfg.train.max_steps`` (or ``stop_at_step``), evaluating,
    checkpointing and logging on the way; save ``output_dir/final`` (a PeftModel: its adapter alone)
    when the run completes or stops early. ``batches`` may replace the default
    :class:`~lmforge.datasets.batching.RankBatches` with any object whose ``get(k)`` returns this
    rank's k-th micro-batch (deterministic in k, so resume stays exact). ``end_training=False`` keeps
    the trackers and the process group alive for a stage that still has collective work to do.
    ``eval_parts`` ({name: dataset}, multi-task): evaluate each part; the eval row gets ``loss/<name>`` and
    ``perplexity/<name>`` beside the token-weighted overall values (``eval_data`` then only says whether to evaluate)."""
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    tc, T, gas = cfg.train, cfg.train.max_steps, cfg.train.gradient_accumulation_steps
    stop = tc.stop_at_step or T

    # 1) model, optimizer, schedule -------------------------------------------------------------
    if tc.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "config"):
            model.config.use_cache = False
    groups = param_groups if param_groups is not None else build_param_groups(model, cfg.optim)
    optimizer = build_optimizer(cfg.optim, groups)
    hf_config = getattr(model, "config", None)
    if tc.compile:
        # Inductor's deterministic mode skips the on-machine benchmarking that can pick other kernels from one
        # process to the next (seen here: two identical compiled runs differing in the 7th digit by step 5), so a
        # resumed compiled run matches the uninterrupted one; TORCHINDUCTOR_DETERMINISTIC=0 trades that for speed.
        import os

        import torch._inductor.config as inductor_config

        inductor_config.deterministic = os.environ.get("TORCHINDUCTOR_DETERMINISTIC", "1") == "1"
        # nn.Module.compile compiles in place: the module (and its state-dict keys, so checkpoints and
        # save_pretrained) stay as they were, unlike torch.compile's `_orig_mod.` wrapper
        model.compile()
        log.info("train.compile: the model is compiled by torch.compile; the first steps (and the first evaluation) "
                 "pay the compilation")
    # stochastic depth before prepare (it rebinds the blocks' forward, which every wrapper then calls)
    depth = StochasticDepth.maybe(tc.stochastic_depth, model, cfg.seed)
    model, optimizer = acc.prepare(model, optimizer)
    if tc.grad_noise.eta > 0 and is_deepspeed(acc):
        raise UserError("train.grad_noise: DeepSpeed clips and steps inside backward, leaving no point to add the noise "
                        "at; use accelerate_configs/ddp.yaml or multi_cpu.yaml, or set train.grad_noise.eta=0")
    flow = None
    if cfg.log.grad_flow_every:
        if is_deepspeed(acc) or is_sharded(acc):
            raise UserError("log.grad_flow_every: DeepSpeed and FSDP keep the gradients in their own partitions, so the "
                            "per-block picture is not available; use multi_cpu.yaml/ddp.yaml or set log.grad_flow_every: 0")
        flow = GradFlow(acc.unwrap_model(model), cfg.log.grad_flow_every)
    adversarial = None
    if tc.adversarial.method != "none":
        if is_deepspeed(acc):
            raise UserError("train.adversarial: DeepSpeed steps its engine inside each backward, and the adversarial "
                            "passes need several per micro-batch; use multi_cpu.yaml/ddp.yaml or method: none")
        adversarial = Adversarial(acc.unwrap_model(model), tc.adversarial)
    harness = cfg.eval.harness_tasks if eval_data is not None else []
    if harness:
        from lmforge.evaluation.harness import load_tasks

        if is_sharded(acc):
            raise UserError("eval.harness_tasks: lm-eval runs the whole model on one process, and ZeRO-3/FSDP keep it "
                            "sharded; evaluate the saved final/ with lmforge evaluate instead, or use another layout")
        if tokenizer is None:
            raise UserError(f"eval.harness_tasks: the {getattr(cfg, 'STAGE', 'run')} stage gives the loop no tokenizer")
        load_tasks(harness, cfg.eval.harness_include_path)  # an unknown task fails now, not at the first evaluation
    offload = tc.activation_offload and acc.device.type == "cuda"
    if tc.activation_offload and not offload:
        log.info("train.activation_offload: no effect on %s (activations already live in CPU memory)", acc.device)
    if getattr(task, "fused", None) is not None:
        if is_sharded(acc):
            raise UserError("train.loss_impl: fused_linear_ce needs the LM head's whole weight, which ZeRO-3 and FSDP keep "
                            "sharded outside its forward; use train.loss_impl: logits with this accelerate config")
        task.bind(acc.unwrap_model(model))
        log.info("train.loss_impl: fused_linear_ce (the logits of the training loss are never held whole)")
    peak_lr, rule = scaled_learning_rate(cfg.optim, tc.per_device_train_batch_size * gas * acc.num_processes)
    log.info("learning rate: %s", rule)
    lr_at = make_schedule(cfg.schedule, peak_lr, T, model_config=hf_config)
    plateau = Plateau.maybe(cfg.schedule)  # schedule.name: plateau scales lr_at by its reductions
    if plateau is not None and eval_data is None:
        raise UserError("schedule.name: plateau needs a validation set (it reduces the lr on the validation loss); "
                        "give the stage validation data or choose another schedule")
    ema = EMA.maybe(tc.ema, acc, model)  # registered for checkpointing before resume, so resume restores it
    if batches is None:
        batches = RankBatches(train_data, tc.per_device_train_batch_size, task.collate, cfg.seed, acc.process_index,
                              acc.num_processes)

    # 2) resume -----------------------------------------------------------------------------------
    state: dict[str, Any] = {"step": 0, "micro_batches": 0, "tokens_seen": 0, "best_eval_loss": None}
    resume_from = None
    if cfg.resume == "auto":
        resume_from = checkpoint.latest(ckpt_root)
    elif cfg.resume != "none":
        resume_from = Path(cfg.resume)
    if resume_from is not None:
        state = checkpoint.load(acc, resume_from)
        log.info("resumed from %s at step %d", resume_from, state["step"])
        if plateau is not None and "plateau" in state:
            plateau.load_state_dict(state["plateau"])
    resumed_step = state["step"] if resume_from else None
    metrics = MetricsLog(out / "metrics.jsonl", acc, resume_step=resumed_step)
    if acc.log_with:
        acc.init_trackers(cfg.log.project_name, config=flat_config(to_dict(cfg)))

    # 3) throughput bookkeeping -------------------------------------------------------------------
    unwrapped = acc.unwrap_model(model)
    n_params = sum(full_numel(p) for p in unwrapped.parameters())  # full sizes, also when ZeRO-3 shards them
    n_trainable = sum(full_numel(p) for p in unwrapped.parameters() if p.requires_grad)
    emb = unwrapped.get_input_embeddings() if hasattr(unwrapped, "get_input_embeddings") else None
    n_emb = full_numel(emb.weight) if emb is not None else 0
    layers, hidden = model_dims(hf_config) if hf_config is not None else (0, 0)
    seq_len = task.seq_len or (len(train_data[0]["input_ids"]) if "input_ids" in train_data.column_names else 0)
    fpt = flops_per_token(n_params - n_emb, layers, hidden, seq_len)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32)
    peak = tc.peak_flops or peak_flops(acc.device, dtype)
    log.info("model: %.2fM parameters (%.2fM trainable); %s on %d process(es), %s",
             n_params / 1e6, n_trainable / 1e6, type(model).__name__, acc.num_processes, acc.device)

    # 4) train --------------------------------------------------------------------------------------
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    pbar = tqdm(total=stop, initial=state["step"], desc="train", disable=not acc.is_local_main_process, dynamic_ncols=True)
    model.train()
    first_loss = last_loss = None
    window_loss = torch.zeros((), dtype=torch.float64, device=acc.device)
    window_tokens, window_input_tokens, window_time = 0.0, 0.0, 0.0
    last_eval: dict[str, float] = {}
    eval_every, save_every = cfg.eval.eval_every, cfg.checkpoint.save_every

    deepspeed = is_deepspeed(acc)
    clock = PhaseClock(acc.device)
    window_phases: dict[str, float] = {}
    profiler = Profiler(out / "profile", acc, tc.profile_steps) if tc.profile else None
    while state["step"] < stop:
        t0 = time.perf_counter()
        clock.start()
        step = state["step"]
        if flow is not None:
            flow.start(step + 1)
        lr = lr_at(step) if plateau is None else plateau.lr(lr_at(step))
        apply_lr(optimizer, lr)  # each group: lr * its lr_scale (layer-wise decay, per-module multipliers)
        micro = [batches.get(state["micro_batches"] + i) for i in range(gas)]
        micro = [{k: v.to(acc.device) for k, v in b.items()} for b in micro]
        # loss tokens (the normaliser), real input tokens and padded input positions, summed over ranks at once
        local = torch.tensor([[float(task.count_tokens(b)), float(task.input_tokens(b)), float(b["input_ids"].numel())]
                              for b in micro], dtype=torch.float64).sum(0).to(acc.device)
        global_tokens, input_tokens, padded_tokens = acc.reduce(local, reduction="sum").unbind()
        global_tokens = global_tokens.clamp_min(1.0)
        # accelerate divides by gas and DDP/DeepSpeed average over ranks: undo both so the gradient
        # is (sum of token losses over the global batch) / (its token count).
        scale = acc.num_processes * gas / global_tokens
        step_loss = torch.zeros((), dtype=torch.float64, device=acc.device)
        clock.lap("data")
        for i, b in enumerate(micro):
            if depth is not None:  # the blocks this micro-batch skips: a function of (seed, micro-batch index)
                depth.set_step(state["micro_batches"] + i)
            with acc.accumulate(model):
                def forward(b=b):
                    if offload:
                        with torch.autograd.graph.save_on_cpu(pin_memory=True):
                            return task.loss(model, b)
                    return task.loss(model, b)

                if adversarial is not None:  # its extra forward/backward passes, each normalised like the clean one
                    res = adversarial.step(forward, lambda loss, s=scale: acc.backward(loss * s.to(loss.dtype)))
                    step_loss += res["loss_sum"].detach().double()
                    clock.lap("adversarial")
                    continue
                res = forward()
                clock.lap("forward")
                if deepspeed:  # accelerate's DeepSpeed backward also steps the engine: check the loss before it
                    check_finite(acc, res["loss_sum"].detach().double(), step + 1, ckpt_root)
                acc.backward(res["loss_sum"] * scale.to(res["loss_sum"].dtype))
                step_loss += res["loss_sum"].detach().double()
                clock.lap("backward")
        check_finite(acc, step_loss, step + 1, ckpt_root)  # NaN/inf: stop before stepping or saving
        flow_row = flow.before_optimizer() if flow is not None else {}
        if is_deepspeed(acc):
            grad_norm = model.get_global_grad_norm()  # the engine stepped and clipped inside backward
        else:
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or float("inf"))
            if tc.grad_noise.eta > 0:  # after clipping; the same noise on every rank (seeded by step, not rank)
                add_grad_noise(model.parameters(), tc.grad_noise.eta, tc.grad_noise.gamma, step, cfg.seed)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["micro_batches"] += gas
        if flow_row:
            metrics.write(state["step"], "grad_flow", flow.after_optimizer(flow_row))
        if ema is not None:
            ema.update(acc.unwrap_model(model), state["step"])
        clock.lap("optimizer")
        if profiler is not None:
            profiler.step()
        input_tokens = float(input_tokens)
        state["tokens_seen"] += input_tokens
        state["padded_tokens_seen"] = state.get("padded_tokens_seen", 0.0) + float(padded_tokens)
        window_loss += step_loss
        window_tokens += float(global_tokens)
        window_input_tokens += input_tokens
        window_time += time.perf_counter() - t0
        step = state["step"]
        pbar.update(1)

        if step % cfg.log.log_every == 0 or step == stop or step == 1:
            loss = float(acc.reduce(window_loss, reduction="sum")) / max(window_tokens, 1.0)
            tps = window_input_tokens / max(window_time, 1e-9)
            row = {"loss": loss, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "tokens_per_s": tps, "mfu": fpt * tps / (peak * acc.num_processes), "tokens_seen": state["tokens_seen"],
                   "padding_efficiency": state["tokens_seen"] / max(state["padded_tokens_seen"], 1.0)}
            # milliseconds per step in each phase since the last row (this rank's clock)
            window = clock.since(window_phases)
            steps_in_window = max(window.pop("steps", 1.0), 1.0)
            row.update({f"time_{k}_ms": 1000 * v / steps_in_window for k, v in window.items()})
            window_phases = dict(clock.totals)
            metrics.write(step, "train", row)
            pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
            window_loss.zero_()
            window_tokens, window_input_tokens, window_time = 0.0, 0.0, 0.0
        clock.lap("logging")

        if eval_data is not None and ((eval_every and step % eval_every == 0) or step == T):
            with EMA.eval_weights(ema, acc, model):  # the averaged weights when train.ema.use_for_eval
                last_eval = _evaluate(acc, model, eval_data, eval_parts, task, cfg.eval)
                if harness:
                    last_eval.update(_harness(acc, model, tokenizer, cfg))
            metrics.write(step, "eval", last_eval)
            if state["best_eval_loss"] is None or last_eval["loss"] < state["best_eval_loss"]:
                state["best_eval_loss"] = last_eval["loss"]
            if plateau is not None:
                if plateau.step(last_eval["loss"], lr_at(step)):
                    log.info("step %d: validation loss stalled; schedule.plateau cuts the lr to %.3g (reduction %d)",
                             step, plateau.lr(lr_at(step)), plateau.reductions)
                state["plateau"] = plateau.state_dict()  # checkpointed with the loop state
            log.info("step %d eval loss %.4f ppl %.2f acc %.3f", step, last_eval["loss"], last_eval["perplexity"], last_eval["accuracy"])
            if early_stop(tc.early_stopping, state, last_eval["loss"]):
                stop = step  # checkpoint below, then leave the loop and save the final model
            clock.lap("eval")

        if (save_every and step % save_every == 0) or (step == stop and stop < T):
            path = checkpoint.save(acc, ckpt_root, step, state, to_dict(cfg), cfg.checkpoint.keep_last)
            log.info("checkpoint: %s", path)
            clock.lap("checkpoint")
        clock.end_step()
    pbar.close()
    if profiler is not None:
        profiler.close()

    # 5) final model, plots, summary ------------------------------------------------------------------
    final_dir = None
    if save_final and (state["step"] >= T or state.get("stopped_early")):
        final_dir = save_model(acc, model, out / "final", tokenizer=tokenizer, recipe=cfg, extra_files=extra_files)
        if ema is not None:
            with ema.swapped_in(acc.unwrap_model(model)):
                save_model(acc, model, out / "final_ema", tokenizer=tokenizer, recipe=cfg, extra_files=extra_files)
    # One digest per rank: under DDP/ZeRO-1/2 every rank must hold bitwise-identical parameters.
    digests = (gather_object([_param_digest(acc.unwrap_model(model))])
               if acc.num_processes > 1 and not is_sharded(acc) else None)
    if acc.is_main_process:
        plot_training(out / "metrics.jsonl", out / "training_curves.png", title=str(out.name))
        if flow is not None:
            plot_grad_flow(out / "metrics.jsonl", out / "grad_flow.png", title=f"{out.name}: per-block gradient flow")
        summary = {
            "step": state["step"], "max_steps": T, "tokens_seen": state["tokens_seen"],
            "first_train_loss": first_loss, "train_loss": last_loss, "eval": last_eval,
            "best_eval_loss": state["best_eval_loss"], "parameters": n_params, "trainable_parameters": n_trainable,
            "distributed_type": str(acc.distributed_type), "num_processes": acc.num_processes,
            "model_wrapper": type(model).__name__, "mixed_precision": acc.mixed_precision, **layout_info(acc),
            "param_digest_per_rank": digests, "final_dir": str(final_dir) if final_dir else None,
            "stopped_early": bool(state.get("stopped_early")),
            "resumed_from_step": resumed_step,
            # real input tokens over padded positions (1.0 for packed blocks; SFT batches pad to the longest row)
            "padding_efficiency": (state["tokens_seen"] / state["padded_tokens_seen"]) if state.get("padded_tokens_seen") else None,
        }
        summary["mixed_precision_reason"] = getattr(acc, "lmforge_precision_reason", None)
        summary["compiled"], summary["loss_impl"] = tc.compile, tc.loss_impl
        summary["phase_seconds"] = {k: v for k, v in clock.totals.items() if k != "steps"}
        summary["phase_fraction"] = clock.fractions()
        summary["wall_time_s"] = time.perf_counter() - started
        summary["peak_rss_mb"] = peak_rss_mb()
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        (out / "report.md").write_text(_report(out, summary, cfg))
        for folder in (final_dir, out / "final_ema" if ema is not None and final_dir else None):
            if folder is not None:
                card_metrics = {"train_loss": last_loss, **{f"eval_{k}": v for k, v in (last_eval or {}).items()}}
                write_card(folder, stage=getattr(cfg, "STAGE", "train"), recipe=to_dict(cfg), metrics=card_metrics,
                           library_name="peft" if hasattr(acc.unwrap_model(model), "peft_config") else "transformers")
        if final_dir is not None:
            outputs.discard_pending(out)  # the new result exists: the folder it replaced can go
    if acc.is_main_process:
        outputs.release(out)
    if end_training:
        acc.wait_for_everyone()  # no rank tears the process group down while another still writes
        acc.end_training()  # closes trackers and destroys the process group
    return RunResult(out, final_dir, state["step"], last_loss, last_eval, first_loss)


def _evaluate(acc, model, eval_data, eval_parts, task, ecfg) -> dict[str, float]:
    """The eval row: the whole validation set, or each part and their token-weighted combination."""
    import math

    if not eval_parts:
        return evaluate(acc, model, eval_data, task, ecfg.per_device_eval_batch_size, ecfg.max_eval_batches)
    per = {name: evaluate(acc, model, ds, task, ecfg.per_device_eval_batch_size, ecfg.max_eval_batches)
           for name, ds in eval_parts.items()}
    tokens = sum(r["tokens"] for r in per.values()) or 1.0
    out = {"loss": sum(r["loss"] * r["tokens"] for r in per.values()) / tokens,
           "accuracy": sum(r["accuracy"] * r["tokens"] for r in per.values()) / tokens, "tokens": tokens}
    out["perplexity"] = math.exp(min(out["loss"], 50.0))
    for name, r in per.items():
        out[f"loss/{name}"], out[f"perplexity/{name}"] = r["loss"], r["perplexity"]
    return out


def _harness(acc, model, tokenizer, cfg) -> dict[str, float]:
    """eval.harness_tasks on the main process ({'harness/<task>/<metric>': value}); the other ranks wait."""
    scores: dict[str, float] = {}
    if acc.is_main_process:
        from lmforge.evaluation.harness import run_harness

        e = cfg.eval
        raw = run_harness(acc.unwrap_model(model), tokenizer, e.harness_tasks, e.harness_include_path, e.harness_limit,
                          e.harness_num_fewshot, e.per_device_eval_batch_size, seed=cfg.seed)
        scores = {f"harness/{k}": v for k, v in raw.items()}
        log.info("harness: %s", ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    acc.wait_for_everyone()
    return scores


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB. Linux: ``VmHWM`` of /proc/self/status, which starts afresh
    at exec — ``ru_maxrss`` does not: a process started by a big one inherits its parent's peak. Elsewhere
    ``ru_maxrss`` (macOS reports bytes, Linux KiB)."""
    import resource
    import sys

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _report(out: Path, s: dict, cfg=None) -> str:
    """A short Markdown run report next to the metrics (what a person opens first)."""
    ev = s.get("eval") or {}
    rows = [("steps", f"{s['step']} / {s['max_steps']}"), ("tokens seen", f"{s['tokens_seen']:,}"),
            ("parameters", f"{s['parameters']:,} ({s['trainable_parameters']:,} trainable)"),
            ("first / last train loss", f"{s['first_train_loss']:.4f} / {s['train_loss']:.4f}" if s["train_loss"] is not None else "-"),
            ("validation loss / perplexity / accuracy",
             f"{ev['loss']:.4f} / {ev['perplexity']:.2f} / {ev['accuracy']:.3f}" if ev else "not evaluated"),
            ("layout", f"{s['distributed_type']} x {s['num_processes']} ({s['model_wrapper']}), mixed precision {s['mixed_precision']}"
                       + (f" ({s['mixed_precision_reason']})" if s.get("mixed_precision_reason") else "")),
            ("final model", s["final_dir"] or "not written (run stopped before max_steps)")]
    if s.get("phase_fraction"):
        rows.append(("training time by phase", ", ".join(f"{k} {v:.0%}" for k, v in s["phase_fraction"].items())))
    rows += [("wall time", f"{s['wall_time_s']:.1f} s" if s.get("wall_time_s") is not None else "-"),
             ("peak memory (RSS, main process)", f"{s['peak_rss_mb']:.0f} MB" if s.get("peak_rss_mb") else "-")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    recipe = yaml.safe_dump(to_dict(cfg), sort_keys=False) if cfg is not None else ""
    return (f"# Run report: {out.name}\n\n```bash\n{command_line()}\n```\n\n| | |\n|---|---|\n{table}\n\n"
            "![loss and learning rate](training_curves.png)\n\n## Environment\n\n" + environment_md() +
            (f"\n## Recipe (resolved)\n\n```yaml\n{recipe}```\n" if recipe else "") +
            "\nEvery logged value: `metrics.jsonl`; the resolved recipe: `recipe.yaml`; machine-readable summary: "
            "`summary.json`; the model card: `final/README.md`.\n")



# ---------------------------------------------------------------------------------------------
# Where the time goes: a per-phase clock and the torch.profiler window


class PhaseClock:
    """Seconds spent in each phase of the training steps (data, forward, backward, optimizer,
    logging, eval, checkpoint), as laps of one clock. On CUDA each lap synchronises first, so a
    phase is charged for its own kernels rather than for whichever call happens to wait on them (a
    small cost in overlap). Under DeepSpeed the engine's optimizer step runs inside backward."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
        self.totals: dict[str, float] = {"steps": 0.0}
        self._t = time.perf_counter()

    def start(self) -> None:
        if self.sync:
            self.sync()
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.sync:
            self.sync()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self._t
        self._t = now

    def end_step(self) -> None:
        self.totals["steps"] += 1

    def since(self, earlier: dict[str, float]) -> dict[str, float]:
        """The totals minus an earlier copy of them (``steps`` included)."""
        return {k: v - earlier.get(k, 0.0) for k, v in self.totals.items()}

    def fractions(self) -> dict[str, float]:
        timed = {k: v for k, v in self.totals.items() if k != "steps"}
        total = sum(timed.values()) or 1.0
        return {k: v / total for k, v in sorted(timed.items(), key=lambda kv: -kv[1])}


class Profiler:
    """``train.profile``: a ``torch.profiler`` window (1 step skipped, 1 warm-up, ``steps`` recorded)
    written as a TensorBoard / Chrome trace per rank into ``folder``, the main rank's operator table
    as ``ops.txt``, and on CUDA a memory snapshot (``memory_snapshot.pickle``, for
    https://pytorch.org/memory_viz) of the same steps."""

    def __init__(self, folder: Path, acc, steps: int):
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        self.folder, self.main, self.remaining = folder, acc.is_main_process, 2 + steps
        folder.mkdir(parents=True, exist_ok=True)
        self.cuda = torch.device(acc.device).type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=steps),
                            on_trace_ready=tensorboard_trace_handler(str(folder), worker_name=f"rank{acc.process_index}"),
                            record_shapes=True, profile_memory=True, with_stack=False)
        if self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.prof.start()

    def step(self) -> None:
        if self.prof is None:
            return
        self.prof.step()
        self.remaining -= 1
        if self.remaining <= 0:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        prof.stop()
        if self.main:
            try:
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
                (self.folder / "ops.txt").write_text(table + "\n")
            except Exception as exc:  # a window cut short by a short run has no events; the trace says so
                log.warning("train.profile: no operator table (%s)", exc)
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.folder / "memory_snapshot.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        log.info("train.profile: trace written to %s (tensorboard --logdir %s, or chrome://tracing)", self.folder, self.folder)

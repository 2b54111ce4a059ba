"""The distillation Task: what ``loop.run`` calls for ``lmforge distill`` (to be folded into tasks.py).

    KD            hard-label CE + soft-target KD (+ hidden states) against a live teacher or a top-k cache
    collate_kd    packed blocks + the cached top-k targets of each block, stacked
    KDParts       the per-part sums (ce, kd, hidden) of every training micro-batch, for logging

In training mode ``KD.loss`` returns, as SUMS over the loss positions (the loop divides by the global
token count), ``loss_sum = alpha_ce * ce_sum + weight_kd * kd_sum + hidden_weight * hidden_sum``, the
token count, and the parts as extra keys ``ce_sum``, ``kd_sum``, ``hidden_sum`` (detached). Loss
positions are the causal shift of ``tasks.next_token_loss``: position t predicts token t+1, the mask
is ``labels[:, 1:] != -100`` padded with False at the end, so KD and hidden losses are computed on
exactly the positions the CE counts. On SFT rows (``datasets.sft``: padded, attention_mask, labels -100
on prompt and padding) those are the completion tokens: whatever either model predicts at a prompt
position changes nothing, and the loop normalises by completion tokens as the SFT task does.

A batch holding ``ON_POLICY_KEY`` (on-policy KD, ``train.kd_generate.OnPolicyBatches``) has the student's
own samples as completions: there the CE term is left out (training on its own samples teaches the student
nothing) and the loss is ``weight_kd * kd_sum (+ hidden)``; its tokens are counted as on-policy tokens.

In eval mode (``loop``'s validation) it returns the plain next-token CE of the student on the real
labels, with accuracy: validation loss and perplexity stay comparable with pretrain runs and with a
CE-only control run, and no teacher forward is spent on them.

Teacher side: ``teacher`` (live mode) is a frozen module in eval mode that the loop never sees; its
forward runs under ``torch.no_grad``. Cached mode has no teacher: the batch carries ``kd_values``,
``kd_indices``, ``kd_rest`` (from :func:`lmforge.train.kd.topk_logprobs`) and the KD part is
:func:`lmforge.train.kd.sparse_forward_kl`. Logits are trimmed to ``vocab`` columns (the rows both
models share, :func:`lmforge.train.kd.shared_vocab_size`) for the KD part only; the CE uses the
student's whole head.

Hidden states: ``layer_pairs`` index the ``output_hidden_states`` tuples (0 = embeddings, i = block i);
``hidden_sum`` is the MEAN over the pairs of each pair's summed :func:`lmforge.train.kd.hidden_state_loss`,
so ``hidden_weight`` does not grow with the number of pairs. ``projection`` maps the student width to
the teacher's when they differ; the stage makes it a submodule of the student (so DDP syncs it, the
optimizer, clipping and checkpoints include it) that ``save_pretrained`` skips.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.train.kd import hidden_state_loss, soft_target_loss, sparse_forward_kl
from lmforge.train.tasks import Batch, Task, collate_blocks, next_token_loss, next_token_targets

CACHE_COLUMNS = ("kd_values", "kd_indices", "kd_rest")
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
ON_POLICY_KEY = "kd_on_policy"  # present in a batch (a 0-d tensor) when its completions are the student's own


def collate_kd(examples: list[dict]) -> Batch:
    """Packed blocks with their cached teacher targets: input_ids, labels, kd_values (b, seq, k) float32,
    kd_indices (b, seq, k) int64, kd_rest (b, seq) float32."""
    batch = collate_blocks(examples)
    batch["kd_values"] = torch.stack([torch.as_tensor(e["kd_values"], dtype=torch.float32) for e in examples])
    batch["kd_indices"] = torch.stack([torch.as_tensor(e["kd_indices"]).long() for e in examples])
    batch["kd_rest"] = torch.stack([torch.as_tensor(e["kd_rest"], dtype=torch.float32) for e in examples])
    return batch


class KDParts:
    """Running sums of [ce, kd, hidden, tokens, ce_tokens] of training micro-batches, one row per optimizer
    step that the loop logs (``step % log_every == 0``, step 1 and the last step), kept on the device (no
    sync). ``ce_tokens`` are the tokens the CE was taken on (all of them but on-policy batches')."""

    def __init__(self, gradient_accumulation_steps: int, log_every: int, last_step: int, start_step: int = 0):
        self.gas, self.log_every, self.last_step = gradient_accumulation_steps, log_every, last_step
        self.calls, self.start_step = 0, start_step
        self.window: torch.Tensor | None = None
        self.rows: list[tuple[int, torch.Tensor]] = []  # (step, [ce_sum, kd_sum, hidden_sum, n_tokens, ce_tokens])

    def add(self, parts: torch.Tensor) -> None:
        self.window = parts if self.window is None else self.window + parts
        self.calls += 1
        if self.calls % self.gas == 0:
            step = self.start_step + self.calls // self.gas
            if step % self.log_every == 0 or step == 1 or step == self.last_step:
                self.rows.append((step, self.window))
                self.window = None


class KD(Task):
    name = "kd"

    def __init__(
        self,
        teacher: torch.nn.Module | None = None,
        *,
        seq_len: int = 0,
        vocab: int | None = None,
        kind: str = "forward",
        temperature: float = 1.0,
        alpha_ce: float = 0.5,
        weight_kd: float = 0.5,
        beta: float = 0.5,
        skew_alpha: float = 0.1,
        hidden: str | None = None,
        hidden_weight: float = 1.0,
        layer_pairs: Sequence[tuple[int, int]] = (),
        projection: torch.nn.Module | None = None,
        cached: bool = False,
        parts: KDParts | None = None,
        **kw: Any,
    ):
        kw.setdefault("collate", collate_kd if cached else collate_blocks)
        kw.setdefault("eval_collate", collate_blocks)
        super().__init__(seq_len, **kw)
        if cached and (teacher is not None or hidden is not None):
            raise ValueError("cached KD uses the top-k targets in the batch: no teacher, no hidden-state loss")
        if not cached and teacher is None and (weight_kd > 0 or hidden is not None):
            raise ValueError("live KD needs the teacher module")
        if hidden is not None and not layer_pairs:
            raise ValueError("a hidden-state loss needs at least one (student, teacher) layer pair")
        self.teacher, self.vocab, self.cached = teacher, vocab, cached
        self.kind, self.temperature, self.beta, self.skew_alpha = kind, temperature, beta, skew_alpha
        self.alpha_ce, self.weight_kd = alpha_ce, weight_kd
        self.hidden, self.hidden_weight, self.layer_pairs = hidden, hidden_weight, list(layer_pairs)
        self.projection = projection
        self.parts = parts
        self.teacher_head = None  # train.loss_impl fused_linear_ce: bound to the teacher in bind()

    def bind(self, model: torch.nn.Module) -> None:
        super().bind(model)
        if self.fused is not None and self.teacher is not None and self.teacher_head is None:
            from lmforge.train.tasks import FusedHead

            self.teacher_head = FusedHead()  # the teacher's final hidden states, without its logits
            self.teacher_head.bind(self.teacher)

    def _fused_loss(self, model, inputs, batch, on_policy: bool) -> dict[str, torch.Tensor]:
        """``train.loss_impl: fused_linear_ce``: student and teacher run with ``logits_to_keep=1`` and the CE +
        divergence are taken chunk by chunk over the loss tokens (``fused_ce.chunked_head_loss``), so neither
        model's (tokens x vocab) logits exist whole. The same sums as the logits path, to fp32 rounding."""
        from lmforge.train.fused_ce import chunked_head_loss

        want_hidden = self.hidden is not None
        h_s, out = self.fused.forward(model, inputs, output_hidden_states=want_hidden)
        target = next_token_targets(batch["labels"])  # (batch, seq)
        keep = (target != -100).reshape(-1).nonzero().squeeze(1)  # the loss tokens
        flat = lambda t: t.reshape(-1, *t.shape[2:]).index_select(0, keep)  # noqa: E731  (batch, seq, ...) -> (n, ...)
        y, hs = flat(target), flat(h_s)
        use_teacher = not self.cached and (self.weight_kd > 0 or want_hidden)
        t_out = h_t = None
        if use_teacher:
            with torch.no_grad():
                h_t, t_out = self.teacher_head.forward(self.teacher, inputs, output_hidden_states=want_hidden)
            h_t = flat(h_t)
        vocab = self.vocab
        t_head = self.teacher_head.head if self.teacher_head is not None else None
        if self.cached:
            cache = {k: flat(batch[k]) for k in ("kd_values", "kd_indices", "kd_rest")}
        take_ce = self.alpha_ce > 0 and not on_policy

        def chunk_loss(z, rows):
            zero = z.new_zeros(())
            ce = F.cross_entropy(z, y[rows], reduction="sum") if not on_policy else zero
            kd = zero
            if self.weight_kd > 0:
                zs = z if vocab is None or vocab >= z.size(-1) else z[:, :vocab]
                ones = torch.ones(1, z.size(0), dtype=torch.bool, device=z.device)
                if self.cached:
                    kd = sparse_forward_kl(zs[None], cache["kd_values"][rows][None], cache["kd_indices"][rows][None],
                                           cache["kd_rest"][rows][None], ones, self.temperature)
                else:
                    with torch.no_grad():
                        w = t_head.weight[: zs.size(-1)].float()
                        zt = h_t[rows].float() @ w.T
                        if t_head.bias is not None:
                            zt += t_head.bias[: zs.size(-1)].float()
                    kd = soft_target_loss(zs[None], zt[None], ones, self.kind, self.temperature, beta=self.beta,
                                          alpha=self.skew_alpha)
            loss = (ce * self.alpha_ce if take_ce else zero) + (self.weight_kd * kd if self.weight_kd > 0 else zero)
            return loss, torch.stack([ce.detach(), kd.detach()])

        head = self.fused.head
        total, (ce_sum, kd_sum) = chunked_head_loss(hs, head.weight, head.bias, chunk_loss, self.fused.chunk_tokens)
        hidden_sum = total.new_zeros(())
        if want_hidden:
            mask = target != -100
            per_pair = [hidden_state_loss(out.hidden_states[a], t_out.hidden_states[b], mask, self.hidden, self.projection)
                        for a, b in self.layer_pairs]
            hidden_sum = torch.stack(per_pair).mean()
            if self.hidden_weight > 0:
                total = total + self.hidden_weight * hidden_sum
        return self._result(total, ce_sum, kd_sum, hidden_sum, keep.numel(), on_policy)

    def _result(self, total, ce_sum, kd_sum, hidden_sum, n_tokens, on_policy: bool) -> dict[str, torch.Tensor]:
        n = torch.as_tensor(n_tokens, device=total.device)
        parts = torch.stack([ce_sum.detach().float(), kd_sum.detach().float(), hidden_sum.detach().float(),
                             n.float(), n.float() * (not on_policy)])
        if self.parts is not None:
            self.parts.add(parts.double())
        return {"loss_sum": total, "n_tokens": n, "ce_sum": parts[0], "kd_sum": parts[1], "hidden_sum": parts[2]}

    def _trim(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.vocab is None or self.vocab >= logits.size(-1) else logits[..., : self.vocab]  # a view

    def loss(self, model, batch):
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
        labels = batch["labels"]
        if not model.training:  # validation: the student's own CE on the real labels
            return next_token_loss(model(**inputs).logits, labels, accuracy=True)

        on_policy = ON_POLICY_KEY in batch  # the completions are the student's own samples: no CE on them
        if self.fused is not None:
            return self._fused_loss(model, inputs, batch, on_policy)
        want_hidden = self.hidden is not None
        out = model(**inputs, output_hidden_states=want_hidden)
        logits = out.logits  # (batch, seq, vocab_s)
        mask = next_token_targets(labels) != -100  # (batch, seq): position t predicts t+1
        zero = logits.new_zeros((), dtype=torch.float32)
        ce = {"loss_sum": zero, "n_tokens": mask.sum()} if on_policy else next_token_loss(logits, labels)
        kd_sum, hidden_sum = zero, zero

        use_teacher = not self.cached and (self.weight_kd > 0 or want_hidden)
        t_out = None
        if use_teacher:
            with torch.no_grad():
                t_out = self.teacher(**inputs, output_hidden_states=want_hidden)
        if self.weight_kd > 0:
            if self.cached:
                kd_sum = sparse_forward_kl(self._trim(logits), batch["kd_values"], batch["kd_indices"], batch["kd_rest"],
                                           mask, self.temperature)
            else:
                kd_sum = soft_target_loss(self._trim(logits), self._trim(t_out.logits), mask, self.kind,
                                          self.temperature, beta=self.beta, alpha=self.skew_alpha)
        if want_hidden:
            hs, ht = out.hidden_states, t_out.hidden_states
            per_pair = [hidden_state_loss(hs[s], ht[t], mask, self.hidden, self.projection) for s, t in self.layer_pairs]
            hidden_sum = torch.stack(per_pair).mean()

        total = ce["loss_sum"] * self.alpha_ce if self.alpha_ce > 0 and not on_policy else zero
        if self.weight_kd > 0:
            total = total + self.weight_kd * kd_sum
        if want_hidden and self.hidden_weight > 0:
            total = total + self.hidden_weight * hidden_sum
        return self._result(total, ce["loss_sum"], kd_sum, hidden_sum, ce["n_tokens"], on_policy)

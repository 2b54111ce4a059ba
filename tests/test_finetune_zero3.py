"""ZeRO-3 on 2 CPU ranks: the saved adapter holds real weights (not the classic empty 40-byte tensors).

Every parameter is sharded across ranks under ZeRO-3, so a bare ``save_pretrained`` writes empty
tensors; ``finetune.save_adapter`` gathers the trainable parameters first. The same 3 steps on one
process (same global batch of 8, no dropout) must give the same adapter up to float reduction order.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from conftest import BIN, ROOT, subprocess_env
from safetensors.torch import load_file
from test_finetune import build_tiny_base, recipe_cfg

from lmforge.stages import finetune

COMMON = ["train.max_steps=3", "peft.dropout=0.0", "optim.learning_rate=1e-2"]


@pytest.mark.layouts
@pytest.mark.slow  # ~40 s of CPU, minutes on a shared machine: make test-layouts
def test_zero3_two_ranks_save_real_adapter_weights(tmp_path):
    base = build_tiny_base(tmp_path / "base")
    z3 = tmp_path / "z3"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / "deepspeed_zero3.yaml"),
           "-m", "lmforge", "finetune", "recipes/tiny/finetune_lora.yaml", f"model.name_or_path={base}", f"output_dir={z3}",
           "train.per_device_train_batch_size=4", "data.max_seq_length=48", "eval.eval_every=0", "eval.max_eval_batches=1",
           "schedule.warmup_steps=0", "log.trackers=[]", *COMMON]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    # the same run on one process, global batch 8 (length-grouped global batches do not depend on the rank count)
    one = recipe_cfg("finetune_lora", base, tmp_path / "one", "train.per_device_train_batch_size=8", *COMMON, steps=3)
    finetune.train(one)

    sharded = load_file(z3 / "final" / "adapter_model.safetensors")
    single = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    assert sorted(sharded) == sorted(single) and len(single) == 2 * 7 * 2  # A and B x 7 linears x 2 layers
    for k, v in single.items():
        assert sharded[k].shape == v.shape and v.numel() > 0, k
        assert sharded[k].abs().sum() > 0, f"{k} saved empty/zero under ZeRO-3"
        torch.testing.assert_close(sharded[k], v, atol=1e-4, rtol=1e-3)

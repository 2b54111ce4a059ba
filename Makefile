# lmforge — the front door. On a fresh machine: `make demo` and `make test` set everything up first.
#   make setup      .venv with torch + lmforge pinned to constraints.txt (rerun only when they change)
#   make test       the default test suite (CPU, no network)
#   make demo       the pipeline on the tiny recipes; prints where the outputs are
#   make <stage>    one stage on its tiny recipe: data pretrain finetune ...
#   make bench      benchmarks (print ratios against a baseline run in the same process)
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmforge-setup
# The CPU build of torch lies on this machine's disk; GPU users: make setup TORCH_SPEC='torch==2.13.0' with
# their own index, or install torch first and set TORCH_SPEC= (empty) to keep it.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,deepspeed,data,qlora,quant,eval
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# DeepSpeed JIT-builds its C++ ops once per machine; keep them in the repo's ignored cache.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# The venv's tools first: DeepSpeed's op builds must always run the same ninja (pip's 1.13 and the
# system's 1.11 record build commands differently, so mixing them rebuilds the ops on every start).
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export LMFORGE_CACHE ?= $(CURDIR)/.cache/lmforge

.PHONY: setup ds-ops test test-slow test-cluster test-layouts test-all lint demo data pretrain pretrain-llrd pretrain-mlm finetune distill quantize quantize-qat evaluate plan bench bench-recipes pipeline constraints clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

# DeepSpeed's C++ ops, JIT-built once per machine (~3.5 min of CPU) for the targets that start DeepSpeed;
# `make demo` runs no DeepSpeed layout and skips it.
DS_OPS := $(VENV)/.lmforge-ds-ops
ds-ops: $(DS_OPS)

$(DS_OPS): $(STAMP)
	$(BIN)/python -c "from lmforge.train.accel import prebuild_deepspeed_ops as b; print('deepspeed ops built:', b())"
	touch $(DS_OPS)

# Refresh the pins after a deliberate upgrade (then run make test and commit constraints.txt).
constraints: setup
	$(BIN)/python -m pip freeze --exclude-editable | grep -viE '^(torch==|nvidia-|triton)' > constraints.txt

test: setup ds-ops
	$(BIN)/python -m pytest -q -m "not slow and not gpu and not cluster" tests

test-slow: setup ds-ops
	$(BIN)/python -m pytest -q -m "slow" tests

# The data stage on real engines on this machine: a single-node Slurm (root; apt installs slurm-wlm and munge
# the first time; `bash scripts/slurm_local.sh stop` ends it) and a two-node local Ray (the ray extra, installed
# here if missing); also scripts/slurm_multinode.sh training through sbatch.
test-cluster: setup ds-ops
	$(BIN)/python -c "import ray" 2>/dev/null || $(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS),ray]"
	bash scripts/slurm_local.sh setup
	$(BIN)/python -m pytest -q -m cluster tests

test-layouts: setup ds-ops
	$(BIN)/python -m pytest -q -m "layouts" tests

test-all: setup ds-ops
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check src tests bench scripts

# The pipeline on the tiny recipes: raw text -> cleaned, deduplicated, packed data + tokenizer ->
# a pretrained tiny Llama -> a LoRA SFT adapter (and its merged export) -> a half-depth distilled student
# -> its int8 weights with a before/after report (size, latency, perplexity) beside int8 / NF4 / Wanda results.
demo: setup
	$(BIN)/lmforge data recipes/tiny/data.yaml overwrite=true
	$(BIN)/lmforge pretrain recipes/tiny/pretrain.yaml overwrite=true data.path=outputs/tiny/data/dataset \
	    data.train_files=[] model.tokenizer=outputs/tiny/data/tokenizer
	$(BIN)/lmforge finetune recipes/tiny/finetune_lora.yaml overwrite=true
	$(BIN)/lmforge distill recipes/tiny/distill.yaml overwrite=true data.path=outputs/tiny/data/dataset data.train_files=[]
	$(BIN)/lmforge quantize recipes/tiny/quantize.yaml overwrite=true model.name_or_path=outputs/tiny/distill/final \
	    data.path=outputs/tiny/data/dataset data.train_files=[]
	$(BIN)/lmforge evaluate recipes/tiny/evaluate.yaml overwrite=true output_dir=outputs/tiny/evaluate_compare \
	    --compare outputs/tiny/distill/final outputs/tiny/quantize/final
	@echo; echo "demo outputs (lmforge runs: each stage's output, key metric and report):"
	@$(BIN)/lmforge runs outputs/tiny/data outputs/tiny/pretrain outputs/tiny/finetune_lora outputs/tiny/distill \
	    outputs/tiny/quantize outputs/tiny/evaluate_compare

data: setup
	$(BIN)/lmforge data recipes/tiny/data.yaml overwrite=true

pretrain: setup
	$(BIN)/lmforge pretrain recipes/tiny/pretrain.yaml overwrite=true

finetune: setup
	$(BIN)/lmforge finetune recipes/tiny/finetune_lora.yaml overwrite=true

distill: setup
	test -d outputs/tiny/pretrain/final || $(BIN)/lmforge pretrain recipes/tiny/pretrain.yaml overwrite=true
	$(BIN)/lmforge distill recipes/tiny/distill.yaml overwrite=true

quantize: setup
	test -d outputs/tiny/pretrain/final || $(BIN)/lmforge pretrain recipes/tiny/pretrain.yaml overwrite=true
	$(BIN)/lmforge quantize recipes/tiny/quantize.yaml overwrite=true

quantize-qat: setup
	test -d outputs/tiny/pretrain/final || $(BIN)/lmforge pretrain recipes/tiny/pretrain.yaml overwrite=true
	$(BIN)/lmforge quantize recipes/tiny/quantize_qat.yaml overwrite=true

evaluate: setup
	test -d outputs/tiny/pretrain/final || $(BIN)/lmforge pretrain recipes/tiny/pretrain.yaml overwrite=true
	$(BIN)/lmforge evaluate recipes/tiny/evaluate.yaml overwrite=true

pretrain-llrd: setup
	$(BIN)/lmforge pretrain recipes/tiny/pretrain_llrd.yaml overwrite=true

pretrain-mlm: setup
	$(BIN)/lmforge pretrain recipes/tiny/pretrain_mlm.yaml overwrite=true

plan: setup
	$(BIN)/lmforge plan recipes/llama-125m/pretrain.yaml --gpus 8 --gpu-memory 80GB

bench: setup ds-ops
	for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# The whole life under one hardware layout: every training stage through `accelerate launch --config_file
# accelerate_configs/$(LAYOUT).yaml` (cpu, multi_cpu, deepspeed_zero1/2/3 run here; ddp, fsdp, tp need GPUs),
# data, quantize and evaluate as one process; outputs in outputs/$(LAYOUT)/.
LAYOUT ?= multi_cpu
PIPE := outputs/$(LAYOUT)
LAUNCH = $(BIN)/accelerate launch --config_file accelerate_configs/$(LAYOUT).yaml -m lmforge
pipeline: setup ds-ops
	test -f accelerate_configs/$(LAYOUT).yaml || { echo "LAYOUT=$(LAYOUT): no accelerate_configs/$(LAYOUT).yaml"; exit 2; }
	$(BIN)/lmforge data recipes/tiny/data.yaml overwrite=true output_dir=$(PIPE)/data
	$(LAUNCH) pretrain recipes/tiny/pretrain.yaml overwrite=true output_dir=$(PIPE)/pretrain \
	    data.path=$(PIPE)/data/dataset data.train_files=[] model.tokenizer=$(PIPE)/data/tokenizer
	$(LAUNCH) finetune recipes/tiny/finetune_lora.yaml overwrite=true output_dir=$(PIPE)/finetune_lora \
	    model.name_or_path=$(PIPE)/pretrain/final
	$(LAUNCH) distill recipes/tiny/distill.yaml overwrite=true output_dir=$(PIPE)/distill \
	    teacher.name_or_path=$(PIPE)/pretrain/final data.path=$(PIPE)/data/dataset data.train_files=[]
	$(BIN)/lmforge quantize recipes/tiny/quantize.yaml overwrite=true output_dir=$(PIPE)/quantize \
	    model.name_or_path=$(PIPE)/distill/final data.path=$(PIPE)/data/dataset data.train_files=[]
	$(BIN)/lmforge evaluate recipes/tiny/evaluate.yaml overwrite=true output_dir=$(PIPE)/evaluate_compare \
	    model.path=$(PIPE)/pretrain/final --compare $(PIPE)/distill/final $(PIPE)/quantize/final
	@echo; echo "pipeline under $(LAYOUT): $(PIPE)/ (each stage's summary.json names the layout it ran as)"

# Every tiny recipe trained once, with its final metrics and wall time in one table: docs/benchmarks.md.
bench-recipes: setup ds-ops
	$(BIN)/python bench/recipes.py --out docs/benchmarks.md

clean:
	rm -rf outputs .pytest_cache .ruff_cache

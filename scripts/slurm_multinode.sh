#!/usr/bin/env bash
# Multi-node training under Slurm: one `accelerate launch` per node, all pointed at the first node.
#   sbatch --nodes 2 --gpus-per-node 8 scripts/slurm_multinode.sh pretrain recipes/llama-125m/pretrain.yaml [key=value ...]
# The layout comes from ACCELERATE_CONFIG (default accelerate_configs/multi_node.yaml, DeepSpeed ZeRO-3);
# any file of accelerate_configs/ works: node count, ranks and the main address are passed here, so
# the file's num_machines/num_processes/machine_rank/main_process_ip are overridden.
# DRY_RUN=1 prints the per-node command instead of running it (for checking outside Slurm).
# PROCS_PER_NODE=N sets the ranks per node where Slurm has no GPUs to count (a CPU cluster, tests).
#SBATCH --job-name=lmforge
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: sbatch --nodes N --gpus-per-node G $0 STAGE RECIPE.yaml [key=value ...]" >&2
  exit 2
fi
CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/multi_node.yaml}
NNODES=${SLURM_NNODES:-1}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # "h100:8" -> 8
GPUS_PER_NODE=${PROCS_PER_NODE:-$GPUS_PER_NODE}  # processes per node without GPUs (CPU test runs)
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
else
  MAIN_ADDR=${MAIN_ADDR:-127.0.0.1}
fi
MAIN_PORT=${MAIN_PORT:-29500}
ACCELERATE=${ACCELERATE:-.venv/bin/accelerate}

export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}

# $SLURM_NODEID is evaluated on each node (single quotes), everything else here on the first node.
LAUNCH="$ACCELERATE launch --config_file $CONFIG \
  --num_machines $NNODES --num_processes $((NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_ADDR --main_process_port $MAIN_PORT \
  --rdzv_backend c10d --deepspeed_multinode_launcher standard \
  -m lmforge $*"

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "$LAUNCH"
  exit 0
fi
srun --ntasks-per-node=1 bash -c "$LAUNCH"

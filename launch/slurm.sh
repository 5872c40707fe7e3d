#!/usr/bin/env bash
# Multi-node osp-train under Slurm: one task per GPU; rank, world size and local rank come from Slurm.
# Usage: sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 launch/slurm.sh --config examples/tiny_t2v.yaml [key=value ...]
#SBATCH --job-name=osp-train
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail
# The first node of the allocation hosts the torch.distributed rendezvous.
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="${MASTER_PORT:-29500}"
# NVLink multicast stays off unless the cluster explicitly allows it.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export PYTHONUNBUFFERED=1
srun --kill-on-bad-exit=1 python -m osp_megatron.training.cli "$@"

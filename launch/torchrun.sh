#!/usr/bin/env bash
# Single-node osp-train on every local GPU (or NPROC ranks): torchrun sets RANK, WORLD_SIZE and LOCAL_RANK.
# Usage: launch/torchrun.sh --config examples/tiny_t2v.yaml parallel.tensor=2 [key=value ...]
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  NPROC="$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
exec torchrun --standalone --nproc_per_node "$NPROC" -m osp_megatron.training.cli "$@"

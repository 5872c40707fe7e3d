#!/usr/bin/env bash
# Slurm lane: start a one-node Slurm on this machine (installed when absent), then submit real jobs through
# osp-launch: a two-task tiny training, and one that is preempted, requeues itself and resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/start_slurm.sh
OSP_SLURM_LANE=1 python -m pytest -q -p no:cacheprovider tests/slurm

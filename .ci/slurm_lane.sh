#!/usr/bin/env bash
# Slurm lane: start the multi-node Slurm of this machine (.ci/slurm_cluster.sh: three nodes, each in its own
# network and UTS namespace), then submit real jobs through osp-launch (tests/slurm, docs/cluster.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/slurm_cluster.sh up 3
OSP_SLURM_LANE=1 python -m pytest -q -p no:cacheprovider tests/slurm

#!/usr/bin/env bash
# Slurm lane: start the multi-node Slurm of this machine (.ci/slurm_cluster.sh: three nodes, each in its own
# network and UTS namespace), then submit real jobs through osp-launch (tests/slurm, docs/cluster.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/slurm_cluster.sh up 3
# A folder of its own for the jobs' runs and logs (kept after a failure for reading), which pytest's rotation of
# its temporary folders, by this or another run, never removes midway.
OSP_SLURM_LANE=1 python -m pytest -q -p no:cacheprovider --basetemp="${OSP_SLURM_LANE_DIR:-/tmp/osp_slurm_lane}" \
  tests/slurm

#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (Debian, root): installs munge and slurm-wlm when absent, writes a
# slurm.conf for this host's CPUs and memory, starts munged, slurmctld and slurmd, and waits for the node.
# Idempotent: a cluster that already answers with an idle node is left as it is.
set -euo pipefail

log() { echo "[start_slurm] $*"; }

node_ready() {
  command -v sinfo >/dev/null && timeout 10 sinfo -h -N -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'
}

if node_ready; then
  log "Slurm is up: $(sinfo -h -N -o '%N %T %c CPUs')"
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  log "installing munge and slurm-wlm"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
fi

# munge authenticates every Slurm message; the package creates the key, an older install may lack it.
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- munged --force  # --force: a stale socket from an earlier boot is no obstacle
fi

host="$(hostname -s)"
cpus="$(nproc)"
# Leave a tenth of the memory to the system so slurmd never reports less than slurm.conf promises.
memory_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<EOF
# One-node cluster for the osp_megatron Slurm lane (written by .ci/start_slurm.sh).
ClusterName=osp-lane
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# linuxproc and task/none need no cgroup setup, so the lane also runs inside containers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=20
MinJobAge=600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${memory_mb} State=UNKNOWN
PartitionName=lane Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

if ! pgrep -x slurmctld >/dev/null; then
  log "starting slurmctld (${cpus} CPUs, ${memory_mb} MB on ${host})"
  slurmctld
fi
if ! pgrep -x slurmd >/dev/null; then
  log "starting slurmd"
  slurmd
fi

for _ in $(seq 1 60); do
  if node_ready; then
    log "Slurm is up: $(sinfo -h -N -o '%N %T %c CPUs')"
    exit 0
  fi
  state="$(timeout 10 sinfo -h -N -o %T 2>/dev/null || true)"
  case "$state" in
    down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done
log "Slurm did not come up; the end of its logs:"
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1

#!/usr/bin/env bash
# A Slurm cluster of several nodes on this one machine (Debian, root): one slurmctld, and one slurmd per node,
# each in its own network and UTS namespace with its own hostname and address on a private bridge. docs/cluster.md
#
#   bash .ci/slurm_cluster.sh up [NODES]      start it, or reuse the one running (default 3 nodes; idempotent)
#   bash .ci/slurm_cluster.sh down            stop every daemon and job, remove namespaces, bridge and hosts lines
#   bash .ci/slurm_cluster.sh node-stop NAME  a node dies: its cable is cut, its slurmd and every task killed
#   bash .ci/slurm_cluster.sh node-start NAME the node comes back (Slurm returns it to service on registration)
#   bash .ci/slurm_cluster.sh status          nodes, addresses and their state
#
# The addresses are 10.77.0.0/24 (OSP_SLURM_SUBNET=10.77.0 to change): the controller is .1 on the bridge, node i
# is .(10+i). Nothing leaves the machine: the bridge has no route out and no other interface is touched.
set -euo pipefail

SUBNET="${OSP_SLURM_SUBNET:-10.77.0}"
BRIDGE=osp-slurm0
NODE_PREFIX=osp-node
CONTROLLER_ADDRESS="${SUBNET}.1"
CONF=/etc/slurm/slurm.conf
HOSTS_BEGIN="# >>> osp slurm cluster (.ci/slurm_cluster.sh) >>>"
HOSTS_END="# <<< osp slurm cluster <<<"

log() { echo "[slurm_cluster] $*"; }
die() { echo "[slurm_cluster] error: $*" >&2; exit 1; }

node_address() { echo "${SUBNET}.$((10 + ${1#"$NODE_PREFIX"}))"; }
node_veth() { echo "osp-v${1#"$NODE_PREFIX"}"; }  # the host end of the node's cable (at most 15 characters)
configured_nodes() { [ -f "$CONF" ] && sed -n "s/^NodeName=\(${NODE_PREFIX}[0-9]*\) .*/\1/p" "$CONF" || true; }
# Checks read a command's whole output before matching: with pipefail, `cmd | grep -q` fails whenever grep exits at
# its first match before cmd has written everything (cmd dies of SIGPIPE), and the check then reads as "absent".
has() { grep -q -- "$2" <<<"$1"; }
ours() { [ -f "$CONF" ] && has "$(head -n 1 "$CONF")" "slurm_cluster.sh"; }

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {  # the daemon whose id the file holds, then the file
  if pid_alive "$1"; then
    local pid
    pid="$(cat "$1")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

kill_namespace() {  # every process whose network is the node's: slurmd, slurmstepd and the job's tasks
  local pids
  pids="$(ip netns pids "$1" 2>/dev/null || true)"
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
  for _ in $(seq 1 50); do [ -z "$(ip netns pids "$1" 2>/dev/null || true)" ] && return; sleep 0.1; done
}

install_packages() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    log "installing munge and slurm-wlm"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
  fi
  command -v ip >/dev/null && command -v unshare >/dev/null || apt-get install -y -q iproute2 util-linux >/dev/null
}

start_munge() {
  # munge authenticates every Slurm message; the package creates the key, an older install may lack it. Its
  # socket is a file, so the daemons in the node namespaces reach the one munged through the shared /run.
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
}

write_hosts() {  # the node names resolve on the host and in every namespace (they share /etc/hosts)
  local block="$1" kept
  kept="$(awk -v begin="$HOSTS_BEGIN" -v end="$HOSTS_END" '$0 == begin {skip = 1} !skip; $0 == end {skip = 0}' /etc/hosts)"
  # Rewritten in place: /etc/hosts may be a mount point that a rename would not replace.
  { printf '%s\n' "$kept"; [ -n "$block" ] && printf '%s\n%s%s\n' "$HOSTS_BEGIN" "$block" "$HOSTS_END"; } > /etc/hosts.osp
  cat /etc/hosts.osp > /etc/hosts && rm -f /etc/hosts.osp
}

network_up() {
  local count="$1" block="" name i
  if has "$(ip route show | grep -v "dev $BRIDGE" || true)" "^${SUBNET}\."; then
    die "${SUBNET}.0/24 is already routed on this machine; choose another with OSP_SLURM_SUBNET=10.x.y"
  fi
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  has "$(ip addr show dev "$BRIDGE")" "inet ${CONTROLLER_ADDRESS}/" || ip addr add "${CONTROLLER_ADDRESS}/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in $(seq 1 "$count"); do
    name="${NODE_PREFIX}${i}"
    has "$(ip netns list)" "^${name}\b" || ip netns add "$name"
    if ! ip link show "$(node_veth "$name")" >/dev/null 2>&1; then
      ip link add "$(node_veth "$name")" type veth peer name eth0 netns "$name"
      ip link set "$(node_veth "$name")" master "$BRIDGE"
    fi
    ip link set "$(node_veth "$name")" up
    ip -n "$name" link set lo up
    has "$(ip -n "$name" addr show dev eth0)" "inet $(node_address "$name")/" \
      || ip -n "$name" addr add "$(node_address "$name")/24" dev eth0
    ip -n "$name" link set eth0 up
    # The mapped IPv6 form too: torch's store accepts connections on dual-stack sockets and looks their peers up
    # by that form, which would otherwise go to DNS and fail (a warning in every rank's log).
    block+="$(node_address "$name") ${name}"$'\n'"::ffff:$(node_address "$name") ${name}"$'\n'
  done
  write_hosts "$block"
}

network_down() {
  local name
  for name in $(ip netns list | awk '{print $1}' | grep "^${NODE_PREFIX}[0-9]*$" || true); do
    kill_namespace "$name"
    ip link del "$(node_veth "$name")" 2>/dev/null || true
    ip netns del "$name"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  write_hosts ""
}

write_config() {  # slurm.conf for `count` nodes on stdout
  local count="$1" cpus memory_mb name i
  # Every node offers the machine's cores, at least 4 (so that one node can run a 4-rank job on a small machine,
  # the nodes share the cores anyway), and an even share of a tenth less than the machine's memory.
  cpus="$(( $(nproc) > 4 ? $(nproc) : 4 ))"
  memory_mb="$(awk -v n="$count" '/MemTotal/ {print int($2 / 1024 * 0.9 / n)}' /proc/meminfo)"
  cat <<EOF
# ${count}-node cluster on one machine for osp_megatron (written by .ci/slurm_cluster.sh; docs/cluster.md)
ClusterName=osp-lane
SlurmctldHost=$(hostname -s)(${CONTROLLER_ADDRESS})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again, the time the nodes need to forget the
# previous run (its credential is revoked until then); Slurm's default is 120 s.
AuthInfo=cred_expire=10
# linuxproc and task/none need no cgroup setup, so the cluster also runs inside containers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
# The nodes share the machine's cores and memory: trust this file rather than what each slurmd counts.
SlurmdParameters=config_overrides
# A node whose slurmd stops answering is DOWN after SlurmdTimeout seconds (default 300): its jobs are requeued.
# It returns to service by itself when its slurmd registers again. 20 s, not less: on a busy small machine a
# live slurmd may take several seconds to answer a ping.
SlurmdTimeout=20
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
EOF
  for i in $(seq 1 "$count"); do
    name="${NODE_PREFIX}${i}"
    echo "NodeName=${name} NodeHostname=${name} NodeAddr=$(node_address "$name") CPUs=${cpus}" \
      "RealMemory=${memory_mb} State=UNKNOWN"
  done
  echo "PartitionName=lane Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
}

start_node() {  # slurmd of node `name` in its namespaces, unless it runs
  local name="$1"
  pid_alive "/run/slurmd-${name}.pid" && return
  ip link set "$(node_veth "$name")" up
  mkdir -p "/var/spool/slurmd/${name}"
  log "starting slurmd of ${name} ($(node_address "$name"))"
  # A UTS namespace of its own gives the node its hostname; slurmd and every task it starts inherit both. nsenter
  # rather than `ip netns exec`, which remounts /sys and so hides the cgroup mounts slurmd looks for.
  nsenter --net="/run/netns/${name}" unshare --uts sh -c "hostname ${name} && exec slurmd -N ${name}"
}

stop_node() {
  local name="$1"
  ip link show "$(node_veth "$name")" >/dev/null 2>&1 || die "no node ${name} (see: bash $0 status)"
  # The cable first: the other nodes' connections to this one stay open and silent, as when a machine dies.
  ip link set "$(node_veth "$name")" down
  kill_namespace "$name"
  rm -f "/run/slurmd-${name}.pid"
  log "${name} is down: cable cut, slurmd and its tasks killed"
}

stop_daemons() {
  local name
  # Cancel the jobs first, so that slurmctld does not restart them when the cluster comes back.
  local jobs
  jobs="$(command -v squeue >/dev/null && timeout 10 squeue -h -o %i 2>/dev/null || true)"
  [ -n "$jobs" ] && timeout 30 scancel $jobs 2>/dev/null || true
  for name in $(configured_nodes); do
    stop_pidfile "/run/slurmd-${name}.pid"
  done
  stop_pidfile /run/slurmd.pid  # a one-node cluster of this machine's own (an older lane) is replaced too
  stop_pidfile /run/slurmctld.pid
}

nodes_ready() {  # every node of the partition answers and is usable
  local states
  states="$(timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null)" || return 1
  [ "$(echo "$states" | grep -c .)" -eq "$1" ] && ! echo "$states" | grep -Evq ' (idle|mixed|allocated|completing)$'
}

wait_for_nodes() {
  local count="$1"
  for _ in $(seq 1 90); do
    if nodes_ready "$count"; then
      log "Slurm is up: $(sinfo -h -N -o '%N(%T)' | tr '\n' ' ')"
      return 0
    fi
    # A node that was down comes back by itself (ReturnToService=2); one drained by an earlier run is resumed.
    timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 ~ /^(drain|down)/ {print $1}' | while read -r name; do
      scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true
    done
    sleep 1
  done
  log "Slurm did not come up; the end of its logs:"
  tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-*.log >&2 || true
  return 1
}

up() {
  local count="${1:-${OSP_SLURM_NODES:-3}}" name i
  [[ "$count" =~ ^[1-9][0-9]?$ ]] || die "the number of nodes must be 1 to 99, got ${count}"
  [ "$(id -u)" -eq 0 ] || die "run as root: it creates network namespaces and starts the Slurm daemons"
  install_packages
  start_munge
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  local wanted
  wanted="$(write_config "$count")"
  if ! ours || [ "$(cat "$CONF")" != "$wanted" ]; then
    log "writing ${CONF} for ${count} nodes (daemons of another configuration are stopped)"
    stop_daemons
    network_down
    printf '%s\n' "$wanted" > "$CONF"
    network_up "$count"
    slurmctld -c  # -c: jobs of the previous configuration are forgotten
  else
    network_up "$count"
    if ! pid_alive /run/slurmctld.pid; then
      log "starting slurmctld"
      slurmctld
    fi
  fi
  for i in $(seq 1 "$count"); do
    start_node "${NODE_PREFIX}${i}"
  done
  wait_for_nodes "$count"
}

down() {
  if ours; then
    stop_daemons
  fi
  network_down
  log "cluster stopped; namespaces, bridge and hosts lines removed (munged and ${CONF} are left)"
}

status() {
  local name
  for name in $(configured_nodes); do
    printf '%-10s %-12s %s\n' "$name" "$(node_address "$name")" \
      "$(timeout 10 sinfo -h -N -n "$name" -o %T 2>/dev/null || echo '?')"
  done
}

case "${1:-up}" in
  up) up "${2:-}" ;;
  down) down ;;
  node-stop) [ -n "${2:-}" ] || die "node-stop needs a node name"; stop_node "$2" ;;
  node-start)
    [ -n "${2:-}" ] || die "node-start needs a node name"
    ip link show "$(node_veth "$2")" >/dev/null 2>&1 || die "no node $2 (see: bash $0 status)"
    start_node "$2" ;;
  status) status ;;
  *) die "unknown command $1; use up [NODES], down, node-stop NAME, node-start NAME or status" ;;
esac

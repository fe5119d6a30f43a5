#!/usr/bin/env bash
# A two-node Slurm cluster on localhost, for trying sweeps on a laptop and for the Slurm tests in CI.
#
#   bash scripts/slurm_local.sh          install (Debian packages, once), configure, start; wait until idle
#   bash scripts/slurm_local.sh stop     stop the daemons it started
#   bash scripts/slurm_local.sh status   print the node line, exit 1 when the cluster is not up
#
# Needs root and Debian/Ubuntu (apt). Idempotent: when the cluster is already up it only prints its
# status. Two slurmd daemons on this machine make two nodes, "node1" and "node2" (own port,
# spool, pid and log files each), both with this machine's CPUs and memory, in partition "local" (the
# slurm_local launcher preset): a member may span two nodes (hydra.launcher.nodes=2), as on a cluster.
# Both nodes share the same cores, so two nodes do not make a job faster. Accounting is off, so sacct
# fails and submitit says so, harmlessly. It refuses to touch a slurm.conf that it did not write.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# written by negagent scripts/slurm_local.sh"
PARTITION=local
NODES=(node1 node2)
NODE=${NODES[0]}  # the node `status` reports
LOG_DIR=/var/log/slurm
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}

die() { echo "slurm_local: $*" >&2; exit 1; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# The state of the cluster: the least ready of its nodes' states (one word), or nothing when unknown.
node_state() {
  local states
  states=$(timeout 10 sinfo -h -n "$(IFS=,; echo "${NODES[*]}")" -N -o %T 2>/dev/null || true)
  [ "$(echo "$states" | grep -c .)" = "${#NODES[@]}" ] || return 0
  echo "$states" | grep -vE '^(idle|mixed|allocated|completing)' | head -1 | grep . || echo "$states" | head -1
}

status() {
  local state
  alive /run/slurmctld.pid || return 1  # no controller: do not wait for sinfo to time out
  state=$(node_state)
  case "$state" in
    idle*|mixed*|allocated*|completing*)
      echo "slurm_local: nodes ${NODES[*]} $state (partition $PARTITION, $(nproc) CPUs each)"; return 0 ;;
    *) return 1 ;;
  esac
}

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || die "installing Slurm needs root (apt-get install munge slurmctld slurmd slurm-client)"
  command -v apt-get >/dev/null || die "no apt-get: install munge, slurmctld, slurmd and slurm-client by hand"
  echo "slurm_local: installing munge, slurmctld, slurmd, slurm-client (apt)"
  export DEBIAN_FRONTEND=noninteractive
  local log
  log=$(mktemp)
  # Try without refreshing the package lists first: it is the fast path on machines that have them.
  if ! timeout 600 apt-get install -y -q --no-install-recommends munge slurmctld slurmd slurm-client >"$log" 2>&1; then
    timeout 300 apt-get update -q >>"$log" 2>&1 || true
    timeout 600 apt-get install -y -q --no-install-recommends munge slurmctld slurmd slurm-client >>"$log" 2>&1 \
      || { tail -20 "$log" >&2; die "apt-get install failed (full log: $log)"; }
  fi
  rm -f "$log"
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to overwrite it"
  fi
  local cpus mem_mb
  cpus=$(nproc)
  # 90% of physical memory: slurmd marks a node invalid when its configured memory exceeds what it finds.
  mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  mkdir -p /etc/slurm /var/spool/slurmctld "$LOG_DIR"
  local node port=17001 nodes_conf=""
  for node in "${NODES[@]}"; do
    mkdir -p "/var/spool/slurmd/$node"
    nodes_conf+="NodeName=$node NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"$'\n'
    port=$((port + 1))
  done
  cat >"$CONF" <<EOF
$MARKER; rewritten on each start
ClusterName=negagent
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again once its old credentials expire: 10 s here instead of 120.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
# Several slurmd on one host: each node keeps its own spool, pid and log file (%n: the node's name).
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Keep finished jobs visible to squeue for a while: without accounting it is how they are followed.
MinJobAge=300
# A cancelled or requeued job's processes get SIGKILL 5 s after SIGTERM (default 30 s).
KillWait=5
${nodes_conf}PartitionName=$PARTITION Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  mkdir -p /run/munge
  chown munge:munge /run/munge 2>/dev/null || true
  alive /run/munge/munged.pid && return 0
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- munged
  else
    munged --force
  fi
  timeout 10 bash -c 'until munge -n </dev/null | unmunge >/dev/null 2>&1; do sleep 0.2; done' \
    || die "munged did not start (see /var/log/munge/munged.log)"
}

start() {
  if status 2>/dev/null; then return 0; fi
  install
  write_conf
  start_munge
  alive /run/slurmctld.pid || slurmctld -i
  local node
  for node in "${NODES[@]}"; do
    alive "/run/slurmd-$node.pid" || slurmd -N "$node"
  done
  local waited=0 state
  while :; do
    state=$(node_state)
    case "$state" in
      idle*|mixed*|allocated*|completing*) break ;;
      down*|drain*|drained*|inval*)
        for node in "${NODES[@]}"; do timeout 10 scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true; done ;;
    esac
    if [ "$waited" -ge $((WAIT_S * 5)) ]; then
      tail -5 "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd-*.log >&2 2>/dev/null || true
      die "nodes ${NODES[*]} not idle after ${WAIT_S}s (state: ${state:-no answer}); logs in $LOG_DIR"
    fi
    sleep 0.2
    waited=$((waited + 1))
  done
  status
}

stop() {
  # scontrol shutdown stops slurmctld and every slurmd; munged goes by its pid file.
  timeout 20 scontrol shutdown >/dev/null 2>&1 || true
  local pid_file
  for pid_file in /run/slurmd-*.pid /run/slurmd.pid /run/slurmctld.pid; do
    if alive "$pid_file"; then kill "$(cat "$pid_file")" 2>/dev/null || true; fi
  done
  alive /run/munge/munged.pid && kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
  echo "slurm_local: stopped"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status || { echo "slurm_local: not running" >&2; exit 1; } ;;
  *) die "usage: $0 [start|stop|status]" ;;
esac

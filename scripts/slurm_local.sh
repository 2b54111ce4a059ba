#!/usr/bin/env bash
# A real single-node Slurm on this machine, for testing the Slurm paths (data stage executor.kind: slurm,
# scripts/slurm_multinode.sh) without a cluster. Root only; everything listens on this host.
#   bash scripts/slurm_local.sh setup    apt-get install slurm-wlm munge if missing, write the config, start
#                                        munged + slurmctld + slurmd, wait until the node is idle
#   bash scripts/slurm_local.sh status   daemons, sinfo, squeue
#   bash scripts/slurm_local.sh stop     stop the three daemons (by their pid files)
#   bash scripts/slurm_local.sh env      print `export SLURM_CONF=...` (eval "$(bash scripts/slurm_local.sh env)")
# Everything lives in LMFORGE_SLURM_DIR (default /tmp/lmforge-slurm): slurm.conf, its own munge key and
# socket, state, spool, logs. Nothing in /etc is changed; clients (sbatch, squeue, sinfo) find the config
# through SLURM_CONF, which the tests set from that folder. One partition, `debug`, one node (this host's
# short name, address 127.0.0.1) with LMFORGE_SLURM_CPUS CPUs (default 2). Ports: LMFORGE_SLURM_PORT
# (slurmctld, default 6817) and the next one (slurmd).
set -euo pipefail

DIR=${LMFORGE_SLURM_DIR:-/tmp/lmforge-slurm}
CPUS=${LMFORGE_SLURM_CPUS:-2}
PORT=${LMFORGE_SLURM_PORT:-6817}
NODE=$(hostname -s)
CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket

log() { echo "slurm_local: $*" >&2; }

alive() {  # alive PIDFILE: the process in the pid file runs
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    log "slurm-wlm and munge are not installed; as root: apt-get install -y slurm-wlm munge"
    exit 1
  fi
  log "installing slurm-wlm and munge (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
}

write_config() {
  mkdir -p "$DIR"/{munge,state,spool,log,run}
  chmod 700 "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
  fi
  local mem
  mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
  cat > "$CONF" <<EOF
# written by scripts/slurm_local.sh: a single-node Slurm for tests ($DIR)
ClusterName=lmforge-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# a job whose dependency failed is cancelled, not left pending for ever
SchedulerParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=10
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

wait_idle() {
  local i state
  for i in $(seq 1 60); do
    state=$(SLURM_CONF=$CONF sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n 1 || true)
    case "$state" in
      idle|mix|alloc) log "node $NODE is $state (partition debug, $CPUS CPUs); SLURM_CONF=$CONF"; return 0 ;;
      down*|drain*|fail*) SLURM_CONF=$CONF scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
  done
  log "the node did not become idle in 60 s (state: ${state:-none}); logs in $DIR/log"
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  exit 1
}

setup() {
  install
  write_config
  if ! alive "$DIR/run/munged.pid"; then
    munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
      --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
  fi
  for i in $(seq 1 20); do [ -S "$SOCKET" ] && break; sleep 0.5; done
  export SLURM_CONF=$CONF
  if ! alive "$DIR/run/slurmctld.pid"; then
    slurmctld -i  # ignores saved state: a fresh controller each setup (forks into the background)
  fi
  if ! alive "$DIR/run/slurmd.pid"; then
    slurmd -N "$NODE"
  fi
  wait_idle
}

stop() {
  local name pid
  for name in slurmd slurmctld munged; do
    if alive "$DIR/run/$name.pid"; then
      pid=$(cat "$DIR/run/$name.pid")
      kill "$pid"
      for i in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      log "stopped $name ($pid)"
    fi
  done
}

status() {
  local name
  for name in munged slurmctld slurmd; do
    if alive "$DIR/run/$name.pid"; then echo "$name: running (pid $(cat "$DIR/run/$name.pid"))"; else echo "$name: stopped"; fi
  done
  if [ -f "$CONF" ] && alive "$DIR/run/slurmctld.pid"; then
    SLURM_CONF=$CONF sinfo
    SLURM_CONF=$CONF squeue
  fi
}

case "${1:-}" in
  setup) setup ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 setup|stop|status|env   (state in LMFORGE_SLURM_DIR=$DIR)" >&2; exit 2 ;;
esac

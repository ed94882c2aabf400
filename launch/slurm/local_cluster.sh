#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests of launch/slurm/train.sbatch.
#
#   bash launch/slurm/local_cluster.sh install   # apt: slurm-wlm, munge (idempotent; root)
#   bash launch/slurm/local_cluster.sh start     # munged (as munge), slurmctld + slurmd (as root); prints SLURM_CONF=...
#   bash launch/slurm/local_cluster.sh stop      # cancels its jobs, stops the daemons it started
#
# Its slurm.conf is private ($HFMG_SLURM_DIR, default /tmp/hybridflow-slurm): a machine's own
# /etc/slurm is never read or written; clients find the cluster through SLURM_CONF. One node named
# $(hostname -s), proctrack/linuxproc, task/none, select/cons_tres, and a default partition that
# oversubscribes (FORCE:8). The node declares $HFMG_SLURM_CPUS CPUs (default 8, with
# SlurmdParameters=config_overrides, whatever the machine has), so that train.sbatch's
# --ntasks-per-node requests fit as they would on a GPU node: 4 or 8 tasks then share the real cores.
set -euo pipefail
DIR=${HFMG_SLURM_DIR:-/tmp/hybridflow-slurm}
CONF=$DIR/slurm.conf
HOST=$(hostname -s)
export SLURM_CONF=$CONF

log() { echo "[local-slurm] $*" >&2; }

install() {
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return; fi
  [ "$(id -u)" = 0 ] || { log "installing slurm-wlm and munge needs root"; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  log "munged did not start"; exit 1
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  local mem
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cat > "$CONF" <<EOF
ClusterName=hybridflow
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
MinJobAge=3600
SlurmdParameters=config_overrides
NodeName=$HOST CPUs=${HFMG_SLURM_CPUS:-8} RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
EOF
}

running() {  # the daemon $1 of this cluster is alive (its pid file names a live process)
  [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null
}

start() {
  install
  start_munge
  if running slurmctld && running slurmd && sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; then
    echo "SLURM_CONF=$CONF"; return
  fi
  write_conf
  pkill -f "slurmctld -f $CONF" 2>/dev/null || true
  pkill -f "slurmd -f $CONF" 2>/dev/null || true
  slurmctld -f "$CONF" -i
  slurmd -f "$CONF"
  for _ in $(seq 100); do
    if sinfo -h -o %T 2>/dev/null | grep -qE "^(idle|mix|alloc)"; then echo "SLURM_CONF=$CONF"; return; fi
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 0.2
  done
  log "the node did not come up: $(sinfo 2>&1 | tail -n 1); see $DIR/log"
  exit 1
}

stop() {
  scancel --full --user "$(id -un)" 2>/dev/null || true
  [ -f "$DIR/slurmd.pid" ] && kill "$(cat "$DIR/slurmd.pid")" 2>/dev/null || true
  [ -f "$DIR/slurmctld.pid" ] && kill "$(cat "$DIR/slurmctld.pid")" 2>/dev/null || true
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac

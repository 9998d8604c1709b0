#!/usr/bin/env bash
# A real one-node SLURM cluster on a test machine, so that `launch/slurm.sbatch` can be tested with
# real `sbatch`/`srun` (tests/launch/test_launch.py::test_sbatch_on_a_live_one_node_cluster, which
# is skipped unless `sinfo` shows an idle node). See docs/slurm-local.md: Debian's SLURM 22.05
# without systemd, as root.
#
#   launch/slurm_local.sh start DIR   # munged + slurmctld + slurmd; writes DIR/slurm.conf and DIR/env
#   . DIR/env                         # or: export SLURM_CONF=DIR/slurm.conf (start prints the line)
#   launch/slurm_local.sh stop DIR    # stops the daemons by their pid files, removes DIR
#
# Install first (separate step, needs root and the network):
#   apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge
# Both sub-commands are idempotent: `start` leaves running daemons alone, `stop` on a stopped (or
# absent) cluster does nothing. Only one node: Debian's SLURM lacks multiple-slurmd support.
# Environment: SLURM_LOCAL_CPUS (default: nproc), SLURM_LOCAL_MEMORY_MB (default: 20000, capped
# at 90% of the machine's memory so that slurmd's registration is not rejected).
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
command=$1
dir=$2

MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pid_file() {  # stop the process named by a pid file: TERM, then KILL after 10 s
  local pid_file=$1 name=$2 pid
  [[ -s $pid_file ]] || return 0
  pid=$(cat "$pid_file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "slurm_local: $name ($pid) ignored TERM, sending KILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pid_file"
}

free_ports() {  # two distinct free TCP ports
  python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

start() {
  local missing=()
  for tool in munged slurmctld slurmd sinfo sbatch srun scontrol python3; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  if (( ${#missing[@]} )); then
    echo "slurm_local: not installed: ${missing[*]}" >&2
    echo "  install: apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge" >&2
    exit 1
  fi
  if [[ $(id -u) -ne 0 ]]; then
    echo "slurm_local: must run as root (munged's key and folders; SlurmUser=root)" >&2
    exit 1
  fi

  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  local conf=$dir/slurm.conf host user
  host=$(hostname)
  user=$(id -un)

  # Munge: a key owned by the user running munged, its runtime folders, the daemon.
  mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
  if [[ ! -s $MUNGE_KEY ]]; then
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
  fi
  chown "$user:" "$MUNGE_KEY" /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 400 "$MUNGE_KEY"
  chmod 700 /etc/munge /var/log/munge
  chmod 755 /run/munge
  if ! alive "$MUNGE_PID"; then
    munged --force
  fi

  # slurm.conf: written once (its ports must not change under running daemons).
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  if [[ ! -s $conf ]]; then
    local ports cpus mem_mb max_mb
    read -r -a ports <<<"$(free_ports)"
    cpus=${SLURM_LOCAL_CPUS:-$(nproc)}
    mem_mb=${SLURM_LOCAL_MEMORY_MB:-20000}
    max_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    (( mem_mb > max_mb )) && mem_mb=$max_mb
    cat >"$conf.tmp" <<EOF
# One-node test cluster written by launch/slurm_local.sh (see docs/slurm-local.md).
ClusterName=twotower-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${ports[0]}
SlurmdPort=${ports[1]}
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$conf.tmp" "$conf"
  fi
  echo "export SLURM_CONF=$conf" >"$dir/env"
  export SLURM_CONF=$conf

  # slurmctld, then slurmd (both daemonise and write their pid files into DIR).
  alive "$dir/slurmctld.pid" || slurmctld -f "$conf"
  alive "$dir/slurmd.pid" || slurmd -f "$conf"

  local state=""
  for _ in $(seq 60); do
    state=$(sinfo -h -o %t 2>/dev/null || true)
    [[ $state == idle || $state == mix || $state == alloc ]] && break
    sleep 1
  done
  if [[ $state != idle && $state != mix && $state != alloc ]]; then
    echo "slurm_local: node not ready after 60 s (sinfo: '${state}'); logs in $dir/log:" >&2
    tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    exit 1
  fi
  echo "slurm_local: node $host $state (SLURM_CONF=$conf)" >&2
  echo "export SLURM_CONF=$conf"
}

stop() {
  if [[ ! -d $dir ]]; then
    stop_pid_file "$MUNGE_PID" munged
    return 0
  fi
  dir=$(cd "$dir" && pwd)
  stop_pid_file "$dir/slurmd.pid" slurmd
  stop_pid_file "$dir/slurmctld.pid" slurmctld
  stop_pid_file "$MUNGE_PID" munged
  if [[ -f $dir/slurm.conf ]]; then
    rm -rf -- "$dir"
  else
    echo "slurm_local: $dir has no slurm.conf, not removing it" >&2
  fi
}

case $command in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac

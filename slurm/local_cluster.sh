#!/usr/bin/env bash
# A Slurm cluster on this host for trying jobs and for the tests: munge, slurmctld and two slurmd
# "nodes" (n1, n2; partition debug) on 127.0.0.1. Run as root.
#
#   bash slurm/local_cluster.sh up       install (if absent), configure, start; wait for idle nodes
#   bash slurm/local_cluster.sh down     stop the daemons it started (by PID)
#   bash slurm/local_cluster.sh status   daemons and sinfo
#
# State (config copy, spool, logs, PID files) lives in $GPTFORGE_SLURM_DIR (default
# /tmp/gptforge-slurm). The generated slurm.conf is written to /etc/slurm/slurm.conf (where sbatch,
# squeue, scancel look) with a marker line; a slurm.conf without the marker (a real cluster's) is
# never overwritten. "n1 n2" are added to /etc/hosts (jobs use MASTER_ADDR=n1).
set -euo pipefail

STATE=${GPTFORGE_SLURM_DIR:-/tmp/gptforge-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by gptforge slurm/local_cluster.sh"
CTLD_PORT=${GPTFORGE_SLURMCTLD_PORT:-6817}
NODES=(n1 n2)
NODE_PORTS=(17001 17002)
CPUS=${GPTFORGE_SLURM_CPUS:-4}  # per node; more than this host has is fine (config_overrides)

die() { echo "local_cluster.sh: error: $*" >&2; exit 2; }

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_if_absent() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [[ $(id -u) == 0 ]] || die "Slurm is not installed and this is not root: apt-get install slurmctld slurmd slurm-client munge"
    echo "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    mkdir -p "$STATE"/{ctld,log,run} /etc/slurm
    for n in "${NODES[@]}"; do mkdir -p "$STATE/spool-$n"; done
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script (a real cluster?): not touching it"
    fi
    local nodelines="" i
    for i in "${!NODES[@]}"; do
        nodelines+="NodeName=${NODES[$i]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=${NODE_PORTS[$i]} CPUs=$CPUS State=UNKNOWN"$'\n'
    done
    cat > "$STATE/slurm.conf" <<CONF
$MARKER (state in $STATE)
ClusterName=gptforge-local
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=300
KillWait=30
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
${nodelines}PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
CONF
    cp "$STATE/slurm.conf" "$CONF"
    grep -qE '^127\.0\.0\.1[[:space:]]+n1 n2([[:space:]]|$)' /etc/hosts || echo "127.0.0.1 n1 n2" >> /etc/hosts
}

start_munge() {
    if [[ -S /run/munge/munge.socket.2 ]] && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        return  # a working munged (ours or the system's)
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    [[ -f /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
    runuser -u munge -- /usr/sbin/munged || die "munged did not start"
    # munged writes /run/munge/munged.pid itself: keep a copy saying that this one is ours
    for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$STATE/run/munged.ours"
}

up() {
    [[ $(id -u) == 0 ]] || die "run as root (starts system daemons)"
    install_if_absent
    write_conf
    start_munge
    alive "$STATE/run/slurmctld.pid" || slurmctld -f "$CONF" \
        || die "slurmctld did not start (see $STATE/log/slurmctld.log)"
    for n in "${NODES[@]}"; do
        alive "$STATE/run/slurmd-$n.pid" || slurmd -f "$CONF" -N "$n" \
            || die "slurmd -N $n did not start (see $STATE/log/slurmd-$n.log)"
    done
    local i
    for i in $(seq 300); do
        if [[ $(sinfo -h -p debug -t idle,mix,alloc -o '%D' 2>/dev/null | awk '{s+=$1} END {print s+0}') -ge ${#NODES[@]} ]]; then
            echo "local Slurm cluster up: nodes ${NODES[*]} (partition debug), state in $STATE"
            return
        fi
        sleep 0.2
    done
    sinfo >&2 || true
    die "nodes did not become idle within 60 s (see $STATE/log)"
}

stop_pidfile() {  # stop the process in PID file $1 (TERM, then KILL after 10 s)
    local f=$1 pid
    [[ -f $f ]] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

down() {
    local n
    for n in "${NODES[@]}"; do stop_pidfile "$STATE/run/slurmd-$n.pid"; done
    stop_pidfile "$STATE/run/slurmctld.pid"
    if [[ -f $STATE/run/munged.ours ]]; then
        stop_pidfile "$STATE/run/munged.ours"
    fi
    if [[ -f $CONF ]] && grep -qF "$MARKER" "$CONF"; then rm -f "$CONF"; fi
    rm -rf "$STATE/ctld"  # no job survives into the next "up"
    echo "local Slurm cluster down"
}

status() {
    local f
    for f in slurmctld slurmd-n1 slurmd-n2 munged.ours; do
        local p=$STATE/run/$f; [[ $f == *.ours ]] || p+=.pid
        if alive "$p"; then echo "$f: running (pid $(cat "$p"))"; else echo "$f: stopped"; fi
    done
    if alive "$STATE/run/slurmctld.pid"; then sinfo; fi
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

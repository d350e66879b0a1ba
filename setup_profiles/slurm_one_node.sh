#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests that run jobs through a real scheduler (tests/test_slurm.py)
# and for trying the cluster set-up of the README before pointing it at a real cluster. Idempotent: installs Debian's
# slurmctld, slurmd, the client commands and munge when they are missing, writes /etc/slurm/slurm.conf for this host
# (its name, its CPUs and memory as `slurmd -C` sees them), starts munged, slurmctld and slurmd when they are not
# running, and waits until the node takes jobs. Needs root and Debian (apt); no systemd (containers, CI).
#
# Partition `normal` is the template's (setup_profiles/computer_slurm.yaml), so its `#SBATCH --partition=normal`
# needs no edit here. Without slurmdbd there is no `sacct`: the scheduler's own record of a job is
# `scontrol show job ID` (kept MIN_JOB_AGE_S after the job ends) and the controller's log, SLURM_LOG_DIR/slurmctld.log.
set -euo pipefail

SLURM_CONF=/etc/slurm/slurm.conf
SLURM_LOG_DIR=/var/log/slurm
SLURM_STATE_DIR=/var/lib/slurm
PARTITION=normal
# Finished jobs stay in the controller (`scontrol show job`) this long; the default, 300 s, is shorter than a test
# module that checks its first jobs at its end.
MIN_JOB_AGE_S=3600

say() { echo "[slurm one node] $*"; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    say "installing slurmctld, slurmd, slurm-client and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    # Recommends would pull in 30 more packages (HDF5, IPMI, ROCm, InfluxDB plugins) that a one-node cluster never loads.
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating the munge key"
        mungekey --create --keyfile /etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    say "starting munged"
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "munged did not start" >&2
    exit 1
}

write_slurm_conf() {
    local host node_line
    host=$(hostname -s)
    # `slurmd -C` prints this machine's NodeName line (CPUs, sockets, cores, threads, RealMemory): the node is then
    # never drained for claiming more than it has. Its second line is an uptime, not configuration.
    node_line=$(slurmd -C | head -n 1)
    install -d -o slurm -g slurm "$SLURM_LOG_DIR" "$SLURM_STATE_DIR/slurmctld"
    install -d "$SLURM_STATE_DIR/slurmd"
    local conf
    conf=$(cat <<EOF
# Written by setup_profiles/slurm_one_node.sh: a one-node cluster on $host.
ClusterName=polmodel
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=slurm
StateSaveLocation=$SLURM_STATE_DIR/slurmctld
SlurmdSpoolDir=$SLURM_STATE_DIR/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$SLURM_LOG_DIR/slurmctld.log
SlurmdLogFile=$SLURM_LOG_DIR/slurmd.log
# No cgroups in a container: processes are tracked through /proc and tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# No slurmdbd (no sacct): the controller's log and \`scontrol show job\` are the record.
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=$MIN_JOB_AGE_S
# CPUs are the consumable: a 2-rank job takes both cores of a 2-core node, the next one waits in the queue.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
$node_line State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
    if [ -f "$SLURM_CONF" ] && [ "$(cat "$SLURM_CONF")" = "$conf" ]; then
        return 1  # unchanged
    fi
    say "writing $SLURM_CONF ($node_line)"
    install -d /etc/slurm
    printf '%s\n' "$conf" >"$SLURM_CONF"
    return 0
}

daemon_running() {  # pid file name
    [ -s "/run/$1.pid" ] && kill -0 "$(cat "/run/$1.pid")" 2>/dev/null
}

start_slurm() {
    local changed=$1
    if daemon_running slurmctld && [ "$changed" = yes ]; then
        say "configuration changed: scontrol reconfigure"
        scontrol reconfigure
    fi
    if ! daemon_running slurmctld; then
        say "starting slurmctld"
        slurmctld
    fi
    if daemon_running slurmd && [ "$changed" = yes ]; then
        # a changed NodeName line needs a new slurmd; `reconfigure` alone keeps the old node description
        kill "$(cat /run/slurmd.pid)"
        for _ in $(seq 50); do daemon_running slurmd || break; sleep 0.1; done
    fi
    if ! daemon_running slurmd; then
        say "starting slurmd"
        slurmd
    fi
}

wait_for_idle_node() {
    local host state
    host=$(hostname -s)
    for _ in $(seq 120); do
        state=$(sinfo --noheader --nodes="$host" --format=%T 2>/dev/null || true)
        case "$state" in
            idle|mixed|allocated|completing) say "node $host is $state in partition $PARTITION"; return ;;
            drain*|down*)
                # ReturnToService=2 brings a node back once it registers; a node left down by a previous
                # configuration is resumed here
                scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    echo "node $host did not become idle (state: ${state:-unknown}); see $SLURM_LOG_DIR/slurmctld.log and slurmd.log" >&2
    exit 1
}

install_packages
start_munge
if write_slurm_conf; then changed=yes; else changed=no; fi
start_slurm "$changed"
wait_for_idle_node

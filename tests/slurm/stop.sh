#!/usr/bin/env bash
# Stop the daemons tests/slurm/start.sh started, by their pid files (never by name): slurmd, slurmctld, slurmdbd,
# MariaDB, and munged when start.sh started it. State (database, job history) is kept for the next start.
set -euo pipefail
STATE=${SIT_SLURM_STATE:-/var/tmp/sit-slurm}
say() { echo "slurm-down: $*" >&2; }

stop_pid() {   # stop_pid NAME PIDFILE: SIGTERM, wait up to 20 s, then SIGKILL
    local name=$1 f=$2 pid
    [[ -s $f ]] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then say "$name ($pid) did not stop: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
        say "stopped $name ($pid)"
    fi
    rm -f "$f"
}
stop_pid slurmd "$STATE/slurmd/slurmd.pid"
stop_pid slurmctld "$STATE/slurm/slurmctld.pid"
stop_pid slurmdbd "$STATE/slurm/slurmdbd.pid"
stop_pid mariadbd "$STATE/dbrun/mariadbd.pid"
if [[ -e $STATE/.munged-ours ]]; then stop_pid munged /run/munge/munged.pid; rm -f "$STATE/.munged-ours"; fi

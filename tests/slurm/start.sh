#!/usr/bin/env bash
# Start a real single-host SLURM cluster for tests/test_slurm.py: munged, MariaDB + slurmdbd (accounting: without it
# submitit cannot see the state of a killed job), slurmctld and slurmd, all on loopback, one node (this machine).
#
# Idempotent: when `sinfo` already shows a usable node it returns at once; otherwise it installs Debian's packages if
# they are missing, writes /etc/slurm/slurm.conf and slurmdbd.conf (only ones it wrote itself) and starts what is not
# running. Needs root on Debian/Ubuntu. All state (database, spool, logs, pid files) is under $SIT_SLURM_STATE
# (default /var/tmp/sit-slurm), outside the repository; tests/slurm/stop.sh stops the daemons by their pid files.
set -euo pipefail

STATE=${SIT_SLURM_STATE:-/var/tmp/sit-slurm}
DB_PORT=${SIT_SLURM_DB_PORT:-3307}          # not 3306, so a MariaDB/MySQL of the machine's own is left alone
CONF_DIR=/etc/slurm
MARK="# written by sit-workbench tests/slurm/start.sh"
t0=$EPOCHREALTIME
say() { echo "slurm-up: $*" >&2; }
die() { say "error: $*"; exit 1; }

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
usable() {   # a node that takes jobs, answered within a few seconds
    command -v sinfo >/dev/null 2>&1 || return 1
    # our own cluster with its controller down: no need to wait for sinfo to give up
    if grep -qsF "$MARK" "$CONF_DIR/slurm.conf" && ! alive "$STATE/slurm/slurmctld.pid"; then return 1; fi
    timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)$'
}
elapsed() { awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

if usable; then say "a SLURM cluster is already up: $(sinfo -h -o '%P %D %T' | tr '\n' ' ')"; exit 0; fi

[[ $(id -u) == 0 ]] || die "no SLURM cluster is reachable and starting one needs root (Debian: slurm-wlm, munge, slurmdbd, mariadb-server)"

# one start at a time (tests and `make slurm-up` may race)
mkdir -p "$STATE"; chmod 755 "$STATE"
exec 9>"$STATE/.lock"
flock -w 300 9 || die "another start.sh holds $STATE/.lock"
if usable; then say "a SLURM cluster came up meanwhile"; exit 0; fi

# --- packages ------------------------------------------------------------------------------------------------------
need=()
for b in slurmctld:slurm-wlm slurmd:slurm-wlm munged:munge slurmdbd:slurmdbd mariadbd:mariadb-server; do
    command -v "${b%%:*}" >/dev/null 2>&1 || [[ -x /usr/sbin/${b%%:*} ]] || need+=("${b#*:}")
done
if ((${#need[@]})); then
    command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get: install SLURM, munge, slurmdbd and MariaDB by hand"
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge slurmdbd mariadb-server mariadb-client >"$STATE/apt.log" 2>&1 || {
        apt-get update -q >>"$STATE/apt.log" 2>&1
        apt-get install -y -q slurm-wlm munge slurmdbd mariadb-server mariadb-client >>"$STATE/apt.log" 2>&1 ||
            { tail -20 "$STATE/apt.log" >&2; die "apt-get install failed (log: $STATE/apt.log)"; }
    }
fi
export PATH=$PATH:/usr/sbin:/sbin

HOST=$(hostname -s)
CORES=$(nproc)
MEM_MB=$(( $(awk '/^MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
(( MEM_MB > 512 )) || MEM_MB=512

# --- directories -----------------------------------------------------------------------------------------------------
install -d -m 700 -o mysql -g mysql "$STATE/db"
install -d -m 755 -o mysql -g mysql "$STATE/dbrun"
install -d -m 755 -o slurm -g slurm "$STATE/slurm" "$STATE/slurm/ctld"
install -d -m 755 "$STATE/slurmd"
install -d -m 755 -o munge -g munge /run/munge

# --- configuration (only files this script wrote are replaced) -----------------------------------------------------
write_conf() {   # write_conf FILE MODE OWNER < content; prints "changed" when the file changed
    local f=$1 mode=$2 owner=$3 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [[ -e $f ]] && ! grep -qF "$MARK" "$f"; then rm -f "$tmp"; die "$f exists and was not written by this script; not touching it"; fi
    if [[ -e $f ]] && cmp -s "$tmp" "$f"; then rm -f "$tmp"; return; fi
    install -D -m "$mode" -o "$owner" -g "$owner" "$tmp" "$f"; rm -f "$tmp"
    echo changed
}
[[ -s $STATE/.dbpass ]] || { (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$STATE/.dbpass"); }
DBPASS=$(cat "$STATE/.dbpass")

changed=$(write_conf "$CONF_DIR/slurm.conf" 644 root <<CONF
$MARK
# One node (this machine) on loopback, for tests; state under $STATE.
ClusterName=sitwb
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
# short credential lifetime and a fast scheduler: a requeued job runs again after ~10 s, not ~2 min
AuthInfo=cred_expire=10
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
StateSaveLocation=$STATE/slurm/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurm/slurmctld.pid
SlurmdPidFile=$STATE/slurmd/slurmd.pid
SlurmctldLogFile=$STATE/slurm/slurmctld.log
SlurmdLogFile=$STATE/slurmd/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobCompType=jobcomp/none
ReturnToService=2
MailProg=/bin/true
MpiDefault=none
KillWait=10
InactiveLimit=0
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 Sockets=1 CoresPerSocket=$CORES ThreadsPerCore=1 RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
)
changed+=$(write_conf "$CONF_DIR/slurmdbd.conf" 600 slurm <<CONF
$MARK
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=$HOST
DbdPort=6819
SlurmUser=slurm
LogFile=$STATE/slurm/slurmdbd.log
PidFile=$STATE/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
CONF
)
if [[ -n $changed ]]; then
    say "configuration written ($CONF_DIR/slurm.conf, slurmdbd.conf)"
    for p in "$STATE/slurmd/slurmd.pid" "$STATE/slurm/slurmctld.pid" "$STATE/slurm/slurmdbd.pid"; do
        if alive "$p"; then say "restarting: the configuration changed"; bash "$(dirname "$0")/stop.sh"; break; fi
    done
fi

wait_for() {   # wait_for SECONDS WHAT COMMAND...
    local n=$(( $1 * 5 )) what=$2; shift 2
    for ((i = 0; i < n; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "$what did not come up"
}
show_log() { [[ -f $1 ]] && { say "--- tail of $1"; tail -20 "$1" >&2; }; return 0; }

# --- munge -----------------------------------------------------------------------------------------------------------
munge_ok() { munge -n | unmunge; }
if ! munge_ok >/dev/null 2>&1; then
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE/.munged-ours"          # stop.sh stops munged only if this script started it
    wait_for 10 "munged" munge_ok || { show_log /var/log/munge/munged.log; exit 1; }
fi

# --- MariaDB ---------------------------------------------------------------------------------------------------------
SOCK=$STATE/dbrun/mysqld.sock
sql() { mariadb --no-defaults -S "$SOCK" -u root -N -e "$1"; }
if ! alive "$STATE/dbrun/mariadbd.pid"; then
    if [[ ! -d $STATE/db/mysql ]]; then
        mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/db" --skip-test-db --auth-root-authentication-method=socket \
            >"$STATE/dbrun/install.log" 2>&1 || { show_log "$STATE/dbrun/install.log"; die "mariadb-install-db failed"; }
    fi
    install -m 640 -o mysql -g mysql /dev/null "$STATE/dbrun/mariadbd.err" 2>/dev/null || true
    setsid mariadbd --no-defaults --user=mysql --datadir="$STATE/db" --socket="$SOCK" --pid-file="$STATE/dbrun/mariadbd.pid" \
        --bind-address=127.0.0.1 --port="$DB_PORT" --log-error="$STATE/dbrun/mariadbd.err" \
        --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 </dev/null >>"$STATE/dbrun/mariadbd.out" 2>&1 &
    wait_for 60 "MariaDB" sql "select 1" || { show_log "$STATE/dbrun/mariadbd.err"; exit 1; }
fi
for h in localhost 127.0.0.1; do
    sql "CREATE USER IF NOT EXISTS 'slurm'@'$h' IDENTIFIED BY '$DBPASS'; ALTER USER 'slurm'@'$h' IDENTIFIED BY '$DBPASS';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'$h';"
done

# --- slurmdbd, slurmctld, slurmd -------------------------------------------------------------------------------------
dbd_ok() { timeout 5 bash -c "</dev/tcp/127.0.0.1/6819"; }
if ! alive "$STATE/slurm/slurmdbd.pid"; then
    slurmdbd || { show_log "$STATE/slurm/slurmdbd.log"; die "slurmdbd failed to start"; }
fi
wait_for 30 "slurmdbd" dbd_ok || { show_log "$STATE/slurm/slurmdbd.log"; exit 1; }
if ! alive "$STATE/slurm/slurmctld.pid"; then
    slurmctld || { show_log "$STATE/slurm/slurmctld.log"; die "slurmctld failed to start"; }
fi
wait_for 30 "slurmctld" scontrol ping || { show_log "$STATE/slurm/slurmctld.log"; exit 1; }
if ! alive "$STATE/slurmd/slurmd.pid"; then
    slurmd || { show_log "$STATE/slurmd/slurmd.log"; die "slurmd failed to start"; }
fi

# --- wait for the node -----------------------------------------------------------------------------------------------
for ((i = 0; i < 300; i++)); do
    usable && break
    st=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
    if [[ $st =~ ^(down|drain|drained|draining|fail|inval) ]] && ((i % 25 == 24)); then
        scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.2
done
if ! usable; then
    sinfo -N -l >&2 || true
    show_log "$STATE/slurm/slurmctld.log"; show_log "$STATE/slurmd/slurmd.log"
    die "the node did not become idle within 60 s"
fi
say "SLURM is up in $(elapsed) s: $(sinfo -h -o 'partition %P, %D node(s) %N, %c cpus, %T' | tr '\n' ' ')(state under $STATE)"

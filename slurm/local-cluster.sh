#!/usr/bin/env bash
# local-cluster.sh — a real, throw-away Slurm cluster on this one machine.
#
#   slurm/local-cluster.sh up [--nodes N]   # install + start; prints `export SLURM_CONF=...`
#   slurm/local-cluster.sh up --hosts FILE --ctld-addr ADDR   # one slurmd per host (see README)
#   slurm/local-cluster.sh down             # stop everything this script started
#   slurm/local-cluster.sh status           # exit 0 if up, 1 if not
#
# Typical use (tests, CI):   eval "$(slurm/local-cluster.sh up --nodes 2)"
#
# Everything lives in one state dir (default /tmp/hpcckpt-slurm, env
# HPCCKPT_SLURM_DIR): slurm.conf, env.sh, logs, pid files, spool/state dirs and a
# private munged socket.  Nothing under /etc/slurm or /run is used, so this never
# fights with a system Slurm/munge installation.  See slurm/README.md.
#
# Environment knobs (all optional):
#   HPCCKPT_SLURM_DIR        state dir                       (/tmp/hpcckpt-slurm)
#   HPCCKPT_SLURM_CTLD_PORT  slurmctld port                  (16817)
#   HPCCKPT_SLURMD_PORT      port of node n1; nK uses +K-1   (17001)
#   HPCCKPT_SLURM_TIMEOUT    seconds to wait for idle nodes  (60)
#
# Only stdout carries the `export SLURM_CONF=...` line (up) and the status report
# (status); progress messages go to stderr so `eval "$(... up)"` is safe.
set -euo pipefail

# Debian puts the daemons in /usr/sbin, which non-login shells in CI may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

STATE_DIR=${HPCCKPT_SLURM_DIR:-/tmp/hpcckpt-slurm}
# slurm.conf needs absolute paths and so does our /proc matching below.
STATE_DIR=$(realpath -m -- "$STATE_DIR")
# slurm.conf has no quoting for paths.
[[ $STATE_DIR != *[[:space:]]* ]] || { echo "local-cluster: HPCCKPT_SLURM_DIR must not contain spaces" >&2; exit 2; }
CONF=$STATE_DIR/slurm.conf
ENV_SH=$STATE_DIR/env.sh
LOG_DIR=$STATE_DIR/log
RUN_DIR=$STATE_DIR/run
MUNGE_DIR=$STATE_DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
CTLD_PORT=${HPCCKPT_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${HPCCKPT_SLURMD_PORT:-17001}
TIMEOUT=${HPCCKPT_SLURM_TIMEOUT:-60}
# tini: see start-up of slurmd in cmd_up.
PACKAGES=(slurmctld slurmd slurm-client munge tini)
SYSTEM_MUNGE_KEY=/etc/munge/munge.key
# The nodes: names, addresses and the command prefix each slurmd starts under
# (empty: this machine).  Set by cmd_up (--nodes, or --hosts FILE).
NODE_NAMES=() NODE_ADDRS=() NODE_PREFIXES=()
CTLD_ADDR=""

log() { printf 'local-cluster: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# ---------------------------------------------------------------- processes

# alive PID: true if PID exists and is not a zombie.  PID 1 in some sandboxes
# does not reap promptly, so a killed daemon can linger as a zombie; `kill -0`
# would report it as running forever.
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }            # field 3 (state) follows "(comm) "
    [[ ${stat%% *} != Z ]]
}

# our_pids: every live slurmctld/slurmd (and its tini)/munged started for THIS
# state dir.
# Matched on argv (argv[0] basename + our exact conf/socket path), not on pid
# files, so daemons are still found when the state dir was deleted under them.
our_pids() {
    local p pid name
    local -a argv
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        mapfile -d '' -t argv 2>/dev/null <"$p/cmdline" || continue
        ((${#argv[@]})) || continue
        name=${argv[0]##*/}
        case $name in
            slurmctld|slurmd|tini)
                [[ " ${argv[*]} " == *" $CONF "* ]] || continue ;;
            munged)
                [[ " ${argv[*]} " == *" --socket=$MUNGE_SOCKET "* ]] || continue ;;
            *) continue ;;
        esac
        alive "$pid" && echo "$pid"
    done
    return 0
}

# stray_stepds: slurmstepd processes of this cluster (they hold files in our
# spool dir open).  slurmstepd detaches from slurmd, so stopping slurmd alone
# would leave running jobs behind.
stray_stepds() {
    local p pid fd
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [[ $(cat "$p/comm" 2>/dev/null) == slurmstepd ]] || continue
        for fd in "$p"/fd/* "$p/cwd"; do
            if [[ $(readlink "$fd" 2>/dev/null) == "$STATE_DIR"/* ]]; then
                alive "$pid" && echo "$pid"
                break
            fi
        done
    done
    return 0
}

# child_pgids PID: process groups of PID's children (from /proc: no procps
# needed, minimal Debian images lack `ps`).
child_pgids() {
    local p stat rest ppid pgrp
    for p in /proc/[0-9]*; do
        stat=$(cat "$p/stat" 2>/dev/null) || continue
        rest=${stat##*) }                 # "state ppid pgrp ..."
        read -r _ ppid pgrp _ <<<"$rest"
        [[ $ppid == "$1" ]] && echo "$pgrp"
    done | sort -u
}

# wait_gone SECONDS PID...: wait until none of the PIDs is alive.
wait_gone() {
    local deadline=$((SECONDS + $1)) pid left
    shift
    while :; do
        left=()
        for pid in "$@"; do alive "$pid" && left+=("$pid"); done
        ((${#left[@]})) || return 0
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# start_daemon NAME CMD...: run CMD in the foreground mode of the daemon, in its
# own session (setsid) so it survives this script and the caller's terminal, with
# stdout/stderr in log/NAME.out and its pid in run/NAME.pid.  The inner shell
# writes its own $$ and then execs, so the pid file is right even if setsid had
# to fork.  fd 9 (our lock) is closed so the daemons do not keep holding it.
start_daemon() {
    local name=$1
    shift
    rm -f "$RUN_DIR/$name.pid"
    # shellcheck disable=SC2016  # $$/$0/$@ are for the inner shell
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$RUN_DIR/$name.pid" "$@" \
        >>"$LOG_DIR/$name.out" 2>&1 </dev/null 9>&- &
    # Callers check liveness through the pid file, so wait until it exists.
    local deadline=$((SECONDS + 10))
    until [[ -s $RUN_DIR/$name.pid ]]; do
        ((SECONDS < deadline)) || die "could not start $name"
        sleep 0.05
    done
}

pid_of() { cat "$RUN_DIR/$1.pid" 2>/dev/null || true; }

# tail_logs: show the end of every log on stderr (for CI output on failure).
# *.log are the daemons' own timestamped logs; *.out is their stdout/stderr,
# which mostly repeats the .log but is the only place for errors that happen
# before the log file is opened (bad config, bind failures), so show its end too.
tail_logs() {
    local f lines
    for f in "$LOG_DIR"/*.log "$LOG_DIR"/*.out; do
        [[ -s $f ]] || continue
        lines=25
        [[ $f == *.out && -s ${f%.out}.log ]] && lines=5
        printf '\n===== %s (last %d lines) =====\n' "$f" "$lines" >&2
        tail -n "$lines" "$f" >&2
    done
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- install

pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}

ensure_installed() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    ((${#missing[@]})) || return 0
    ((EUID == 0)) || die "packages missing (${missing[*]}) and not root"
    log "installing ${missing[*]} ..."
    export DEBIAN_FRONTEND=noninteractive
    # Lock timeout: fresh CI VMs often run apt (unattended-upgrades) at boot.
    local apt=(apt-get -o DPkg::Lock::Timeout=300 -y -q)
    # Try without `apt-get update` first: it is the slow part and the lists are
    # usually fresh enough; only refresh them if the install fails.
    if ! "${apt[@]}" install --no-install-recommends "${missing[@]}" >&2; then
        log "install failed; running apt-get update and retrying"
        "${apt[@]}" update >&2
        "${apt[@]}" install --no-install-recommends "${missing[@]}" >&2
    fi
}

# The munge package's postinst normally creates the key; create it if a broken
# or minimal install left none.
ensure_munge_key() {
    [[ -s $SYSTEM_MUNGE_KEY ]] && return 0
    log "creating munge key $SYSTEM_MUNGE_KEY"
    install -d -m 0700 "$(dirname "$SYSTEM_MUNGE_KEY")"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile="$SYSTEM_MUNGE_KEY" >&2
    else
        dd if=/dev/urandom of="$SYSTEM_MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chmod 0400 "$SYSTEM_MUNGE_KEY"
    if id munge >/dev/null 2>&1; then
        chown munge:munge "$(dirname "$SYSTEM_MUNGE_KEY")" "$SYSTEM_MUNGE_KEY"
    fi
}

# ---------------------------------------------------------------- config

# Generate slurm.conf for the nodes in NODE_NAMES on stdout.  Deterministic, so `up` can compare
# it with the running cluster's file to decide whether anything must change.
gen_conf() {
    local n=${#NODE_NAMES[@]} i hw cpus boards sockets cores threads mem
    # Describe each node exactly as slurmd will report it (`slurmd -C`), else the
    # node registers with a different topology and goes DRAIN/INVAL.  RealMemory
    # is set a bit (5%) below the real value: a node reporting LESS memory than
    # configured is drained, a node reporting more is fine.
    hw=$(slurmd -C 2>/dev/null | head -n 1) || true
    field() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
    cpus=$(field CPUs); boards=$(field Boards); sockets=$(field SocketsPerBoard)
    cores=$(field CoresPerSocket); threads=$(field ThreadsPerCore); mem=$(field RealMemory)
    local hwspec
    if [[ -n $cpus && -n $boards && -n $sockets && -n $cores && -n $threads ]]; then
        hwspec="CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads"
    else
        hwspec="CPUs=$(nproc)"     # fallback: slurmd -C unavailable
    fi
    [[ -n $mem ]] || mem=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
    mem=$((mem * 95 / 100))
    ((mem > 0)) || mem=1

    cat <<EOF
# Generated by slurm/local-cluster.sh — do not edit; rerun 'up' instead.
ClusterName=hpcckpt
# "localhost" is accepted by slurmctld as "this machine" whatever the hostname;
# with --hosts, the nodes reach it at the address in parentheses.
SlurmctldHost=localhost${CTLD_ADDR:+($CTLD_ADDR)}
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root

# Private munged (socket in the state dir).  cred_expire=5 (the minimum) makes a
# requeued job eligible again after ~5 s instead of the default 120 s.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5,socket=$MUNGE_SOCKET

StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups needed (containers/VMs without a usable cgroup tree work too).
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No slurmdbd / accounting daemons.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none

# Schedule every second so tests (requeue -> rerun) do not wait for the default
# 60 s scheduler / 30 s backfill intervals.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1,batch_sched_delay=0
ReturnToService=2
JobRequeue=1
# Finished jobs stay visible in 'scontrol show job' for 5 minutes.
MinJobAge=300
KillWait=5
OverTimeLimit=0
MessageTimeout=10
InactiveLimit=0
Waittime=0
PropagateResourceLimits=NONE
MailProg=/bin/true

# $n node(s), all on this machine (one slurmd per node; distinct ports, or with
# --hosts each in its own network namespace).  Each node claims all CPUs, so
# several nodes over-subscribe the machine: fine for tests.
EOF
    for ((i = 0; i < n; i++)); do
        if [[ -n $CTLD_ADDR ]]; then
            echo "NodeName=${NODE_NAMES[i]} NodeHostname=${NODE_NAMES[i]} NodeAddr=${NODE_ADDRS[i]} $hwspec RealMemory=$mem State=UNKNOWN"
        else
            echo "NodeName=${NODE_NAMES[i]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i)) $hwspec RealMemory=$mem State=UNKNOWN"
        fi
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
}

conf_nodes() { grep -c '^NodeName=' "$CONF" 2>/dev/null || true; }
# daemon_names: munged, slurmctld and slurmd.<node> for every node of $CONF.
daemon_names() {
    echo munged slurmctld
    sed -n 's/^NodeName=\([^ ]*\).*/slurmd.\1/p' "$CONF" 2>/dev/null || true
}

# read_hosts FILE: NODE_* from "NAME ADDR [COMMAND PREFIX...]" lines (# comments).
read_hosts() {
    local name addr rest
    [[ -r $1 ]] || die "cannot read hosts file $1"
    while read -r name addr rest; do
        [[ -z $name || $name == \#* ]] && continue
        [[ -n $addr ]] || die "$1: no address for node $name"
        NODE_NAMES+=("$name") NODE_ADDRS+=("$addr") NODE_PREFIXES+=("$rest")
    done <"$1"
}

# ---------------------------------------------------------------- health

# node_states: "<name> <state>" per node, or fail if slurmctld does not answer.
node_states() {
    SLURM_CONF=$CONF timeout 15 sinfo -h -N -o '%N %t' 2>/dev/null
}

# healthy: all our daemons run (per pid files) and sinfo lists the configured
# nodes, none down/drained/not responding.  Busy nodes (alloc/mix) count as up.
healthy() {
    local n name pid states i=0 st
    [[ -f $CONF ]] || return 1
    n=$(conf_nodes)
    ((n > 0)) || return 1
    for name in $(daemon_names); do
        pid=$(pid_of "$name")
        [[ -n $pid ]] && alive "$pid" || return 1
    done
    states=$(node_states) || return 1
    while read -r _ st; do
        case $st in idle|alloc|mix|comp|mix-|plnd) i=$((i + 1)) ;; *) return 1 ;; esac
    done <<<"$states"
    ((i == n))
}

# wait_idle N: wait until sinfo shows N idle nodes; fail fast if a daemon died.
wait_idle() {
    local n=$1 deadline=$((SECONDS + TIMEOUT)) states name pid
    while :; do
        states=$(node_states || true)
        if [[ $(grep -c ' idle$' <<<"$states") -eq $n && $(grep -c . <<<"$states") -eq $n ]]; then
            return 0
        fi
        for name in $(daemon_names); do
            pid=$(pid_of "$name")
            if [[ -z $pid ]] || ! alive "$pid"; then
                log "$name exited during start-up"
                return 1
            fi
        done
        if ((SECONDS >= deadline)); then
            log "timed out after ${TIMEOUT}s waiting for $n idle node(s); sinfo says:"
            printf '%s\n' "${states:-<no answer from slurmctld>}" >&2
            return 1
        fi
        sleep 0.2
    done
}

# ---------------------------------------------------------------- commands

stop_all() {
    local pids ctld_pid
    # 1. Cancel jobs while slurmctld is still there, so slurmstepd kills the job
    #    processes cleanly (they live outside slurmd's process tree).
    ctld_pid=$(pid_of slurmctld)
    if [[ -f $CONF && -n $ctld_pid ]] && alive "$ctld_pid"; then
        local jobs
        jobs=$(SLURM_CONF=$CONF timeout 15 squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            log "cancelling jobs: ${jobs//$'\n'/ }"
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF timeout 15 scancel $jobs 2>/dev/null || true
            local deadline=$((SECONDS + 20))
            while ((SECONDS < deadline)) &&
                [[ -n $(SLURM_CONF=$CONF timeout 15 squeue -h -o %i 2>/dev/null || true) ]]; do
                sleep 0.5
            done
        fi
    fi
    # 2. Daemons: slurmd's and slurmctld first, munged last (they talk to it
    #    while shutting down).  SIGTERM is the documented clean stop for all.
    mapfile -t pids < <(our_pids)
    local slurm_pids=() munge_pids=() pid
    for pid in "${pids[@]}"; do
        if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == munged ]]; then munge_pids+=("$pid")
        else slurm_pids+=("$pid"); fi
    done
    local group
    for group in slurm munge; do
        local -n g=${group}_pids
        ((${#g[@]})) || continue
        log "stopping ${group} daemons (pids ${g[*]})"
        kill -TERM "${g[@]}" 2>/dev/null || true
        if ! wait_gone 20 "${g[@]}"; then
            log "still running after 20 s, sending SIGKILL"
            kill -KILL "${g[@]}" 2>/dev/null || true
            wait_gone 5 "${g[@]}" || die "could not stop pids ${g[*]}"
        fi
        unset -n g
    done
    # 3. Leftover step daemons (e.g. a job that ignored the cancel): kill their
    #    process groups (proctrack/pgid puts each job in its own group).
    mapfile -t pids < <(stray_stepds)
    if ((${#pids[@]})); then
        log "killing leftover slurmstepd ${pids[*]}"
        local pgid
        for pid in "${pids[@]}"; do
            # Each task is the leader of its own group; kill the groups first
            # (grandchildren included), then the step daemon itself.
            for pgid in $(child_pgids "$pid"); do
                if ((pgid > 1)); then kill -KILL -- "-$pgid" 2>/dev/null || true; fi
            done
            kill -KILL "$pid" 2>/dev/null || true
        done
        wait_gone 5 "${pids[@]}" || true
    fi
    rm -f "$RUN_DIR"/*.pid 2>/dev/null || true
}

lock_state() {
    # Serialise concurrent up/down on the same state dir (parallel test runs).
    exec 9>"$STATE_DIR/.lock"
    flock -w 300 9 || die "could not lock $STATE_DIR/.lock"
}

print_env() {
    printf 'export SLURM_CONF=%q\n' "$CONF" >"$ENV_SH"
    cat "$ENV_SH"
}

cmd_up() {
    local nodes=1 hosts_file="" i
    while (($#)); do
        case $1 in
            --nodes) [[ $# -ge 2 ]] || usage; nodes=$2; shift 2 ;;
            --nodes=*) nodes=${1#--nodes=}; shift ;;
            --hosts) [[ $# -ge 2 ]] || usage; hosts_file=$2; shift 2 ;;
            --ctld-addr) [[ $# -ge 2 ]] || usage; CTLD_ADDR=$2; shift 2 ;;
            -h|--help) usage ;;
            *) log "unknown argument: $1"; usage ;;
        esac
    done
    if [[ -n $hosts_file ]]; then
        [[ -n $CTLD_ADDR ]] || die "--hosts needs --ctld-addr (the address the nodes reach slurmctld at)"
        read_hosts "$hosts_file"
        nodes=${#NODE_NAMES[@]}
    elif [[ -n $CTLD_ADDR ]]; then
        die "--ctld-addr goes with --hosts"
    fi
    if ! [[ $nodes =~ ^[1-9][0-9]*$ ]] || ((nodes > 64)); then
        die "--nodes must be 1..64, got '$nodes'"
    fi
    if [[ -z $hosts_file ]]; then
        for ((i = 1; i <= nodes; i++)); do NODE_NAMES+=("n$i") NODE_ADDRS+=(127.0.0.1) NODE_PREFIXES+=(""); done
    fi
    ((EUID == 0)) || die "'up' must run as root (the daemons run as SlurmUser=root)"

    ensure_installed
    ensure_munge_key
    mkdir -p "$STATE_DIR"
    lock_state

    local want
    want=$(gen_conf)
    # Already running with exactly this configuration?  Then do nothing.
    if [[ -f $CONF && $(cat "$CONF") == "$want" ]] && healthy; then
        log "already up with $nodes node(s)"
        print_env
        return 0
    fi
    if [[ -n $(our_pids) ]]; then
        log "restarting (node count/config changed or cluster unhealthy)"
    fi
    stop_all

    local p ports=$CTLD_PORT
    # With --hosts every slurmd listens in its own host's network namespace.
    [[ -n $CTLD_ADDR ]] || ports+=" $(seq "$SLURMD_PORT" $((SLURMD_PORT + nodes - 1)))"
    for p in $ports; do
        ! port_busy "$p" || die "port $p is already in use (another cluster? set HPCCKPT_SLURM_CTLD_PORT / HPCCKPT_SLURMD_PORT)"
    done

    # Fresh start: drop old job state, spool and logs (only our sub-dirs; the
    # state dir itself may be user-provided).
    rm -rf "$STATE_DIR/ctld" "$STATE_DIR/spool" "$LOG_DIR" "$RUN_DIR" "$MUNGE_DIR"
    # munged insists that every directory on the socket path is world-searchable
    # (mode 755) and that the key is owned by the user it runs as (root here,
    # while Debian's key belongs to 'munge'): so it gets a root-owned copy.
    install -d -m 0755 "$STATE_DIR" "$MUNGE_DIR"
    install -d -m 0755 "$LOG_DIR" "$RUN_DIR" "$STATE_DIR/ctld" "$STATE_DIR/spool"
    install -m 0400 -o root -g root "$SYSTEM_MUNGE_KEY" "$MUNGE_DIR/munge.key"
    printf '%s\n' "$want" >"$CONF"
    rm -f "$ENV_SH"

    local name t0=$EPOCHREALTIME
    # slurmd would create its spool dir itself, but only after complaining once.
    for name in "${NODE_NAMES[@]}"; do install -d -m 0755 "$STATE_DIR/spool/$name"; done

    log "starting munged"
    start_daemon munged munged --foreground --force \
        --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$RUN_DIR/munged.pid" --seed-file="$MUNGE_DIR/munged.seed" \
        --log-file="$LOG_DIR/munged.log"
    local deadline=$((SECONDS + 15))
    until munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)) || ! alive "$(pid_of munged)"; then
            tail_logs; stop_all; die "munged did not come up"
        fi
        sleep 0.1
    done

    log "starting slurmctld and $nodes slurmd"
    # -D: stay in the foreground (we daemonise with setsid ourselves, so the pid
    # we record is the daemon's own; Slurm writes the same pid files, too);
    # -f: our conf, which is also what our_pids() matches on.
    start_daemon slurmctld slurmctld -D -f "$CONF"
    # slurmd runs under `tini -s` (a child subreaper that reaps at once).  Job
    # processes orphaned when a job is killed (e.g. `sleep` under a killed batch
    # shell) are otherwise re-parented to PID 1, and slurmstepd (proctrack/pgid)
    # waits until the whole process group, zombies included, is gone, polling
    # after 1 s, then 2 s more.  Where PID 1 reaps lazily (this VM kind: ~1-2 s)
    # that added ~3 s to every kill/requeue; under tini it is <= 1 s.
    # With --hosts, each slurmd starts under its host's command prefix (e.g.
    # `nsenter -t PID --net --uts --`, which execs: the pid stays the daemon's).
    local -a prefix
    for ((i = 0; i < nodes; i++)); do
        read -r -a prefix <<<"${NODE_PREFIXES[i]}"
        start_daemon "slurmd.${NODE_NAMES[i]}" "${prefix[@]}" tini -s -- slurmd -D -N "${NODE_NAMES[i]}" -f "$CONF"
    done
    if ! wait_idle "$nodes"; then
        tail_logs
        stop_all
        die "cluster did not become idle; logs are in $LOG_DIR"
    fi
    log "up: $nodes node(s) idle after $(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $t0}") s"
    print_env
}

cmd_down() {
    ((EUID == 0)) || die "'down' must run as root"
    # Do not create a state dir just to stop nothing.
    [[ -d $STATE_DIR ]] && lock_state
    if [[ -z $(our_pids) && -z $(stray_stepds) ]]; then
        log "nothing running"
        rm -f "$RUN_DIR"/*.pid 2>/dev/null || true
        return 0
    fi
    stop_all
    log "down"
}

cmd_status() {
    if healthy; then
        echo "hpcckpt local Slurm cluster: UP ($(conf_nodes) node(s), SLURM_CONF=$CONF)"
        SLURM_CONF=$CONF sinfo
        return 0
    fi
    local pids
    pids=$(our_pids)
    if [[ -n $pids ]]; then
        echo "hpcckpt local Slurm cluster: UNHEALTHY (daemons running: ${pids//$'\n'/ }); logs in $LOG_DIR"
        if [[ -f $CONF ]]; then SLURM_CONF=$CONF timeout 15 sinfo 2>&1 || true; fi
    else
        echo "hpcckpt local Slurm cluster: DOWN (state dir $STATE_DIR)"
    fi
    return 1
}

case ${1:-} in
    up) shift; cmd_up "$@" ;;
    down) shift; (($# == 0)) || usage; cmd_down ;;
    status) shift; (($# == 0)) || usage; cmd_status ;;
    *) usage ;;
esac

#!/usr/bin/env bash
# local-cell.sh — a real, throw-away Grid Engine cell on this one machine.
#
#   sge/local-cell.sh up       # install + start; prints `export SGE_ROOT=...` lines
#   sge/local-cell.sh down     # stop everything this script started
#   sge/local-cell.sh status   # exit 0 if up, 1 if not
#
# Typical use (tests, CI):   eval "$(sge/local-cell.sh up)"
#
# Debian's gridengine 8.1.9 packages, one sge_qmaster and one sge_execd, one
# queue all.q with slots = nproc.  Everything lives in one state dir (default
# /tmp/hpcckpt-sge, env HPCCKPT_SGE_DIR): a private SGE_ROOT with cell "default",
# the qmaster and execd spool dirs (their `messages` files are the logs),
# env.sh, bin/ (client wrappers), log/ and run/.  The system cell in
# /var/lib/gridengine and the ports in /etc/services are NOT used, so this never
# fights with a system Grid Engine.  See sge/README.md.
#
# Environment knobs (all optional):
#   HPCCKPT_SGE_DIR           state dir                        (/tmp/hpcckpt-sge)
#   HPCCKPT_SGE_QMASTER_PORT  sge_qmaster port                 (16444)
#   HPCCKPT_SGE_EXECD_PORT    sge_execd port                   (16445)
#   HPCCKPT_SGE_TIMEOUT       seconds to wait for the queue    (60)
#
# Only stdout carries the export lines (up) and the status report (status);
# progress messages go to stderr so `eval "$(... up)"` is safe.
set -euo pipefail

# Debian puts some tools in /usr/sbin, which non-login shells in CI may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

STATE_DIR=${HPCCKPT_SGE_DIR:-/tmp/hpcckpt-sge}
# Grid Engine's bootstrap file needs absolute paths, and so does our /proc matching.
STATE_DIR=$(realpath -m -- "$STATE_DIR")
# bootstrap/spooling_params have no quoting for paths.
[[ $STATE_DIR != *[[:space:]]* ]] || { echo "local-cell: HPCCKPT_SGE_DIR must not contain spaces" >&2; exit 2; }
ROOT=$STATE_DIR/root               # our SGE_ROOT
CELL=default
COMMON=$ROOT/$CELL/common          # bootstrap, act_qmaster, host_aliases, accounting
SPOOL=$STATE_DIR/spool
QMASTER_SPOOL=$SPOOL/qmaster       # its `messages` file is the qmaster log
EXECD_SPOOL=$SPOOL/execd           # execd uses $EXECD_SPOOL/<its host name>/
CFG_DIR=$STATE_DIR/config          # the generated cell definition (qconf input)
BIN_DIR=$STATE_DIR/bin             # client wrappers that always talk to this cell
LOG_DIR=$STATE_DIR/log             # daemons' stdout/stderr
RUN_DIR=$STATE_DIR/run
ENV_SH=$STATE_DIR/env.sh
QMASTER_PORT=${HPCCKPT_SGE_QMASTER_PORT:-16444}
EXECD_PORT=${HPCCKPT_SGE_EXECD_PORT:-16445}
TIMEOUT=${HPCCKPT_SGE_TIMEOUT:-60}
SGE_LIB=/usr/lib/gridengine        # the real binaries (/usr/bin/q* are wrappers)
SGE_SHARE=/usr/share/gridengine
PACKAGES=(gridengine-master gridengine-exec gridengine-client gridengine-common)
# Client commands we wrap in $BIN_DIR.  Callers use these full paths: Debian's
# /usr/bin/qsub etc. default to the system cell and share their names with
# PBS/Torque commands.
CLIENTS=(qsub qstat qdel qmod qconf qacct qhost qalter qhold qrls qresub qselect qping qquota)
QUEUE=all.q
# gethostname(), which is what Grid Engine uses.
HOST=$(uname -n)

log() { printf 'local-cell: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# The environment every Grid Engine program of this cell needs.  Ports come from
# the environment, not /etc/services, so clients must carry them too.
CELL_ENV=(SGE_ROOT="$ROOT" SGE_CELL="$CELL" SGE_QMASTER_PORT="$QMASTER_PORT" SGE_EXECD_PORT="$EXECD_PORT")
# SGE_QSUB=<state dir>/bin/qsub etc.: full paths for callers (and jobs).
CLIENT_VARS=()
for c in qsub qstat qdel qmod qconf qacct qhost qalter qresub; do
    CLIENT_VARS+=("SGE_${c^^}=$BIN_DIR/$c")
done
unset c

# sge CMD ARGS...: run a client command against this cell (with a timeout: a
# client hangs for a long time when the qmaster does not answer).
sge() {
    local cmd=$1
    shift
    env "${CELL_ENV[@]}" timeout 20 "$SGE_LIB/$cmd" "$@"
}

# ---------------------------------------------------------------- processes

# alive PID: true if PID exists and is not a zombie.  PID 1 in some sandboxes
# does not reap promptly, so a killed daemon can linger as a zombie; `kill -0`
# would report it as running forever.
alive() {
    local stat
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat=${stat##*) }            # field 3 (state) follows "(comm) "
    [[ ${stat%% *} != Z ]]
}

# ours PID: true if PID runs with this cell's SGE_ROOT in its environment.  The
# daemons take no arguments that name the cell (so argv cannot be matched, as
# the Slurm script does), but they are started with SGE_ROOT=$ROOT and pass it
# on to the shepherds.  Needs root (other users' environ is not readable).
ours() {
    grep -qzxF "SGE_ROOT=$ROOT" "/proc/$1/environ" 2>/dev/null
}

# our_pids [NAME...]: live sge_qmaster/sge_execd/sge_shepherd processes of THIS
# cell (default: all three kinds).  Matched on /proc, not on pid files, so
# daemons are still found when the state dir was deleted under them.
our_pids() {
    local names=" ${*:-sge_qmaster sge_execd sge_shepherd} " p pid comm
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        read -r comm 2>/dev/null <"$p/comm" || continue   # builtin: no fork per process
        [[ $names == *" $comm "* ]] || continue
        ours "$pid" && alive "$pid" && echo "$pid"
    done
    return 0
}

# job_pids: processes started by a job of this cell, recognised by the
# SGE_JOB_SPOOL_DIR=<our execd spool>/... that every job gets in its environment
# (a shell that merely sourced env.sh does not have it).  Read with builtins:
# this looks at every process.
job_pids() {
    local p pid e
    local -a environ
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
        mapfile -d '' -t environ 2>/dev/null <"$p/environ" || continue
        for e in "${environ[@]}"; do
            if [[ $e == "SGE_JOB_SPOOL_DIR=$EXECD_SPOOL/"* ]]; then
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
        read -r stat 2>/dev/null <"$p/stat" || continue
        rest=${stat##*) }                 # "state ppid pgrp ..."
        read -r _ ppid pgrp _ <<<"$rest"
        [[ $ppid == "$1" ]] && echo "$pgrp"
    done | sort -u
}

# wait_gone SECONDS PID...: wait until none of the PIDs is alive.
wait_gone() {
    local tenths=$(($1 * 10)) pid left
    shift
    while :; do
        left=()
        for pid in "$@"; do alive "$pid" && left+=("$pid"); done
        ((${#left[@]})) || return 0
        ((tenths-- > 0)) || return 1
        sleep 0.1
    done
}

# start_daemon NAME: run $SGE_LIB/NAME in its own session (setsid) so it
# survives this script and the caller's terminal, with stdout/stderr in
# log/NAME.out and its pid in run/NAME.pid.
#  - SGE_ND=1 ("no daemonize") keeps it in the foreground, so the pid we record
#    is the daemon's own; the inner shell writes its $$ and then execs.
#  - env -i: jobs inherit sge_execd's environment (all but PATH, which Grid
#    Engine sets to /usr/local/bin:/bin:/usr/bin unless the job passes its
#    own), so the daemons get a clean, fixed one instead of whatever the caller
#    of `up` had (CI secrets, venvs).  It includes SGE_ROOT/SGE_CELL/the ports
#    and SGE_QSUB etc., so "$SGE_QSUB" and /usr/bin/qsub in a job reach this cell.
#  - cd /: the daemons chdir to their spool dirs anyway; do not pin the caller's
#    cwd.  fd 9 (our lock) is closed so the daemons do not keep holding it.
start_daemon() {
    local name=$1
    rm -f "$RUN_DIR/$name.pid"
    # shellcheck disable=SC2016  # $$/$0/$@ are for the inner shell
    (cd / && exec env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 SGE_ND=1 "${CELL_ENV[@]}" "${CLIENT_VARS[@]}" \
        setsid bash -c 'echo $$ >"$0"; exec "$@"' "$RUN_DIR/$name.pid" "$SGE_LIB/$name" \
        >>"$LOG_DIR/$name.out" 2>&1 </dev/null 9>&-) &
    # Not our job to wait for (and no "Killed" notice if a failed `up` stops it).
    disown
    # Callers check liveness through the pid file, so wait until it exists.
    local deadline=$((SECONDS + 10))
    until [[ -s $RUN_DIR/$name.pid ]]; do
        ((SECONDS < deadline)) || die "could not start $name"
        sleep 0.05
    done
}

pid_of() { cat "$RUN_DIR/$1.pid" 2>/dev/null || true; }

# tail_logs: show the end of every log on stderr (for CI output on failure).
# The `messages` files are the daemons' own logs; *.out is their stdout/stderr,
# the only place for errors from before the spool dir is usable.
tail_logs() {
    local f
    for f in "$QMASTER_SPOOL/messages" "$EXECD_SPOOL"/*/messages "$LOG_DIR"/*.out; do
        [[ -s $f ]] || continue
        printf '\n===== %s (last 20 lines) =====\n' "$f" >&2
        tail -n 20 "$f" >&2
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
    # The packages' debconf questions (shared by all four).  We do not use the
    # system cell they create in /var/lib/gridengine, but answer so that it is a
    # valid one for this host (the default master name is empty) and so that no
    # frontend ever prompts.
    debconf-set-selections <<EOF
gridengine-common shared/gridengineconfig boolean true
gridengine-common shared/gridenginecell string default
gridengine-common shared/gridenginemaster string $HOST
EOF
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

# Grid Engine must be able to resolve this host's name.  Only if it cannot, add
# the Debian-style "127.0.1.1 <host>" line to /etc/hosts (once: the line is
# tagged, and a resolvable name is never touched).
ensure_hostname_resolves() {
    getent hosts "$HOST" >/dev/null && return 0
    if ! grep -q '# added by hpcckpt sge/local-cell.sh$' /etc/hosts 2>/dev/null; then
        log "host name '$HOST' does not resolve: adding '127.0.1.1 $HOST' to /etc/hosts"
        printf '127.0.1.1\t%s\t# added by hpcckpt sge/local-cell.sh\n' "$HOST" >>/etc/hosts
    fi
    getent hosts "$HOST" >/dev/null || die "host name '$HOST' still does not resolve"
}

# host_aliases_line: "<host> <other names>" for $COMMON/host_aliases, or nothing.
# The qmaster checks that a client's IP resolves back to the name the client
# claims.  Where the host name maps to 127.0.0.1 (this VM: "127.0.0.1 localhost"
# comes first in /etc/hosts), the IP resolves to "localhost" and every execd and
# qconf is refused ("access denied (client IP resolved to host name localhost.
# This is not identical to clients host name vm)").  The aliases file makes
# them one host; the first name is the one Grid Engine uses.
host_aliases_line() {
    local -a names=("$HOST")
    local addr name n seen
    for addr in $(getent ahosts "$HOST" | awk '{print $1}' | sort -u); do
        name=$(getent hosts "$addr" | awk 'NR == 1 {print $2}') || true
        [[ -n $name ]] || continue
        seen=
        for n in "${names[@]}"; do [[ $n == "$name" ]] && seen=1; done
        [[ -n $seen ]] || names+=("$name")
    done
    ((${#names[@]} > 1)) && echo "${names[*]}"
    return 0
}

# ---------------------------------------------------------------- config

# gen_cell: write the whole cell definition into directory $1 (bootstrap, global
# configuration, scheduler, exec host, PE, queue).  Deterministic, so `up` can
# compare it with the running cell's copy to decide whether anything must change.
gen_cell() {
    local d=$1 slots aliases
    slots=$(nproc)
    aliases=$(host_aliases_line)
    mkdir -p "$d"

    # Where the cell keeps its state.  admin_user none: the daemons stay root
    # (no sgeadmin-owned dirs needed).  Classic (flat file) spooling instead of
    # Debian's Berkeley DB: no DB environment, readable files.
    cat >"$d/bootstrap" <<EOF
# Generated by sge/local-cell.sh — do not edit; rerun 'up' instead.
admin_user              none
default_domain          none
ignore_fqdn             false
spooling_method         classic
spooling_lib            libspoolc
spooling_params         $COMMON;$QMASTER_SPOOL
binary_path             $SGE_LIB
qmaster_spool_dir       $QMASTER_SPOOL
security_mode           none
listener_threads        2
worker_threads          2
scheduler_threads       1
EOF
    printf '%s\n' "$aliases" >"$d/host_aliases"
    # Ports and slots are not in any of the files below; record them so a change
    # restarts the cell.
    printf 'host=%s qmaster_port=%s execd_port=%s slots=%s\n' \
        "$HOST" "$QMASTER_PORT" "$EXECD_PORT" "$slots" >"$d/params"

    # Global configuration: Debian's defaults, except
    #  - min_uid/min_gid 0: allow root's jobs (tests run as root; default 1000);
    #  - load_report_time 1 s (default 40 s): execd reports job ends and load at
    #    this interval, and a rescheduled job (exit 99, qmod -rj) waits ~2-3
    #    reports in Rq; exit 99 -> rerun running takes 4 s instead of 77 s;
    #  - accounting_flush_time 0: qacct sees a job as soon as it ends (default:
    #    buffered for flush_time = 15 s);
    #  - mailer /bin/true: never hand mail to the MTA the packages pull in;
    #  - login_shells none (default sh,bash,ksh,csh,tcsh): job shells are never
    #    login shells, whose /etc/profile and ~/.profile reset PATH and so undo
    #    `qsub -V`/`-v PATH=...` (a venv's python disappears from PATH).
    sed -e "s|^execd_spool_dir .*|execd_spool_dir        $EXECD_SPOOL|" \
        -e 's|^login_shells .*|login_shells           none|' \
        -e 's|^min_uid .*|min_uid                0|' \
        -e 's|^min_gid .*|min_gid                0|' \
        -e 's|^load_report_time .*|load_report_time       00:00:01|' \
        -e 's|^mailer .*|mailer                 /bin/true|' \
        -e 's|^reporting_params .*|reporting_params       accounting=true reporting=false flush_time=00:00:15 joblog=false sharelog=00:00:00 accounting_flush_time=00:00:00|' \
        "$SGE_SHARE/default-configuration" >"$d/global"
    # Make sure every override took (the template could change between releases).
    if ! { grep -q "^execd_spool_dir  *$EXECD_SPOOL\$" "$d/global" &&
        grep -q '^min_uid  *0$' "$d/global" && grep -q '^load_report_time  *00:00:01$' "$d/global" &&
        grep -q 'accounting_flush_time=00:00:00' "$d/global" && grep -q '^login_shells  *none$' "$d/global"; }; then
        die "unexpected $SGE_SHARE/default-configuration; cannot generate the global configuration"
    fi

    # Scheduler: SGE's defaults, except schedule_interval 1 s (default 15 s) and
    # no load adjustments / load-based sorting (one host; load must never hold
    # jobs back).
    cat >"$d/sched" <<'EOF'
algorithm                         default
schedule_interval                 0:0:1
maxujobs                          0
queue_sort_method                 seqno
job_load_adjustments              NONE
load_adjustment_decay_time        0:0:0
load_formula                      np_load_avg
schedd_job_info                   true
flush_submit_sec                  0
flush_finish_sec                  0
params                            none
reprioritize_interval             0:0:0
halftime                          168
usage_weight_list                 cpu=1.000000,mem=0.000000,io=0.000000
compensation_factor               5.000000
weight_user                       0.250000
weight_project                    0.250000
weight_department                 0.250000
weight_job                        0.250000
weight_tickets_functional         0
weight_tickets_share              0
share_override_tickets            TRUE
share_functional_shares           TRUE
max_functional_jobs_to_schedule   200
report_pjob_tickets               TRUE
max_pending_tasks_per_job         50
halflife_decay_list               none
policy_hierarchy                  OFS
weight_ticket                     0.500000
weight_waiting_time               0.278000
weight_deadline                   3600000.000000
weight_urgency                    0.500000
weight_priority                   0.000000
max_reservation                   0
default_duration                  INFINITY
EOF

    # qconf -Ae takes the object name from the file's "hostname" line.
    cat >"$d/exechost" <<EOF
hostname              $HOST
load_scaling          NONE
complex_values        NONE
user_lists            NONE
xuser_lists           NONE
projects              NONE
xprojects             NONE
usage_scaling         NONE
report_variables      NONE
EOF

    # "smp" parallel environment (Debian's template): `qsub -pe smp N`.
    cp "$SGE_SHARE/util/resources/pe/smp" "$d/pe_smp"

    # The one queue.  SGE's defaults, except:
    #  - rerun TRUE: jobs may be rescheduled (qmod -rj, execd crash) unless
    #    submitted with -r n;
    #  - slots = nproc, pe_list smp;
    #  - load_thresholds NONE: a busy CI machine must not put the queue into
    #    alarm state (default np_load_avg=1.75 stops dispatching);
    #  - shell_start_mode unix_behavior (default posix_compliant): a job
    #    script runs under its #! line, as with sbatch; without one, /bin/sh
    #    (dash).  -S is then ignored.  shell /bin/bash runs `qsub -b y` commands.
    #  - notify stays 60 s: time between -notify's SIGUSR1/SIGUSR2 and the
    #    SIGSTOP/SIGKILL that follows.
    cat >"$d/queue" <<EOF
qname                 $QUEUE
hostlist              $HOST
seq_no                0
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               smp
rerun                 TRUE
slots                 $slots
tmpdir                /tmp
shell                 /bin/bash
prolog                NONE
epilog                NONE
shell_start_mode      unix_behavior
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                00:00:60
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         default
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
EOF
}

# same_cell DIR1 DIR2: true if both hold the same generated definition.
same_cell() { diff -qr "$1" "$2" >/dev/null 2>&1; }

# write_root: create SGE_ROOT and the cell's common dir from $CFG_DIR, and
# initialise the qmaster spool (what Debian's init_cluster does for the system
# cell, with our paths).
write_root() {
    local d
    install -d -m 0755 "$ROOT" "$ROOT/$CELL" "$COMMON" "$QMASTER_SPOOL" "$EXECD_SPOOL" "$BIN_DIR"
    # Programs look for $SGE_ROOT/util/arch, $SGE_ROOT/utilbin/<arch>/... and
    # $SGE_ROOT/bin/<arch>/...: point them at Debian's.
    for d in bin lib utilbin; do ln -sfn "/var/lib/gridengine/$d" "$ROOT/$d"; done
    ln -sfn "$SGE_SHARE/util" "$ROOT/util"
    cp "$CFG_DIR/bootstrap" "$COMMON/bootstrap"
    echo "$HOST" >"$COMMON/act_qmaster"
    if [[ -s $CFG_DIR/host_aliases && $(cat "$CFG_DIR/host_aliases") != "" ]]; then
        cp "$CFG_DIR/host_aliases" "$COMMON/host_aliases"
    fi

    local spoolinit=(env "${CELL_ENV[@]}" "$SGE_LIB/spoolinit" classic libspoolc "$COMMON;$QMASTER_SPOOL")
    local defaults=(env "${CELL_ENV[@]}" "$SGE_LIB/spooldefaults")
    # (&&: set -e does not apply inside a command list whose status is tested.)
    {
        "${spoolinit[@]}" init &&
            "${defaults[@]}" configuration "$CFG_DIR/global" &&
            "${defaults[@]}" complexes "$SGE_SHARE/util/resources/centry" &&
            "${defaults[@]}" usersets "$SGE_SHARE/util/resources/usersets" &&
            "${defaults[@]}" managers root
    } >>"$LOG_DIR/init.out" 2>&1 || { tail -n 20 "$LOG_DIR/init.out" >&2; die "spool initialisation failed"; }

    # Client wrappers: this cell's commands whatever the caller's environment
    # (SGE_ROOT unset, or pointing at another cell, or a PBS qsub first in PATH).
    local c
    for c in "${CLIENTS[@]}"; do
        cat >"$BIN_DIR/$c" <<EOF
#!/bin/sh
# Generated by sge/local-cell.sh: $c of the cell in $STATE_DIR.
SGE_ROOT=$ROOT SGE_CELL=$CELL SGE_QMASTER_PORT=$QMASTER_PORT SGE_EXECD_PORT=$EXECD_PORT
export SGE_ROOT SGE_CELL SGE_QMASTER_PORT SGE_EXECD_PORT
exec $SGE_LIB/$c "\$@"
EOF
        chmod 0755 "$BIN_DIR/$c"
    done
}

# configure_cell: the objects that need a running qmaster (through qconf, the
# documented interface).  The exec host must exist before the execd starts.
configure_cell() {
    {
        sge qconf -Msconf "$CFG_DIR/sched" &&
            sge qconf -as "$HOST" &&
            sge qconf -Ae "$CFG_DIR/exechost" &&
            sge qconf -Ap "$CFG_DIR/pe_smp" &&
            sge qconf -Aq "$CFG_DIR/queue"
    } >>"$LOG_DIR/init.out" 2>&1
}

# ---------------------------------------------------------------- health

# queue_state: "<states>" of our queue instance ("" = fine; e.g. "u" = execd
# not heard from, "E" = error, "d" = disabled), or fail if the qmaster does not
# answer or the queue instance does not exist.
queue_state() {
    local out line
    out=$(sge qstat -f -q "$QUEUE" 2>/dev/null) || return 1
    line=$(grep "^$QUEUE@" <<<"$out") || return 1
    # queuename qtype resv/used/tot. load_avg arch [states]
    awk '{print $6}' <<<"$line"
}

# healthy: both daemons run (per pid files) and the queue instance is usable.
healthy() {
    local name pid st
    [[ -f $CFG_DIR/params ]] || return 1
    for name in sge_qmaster sge_execd; do
        pid=$(pid_of "$name")
        [[ -n $pid ]] && alive "$pid" || return 1
    done
    st=$(queue_state) || return 1
    [[ -z $st ]]
}

# wait_ready: wait until the queue instance has no state flags (the execd has
# registered and sent its first load report); fail fast if a daemon died.
wait_ready() {
    local deadline=$((SECONDS + TIMEOUT)) st name pid
    while :; do
        if st=$(queue_state) && [[ -z $st ]]; then return 0; fi
        for name in sge_qmaster sge_execd; do
            pid=$(pid_of "$name")
            if [[ -z $pid ]] || ! alive "$pid"; then
                log "$name exited during start-up"
                return 1
            fi
        done
        if ((SECONDS >= deadline)); then
            log "timed out after ${TIMEOUT}s waiting for $QUEUE@$HOST; qstat -f says:"
            sge qstat -f >&2 2>&1 || true
            return 1
        fi
        sleep 0.2
    done
}

# ---------------------------------------------------------------- commands

stop_all() {
    local qmaster execd pids pid asked=
    qmaster=$(our_pids sge_qmaster)
    execd=$(our_pids sge_execd)
    # 1. Through the qmaster: `qconf -kej` makes the execd kill all jobs and
    #    exit; `qconf -km` asks the qmaster to shut down.  (Debian's init
    #    scripts only know the system cell.)  Either fails if the qmaster does
    #    not answer or the state dir is gone; step 2 then signals the daemons.
    if [[ -n $qmaster ]]; then
        if [[ -n $execd ]]; then
            log "stopping sge_execd and its jobs (qconf -kej)"
            if sge qconf -kej "$HOST" >/dev/null 2>&1; then
                # shellcheck disable=SC2086
                wait_gone 10 $execd || true
            fi
        fi
        log "stopping sge_qmaster (qconf -km)"
        sge qconf -km >/dev/null 2>&1 && asked=1
    fi
    # 2. The qmaster's "controlled shutdown" (after qconf -km or SIGTERM) joins
    #    its thread pools one after the other and takes 8-11 s here; nothing in
    #    it matters to a cell whose state the next fresh `up` wipes.  So give the
    #    daemons 1 s, then SIGKILL whatever still runs.
    mapfile -t pids < <(our_pids sge_qmaster sge_execd)
    if ((${#pids[@]})); then
        # The qmaster did not pass the requests on: ask the daemons directly
        # (an execd leaves its jobs running on SIGTERM; step 3 kills them).
        [[ -n $asked ]] || kill -TERM "${pids[@]}" 2>/dev/null || true
        if ! wait_gone 1 "${pids[@]}"; then
            kill -KILL "${pids[@]}" 2>/dev/null || true
            wait_gone 5 "${pids[@]}" || die "could not stop pids ${pids[*]}"
        fi
    fi
    # 3. Leftovers: shepherds (a job the execd did not kill, e.g. one deleted
    #    while waiting out its -notify period, or after an execd was SIGKILLed)
    #    and job processes.  Kill each shepherd's children's process groups
    #    (every job is its own group), the shepherd, and any process still
    #    running from one of our jobs (e.g. a daemon the job started with setsid).
    mapfile -t pids < <(our_pids sge_shepherd)
    local -a jobs
    mapfile -t jobs < <(job_pids)
    if ((${#pids[@]} + ${#jobs[@]})); then
        log "killing leftover shepherds/job processes ${pids[*]} ${jobs[*]}"
        local pgid
        for pid in "${pids[@]}"; do
            for pgid in $(child_pgids "$pid"); do
                if ((pgid > 1)); then kill -KILL -- "-$pgid" 2>/dev/null || true; fi
            done
        done
        kill -KILL "${pids[@]}" "${jobs[@]}" 2>/dev/null || true
        wait_gone 5 "${pids[@]}" "${jobs[@]}" || true
    fi
    rm -f "$RUN_DIR"/*.pid 2>/dev/null || true
}

lock_state() {
    # Serialise concurrent up/down on the same state dir (parallel test runs).
    exec 9>"$STATE_DIR/.lock"
    flock -w 300 9 || die "could not lock $STATE_DIR/.lock"
}

print_env() {
    local v q=()
    for v in "${CLIENT_VARS[@]}"; do q+=("${v%%=*}=$(printf '%q' "${v#*=}")"); done
    {
        printf 'export SGE_ROOT=%q SGE_CELL=%q SGE_QMASTER_PORT=%q SGE_EXECD_PORT=%q\n' \
            "$ROOT" "$CELL" "$QMASTER_PORT" "$EXECD_PORT"
        # shellcheck disable=SC2016  # $PATH is for the caller's shell
        printf 'export PATH=%q:"$PATH"\n' "$BIN_DIR"
        echo "export ${q[*]}"
    } >"$ENV_SH"
    cat "$ENV_SH"
}

cmd_up() {
    (($# == 0)) || usage
    ((EUID == 0)) || die "'up' must run as root (the daemons and root's jobs need it)"

    ensure_installed
    ensure_hostname_resolves
    mkdir -p "$STATE_DIR"
    lock_state

    local want=$STATE_DIR/.config.new
    rm -rf "$want"
    gen_cell "$want"
    # Already running with exactly this definition?  Then do nothing.
    if [[ -d $CFG_DIR ]] && same_cell "$want" "$CFG_DIR" && healthy; then
        rm -rf "$want"
        log "already up"
        print_env
        return 0
    fi
    if [[ -n $(our_pids) ]]; then
        log "restarting (configuration changed or cell unhealthy)"
    fi
    stop_all

    local p
    for p in "$QMASTER_PORT" "$EXECD_PORT"; do
        ! port_busy "$p" || die "port $p is already in use (another cell? set HPCCKPT_SGE_QMASTER_PORT / HPCCKPT_SGE_EXECD_PORT)"
    done

    # Fresh start: drop old job state, spools and logs (only our sub-dirs; the
    # state dir itself may be user-provided).
    rm -rf "$ROOT" "$SPOOL" "$CFG_DIR" "$BIN_DIR" "$LOG_DIR" "$RUN_DIR" "$ENV_SH"
    mv "$want" "$CFG_DIR"
    install -d -m 0755 "$LOG_DIR" "$RUN_DIR"
    local t0=$EPOCHREALTIME
    write_root

    log "starting sge_qmaster"
    start_daemon sge_qmaster
    local deadline=$((SECONDS + TIMEOUT))
    until sge qstat >/dev/null 2>&1; do
        if ((SECONDS >= deadline)) || ! alive "$(pid_of sge_qmaster)"; then
            tail_logs; stop_all; die "sge_qmaster did not come up; logs are in $QMASTER_SPOOL/messages and $LOG_DIR"
        fi
        sleep 0.1
    done
    if ! configure_cell; then
        tail -n 20 "$LOG_DIR/init.out" >&2
        stop_all
        die "configuring the cell with qconf failed (see $LOG_DIR/init.out)"
    fi

    log "starting sge_execd"
    start_daemon sge_execd
    if ! wait_ready; then
        tail_logs
        stop_all
        die "cell did not become ready; logs are in $SPOOL/*/messages and $LOG_DIR"
    fi
    log "up: $QUEUE@$HOST ($(nproc) slots) ready after $(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $t0}") s"
    print_env
}

cmd_down() {
    ((EUID == 0)) || die "'down' must run as root"
    # Do not create a state dir just to stop nothing.
    [[ -d $STATE_DIR ]] && lock_state
    if [[ -z $(our_pids) && -z $(job_pids) ]]; then
        log "nothing running"
        rm -f "$RUN_DIR"/*.pid 2>/dev/null || true
        return 0
    fi
    stop_all
    log "down"
}

cmd_status() {
    if healthy; then
        echo "hpcckpt local Grid Engine cell: UP (SGE_ROOT=$ROOT SGE_CELL=$CELL, qmaster port $QMASTER_PORT)"
        sge qstat -f -u '*' || true
        return 0
    fi
    local pids
    pids=$(our_pids)
    if [[ -n $pids ]]; then
        echo "hpcckpt local Grid Engine cell: UNHEALTHY (processes running: ${pids//$'\n'/ }); logs in $SPOOL/*/messages and $LOG_DIR"
        sge qstat -f -u '*' 2>&1 || true
    elif [[ -n $(pid_of sge_qmaster) ]] && alive "$(pid_of sge_qmaster)"; then
        # Non-root callers cannot read the daemons' environment (our_pids).
        echo "hpcckpt local Grid Engine cell: UNHEALTHY; logs in $SPOOL/*/messages and $LOG_DIR"
        sge qstat -f -u '*' 2>&1 || true
    else
        echo "hpcckpt local Grid Engine cell: DOWN (state dir $STATE_DIR)"
    fi
    return 1
}

case ${1:-} in
    up) shift; cmd_up "$@" ;;
    down) shift; (($# == 0)) || usage; cmd_down ;;
    status) shift; (($# == 0)) || usage; cmd_status ;;
    *) usage ;;
esac

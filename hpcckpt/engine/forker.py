"""Copy-on-write snapshots for forked checkpoints.

While the process is frozen, a clone() without CLONE_VM is injected into its leader thread: the child holds a
copy-on-write copy of the whole address space, as it was at that instant. The process then runs again at
once, and its memory is written out from the child, which never runs a single instruction of its own (it is
auto-attached stopped, PTRACE_O_TRACEFORK) and drops every file descriptor first (so it holds no pipe or
socket open). It is killed when the image is written.

Who reaps it: a process whose parent is the agent (every top-level process of the job) creates the fork with
CLONE_PARENT, so it is the agent's child and the agent reaps it. Deeper in the tree it is the process's own
child with exit signal 0: the process gets no SIGCHLD and plain wait()/waitpid() never return it (only
__WALL would), so it stays a zombie. Those zombies are left out of the computation (left_snapshot) and the
next checkpoint reaps them from inside their parent while it is frozen anyway (reap_left, an injected
wait4): one at most per process at any time, not one more per checkpoint (a week of 1-minute checkpoints once
left 10,000 zombies, PIDs and kernel task structures, under every process below the top).
"""
from __future__ import annotations

import logging
import os
import signal

from . import ptrace
from .errors import SnapshotError
from .freeze import FrozenProcess
from .inject import Injector
from .linux import SYS

log = logging.getLogger(__name__)

CLONE_PARENT = 0x8000
SYS_WAIT4 = 61
WNOHANG, WALL = 1, 0x40000000

# zombie snapshots under job processes: snapshot pid -> its parent (a job process)
_left: dict[int, int] = {}


def fork_snapshot(fp: FrozenProcess, parent_is_agent: bool) -> int:
    leader = fp.pid if fp.pid in fp.threads else next(iter(fp.threads))
    ptrace.setoptions(leader, ptrace.O_TRACESYSGOOD | ptrace.O_TRACEFORK | ptrace.O_TRACECLONE)
    try:
        inj = fp.injector(leader)
        inj.clone_events.clear()
        flags = CLONE_PARENT if parent_is_agent else 0          # exit signal 0: nobody is told it exits
        r = inj.call(SYS.clone, flags, 0, 0, 0, 0)
        if r <= 0 or not inj.clone_events:
            raise SnapshotError(f"pid {fp.pid}: clone for the snapshot failed ({os.strerror(-r) if r < 0 else r})")
        child = inj.clone_events[-1]
    finally:
        fp.restore_registers()
        ptrace.setoptions(leader, ptrace.O_TRACESYSGOOD)
    st = ptrace.wait(child)
    if not st.stopped:
        raise SnapshotError(f"snapshot {child} of pid {fp.pid} did not stop ({st.describe()})")
    # drop the copied descriptors: the snapshot must not keep pipes or sockets of the job open
    cinj = Injector(child, child, fp.syscall_addr, ptrace.getregs(child))
    cinj.call(SYS.close_range, 0, 0xFFFFFFFF, 0)
    return child


def kill_snapshot(pid: int) -> None:
    """Kill a snapshot and collect it (as its tracer; as its parent too when it is ours). One whose parent is a
    job process stays a zombie until the next checkpoint reaps it (reap_left)."""
    try:
        parent = _ppid(pid)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while True:
        try:
            st = ptrace.wait(pid)
        except ChildProcessError:
            break
        if st.gone:
            break
    if parent and parent != os.getpid() and _ppid(pid) == parent:
        _left[pid] = parent


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def left_snapshot(pid: int) -> bool:
    """Is pid one of our killed snapshots, a zombie under a job process? (Checked against /proc, so a PID
    reused by a new process of the job is never mistaken for one.)"""
    parent = _left.get(pid)
    if parent is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] == b"Z" and int(fields[1]) == parent:
            return True
    except (OSError, IndexError, ValueError):
        pass
    del _left[pid]
    return False


def reap_left(fp: FrozenProcess, inj: Injector) -> int:
    """Reap, from inside the frozen process fp, the zombie snapshots an earlier checkpoint left under it;
    returns how many. inj: an injector into one of its threads."""
    reaped = 0
    for snap in [s for s, parent in _left.items() if parent == fp.pid]:
        if left_snapshot(snap) and inj.call(SYS_WAIT4, snap, 0, WNOHANG | WALL, 0) == snap:
            reaped += 1
        _left.pop(snap, None)
    return reaped

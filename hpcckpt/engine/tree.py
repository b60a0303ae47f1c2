"""The computation's processes: finding every descendant, freezing them all together, and the tree facts
(parent, process group, session, zombies) restore needs.

Inside the job's own PID namespace every process but the agent (PID 1) belongs to the job, including
double-forked daemons that were re-parented to it; without a namespace the agent is a child subreaper and the
job is its descendants.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from . import freeze as freezing
from .errors import FreezeError, ProcessGone, VforkBusy
from .freeze import FrozenProcess, freeze
from .procattrs import children_of

WALL = 0x40000000
# How long a checkpoint waits for a process in vfork() whose child has neither exec'd nor exited (the child
# shares the parent's memory and the parent cannot be stopped meanwhile); past it the checkpoint fails.
VFORK_WAIT_S = float(os.environ.get("HPCCKPT_VFORK_WAIT", "5"))

log = logging.getLogger(__name__)


@dataclass
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    exit_code: int          # waitpid-style status of a zombie
    comm: str

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def read_proc(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            raw = stat_file.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    head, _, rest = raw.rpartition(")")
    comm = head.split(" (", 1)[1]
    f = rest.split()
    # fields after the comm: state(3) ppid(4) pgrp(5) session(6) ... exit_code(52)
    exit_code = int(f[49]) if len(f) > 49 else 0
    return ProcInfo(pid, int(f[1]), int(f[2]), int(f[3]), f[0], exit_code, comm)


def job_processes(agent_pid: int, in_namespace: bool,
                  not_job: set[int] | frozenset[int] = frozenset()) -> list[ProcInfo]:
    """Every process of the job (zombies included), sorted by PID; not_job are the agent's own helpers."""
    if in_namespace:
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit() and int(n) != agent_pid]
    else:
        pids, todo = [], [agent_pid]
        while todo:
            for c in children_of(todo.pop()):
                if c in not_job:
                    continue
                pids.append(c)
                todo.append(c)
    infos = [i for i in (read_proc(p) for p in sorted(set(pids))) if i is not None]
    outside = launched_by_shims(infos)
    return [i for i in infos if i.pid not in outside] if outside else infos


SHIM_MARK = b"hpcckpt.cli.shim"


def launched_by_shims(infos: list[ProcInfo]) -> set[int]:
    """The real ssh/srun our shims start (and what those start): they reach outside the computation and are
    not part of it (agent/remoteio.py)."""
    shims = set()
    for i in infos:
        if i.comm.startswith("python"):
            try:
                with open(f"/proc/{i.pid}/cmdline", "rb") as f:
                    if SHIM_MARK in f.read(512):
                        shims.add(i.pid)
            except OSError:
                pass
    if not shims:
        return set()
    parent = {i.pid: i.ppid for i in infos}
    out = set()
    for i in infos:
        p, hops = i.ppid, 0
        while p in parent and hops < 64:
            if p in shims:
                out.add(i.pid)
                break
            p, hops = parent[p], hops + 1
    return out


def wait_for_vforks(list_processes, until: float) -> None:
    """Return once no process of the job is in the middle of a vfork(); VforkBusy (naming it) at `until`."""
    while True:
        busy = None
        for p in list_processes():
            if not p.zombie:
                busy = freezing.in_vfork(p.pid)
                if busy:
                    break
        if busy is None:
            return
        if time.monotonic() >= until:
            raise busy
        time.sleep(0.01)


def freeze_all(list_processes, timeout: float = 10.0, vfork_wait: float | None = None) -> dict[int, FrozenProcess]:
    """Freeze every live process list_processes() returns, re-listing until no new process appears (a process
    can fork while we freeze it; once it is stopped it cannot fork again). On failure everything already frozen
    is resumed.

    A process in vfork() cannot be stopped until its child execs or exits, and that child must not be frozen
    while its parent waits (it would never go on): wait up to vfork_wait seconds for every vfork to end, and if
    one begins while we freeze, resume everything and wait again. Past the wait the freeze fails, naming the
    process, with the job running and untraced."""
    vfork_wait = VFORK_WAIT_S if vfork_wait is None else vfork_wait
    t0 = time.monotonic()
    freezing.settle_stragglers()
    while True:
        try:
            wait_for_vforks(list_processes, t0 + vfork_wait)
            return _freeze_once(list_processes, timeout)
        except VforkBusy as e:
            if time.monotonic() >= t0 + vfork_wait:
                raise FreezeError(f"{e} for more than {vfork_wait:g} s; checkpoint not taken, the job runs on "
                                  f"untouched; try again later (or raise HPCCKPT_VFORK_WAIT)") from None
            log.info("%s; waiting for it before freezing again", e)


def _freeze_once(list_processes, timeout: float) -> dict[int, FrozenProcess]:
    frozen: dict[int, FrozenProcess] = {}
    deadline = time.monotonic() + timeout
    try:
        while True:
            new = [p for p in list_processes() if not p.zombie and p.pid not in frozen]
            if not new:
                return frozen
            if time.monotonic() > deadline:
                raise FreezeError(f"processes kept appearing for {timeout:.0f} s while freezing the computation")
            for p in new:
                try:
                    frozen[p.pid] = freeze(p.pid, timeout=max(1.0, deadline - time.monotonic()))
                except ProcessGone:
                    continue           # exited meanwhile: it is no longer part of the computation
    except BaseException:
        for fp in frozen.values():
            fp.resume()
        raise


@dataclass
class Exit:
    pid: int
    code: int               # shell convention: exit status, or 128 + signal
    signaled: bool
    status: int             # exit status or signal number


def reap_exits() -> list[Exit]:
    """Collect every child that has exited (without blocking). A traced process's ptrace stops are reported
    to its tracer by the same wait, whatever the flags: they are not exits. A stop of a thread a failed
    freeze left seized (engine/freeze.py) lets it go; any other stop is left as it was."""
    out: list[Exit] = []
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | WALL)
        except ChildProcessError:
            return out
        if info is None or info.si_pid == 0:
            return out
        if info.si_code in (os.CLD_TRAPPED, os.CLD_STOPPED):
            if not freezing.release_straggler(info.si_pid):
                log.debug("pid %d: ptrace stop %#x while not freezing; left as it is", info.si_pid,
                          info.si_status)
            continue
        if info.si_code == os.CLD_CONTINUED:
            continue
        signaled = info.si_code != os.CLD_EXITED
        out.append(Exit(info.si_pid, 128 + info.si_status if signaled else info.si_status, signaled,
                        info.si_status))

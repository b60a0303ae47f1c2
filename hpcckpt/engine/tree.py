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

from .freeze import FreezeError, FrozenProcess, freeze
from .inject import ProcessGone
from .procattrs import children_of

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
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    head, _, rest = raw.rpartition(")")
    comm = head.split(" (", 1)[1]
    f = rest.split()
    # fields after the comm: state(3) ppid(4) pgrp(5) session(6) ... exit_code(52)
    exit_code = int(f[49]) if len(f) > 49 else 0
    return ProcInfo(pid, int(f[1]), int(f[2]), int(f[3]), f[0], exit_code, comm)


def job_processes(agent_pid: int, in_namespace: bool, not_job: set[int] = frozenset()) -> list[ProcInfo]:
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


def freeze_all(list_processes, timeout: float = 10.0) -> dict[int, FrozenProcess]:
    """Freeze every live process list_processes() returns, re-listing until no new process appears (a process
    can fork while we freeze it; once it is stopped it cannot fork again). On failure everything already frozen
    is resumed."""
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

"""Descriptors open on /proc/PID/... (or /proc/PID/task/TID/...) of a process of the computation, e.g. a
program that keeps /proc/self/maps or /proc/self/status open and re-reads it.

Such a file belongs to a process, not to a path: after a restart it must be the restored process's file, and
without our own PID namespace the restored process has another PID. The image keeps the path as the kernel
shows it (/proc/<pid>[/task/<tid>]/<rest>); at restore the agent puts a stand-in (/dev/null) at the fd number
while the helpers are made, and once every process and thread exists the process itself opens
/proc/<its new pid>[/task/<new tid>]/<rest> (an injected openat: its own /proc view, its own credentials),
moves it to the fd number with the same close-on-exec flag and seeks to the saved offset (seq files such as
maps replay their records up to it). A descriptor on a process outside the computation is refused: after a
restart that PID is another process or none. Two processes sharing one such description (inherited across
fork) each get their own after a restart; their offsets are no longer shared.
"""
from __future__ import annotations

import logging
import os
import re

from ...image.fdstate import ProcFileState
from ..errors import UnsupportedFd
from ..inject import Injector, find_syscall_insn
from ..linux import SYS
from ..maps import read_maps
from .base import FdKind
from .entry import FdEntry

log = logging.getLogger(__name__)

_PROC = re.compile(r"^/proc/(\d+)(?:/task/(\d+))?(/.*)?$")
AT_FDCWD = -100
O_CLOEXEC = 0o2000000
SYS_OPENAT, SYS_DUP3 = 257, 292


def parse(path: str) -> tuple[int, int | None, str] | None:
    """(pid, tid or None, the rest of the path) of a /proc/PID path, None for any other path."""
    m = _PROC.match(path)
    if not m:
        return None
    return int(m[1]), int(m[2]) if m[2] else None, m[3] or ""


class ProcFile(FdKind):
    KIND = "procfile"

    @staticmethod
    def matches(e: FdEntry) -> bool:
        return parse(e.target) is not None

    @staticmethod
    def dump(ctx, oid: str, ofd: list[FdEntry]) -> None:
        e = ofd[0]
        parsed = parse(e.target)
        if parsed is None:
            raise UnsupportedFd(f"{e.where()}: {e.target} is not a /proc path")
        pid, tid, rest = parsed
        job = {p for p, _ in ctx.entries}
        # /proc/<tid>/... of a job thread works too (not listed in /proc, but opened by number)
        ours = pid in job or any(os.path.exists(f"/proc/{p}/task/{pid}") for p in job)
        if not ours or (tid is not None and not os.path.exists(f"/proc/{pid}/task/{tid}")):
            raise UnsupportedFd(f"{e.where()}: {e.target} belongs to a process outside the computation; after a "
                                f"restart that PID is another process or none (close it before checkpointing)")
        ctx.add(oid, ProcFileState(path=e.target, flags=e.flags, pos=e.pos), min(x.pid for x in ofd))

    @staticmethod
    def create(factory, state: ProcFileState) -> int:
        # a stand-in holding the fd number: reopen() replaces it once the processes exist
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def _thread_order(proc) -> list[int]:
    """Image TIDs in the order restore creates the threads (transform: the main thread, then the others)."""
    main = next((t for t in proc.threads if t.tid == proc.pid), proc.threads[0])
    return [main.tid] + [t.tid for t in proc.threads if t is not main]


def reopen(restored: list) -> None:
    """(restore, every process rebuilt and stopped) Put each /proc descriptor back, opened by the process
    itself on its file of the restored PID/TID. Raises OSError naming the process, fd and path."""
    pids = {rp.meta.process.pid: rp.pid for rp in restored}
    tids: dict[int, int] = {}
    for rp in restored:
        tids.update(zip(_thread_order(rp.meta.process), rp.tids))
    for rp in restored:
        recs = [r for r in rp.meta.process.fds if r.kind == ProcFile.KIND]
        if recs:
            _reopen_in(rp, recs, pids, tids)


def _reopen_in(rp, recs: list, pids: dict[int, int], tids: dict[int, int]) -> None:
    from ..remote import Scratch
    vdso = next(m for m in read_maps(rp.pid, with_flags=False) if m.path == "[vdso]")
    inj = Injector(rp.pid, rp.pid, find_syscall_insn(rp.pid, vdso.start, vdso.end))
    scratch = Scratch(inj)
    try:
        for rec in recs:
            parsed = parse(rec.path)
            if parsed is None:
                raise OSError(f"pid {rp.meta.process.pid} fd {rec.fd}: {rec.path} is not a /proc path")
            pid, tid, rest = parsed
            new = pids.get(pid) or tids.get(pid)
            if new is None or (tid is not None and tid not in tids):
                raise OSError(f"pid {rp.meta.process.pid} fd {rec.fd}: {rec.path} names a process not restored")
            path = f"/proc/{new}" + (f"/task/{tids[tid]}" if tid is not None else "") + rest
            scratch.write(0, path.encode() + b"\0")
            fd = inj.call(SYS_OPENAT, AT_FDCWD, scratch.addr, rec.flags | O_CLOEXEC, 0)
            if fd < 0:
                raise OSError(f"pid {rp.meta.process.pid} fd {rec.fd}: cannot reopen {rec.path} as {path}: "
                              f"{os.strerror(-fd)}")
            r = inj.call(SYS_DUP3, fd, rec.fd, O_CLOEXEC if rec.cloexec else 0)
            inj.call(SYS.close, fd)
            if r < 0:
                raise OSError(f"pid {rp.meta.process.pid} fd {rec.fd}: dup3: {os.strerror(-r)}")
            log.debug("pid %d fd %d: %s reopened as %s", rp.pid, rec.fd, rec.path, path)
        # seek once our scratch page is gone: a seq file such as maps replays its records up to the offset
        # then, and with our page still mapped it would count one line too many
        scratch.release()
        for rec in recs:
            if rec.pos and inj.call(SYS.lseek, rec.fd, rec.pos, os.SEEK_SET) < 0:
                log.warning("pid %d fd %d: %s reopened at offset 0, not %d", rp.pid, rec.fd, rec.path, rec.pos)
    finally:
        scratch.release()
        inj.finish(new_process=False)

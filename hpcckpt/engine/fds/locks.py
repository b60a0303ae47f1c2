"""File locks held by the computation: flock(), POSIX record locks (fcntl F_SETLK) and OFD locks (F_OFD_SETLK).

Dump: /proc/PID/fdinfo/N lists, in `lock:` lines, the locks held through that descriptor's open file
description - flock and OFD locks (owned by the description: every fd of it shows them, in every process) and
the POSIX locks owned by that very process (another process sharing the description does not see them):

    lock:   1: POSIX  ADVISORY  WRITE 1234 fe:00:2179503 10 14
    lock:   2: OFDLCK ADVISORY  WRITE -1 fe:00:2179503 50 EOF

They are kept with the file's object (files.py): flock/OFD locks once per description, POSIX locks with the
PID that owns them. Leases are refused; locks on pipes, sockets and other kinds are not restored.

Restore: flock and OFD locks are taken on the description itself, in the agent, when the object is created
(the helpers then share the description, and the lock with it, as the job did). POSIX locks belong to a
process: they are taken by an injected fcntl(F_SETLK) in the restored process itself, after the helper's own
descriptors are closed (closing any fd of a file drops the process's POSIX locks on it). A lock someone
outside the job holds now fails the restart, naming the file.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import struct

from ...image.fdstate import DirState, FileState

F_GETLK, F_SETLK = 5, 6
F_OFD_GETLK, F_OFD_SETLK = 36, 37
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
_FLOCK = struct.Struct("<hh4xqqi4x")        # struct flock: type, whence, start, len, pid
_LINE = re.compile(r"^lock:\s+\d+:\s+(\S+)\s+(\S+)\s+(\S+)\s+(-?\d+)\s+\S+\s+(\d+)\s+(\d+|EOF)\s*$")
KINDS = {"FLOCK": "flock", "POSIX": "posix", "OFDLCK": "ofd"}


def parse(info_text: str, pid: int) -> list[dict]:
    """The locks an fdinfo text lists: {type, write, start, end (-1: to EOF), pid (POSIX: the owner)}."""
    out = []
    for line in info_text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        kind = KINDS.get(m[1])
        if kind is None:
            raise ValueError(f"{m[1].lower()} ({line.split(':', 2)[2].strip()})")
        out.append({"type": kind, "write": m[3] == "WRITE", "start": int(m[5]),
                    "end": -1 if m[6] == "EOF" else int(m[6]), "pid": pid if kind == "posix" else -1})
    return out


def dump_into(state: FileState | DirState, ofd: list) -> None:
    """Record the locks held through one open file description (FdEntry list) into its object's record."""
    from ..errors import UnsupportedFd
    seen = []
    for e in ofd:
        try:
            found = parse(e.info_text, e.pid)
        except ValueError as err:
            raise UnsupportedFd(f"{e.where()}: {e.target} holds a lock that cannot be checkpointed: {err}") from None
        for lk in found:
            if lk not in seen:
                seen.append(lk)
    if seen:
        state.locks = seen


def _describe(lk: dict, path: str) -> str:
    what = {"flock": "flock()", "posix": "POSIX", "ofd": "OFD"}[lk["type"]]
    mode = "write" if lk["write"] else "read"
    span = "" if lk["type"] == "flock" else \
        f" (bytes {lk['start']}-{'EOF' if lk['end'] < 0 else lk['end']})"
    return f"the {what} {mode} lock on {path}{span}"


def _flock_struct(lk: dict, ltype: int | None = None) -> bytes:
    length = 0 if lk["end"] < 0 else lk["end"] - lk["start"] + 1
    return _FLOCK.pack(ltype if ltype is not None else (F_WRLCK if lk["write"] else F_RDLCK), os.SEEK_SET,
                       lk["start"], length, 0)


def _holder(fd: int, lk: dict) -> str:
    """Who holds a lock conflicting with lk (as seen from our PID namespace), for the error message."""
    try:
        res = fcntl.fcntl(fd, F_OFD_GETLK, _flock_struct(lk))
        ltype, _, _, _, pid = _FLOCK.unpack(res)
    except OSError:
        return ""
    if ltype == F_UNLCK:
        return ""
    return f" (pid {pid})" if pid > 0 else ""


def take_on_description(fd: int, state: FileState | DirState) -> None:
    """flock and OFD locks of a description the agent just recreated (fd)."""
    from ..errors import UnsupportedFd
    path = state.path or "?"
    for lk in state.locks or ():
        try:
            if lk["type"] == "flock":
                fcntl.flock(fd, (fcntl.LOCK_EX if lk["write"] else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            elif lk["type"] == "ofd":
                fcntl.fcntl(fd, F_OFD_SETLK, _flock_struct(lk))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                who = _holder(fd, lk) if lk["type"] == "ofd" else ""
                raise UnsupportedFd(f"cannot restore {_describe(lk, path)}: a process outside the job holds a "
                                    f"conflicting lock{who}") from None
            raise UnsupportedFd(f"cannot restore {_describe(lk, path)}: {e.strerror}") from None


def posix_for(proc, objects: dict[str, dict]) -> list[tuple[int, dict, str]]:
    """(fd, lock, path) for every POSIX lock the process owned, through the lowest fd of its description."""
    out = []
    fds: dict[str, int] = {}
    for rec in proc.fds:
        fds[rec.ofd] = min(rec.fd, fds.get(rec.ofd, rec.fd))
    for oid, fd in sorted(fds.items(), key=lambda kv: kv[1]):
        state = objects.get(oid) or {}
        for lk in state.get("locks", ()):
            if lk["type"] == "posix" and lk["pid"] == proc.pid:
                out.append((fd, lk, state.get("path", "?")))
    return out


def restore_posix(inj, scratch, pid: int, locks: list[tuple[int, dict, str]]) -> None:
    """Take the process's POSIX locks by injected fcntl(F_SETLK): the lock owner must be the process itself."""
    from ..errors import RestoreError
    from ..linux import SYS
    for fd, lk, path in locks:
        scratch.write(0, _flock_struct(lk))
        r = inj.call(SYS.fcntl, fd, F_SETLK, scratch.addr)
        if r in (-errno.EAGAIN, -errno.EACCES):
            scratch.write(0, _flock_struct(lk))
            who = ""
            if inj.call(SYS.fcntl, fd, F_GETLK, scratch.addr) == 0:
                ltype, _, _, _, holder = _FLOCK.unpack(scratch.read(0, _FLOCK.size))
                who = f" (pid {holder})" if ltype != F_UNLCK and holder > 0 else ""
            raise RestoreError(f"cannot restore {_describe(lk, path)} of pid {pid}: a process outside the job "
                               f"holds a conflicting lock{who}")
        if r < 0:
            raise RestoreError(f"cannot restore {_describe(lk, path)} of pid {pid}: {os.strerror(-r)}")

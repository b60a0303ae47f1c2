"""File descriptors: regular files, directories, harmless character devices and standard I/O.

Standard input, output and error (fds 0-2) always reconnect to the restarting command's own.
Dump reads /proc/PID/fd and fdinfo (offset, open flags). Restore reopens each file by path with its flags
and offset in the agent, and the restore helper moves it to its fd number (engine/restore.py). A writable
file that grew after the checkpoint is cut back to its checkpoint size, so a restarted program that writes
the same lines again does not leave duplicates (e.g. logs opened with O_APPEND).

Kinds not handled here (pipes, sockets, event fds, ...) are refused at checkpoint time with a message that
names the process, the fd and its kind, and the program keeps running untouched.
"""
from __future__ import annotations

import logging
import os
import stat

from ..image.records import FdRecord

log = logging.getLogger(__name__)

O_ACCMODE = 0o3
O_WRONLY, O_RDWR = 0o1, 0o2
O_CLOEXEC = 0o2000000
# devices with no state worth saving: reopening them by path is exact
STATELESS_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
STDIO_FDS = (0, 1, 2)


class UnsupportedFd(RuntimeError):
    pass


def _fdinfo(pid: int, fd: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k.strip()] = v.strip()
    return out


def describe_kind(target: str, mode: int) -> str:
    if target.startswith("pipe:"):
        return "pipe"
    if target.startswith("socket:"):
        return "socket"
    if target.startswith("anon_inode:"):
        return target[len("anon_inode:"):].strip("[]")
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    return "unknown"


def dump_fds(pid: int) -> list[FdRecord]:
    out = []
    for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        fd = int(name)
        link = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(link)
            st = os.stat(link)
            info = _fdinfo(pid, fd)
        except FileNotFoundError:
            continue            # closed meanwhile (cannot happen while frozen, but harmless)
        flags = int(info.get("flags", "0"), 8)
        pos = int(info.get("pos", "0"))
        cloexec = bool(flags & O_CLOEXEC)
        flags &= ~O_CLOEXEC
        rec = FdRecord(fd=fd, kind="", path=target, flags=flags, pos=pos, cloexec=cloexec)
        if fd in STDIO_FDS:
            # standard I/O reconnects to the restarting command's own (like DMTCP): in a batch job that is the
            # new run's log, which must never be reopened or cut back by path
            rec.kind = "stdio"
        elif stat.S_ISREG(st.st_mode):
            if target.endswith(" (deleted)"):
                raise UnsupportedFd(f"pid {pid} fd {fd}: file {target} was deleted while open; "
                                    f"not supported yet")
            rec.kind = "file"
            rec.size = st.st_size
        elif stat.S_ISDIR(st.st_mode):
            rec.kind = "dir"
        elif stat.S_ISCHR(st.st_mode) and target in STATELESS_DEVICES:
            rec.kind = "dev"
        else:
            raise UnsupportedFd(f"pid {pid} fd {fd}: {describe_kind(target, st.st_mode)} ({target}) cannot be "
                                f"checkpointed yet")
        out.append(rec)
    return out


def reopen(rec: FdRecord) -> int:
    """Open the file an FdRecord describes, at its offset. Returns a new fd in the calling process.
    Nothing is changed on disk here (see cut_back): a restore that fails later must leave files alone."""
    flags = rec.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
    if rec.kind == "dir":
        flags |= os.O_DIRECTORY
    try:
        fd = os.open(rec.path, flags | os.O_CLOEXEC)
    except OSError as e:
        raise UnsupportedFd(f"cannot reopen fd {rec.fd} ({rec.path}): {e.strerror}") from None
    if rec.kind == "file":
        os.lseek(fd, rec.pos, os.SEEK_SET)
    return fd


def cut_back(records: list[FdRecord]) -> None:
    """Cut writable files that grew since the checkpoint back to their checkpoint size (done only once the
    restored process is complete and about to run)."""
    for rec in records:
        if rec.kind != "file" or rec.size < 0 or (rec.flags & O_ACCMODE) not in (O_WRONLY, O_RDWR):
            continue
        try:
            size = os.stat(rec.path).st_size
            if size > rec.size:
                log.info("fd %d: cutting %s back from %d to its checkpoint size %d bytes", rec.fd, rec.path, size,
                         rec.size)
                os.truncate(rec.path, rec.size)
        except OSError as e:
            log.warning("fd %d: could not cut %s back to %d bytes: %s", rec.fd, rec.path, rec.size, e.strerror)

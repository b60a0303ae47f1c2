"""Regular files, directories and stateless character devices (one open file description each).

A file is reopened by path with its open flags and offset (shared by every fd and process that shared it).
A file deleted while open has its content saved in the image and comes back as a deleted file again.
A writable file that grew after the checkpoint is cut back to its checkpoint size when the restarted
computation is released (cut_back), so a restarted program writing the same lines again leaves no
duplicates (e.g. logs opened with O_APPEND).
flock() and OFD locks held through a description are taken again on the new one (locks.py).
"""
from __future__ import annotations

import logging
import os
import stat
import tempfile

from ...image.fdstate import DeviceState, DirState, FileState
from ...image.records import FdRecord
from ..errors import UnsupportedFd
from . import locks, openfiles
from .base import FdKind
from .entry import FdEntry

log = logging.getLogger(__name__)

O_ACCMODE = 0o3
O_WRONLY, O_RDWR = 0o1, 0o2
STATELESS_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
DELETED = " (deleted)"
MAX_DELETED_BYTES = 1 << 30


def _open(path: str, flags: int, what: str) -> int:
    flags &= ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
    if path.startswith("/proc/self/fd/"):
        flags &= ~os.O_NOFOLLOW        # (shm_open's) would refuse the magic link itself: ELOOP
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as e:
        raise UnsupportedFd(f"cannot reopen {what} {path}: {e.strerror}") from None


class RegularFile(FdKind):
    KIND = "file"

    @staticmethod
    def matches(e: FdEntry) -> bool:
        return stat.S_ISREG(e.mode)

    @staticmethod
    def dump(ctx, oid: str, ofd: list[FdEntry]) -> None:
        e = ofd[0]
        state = FileState(path=e.target, flags=e.flags, pos=e.pos, deleted=False,
                          size=os.stat(f"/proc/{e.pid}/fd/{e.fd}").st_size)
        if e.target.endswith(DELETED):
            # unlinked while open: only the open file keeps the data; save it
            state.deleted = True
            state.path = e.target[: -len(DELETED)]
            if state.path.startswith(("/memfd:", "/dev/shm/")):
                # shared memory that processes may also map: one object with the mappings (memory.py)
                state.shm = f"{os.major(e.dev):02x}:{os.minor(e.dev):02x}:{e.ino}"
            st = os.stat(f"/proc/{e.pid}/fd/{e.fd}")
            if st.st_size > MAX_DELETED_BYTES:
                raise UnsupportedFd(f"{e.where()}: deleted file {e.target} is {st.st_size} bytes; only up to "
                                    f"{MAX_DELETED_BYTES} are saved")
            with open(f"/proc/{e.pid}/fd/{e.fd}", "rb") as f:
                ctx.blobs[oid] = f.read()
            state.mode = stat.S_IMODE(st.st_mode)
        else:
            openfiles.save(ctx, oid, state, e.pid, e.fd)      # --checkpoint-open-files
        locks.dump_into(state, ofd)
        ctx.add(oid, state, min(x.pid for x in ofd))

    @staticmethod
    def create(factory, state: FileState) -> int:
        if state.shm:
            data = factory.read_blob(state.id)
            shm = factory.shm_fd(state.shm, max(len(data), state.size or 0))
            os.pwrite(shm, data, 0)
            fd = _open(f"/proc/self/fd/{shm}", state.flags, "shared memory file")
        elif state.deleted:
            d = os.path.dirname(state.path)
            d = d if os.path.isdir(d) and os.access(d, os.W_OK) else tempfile.gettempdir()
            fd, tmp = tempfile.mkstemp(prefix=".hpcckpt-deleted-", dir=d)
            try:
                data = factory.read_blob(state.id)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, state.mode if state.mode is not None else 0o600)
                os.close(fd)
                fd = _open(tmp, state.flags, "deleted file")
            finally:
                os.unlink(tmp)              # deleted again, as it was
        else:
            openfiles.restore(factory, state)                   # --checkpoint-open-files
            fd = _open(state.path, state.flags, "file")
        os.lseek(fd, state.pos, os.SEEK_SET)
        return _locked(fd, state)


class Directory(FdKind):
    KIND = "dir"

    @staticmethod
    def matches(e: FdEntry) -> bool:
        return stat.S_ISDIR(e.mode)

    @staticmethod
    def dump(ctx, oid: str, ofd: list[FdEntry]) -> None:
        e = ofd[0]
        state = DirState(path=e.target, flags=e.flags, pos=e.pos)
        locks.dump_into(state, ofd)
        ctx.add(oid, state, min(x.pid for x in ofd))

    @staticmethod
    def create(factory, state: DirState) -> int:
        return _locked(_open(state.path, state.flags | os.O_DIRECTORY, "directory"), state)


def _locked(fd: int, state: FileState | DirState) -> int:
    """The description's own locks (flock, OFD) taken again on the new description."""
    try:
        locks.take_on_description(fd, state)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Device(FdKind):
    KIND = "dev"

    @staticmethod
    def matches(e: FdEntry) -> bool:
        return stat.S_ISCHR(e.mode) and e.target in STATELESS_DEVICES

    @staticmethod
    def dump(ctx, oid: str, ofd: list[FdEntry]) -> None:
        e = ofd[0]
        ctx.add(oid, DeviceState(path=e.target, flags=e.flags), min(x.pid for x in ofd))

    @staticmethod
    def create(factory, state: DeviceState) -> int:
        return _open(state.path, state.flags, "device")


def cut_back(records: list[FdRecord]) -> None:
    """Cut writable files that grew since the checkpoint back to their checkpoint size (done only once the
    restored process is complete and about to run)."""
    for rec in records:
        if rec.kind != "file" or rec.size < 0 or (rec.flags & O_ACCMODE) not in (O_WRONLY, O_RDWR):
            continue
        if rec.path.endswith(DELETED):
            continue
        try:
            size = os.stat(rec.path).st_size
            if size > rec.size:
                log.info("fd %d: cutting %s back from %d to its checkpoint size %d bytes", rec.fd, rec.path, size,
                         rec.size)
                os.truncate(rec.path, rec.size)
        except OSError as e:
            log.warning("fd %d: could not cut %s back to %d bytes: %s", rec.fd, rec.path, rec.size, e.strerror)

"""Shared memory files that still have a name - shm_open'ed files in /dev/shm, other tmpfs files a job maps
MAP_SHARED, and ordinary files (up to 1 GiB) a job maps MAP_SHARED and writable: their contents are part of the
computation's memory, so they are saved with it and put back at restart.

MPI libraries keep their on-node message queues and barriers in such a file (MPICH's /dev/shm/mpich_shm_*,
Open MPI's /dev/shm/sm_segment.* and PMIx's /tmp/ompi.*/pmix-gds-shmem2.* mapped at fixed addresses): every
rank maps it MAP_SHARED and the file stays until MPI_Finalize. A process keeps writing it after a checkpoint,
and a killed job leaves it behind with whatever it held at the kill (or a node cleanup, a reboot or a restart
elsewhere leaves no file at all). Restoring the mapping from the file as it is then would resume the job with
queues from a different moment than its memory.

Dump (while every process is frozen, with the fd scan): each such file once per computation (by inode) - its
data extents (SEEK_DATA/SEEK_HOLE), size, mode, owner and mtime - as an object of kind "shmfile" in the image
of the lowest PID that maps or opens it. Deleted ones (memfd, unlinked /dev/shm files) are not handled here:
they are shared anonymous memory (memory.py, files.py).

Restore (before anything is opened or mapped): each file is written whole into a new file next to its path
and renamed over it, with its mode, owner and mtime (so the mapping's size/mtime check holds), creating missing
directories. A process still using the old file (the original job, if it runs) keeps its own inode untouched.
"""
from __future__ import annotations

import ctypes
import logging
import os
import stat

from ...image.fdstate import ShmFileState
from ..errors import ShmFileError
from ..linux import libc
from ..maps import read_maps

log = logging.getLogger(__name__)

TMPFS_MAGIC = 0x01021994
MAX_FILE_BYTES = 8 << 30
MAX_DISK_FILE_BYTES = 1 << 30      # a larger ordinary file mapped shared+writable is left to the file system
SEEK_DATA, SEEK_HOLE = 3, 4


class _statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]


libc.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_statfs)]


def _on_tmpfs(path: str) -> bool:
    buf = _statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) == TMPFS_MAGIC


def _live(path: str, dev: int, ino: int) -> bool:
    """Is `path` still the file (dev, ino)?"""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (dev, ino)


def candidates(entries: dict, pids: list[int]) -> dict[tuple[int, int], tuple[str, int, bool]]:
    """(dev, ino) -> (path, lowest pid using it, on tmpfs) for every named shared memory file of the
    computation: opened files under /dev/shm, files on tmpfs mapped MAP_SHARED, and other files mapped
    MAP_SHARED and writable."""
    found: dict[tuple[int, int], tuple[str, int, bool]] = {}

    def note(key, path, pid, shm):
        if key not in found or pid < found[key][1]:
            found[key] = (path, pid, shm)

    for (pid, _fd), e in entries.items():
        if (stat.S_ISREG(e.mode) and e.target.startswith("/dev/shm/") and not e.target.endswith(" (deleted)")
                and _live(e.target, e.dev, e.ino)):
            note((e.dev, e.ino), e.target, pid, True)
    tmpfs: dict[int, bool] = {}
    for pid in pids:
        try:
            maps = read_maps(pid, with_flags=False)
        except (FileNotFoundError, ProcessLookupError):
            continue
        for m in maps:
            if not m.shared or m.deleted or not m.inode or not m.path.startswith("/") or m.path.startswith("/SYSV"):
                continue
            try:
                st = os.stat(m.path)
            except OSError:
                continue
            if (st.st_ino != m.inode or f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}" != m.dev
                    or not stat.S_ISREG(st.st_mode)):
                continue
            if st.st_dev not in tmpfs:
                tmpfs[st.st_dev] = m.path.startswith("/dev/shm/") or _on_tmpfs(m.path)
            if tmpfs[st.st_dev] or m.perms[1] == "w":
                note((st.st_dev, st.st_ino), m.path, pid, tmpfs[st.st_dev])
    return found


def _extents(fd: int, size: int) -> list[list[int]]:
    """[[offset, length], ...] of the file's data (holes left out)."""
    out: list[list[int]] = []
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, SEEK_DATA)
        except OSError:            # ENXIO: only a hole from here on
            break
        end = os.lseek(fd, start, SEEK_HOLE)
        end = min(end, size)
        if end > start:
            out.append([start, end - start])
        off = end
    return out


def scan(ctx, pids: list[int]) -> None:
    """Add one object (and its contents) per named shared memory file of the computation."""
    for (dev, ino), (path, owner, shm) in sorted(candidates(ctx.entries, pids).items(), key=lambda kv: kv[1]):
        if not shm:
            try:
                size = os.stat(path).st_size
            except OSError:
                size = 0
            if size > MAX_DISK_FILE_BYTES:
                log.warning("pid %d maps %s (%d bytes) shared and writable: too big to save, a restart maps the "
                            "file as it is then", owner, path, size)
                continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            raise ShmFileError(f"cannot read shared memory file {path} (used by pid {owner}): {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (dev, ino):
                raise ShmFileError(f"shared memory file {path} (used by pid {owner}) was replaced while frozen")
            if st.st_size > MAX_FILE_BYTES:
                raise ShmFileError(f"shared memory file {path} is {st.st_size} bytes; only up to {MAX_FILE_BYTES} "
                                   f"are saved")
            extents = _extents(fd, st.st_size)
            parts = []
            for off, n in extents:
                data = os.pread(fd, n, off)
                while len(data) < n:           # (a short read: read on)
                    more = os.pread(fd, n - len(data), off + len(data))
                    if not more:
                        raise ShmFileError(f"shared memory file {path} shrank while being read")
                    data += more
                parts.append(data)
        finally:
            os.close(fd)
        oid = ctx.new_id("shmf")
        ctx.add(oid, ShmFileState(path=path, size=st.st_size, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid,
                                  gid=st.st_gid, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns, extents=extents),
                owner)
        ctx.blobs[oid] = b"".join(parts)


def restore(objects: list[dict], read_blob) -> None:
    """Put every saved shared memory file back at its path, as it was at the checkpoint."""
    for s in map(ShmFileState.from_dict, objects):
        path = s.path
        d = os.path.dirname(path)
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
        except OSError as e:
            raise ShmFileError(f"cannot recreate the directory of shared memory file {path}: {e.strerror}") from None
        tmp = os.path.join(d, f".hpcckpt-{os.path.basename(path)}.{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise ShmFileError(f"cannot recreate shared memory file {path}: {e.strerror}") from None
        try:
            data = memoryview(read_blob(s.id))
            os.ftruncate(fd, s.size)
            at = 0
            for off, n in s.extents:
                part = data[at:at + n]
                while part:
                    w = os.pwrite(fd, part, off)
                    part, off = part[w:], off + w
                at += n
            try:
                os.fchown(fd, s.uid, s.gid)
            except PermissionError:
                pass                           # (an unprivileged restart: our own uid, as it was)
            os.fchmod(fd, s.mode)
            os.utime(fd, ns=(s.atime_ns, s.mtime_ns))
            os.rename(tmp, path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise ShmFileError(f"cannot recreate shared memory file {path}: {e.strerror}") from None
        finally:
            os.close(fd)
        log.debug("shared memory file %s put back (%d bytes)", path, s.size)

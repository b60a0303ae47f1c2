"""inotify instances: their watches re-armed with the same watch descriptors.

Dump: /proc/PID/fdinfo lists every watch (`inotify wd ino sdev mask ignored_mask fhandle-bytes fhandle-type
f_handle`). The watched inode is turned back into a path: by its file handle (open_by_handle_at on a mount
of that filesystem; needs CAP_DAC_READ_SEARCH, which the agent has as root), else by searching the job's
working directories and the directories of the files it has open, then the whole tree, for that device and
inode (bounded; see SEARCH_BUDGET).

Restore: inotify_init1 with the same flags, then inotify_add_watch in watch descriptor order. The kernel hands
out descriptors cyclically (1, 2, 3, ... never reusing one until the counter wraps), so a descriptor that was
removed before the checkpoint is skipped by adding and removing a dummy watch on a directory of our own; every
watch gets its original number (checked: a different one fails the restore rather than mislead the program).
The IN_IGNORED events the dummies leave in the queue are read away before any process sees the instance. Where
the watched inode can still be opened by its handle it is watched itself (even if renamed meanwhile), else the
path is.

Not carried over: events queued and not read yet at the checkpoint (reading them would take them from the
running program, and there is no way to queue an event again; the checkpoint logs how many bytes are lost on
restart); a watch on a file deleted while watched, or whose path is gone at restart (its descriptor stays
unused, logged); the descriptor counter's position beyond the highest live watch (new watches the program adds
later may get different, still unique, numbers).
"""
from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import re
import shutil
import stat
import struct
import tempfile
from collections import deque

from ...image.fdstate import InotifyState
from ..errors import UnsupportedFd
from ..linux import check, libc, pidfd_getfd, syscall
from .base import FdKind
from .entry import FdEntry

log = logging.getLogger(__name__)

SYS_open_by_handle_at = 304
FIONREAD = 0x541B
IN_DONT_FOLLOW = 0x02000000
IN_MASK_CREATE = 0x10000000
IN_ATTRIB = 0x4
IN_IGNORED = 0x8000
SEARCH_BUDGET = 200_000                  # directory entries looked at, at most, to find a watched inode by search
_WATCH = re.compile(r"inotify wd:([0-9a-f]+) ino:([0-9a-f]+) sdev:([0-9a-f]+) mask:([0-9a-f]+) "
                    r"ignored_mask:([0-9a-f]+)(?: fhandle-bytes:([0-9a-f]+) fhandle-type:([0-9a-f]+) "
                    r"f_handle:([0-9a-f]+))?")
_EVENT = struct.Struct("iIII")


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_ubyte * 128)]


def _dev(sdev: int) -> int:
    """The kernel's internal device number (as fdinfo prints it) as st_dev."""
    return os.makedev(sdev >> 20, sdev & 0xFFFFF)


def _mounts_of(dev: int) -> list[str]:
    major, minor = os.major(dev), os.minor(dev)
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if parts[2] == f"{major}:{minor}":
                    out.append(parts[4].replace("\\040", " "))
    except OSError:
        pass
    return out


def _open_by_handle(dev: int, htype: int, handle: bytes) -> int:
    """An O_PATH descriptor of the inode, or -1 (no privilege, inode gone, no mount of its filesystem)."""
    fh = _FileHandle(len(handle), htype)
    ctypes.memmove(fh.f_handle, handle, len(handle))
    for mnt in _mounts_of(dev):
        try:
            mfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fd = syscall(SYS_open_by_handle_at, mfd, ctypes.addressof(fh), os.O_PATH | os.O_CLOEXEC)
        finally:
            os.close(mfd)
        if fd >= 0:
            return fd
        if ctypes.get_errno() in (1, 116):    # EPERM: not privileged; ESTALE: the inode is gone
            return -1
    return -1


def _search(dev: int, ino: int, starts: list[str]) -> str | None:
    """Breadth-first search of the start directories, then of /, for a name of the inode."""
    budget = SEARCH_BUDGET
    seen = set()
    for top in starts + ["/"]:
        queue = deque([top])
        while queue and budget > 0:
            d = queue.popleft()
            if d in seen or d in ("/proc", "/sys"):
                continue
            seen.add(d)
            try:
                st = os.stat(d)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    return d
                it = os.scandir(d)
            except OSError:
                continue
            with it:
                for entry in it:
                    budget -= 1
                    if entry.inode() == ino:
                        try:
                            if entry.stat(follow_symlinks=False).st_dev == dev:
                                return entry.path
                        except OSError:
                            pass
                    if entry.is_dir(follow_symlinks=False):
                        queue.append(entry.path)
    return None


def _resolve(w: dict, starts: list[str]) -> tuple[str | None, bool]:
    """(a path of the watched inode, whether it is a symbolic link)."""
    dev = _dev(w["sdev"])
    if w.get("handle"):
        fd = _open_by_handle(dev, w["htype"], bytes.fromhex(w["handle"]))
        if fd >= 0:
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
                link = stat.S_ISLNK(os.fstat(fd).st_mode)
            finally:
                os.close(fd)
            if not path.endswith(" (deleted)"):
                return path, link
            return None, False
    found = _search(dev, w["ino"], starts)
    return found, found is not None and os.path.islink(found)


class Inotify(FdKind):
    KIND = "inotify"

    @staticmethod
    def matches(e: FdEntry) -> bool:
        return e.target in ("anon_inode:inotify", "anon_inode:[inotify]")

    @staticmethod
    def dump(ctx, oid: str, ofd: list[FdEntry]) -> None:
        e = ofd[0]
        holders = sorted({x.pid for x in ofd})
        starts = []
        for p in holders:
            try:
                starts.append(os.readlink(f"/proc/{p}/cwd"))
            except OSError:
                pass
        starts += sorted({os.path.dirname(x.target) for x in ctx.entries.values()
                          if x.pid in holders and x.target.startswith("/") and stat.S_ISREG(x.mode)})
        watches = []
        for m in _WATCH.finditer(e.info_text):
            w = {"wd": int(m[1], 16), "ino": int(m[2], 16), "sdev": int(m[3], 16), "mask": int(m[4], 16),
                 "handle": m[8] or "", "htype": int(m[7], 16) if m[7] else 0}
            w["path"], w["link"] = _resolve(w, starts)
            if w["path"] is None:
                log.warning("%s: inotify watch %d (inode %d) has no name any more (deleted?); it is not re-armed "
                            "after a restart", e.where(), w["wd"], w["ino"])
            watches.append(w)
        queued = _queued(e)
        if queued:
            log.warning("%s: %d bytes of inotify events not read yet are not part of the checkpoint; a restart "
                        "from it loses them", e.where(), queued)
        ctx.add(oid, InotifyState(flags=e.flags, watches=sorted(watches, key=lambda w: w["wd"]), queued=queued),
                min(holders))

    @staticmethod
    def create(factory, s: InotifyState) -> int:
        fd = check(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")
        try:
            _arm(fd, s.watches)
            fcntl.fcntl(fd, fcntl.F_SETFL, s.flags & os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _queued(e: FdEntry) -> int:
    try:
        pidfd = os.pidfd_open(e.pid)
        try:
            mine = pidfd_getfd(pidfd, e.fd)
        finally:
            os.close(pidfd)
    except OSError:
        return 0
    try:
        n = ctypes.c_int(0)
        fcntl.ioctl(mine, FIONREAD, n)
        return n.value
    finally:
        os.close(mine)


def _add(fd: int, path: str, mask: int) -> int:
    wd = libc.inotify_add_watch(fd, path.encode(), ctypes.c_uint32(mask))
    if wd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return wd


def _arm(fd: int, watches: list[dict]) -> None:
    dummy_dir = tempfile.mkdtemp(prefix=".hpcckpt-inotify-")
    dummies: set[int] = set()
    next_wd = 1

    def skip_one() -> int:
        wd = _add(fd, dummy_dir, IN_ATTRIB)
        libc.inotify_rm_watch(fd, wd)
        dummies.add(wd)
        return wd + 1

    try:
        for w in watches:
            while next_wd < w["wd"]:
                next_wd = skip_one()
            target, mask, tmp = _target(w)
            wd = -1
            try:
                if target is not None:
                    wd = _add(fd, target, mask | IN_MASK_CREATE)
                else:
                    log.warning("inotify watch %d on %s not re-armed: it is gone", w["wd"], w["path"] or
                                f"inode {w['ino']}")
            except OSError as e:
                log.warning("inotify watch %d on %s not re-armed: %s", w["wd"], w["path"], e.strerror)
            finally:
                if tmp >= 0:
                    os.close(tmp)
            if wd < 0:
                next_wd = skip_one()          # its number stays unused, as the program expects of it
                continue
            if wd != w["wd"]:
                raise UnsupportedFd(f"inotify watch on {w['path']} came back as watch {wd}, not {w['wd']}")
            next_wd = wd + 1
    finally:
        shutil.rmtree(dummy_dir, ignore_errors=True)
    lost = 0
    while True:                                # the dummies' IN_IGNORED events: the program never saw those
        try:
            buf = os.read(fd, 65536)
        except BlockingIOError:
            break
        off = 0
        while off + _EVENT.size <= len(buf):
            wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
            off += _EVENT.size + length
            if not (wd in dummies and mask & IN_IGNORED):
                lost += 1
    if lost:
        log.info("inotify: %d event(s) that happened while the watches were re-armed were dropped", lost)


def _target(w: dict) -> tuple[str | None, int, int]:
    """What to watch: the very inode if its handle still opens it (renamed or not; through its /proc link, the
    returned descriptor to be closed after the call), else the saved path. (path, mask, fd or -1)."""
    mask = w["mask"]
    if w.get("link"):
        return w.get("path"), mask | IN_DONT_FOLLOW, -1
    if w.get("handle") and w.get("path"):
        fd = _open_by_handle(_dev(w["sdev"]), w["htype"], bytes.fromhex(w["handle"]))
        if fd >= 0:
            return f"/proc/self/fd/{fd}", mask, fd
    path = w.get("path")
    if path and not os.path.lexists(path):
        return None, mask, -1
    return path, mask, -1

"""Pipes and FIFOs between processes of the computation, with the bytes still in them.

Dump: for each pipe (inode) the agent takes a copy of a read end from a frozen process (pidfd_getfd) and
tee(2)s the buffered bytes into a scratch pipe, which duplicates them without consuming anything: the
running computation is not disturbed. The pipe's capacity is saved too. A pipe whose read end lives in no
process of the computation can hold data no one in it will read; it is saved without data.

Restore: the agent creates the pipe (or opens the FIFO by path, creating the FIFO if it is gone), sets the
capacity, writes the saved bytes back, and every read or write end becomes an object the helpers
duplicate into place. Every byte comes back once, in order.
"""
from __future__ import annotations

import base64
import ctypes
import fcntl
import logging
import os
import stat

from ...image.fdstate import PipeEndState, PipeInodeState
from ..errors import UnsupportedFd
from ..linux import check, libc, pidfd_getfd
from .base import FdKind
from .entry import FdEntry

log = logging.getLogger(__name__)

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
FIONREAD = 0x541B
SPLICE_F_NONBLOCK = 2
O_ACCMODE = 0o3
libc.tee.restype = ctypes.c_ssize_t
libc.tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]


def _is_pipe(e: FdEntry) -> bool:
    return stat.S_ISFIFO(e.mode)


def _peek_pipe(pid: int, fd: int) -> tuple[bytes, int]:
    """(buffered bytes, capacity) of the pipe behind pid's fd, without consuming anything."""
    pidfd = os.pidfd_open(pid)
    try:
        mine = pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)
    try:
        capacity = fcntl.fcntl(mine, F_GETPIPE_SZ)
        avail = ctypes.c_int(0)
        fcntl.ioctl(mine, FIONREAD, avail)
        if avail.value == 0:
            return b"", capacity
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, max(capacity, avail.value))
            except OSError:
                pass
            # tee always copies from the head of the source, so one call with room for everything is needed
            n = libc.tee(mine, w, avail.value, SPLICE_F_NONBLOCK)
            if n != avail.value:
                raise UnsupportedFd(f"pid {pid} fd {fd}: could only copy {n} of the {avail.value} bytes in its "
                                    f"pipe")
            os.close(w)
            w = -1
            chunks = []
            while True:
                b = os.read(r, 1 << 20)
                if not b:
                    break
                chunks.append(b)
            return b"".join(chunks), capacity
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
    finally:
        os.close(mine)


class PipeEnd(FdKind):
    """An open end of a pipe (anonymous or a FIFO); the pipe itself is a separate `pipe-inode` object."""
    KIND = "pipe"

    @staticmethod
    def matches(e: FdEntry) -> bool:
        return _is_pipe(e)

    @staticmethod
    def dump(ctx, oid: str, ofd: list[FdEntry]) -> None:
        e = ofd[0]
        key = f"pipe-inode:{e.dev}:{e.ino}"
        inode_id = ctx.index.get(key)
        if inode_id is None:
            inode_id = ctx.new_id("p")
            fifo = None if e.target.startswith("pipe:") else e.target
            same = [x for x in ctx.entries.values() if (x.dev, x.ino) == (e.dev, e.ino)]
            readers = [x for x in same if (x.flags & O_ACCMODE) in (os.O_RDONLY, os.O_RDWR)]
            data, capacity = (b"", 65536)
            if readers:
                data, capacity = _peek_pipe(readers[0].pid, readers[0].fd)
            elif any((x.flags & O_ACCMODE) != os.O_RDONLY for x in same) and not fifo:
                log.info("pipe %s has no reader in the computation; its buffered bytes are not saved", e.target)
            ctx.add(inode_id, PipeInodeState(fifo=fifo, capacity=capacity, data=base64.b64encode(data).decode(),
                                             bytes=len(data)), min(x.pid for x in same))
            ctx.index[key] = inode_id
        mode = e.flags & O_ACCMODE
        end = "rw" if mode == os.O_RDWR else ("r" if mode == os.O_RDONLY else "w")
        ctx.add(oid, PipeEndState(pipe=inode_id, end=end, flags=e.flags), min(x.pid for x in ofd))

    @staticmethod
    def create(factory, state: PipeEndState) -> int:
        r, w = _pipe(factory, state.pipe)
        end = state.end
        src = r if end == "r" else w if end == "w" else None
        used = factory.extra.setdefault("pipe-ends-used", set())
        if src is not None and src not in used:
            used.add(src)
            fd = src                       # the first description of this end is the pipe's own
        else:
            inode = factory.state(state.pipe)
            path = inode.fifo or f"/proc/self/fd/{src if src is not None else r}"
            mode = os.O_RDWR if end == "rw" else (os.O_RDONLY if end == "r" else os.O_WRONLY)
            fd = check(os.open(path, mode | os.O_NONBLOCK | os.O_CLOEXEC), "reopen pipe")
        fcntl.fcntl(fd, fcntl.F_SETFL, state.flags & ~O_ACCMODE)
        return fd

    @staticmethod
    def cleanup(factory) -> None:
        used = factory.extra.get("pipe-ends-used", set())    # those were handed out (closed with the objects)
        for r, w in factory.extra.get("pipes", {}).values():
            for fd in (r, w):
                if fd not in used:
                    try:
                        os.close(fd)
                    except OSError:
                        pass


class PipeInode(FdKind):
    """Only referred to by PipeEnd objects; created on first use (see _pipe)."""
    KIND = "pipe-inode"
    DERIVED = True

    @staticmethod
    def create(factory, state: PipeInodeState) -> int:
        raise UnsupportedFd("internal: a pipe inode has no descriptor of its own")


def _pipe(factory, inode_id: str) -> tuple[int, int]:
    """The agent's (read, write) fds of a pipe inode, created and refilled on first use."""
    pipes = factory.extra.setdefault("pipes", {})
    if inode_id in pipes:
        return pipes[inode_id]
    inode = factory.state(inode_id)
    data = base64.b64decode(inode.data)
    if inode.fifo:
        path = inode.fifo
        if not os.path.exists(path):
            log.warning("FIFO %s is gone; creating it again", path)
            os.mkfifo(path, 0o600)
        r = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        w = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    else:
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    r, w = factory.high(r), factory.high(w)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, max(inode.capacity, len(data)))
    except OSError as e:
        log.warning("pipe %s: cannot set its capacity to %s bytes (%s)", inode_id, inode.capacity, e)
    view = memoryview(data)
    while view:
        view = view[os.write(w, view):]
    # the agent's own copies stay blocking-neutral: each end's flags are set per description in create()
    fcntl.fcntl(r, fcntl.F_SETFL, 0)
    fcntl.fcntl(w, fcntl.F_SETFL, 0)
    pipes[inode_id] = (r, w)
    return r, w

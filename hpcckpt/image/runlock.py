"""One live copy of a computation per checkpoint directory: <ckptdir>/ckpt_<computation>/running.lock.

Every agent of a running computation holds a shared flock(2) on it from its first checkpoint on (a computation
with no checkpoint cannot be restarted anyway), so the agents of a computation spread over hosts sharing the
directory hold it together. A restart claims it before touching anything: an exclusive non-blocking lock that
fails while any agent (or another restart) holds it, then turned into a shared one for the restarted
computation's life. Turning an exclusive flock into a shared one is not atomic (the kernel drops and retakes
it), so the claim also fails if the shared lock cannot be taken at once; of two restarts racing, exactly one
ends up holding the lock and the other refuses. A restart waits up to GRACE_S (HPCCKPT_LOCK_GRACE) for the
lock before refusing: the agents of a computation just killed (on other hosts too) may take a moment to exit.

A lock dies with the processes that hold it (the agent, the restart command and its helpers), so the agents
of a computation that was killed never block its restart. On NFS, flock is carried by the server's lock
manager across hosts; on a filesystem without locks (ENOLCK, EOPNOTSUPP) the check is skipped with a warning.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time

from . import safefs, store

log = logging.getLogger("hpcckpt.runlock")

LOCK_NAME = "running.lock"
GRACE_S = 3.0       # a computation just killed: its agents (on other hosts too) may take a moment to exit
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
_held: dict[str, int] = {}          # computation directory -> the lock file's fd (kept open: the lock)


class Busy(Exception):
    """The computation is running (or being restarted) with this checkpoint directory."""


def _open_lock(ckptdir: str, computation: str) -> int:
    dfd = store.open_computation_dir(ckptdir, computation, create=True)
    try:
        fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600,
                     dir_fd=dfd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise safefs.UnsafePath(f"{os.path.join(store.computation_dir(ckptdir, computation), LOCK_NAME)} is "
                                    f"a symlink: remove it") from None
        raise
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or not safefs.trusted_owner(st.st_uid):
        os.close(fd)
        raise safefs.UnsafePath(f"{os.path.join(store.computation_dir(ckptdir, computation), LOCK_NAME)} is not "
                                f"a regular file of yours: remove it")
    return fd


def _key(ckptdir: str, computation: str) -> str:
    return store.computation_dir(ckptdir, computation)


def hold(ckptdir: str, computation: str) -> None:
    """A running computation's agent: hold the shared lock (once per process; blocks only during a restart's
    claim, which lasts microseconds)."""
    key = _key(ckptdir, computation)
    if key in _held:
        return
    fd = _open_lock(ckptdir, computation)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError as e:
        os.close(fd)
        if e.errno in _NO_LOCKS:
            log.warning("cannot lock %s (%s): a restart will not see that this computation runs", key, e.strerror)
            return
        raise
    _held[key] = fd


def claim(ckptdir: str, computation: str, force: bool = False) -> None:
    """A restart, before it touches anything: raise Busy if the computation runs (or another restart of it
    does) with this checkpoint directory; else hold the shared lock from now on. force: take the shared lock
    without checking (two live copies may then write the same files and checkpoints)."""
    key = _key(ckptdir, computation)
    if key in _held:
        return
    fd = _open_lock(ckptdir, computation)
    try:
        if not force:
            deadline = time.monotonic() + float(os.environ.get("HPCCKPT_LOCK_GRACE", GRACE_S))
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() < deadline:
                        time.sleep(0.1)
                        continue
                raise Busy(f"computation {computation} is still running (or being restarted) with checkpoint "
                           f"directory {os.path.dirname(key)} (lock {os.path.join(key, LOCK_NAME)} held): stop it "
                           f"first, or pass --force to start a second live copy anyway") from None
        else:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except Busy:
        os.close(fd)
        raise
    except OSError as e:
        os.close(fd)
        if e.errno in _NO_LOCKS:
            log.warning("cannot lock %s (%s): not checking whether computation %s still runs", key, e.strerror,
                        computation)
            return
        if isinstance(e, BlockingIOError) and force:
            log.warning("computation %s looks still running (%s held); restarting anyway (--force)", computation,
                        os.path.join(key, LOCK_NAME))
            return
        raise
    _held[key] = fd


def targets(image_paths: list[str], computation: str | None, ckptdir: str) -> list[tuple[str, str]]:
    """(checkpoint directory, computation) pairs a restart of these images must claim: the directory the
    images were checkpointed to (<dir>/ckpt_<comp>/gen<N>/image) and the one later checkpoints go to."""
    out: list[tuple[str, str]] = []
    for p in image_paths:
        gdir = os.path.dirname(os.path.abspath(p))
        cdir = os.path.dirname(gdir)
        if os.path.basename(gdir).startswith("gen") and os.path.basename(cdir).startswith("ckpt_"):
            pair = (os.path.dirname(cdir), os.path.basename(cdir)[len("ckpt_"):])
            if pair not in out:
                out.append(pair)
    comps = [computation] if computation else sorted({c for _, c in out})
    for c in comps:
        pair = (os.path.abspath(ckptdir), c)
        if pair not in out:
            out.append(pair)
    return out


def release_all() -> None:
    for fd in _held.values():
        os.close(fd)
    _held.clear()

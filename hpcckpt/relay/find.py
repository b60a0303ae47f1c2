"""How an agent finds its node's relay: one per coordinator and node, named by a port file in the run directory
(the node's name in it: a run directory on a shared file system serves several nodes); the first launch on the
node starts it (`hpcckpt relay --daemon`), the others find it there.

What lies in the run directory is trusted only if it is ours: the port file must be a regular file (no symlink
followed) of our uid that nobody else can write. Starts are serialized by a lock on the run directory itself, so
no lock file is left behind (a lock file only where a directory cannot be locked: NFS). A relay killed (SIGKILL)
leaves its port file; the next start, under the lock, finds its port silent and removes it first. The relay needs
no copy of the secret: agents sign for it with the computation's secret (read by the coordinator's port, as
direct agents do)."""
from __future__ import annotations

import fcntl
import logging
import os
import stat
import subprocess
import sys

from ..coordinator import protocol
from ..coordinator.client import port_is_open
from ..image import store
from ..settings import Settings

log = logging.getLogger("hpcckpt.relay")
RELAY_HOST = "127.0.0.1"          # a relay serves the agents of its own node only


def port_file(coord_host: str, coord_port: int) -> str:
    node = store.safe_name(os.uname().nodename)
    return os.path.join(protocol.rundir(), f"relay-{node}-{store.safe_name(coord_host)}-{coord_port}.port")


def read_port_file(path: str) -> int | None:
    """The port a relay wrote there, if the file is one we can trust: a regular file of ours that only we may
    write, not reached through a symlink (else None, and a warning: someone else put it there)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("ignoring the relay port file %s: %s (a symlink?); joining the coordinator directly",
                    path, e.strerror)
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            log.warning("ignoring the relay port file %s: not a regular file of yours that only you can write "
                        "(owner uid %d, mode %o); remove it", path, st.st_uid, stat.S_IMODE(st.st_mode))
            return None
        text = os.read(fd, 64).decode(errors="replace")
    finally:
        os.close(fd)
    try:
        port = int(text.split()[0])
    except (IndexError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def running_relay(coord_host: str, coord_port: int) -> tuple[str, int] | None:
    """The address of this node's relay for that coordinator, if one answers."""
    port = read_port_file(port_file(coord_host, coord_port))
    if port is None:
        return None
    return (RELAY_HOST, port) if port_is_open(RELAY_HOST, port, timeout=0.5) else None


def _remove_stale(path: str) -> None:
    """A port file whose relay is gone (killed): removed, so nobody trips on it (ours only: see read_port_file)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() or stat.S_ISLNK(st.st_mode):
        try:
            os.unlink(path)
            log.info("removed the stale relay port file %s", path)
        except OSError as e:
            log.warning("cannot remove the stale relay port file %s: %s", path, e.strerror)


def _lock(path: str) -> int:
    """An exclusive flock on the run directory (no file left behind); where a directory cannot be flocked (NFS
    emulates flock with write locks), on a lock file beside the port file instead (ours, 0600, no symlink)."""
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    except OSError:
        os.close(fd)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def ensure_relay(s: Settings, coord_host: str, coord_port: int) -> tuple[str, int] | None:
    """This node's relay (started if there is none yet); None if it cannot be had (said why: agents then join
    the coordinator directly)."""
    path = port_file(coord_host, coord_port)
    lock = _lock(path)                          # two launches on one node at once start one relay
    try:
        found = running_relay(coord_host, coord_port)
        if found is not None:
            return found
        _remove_stale(path)
        env = dict(os.environ, HPCCKPT_PEER_TIMEOUT=str(s.peer_timeout), HPCCKPT_HEARTBEAT=str(s.heartbeat),
                   HPCCKPT_PHASE_TIMEOUT=str(s.phase_timeout))
        cmd = [sys.executable, "-m", "hpcckpt.cli.main", "relay", "--coord-host", coord_host, "--coord-port",
               str(coord_port), "--port-file", path, "--daemon"]
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            log.warning("cannot start this node's relay (%s); joining the coordinator directly",
                        (r.stderr.strip().splitlines() or ["no reason given"])[-1])
            return None
        found = running_relay(coord_host, coord_port)
        if found is None:
            log.warning("this node's relay started but does not answer; joining the coordinator directly")
        return found
    finally:
        os.close(lock)

"""The job's own PID namespace (plus user and mount namespaces when not root), with the agent as its init.

Why: a restarted process must get its original PID and thread IDs back, because glibc caches thread IDs,
robust and error-checking mutexes record owners by TID, and programs write pid files. Inside a PID namespace
that the agent created, it may choose PIDs (ns_last_pid / clone3 set_tid need CAP_CHECKPOINT_RESTORE in the
user namespace that owns the PID namespace, which the agent has because it created it). A private /proc is
mounted so /proc/<getpid()> is the job's own process, for the job and for the agent.

Process layout:
    launch/restart (outer, the user's foreground command; waits, forwards signals, exits with the status)
      └─ agent        PID 1 in the namespace: talks to the coordinator, owns and traces the job, reaps orphans
           └─ program PID 2.. (never PID 1)

Where namespaces are not available, everything runs in the outer process and restarted processes get new
PIDs; the log says which mode is in use (see RestoreOptions.same_pids for the thread-ID fix-up then).
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
from dataclasses import dataclass

from ..engine.linux import libc

log = logging.getLogger("hpcckpt.agent")

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_REC, MS_PRIVATE = 0x4000, 0x40000


@dataclass
class NamespaceMode:
    pid_namespace: bool
    user_namespace: bool
    reason: str = ""

    def describe(self) -> str:
        if self.pid_namespace:
            return "own PID namespace (processes keep their PIDs across restarts)" + \
                (", unprivileged (user namespace)" if self.user_namespace else "")
        return f"no PID namespace ({self.reason}); restarted processes get new PIDs"


def _unshare(flags: int) -> int:
    if libc.unshare(flags) != 0:
        return ctypes.get_errno()
    return 0


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter(wanted: bool = True) -> NamespaceMode:
    """Called by the outer process before it forks the agent: new PID (+mount, +user if needed) namespaces
    for its children. Never raises: falls back to no namespace and says why."""
    if not wanted:
        return NamespaceMode(False, False, "disabled (--no-pid-namespace / HPCCKPT_PID_NAMESPACE=0)")
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        err = _unshare(CLONE_NEWPID | CLONE_NEWNS)
        if err == 0:
            return NamespaceMode(True, False)
        return NamespaceMode(False, False, f"unshare(CLONE_NEWPID) failed: {os.strerror(err)}")
    err = _unshare(CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNS)
    if err:
        return NamespaceMode(False, False, f"user namespaces unavailable: {os.strerror(err)}")
    try:
        # map our own uid/gid to themselves: the job keeps seeing its real ids and owns its files
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    except OSError as e:
        return NamespaceMode(False, False, f"cannot map ids in the user namespace: {e.strerror}")
    return NamespaceMode(True, True)


def become_init() -> None:
    """In the agent (PID 1 of the new namespace): private mounts and a /proc of our own.

    An init only receives signals it has a handler for, so the signals the agent reads through its signalfd
    get (never called) handlers."""
    if os.getpid() != 1:
        raise RuntimeError("become_init() outside a new PID namespace")
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "making mounts private")
    if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mounting a private /proc: {os.strerror(err)}")


def install_init_handlers(signals: list[int]) -> None:
    for sig in signals:
        signal.signal(sig, lambda *_: None)


def supervise(child: int, forward: list[int], root_exit_fd: int | None = None) -> tuple[int, bool]:
    """The outer process: wait for the agent, forwarding the signals someone sends us; return (its status,
    False). If the agent reports on root_exit_fd that the launched process ended while others of the job go on,
    return (the root's status, True) at once: the agent lives on without us."""
    from .sigfd import SignalFd
    sfd = SignalFd(list(forward) + [signal.SIGCHLD])
    try:
        import select
        while True:
            try:
                wpid, status = os.waitpid(child, os.WNOHANG)
            except ChildProcessError:
                return 0, False
            if wpid == child:
                if os.WIFEXITED(status):
                    return os.WEXITSTATUS(status), False
                return 128 + os.WTERMSIG(status), False
            watch = [sfd.fd] + ([root_exit_fd] if root_exit_fd is not None else [])
            ready, _, _ = select.select(watch, [], [], 1.0)
            if root_exit_fd is not None and root_exit_fd in ready:
                text = os.read(root_exit_fd, 64).decode().strip()
                if text.lstrip("-").isdigit():
                    return int(text), True
                root_exit_fd = None           # (closed without a word: the agent ends as usual)
            for signo, code, _sender in sfd.read():
                if signo in forward and sfd.sent_by_process(code):
                    try:
                        os.kill(child, signo)
                    except ProcessLookupError:
                        pass
    finally:
        sfd.close()



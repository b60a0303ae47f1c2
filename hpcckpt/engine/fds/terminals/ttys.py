"""The terminal the computation was started from, and /dev/tty.

A job started from a terminal shares it with the launch command: the agent and the program are in that
command's session (jobrun.py), so the terminal stays their controlling terminal without anything done, and a
restart run from another terminal makes that one the restored processes' controlling terminal the same way.
Descriptors on it are `stdio` (fdtable.py) and come back as the restarting command's. Like DMTCP, the
settings the program had made (termios: raw mode, echo off, ...) are saved and applied to the restarting
terminal. Its window size is not: it is the size of the window the user restarts in; when it differs from
the saved one, the processes of the terminal's foreground group get a SIGWINCH, as on a resize, so
full-screen programs redraw. A process group of the job that was the terminal's foreground group is made the
foreground group again.

/dev/tty descriptors name no terminal by path (TIOCGDEV tells which). One on the launching terminal is
reopened in the agent, whose controlling terminal is the restarting command's (/dev/null, with a warning, when
restarted without a terminal); one on a pty of the computation is opened by a short-lived process that makes
the new slave its controlling terminal and hands the descriptor over; a hung-up one comes back hung up.

Not possible: a process of the job that leads a session with the launching terminal as controlling terminal
(the launch command's session has it; only stealing it with TIOCSCTTY could make that happen).
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import stat
import struct

from ....image.fdstate import DevTtyState, TerminalState
from ....image.records import b64, unb64
from ...errors import UnsupportedFd
from ...linux import pidfd_getfd
from ..base import FdKind
from ..entry import FdEntry
from .ptys import (
    PTS_MAJORS,
    TIOCGDEV,
    TIOCGPTPEER,
    TIOCNOTTY,
    TIOCSCTTY,
    TIOCSPTLCK,
    copy_fd,
    get_int,
    get_termios,
    get_winsize,
    open_flags,
    pair,
    pair_dump,
    pty_index,
    rdev_of,
    set_int,
    set_termios,
)

log = logging.getLogger(__name__)

DEVTTY = os.makedev(5, 0)
SI_KERNEL = 0x80
_SIGWINCH_INFO = struct.pack("iii", signal.SIGWINCH, 0, SI_KERNEL).ljust(128, b"\0")   # as from a resize


def _stat_fields(pid) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, session, tty_nr, tpgid, ...]."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().decode("utf-8", "replace").rpartition(")")[2].split()


def _launch_tty_rdev(stdio_pid: int) -> int:
    """The device of the agent's controlling terminal (the launching command's), or 0."""
    try:
        return int(_stat_fields(stdio_pid)[4])
    except (OSError, IndexError, ValueError):
        return 0


# ----------------------------------------------------------------------------------------- restore --
def _devtty_of_session(slave: int, flags: int) -> int:
    """/dev/tty of a terminal is reachable only as a process's controlling terminal: a short-lived child takes
    the slave as its own, opens /dev/tty, and we take a copy of that descriptor."""
    r, w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.close(go_w)
            os.setsid()
            fcntl.ioctl(slave, TIOCSCTTY, 0)
            fd = os.open("/dev/tty", open_flags(flags))
            os.write(w, str(fd).encode())
            os.read(go_r, 1)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            fcntl.ioctl(slave, TIOCNOTTY)     # let it go without a hangup; the session leader takes it later
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.close(go_r)
    try:
        text = os.read(r, 32)
        if not text:
            raise UnsupportedFd("could not open /dev/tty of a restored pseudo-terminal")
        pidfd = os.pidfd_open(pid)
        try:
            return pidfd_getfd(pidfd, int(text))
        finally:
            os.close(pidfd)
    finally:
        os.close(go_w)
        os.close(r)
        os.waitpid(pid, 0)


def _hung_tty(flags: int) -> int:
    """A descriptor of a terminal that was hung up (reads see end of file, writes fail)."""
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        set_int(master, TIOCSPTLCK, 0)
        return fcntl.ioctl(master, TIOCGPTPEER, open_flags(flags))
    finally:
        os.close(master)


def _restart_terminal(factory, st: TerminalState) -> int:
    """The agent's descriptor of the restarting terminal standing for a saved one (-1: none)."""
    for n in st.stdio:
        if os.isatty(n):
            return factory.fd_for(f"stdio:{n}")
    if st.ctty:
        try:
            return factory.high(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC))
        except OSError:
            pass
    return -1


def apply_terminals(factory) -> dict:
    """Once per restore: the saved settings applied to the restarting terminal(s). Returns {terminal id: (fd,
    window size differs)}."""
    done = factory.extra.get("terminals")
    if done is not None:
        return done
    done = {}
    factory.extra["terminals"] = done
    for st in factory.states_of("terminal"):
        fd = _restart_terminal(factory, st)
        if fd < 0:
            log.info("not restarted from a terminal: the saved terminal settings are not applied")
            continue
        try:
            set_termios(fd, st.termios)
            differs = get_winsize(fd)[:2] != st.winsize[:2]
        except OSError as e:
            log.warning("could not apply the saved terminal settings: %s", e.strerror)
            continue
        if fd not in factory.fds.values():
            factory.fds[f"terminal:{st.id}"] = fd           # closed with the other objects
        done[st.id] = (fd, differs)
    return done


def plan_session(factory, proc) -> tuple[int, int, bool]:
    """What proc's restore helper does about terminals: (fd to take as controlling terminal after setsid, fd on
    which its new process group becomes the foreground group, queue a SIGWINCH); -1 for none."""
    applied = apply_terminals(factory)
    ctty = fg = -1
    winch = False
    leads_group = proc.pgid == proc.pid
    for oid, row in factory.objects.items():
        kind = row.get("kind")
        if kind == "pty":
            pty = factory.state(oid)
            if pty.hung:
                continue
            if pty.sid == proc.pid:
                ctty = pair(factory, oid)[1]
            if pty.fg == proc.pid and leads_group and pty.sid != proc.pid:
                fg = pair(factory, oid)[1]
        elif kind == "terminal" and oid in applied:
            term = factory.state(oid)
            fd, differs = applied[oid]
            if term.fg and term.fg == proc.pid and leads_group:
                fg = fd
            if differs and proc.pid in term.members and proc.pgid == term.fg:
                winch = True
    if winch and not any(int.from_bytes(unb64(p)[:4], "little") == signal.SIGWINCH for p in proc.pending):
        # made pending by the restore after the signal dispositions are set: raised any earlier, it would be
        # discarded where its disposition is SIG_DFL (ignored), as with a program reading it from a signalfd
        proc.pending.append(b64(_SIGWINCH_INFO))
    return ctty, fg, False


def session_terminal(ctty: int, fg: int, winch: bool) -> None:
    """In a restore helper, after its session and group are made: see plan_session."""
    if ctty >= 0 and os.getsid(0) == os.getpid():
        fcntl.ioctl(ctty, TIOCSCTTY, 0)
    if fg >= 0:
        # from a background group this would stop us with SIGTTOU; blocked, the kernel just does it
        old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTTOU])
        try:
            os.tcsetpgrp(fg, os.getpgrp())
        except OSError:
            pass                 # the terminal is not ours (restarted from another session or none)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if winch:
        # (plan_session queues the SIGWINCH with the image's pending signals instead)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGWINCH])
        os.kill(os.getpid(), signal.SIGWINCH)


# ---------------------------------------------------------------------------------------- handlers --
class DevTty(FdKind):
    KIND = "devtty"

    @staticmethod
    def matches(e: FdEntry) -> bool:
        return stat.S_ISCHR(e.mode) and rdev_of(e) == DEVTTY

    @staticmethod
    def dump(ctx, oid: str, ofd: list[FdEntry]) -> None:
        e = ofd[0]
        state = DevTtyState(flags=e.flags, of="hung")
        fd = copy_fd(e)
        try:
            dev = get_int(fd, TIOCGDEV)
        except OSError:
            dev = -1                                 # hung up
        finally:
            os.close(fd)
        if dev >= 0:
            if dev == _launch_tty_rdev(ctx.stdio_pid):
                state.of = "launch"
            elif os.major(dev) in PTS_MAJORS:
                state.of = pair_dump(ctx, pty_index(dev), e.where())
            else:
                raise UnsupportedFd(f"{e.where()}: /dev/tty is terminal {os.major(dev)}:{os.minor(dev)}, neither "
                                    f"the launching command's nor one the computation created")
        ctx.add(oid, state, min(x.pid for x in ofd))

    @staticmethod
    def create(factory, state: DevTtyState) -> int:
        of, flags = state.of, state.flags
        if of == "hung":
            return _hung_tty(flags)
        if of != "launch":
            return _devtty_of_session(pair(factory, of)[1], flags)
        apply_terminals(factory)
        try:
            return os.open("/dev/tty", open_flags(flags))        # the restarting command's terminal
        except OSError:
            log.warning("the restarting command has no controlling terminal: /dev/tty of the computation is "
                        "/dev/null")
            return os.open(os.devnull, (flags & os.O_ACCMODE) | os.O_CLOEXEC)


class Terminal(FdKind):
    """The launching command's terminal: settings the computation made, its foreground group, and which
    processes have it as controlling terminal. Never referred to by a descriptor (those are `stdio`)."""
    KIND = "terminal"
    DERIVED = True

    @staticmethod
    def create(factory, state: TerminalState) -> int:
        raise UnsupportedFd("internal: the launching terminal has no descriptor of its own")

    @staticmethod
    def dump_computation(ctx, pids: list[int], stdio: list[FdEntry], records: dict) -> None:
        terms: dict[int, dict] = {}
        for s in stdio:
            if stat.S_ISCHR(s.mode):
                rdev = os.stat(f"/proc/{s.pid}/fd/{s.fd}").st_rdev
                if os.major(rdev) != 1:          # memory devices (/dev/null) are not terminals
                    terms.setdefault(rdev, {"stdio": [], "src": s})["stdio"].append(s.fd)
        ctty = _launch_tty_rdev(stdio[0].pid) if stdio else 0
        if ctty > 0:
            terms.setdefault(ctty, {"stdio": [], "src": None})["ctty"] = True
        used_stdio = {int(r.ofd.split(":")[1]) for recs in records.values() for r in recs
                      if r.ofd.startswith("stdio:")}
        uses_devtty = any(o.get("kind") == "devtty" and o.get("of") == "launch" for o in ctx.objects.values())
        for rdev, t in terms.items():
            members, fg = [], 0
            for pid in pids:
                try:
                    f = _stat_fields(pid)
                except OSError:
                    continue
                if int(f[4]) == rdev:
                    members.append(pid)
                    fg = max(int(f[5]), 0)       # 0: a group outside the job (the launching command's)
            if not (members or used_stdio & set(t["stdio"]) or (t.get("ctty") and uses_devtty)):
                continue
            fd = _query_fd(t["src"])
            if fd < 0:
                continue
            try:
                state = TerminalState(stdio=t["stdio"], ctty=bool(t.get("ctty")), rdev=rdev, termios=get_termios(fd),
                                      winsize=get_winsize(fd), members=members, fg=fg if fg in pids else 0)
            except OSError:
                continue                          # not a terminal after all
            finally:
                os.close(fd)
            ctx.add(ctx.new_id("T"), state, min(pids))


def _query_fd(src: FdEntry | None) -> int:
    try:
        if src is not None and src.pid == os.getpid():
            return os.dup(src.fd)
        if src is None:
            return os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        return os.open(f"/proc/{src.pid}/fd/{src.fd}", os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return -1

"""Pseudo-terminals the computation created itself (`script`, Open MPI's output forwarding, ...): a master
from /dev/ptmx and its slave /dev/pts/N, with their settings, their session and the bytes in flight.

Dump, while the job is frozen: termios, window size, packet mode, lock and exclusive state, the session whose
controlling terminal the slave is and its foreground group (asked through the master, in the agent's PID
namespace: the job's own numbers), and the bytes in flight both ways. A terminal cannot be read without
consuming, so the queues are read and written straight back (the computation goes on after the checkpoint):
 - input the slave has not read yet has already been through the line discipline (echoed, CR mapped, ...). It
   is read a line at a time (canonical mode keeps line boundaries; a line ended by EOF reads without its
   terminator), then the unfinished line with ICANON briefly off. It is put back with TIOCSTI (synchronous;
   needs CAP_SYS_ADMIN) under temporary settings that echo nothing, map nothing and treat no byte of the data
   as special, so the program reads exactly the same lines again. Without the capability it is written to the
   master under those settings and we wait for the line discipline to take it.
 - output the master has not read yet is written back through the slave with output processing off (the
   master's own line discipline is raw), in order.
Restore: a new pair, with the original index if it is free (ptmx is opened until it hands out that index, as
CRIU does; the lowest free index comes first), the queued bytes put back the same way, settings applied; every
description of the slave is opened at once (before a lock is set again), the master's is duplicated into
place. The session leader's restore helper makes the slave its controlling terminal (TIOCSCTTY after setsid)
and the leader of the foreground group takes the foreground (ttys.plan_session, helpers.py). A slave whose
master had been closed comes back hung up.

Not carried over: the index when another terminal holds it meanwhile (the slave's path /dev/pts/N changes; a
program that opens that path again later finds another terminal or none: a private devpts instance would give
the job its own numbers, but would hide the launching terminal's /dev/pts/N from the job, so ttyname(3) on it
would fail); locked termios (TIOCSLCKTRMIOS); a pending packet-mode status byte; output stopped with ^S runs
again. Unread input beyond what the line discipline holds (4 KiB; the rest waits in the kernel's flip buffers,
not processed yet) is read with echo off and queued again through the master, to be processed when the
program reads it, as it would have been: only bytes the first pass changed (a CR mapped to NL, a character
quoted with ^V) are processed a second time. Queued bytes that do not fit in the terminal's buffers again fail
the checkpoint or restart (UnsupportedFd) rather than being dropped.
"""
from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import logging
import os
import select
import stat
import struct
import termios
import time

from ....image.fdstate import PtyMasterState, PtySlaveState, PtyState
from ...errors import UnsupportedFd
from ...linux import check, libc, pidfd_getfd
from ..base import FdKind
from ..entry import FdEntry

log = logging.getLogger(__name__)

TCGETS, TCSETS = 0x5401, 0x5402
TIOCGWINSZ, TIOCSWINSZ = 0x5413, 0x5414
TIOCSTI, TIOCINQ, TIOCEXCL, TIOCSCTTY, TIOCNOTTY = 0x5412, 0x541B, 0x540C, 0x540E, 0x5422
TIOCGPGRP, TIOCSPGRP, TIOCGSID, TIOCPKT = 0x540F, 0x5410, 0x5429, 0x5420
TIOCGPTN, TIOCSPTLCK, TIOCGDEV, TIOCGPKT = 0x80045430, 0x40045431, 0x80045432, 0x80045438
TIOCGPTLCK, TIOCGEXCL, TIOCGPTPEER = 0x80045439, 0x80045440, 0x5441
PTMX = os.makedev(5, 2)
PTS_MAJORS = range(136, 144)
PTM_MAJORS = range(128, 136)
_KTERMIOS = struct.Struct("4IB19s")       # the kernel's struct termios (TCGETS/TCSETS)
_PTMX_TRIES = 64


def get_int(fd: int, req: int) -> int:
    v = ctypes.c_int(0)
    check(libc.ioctl(fd, ctypes.c_ulong(req), ctypes.byref(v)), f"ioctl {req:#x}")
    return v.value


def set_int(fd: int, req: int, value: int) -> None:
    v = ctypes.c_int(value)
    check(libc.ioctl(fd, ctypes.c_ulong(req), ctypes.byref(v)), f"ioctl {req:#x}")


def get_termios(fd: int) -> dict:
    iflag, oflag, cflag, lflag, line, cc = _KTERMIOS.unpack(fcntl.ioctl(fd, TCGETS, bytes(_KTERMIOS.size)))
    return {"iflag": iflag, "oflag": oflag, "cflag": cflag, "lflag": lflag, "line": line, "cc": list(cc)}


def set_termios(fd: int, t: dict) -> None:
    fcntl.ioctl(fd, TCSETS, _KTERMIOS.pack(t["iflag"], t["oflag"], t["cflag"], t["lflag"], t["line"],
                                           bytes(t["cc"])))


def get_winsize(fd: int) -> list[int]:
    return list(struct.unpack("4H", fcntl.ioctl(fd, TIOCGWINSZ, bytes(8))))


def set_winsize(fd: int, ws: list[int]) -> None:
    fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("4H", *ws))


def rdev_of(e: FdEntry) -> int:
    try:
        return os.stat(f"/proc/{e.pid}/fd/{e.fd}").st_rdev
    except OSError:
        return -1


def is_master(e: FdEntry) -> bool:
    if not stat.S_ISCHR(e.mode):
        return False
    r = rdev_of(e)
    return r == PTMX or os.major(r) in PTM_MAJORS


def is_slave(e: FdEntry) -> bool:
    return stat.S_ISCHR(e.mode) and os.major(rdev_of(e)) in PTS_MAJORS


def pty_index(rdev: int) -> int:
    return (os.major(rdev) - PTS_MAJORS[0]) * 256 + os.minor(rdev)


def copy_fd(e: FdEntry) -> int:
    pidfd = os.pidfd_open(e.pid)
    try:
        return pidfd_getfd(pidfd, e.fd)
    finally:
        os.close(pidfd)


# ----------------------------------------------------------------------------------- queued bytes --
def _set_nonblock(fd: int) -> int:
    old = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, old | os.O_NONBLOCK)
    return old


def _read_all(fd: int) -> bytes:
    """Everything readable now (fd non-blocking); a read that finds nothing flushes the flip buffers first."""
    out = []
    while True:
        try:
            b = os.read(fd, 65536)
        except BlockingIOError:
            break
        except OSError as e:
            if e.errno == errno.EIO:        # the other side is closed and nothing is left
                break
            raise
        if not b:
            break
        out.append(b)
    return b"".join(out)


def _line_ends(t: dict) -> set[int]:
    ends = {10, t["cc"][termios.VEOL]}
    if t["lflag"] & termios.IEXTEN:
        ends.add(t["cc"][termios.VEOL2])
    return ends


_ECHO_L = (termios.ECHO | termios.ECHOE | termios.ECHOK | termios.ECHONL | termios.ECHOCTL | termios.ECHOPRT
           | termios.ECHOKE)
N_TTY_ROOM = 4095                       # bytes the line discipline holds; more input waits in the flip buffers


def _read_input(sfd: int, t: dict) -> tuple[list[list], int]:
    """Unread input at the slave as ([[bytes, eof]], how many of them the line discipline held): in canonical
    mode one entry per line (eof: ended by the EOF character, which a read does not return), the unfinished
    line last; else one entry. Reading makes room in the line discipline, which then takes more of the input
    waiting in the flip buffers (beyond its 4 KiB): that part is not echoed now (echo is off while we read), so
    it can be queued behind the rest and echoed when the program reads it, as it would have been.
    A chunk that is split ([first part, False]) continues in the next one."""
    set_termios(sfd, dict(t, lflag=t["lflag"] & ~_ECHO_L))
    try:
        chunks = _read_queued(sfd, t)
    finally:
        set_termios(sfd, t)
    # More than the line discipline holds: it was full (N_TTY_ROOM bytes, an EOF taking one), the rest waited.
    # The line it was taking in at that point is split there.
    room = N_TTY_ROOM
    for i, (c, e) in enumerate(chunks):
        size = len(c) + (1 if e else 0)
        if size > room:
            if room > 0 and len(c) > room:
                chunks[i:i + 1] = [[c[:room], False], [c[room:], e]]
                return chunks, i + 1
            return chunks, i
        room -= size
    return chunks, len(chunks)


def _read_queued(sfd: int, t: dict) -> list[list]:
    if not t["lflag"] & termios.ICANON:
        data = _read_all(sfd)
        return [[data, False]] if data else []
    chunks, ends, empty = [], _line_ends(t), 0
    while empty <= N_TTY_ROOM:           # (a line discipline holds at most that many EOFs)
        try:
            b = os.read(sfd, 65536)
        except BlockingIOError:
            break
        except OSError as e:
            if e.errno == errno.EIO:
                break
            raise
        empty = empty + 1 if not b else 0
        chunks.append([b, not b or b[-1] not in ends])
    # the line being typed is only readable without ICANON (the switch makes all of it available)
    tmp = dict(t, lflag=t["lflag"] & ~(termios.ICANON | _ECHO_L), cc=list(t["cc"]))
    tmp["cc"][termios.VMIN], tmp["cc"][termios.VTIME] = 1, 0
    set_termios(sfd, tmp)
    rest = _read_all(sfd)
    if rest:
        chunks.append([rest, False])
    return chunks


_QUIET_L = (termios.ECHO | termios.ECHOE | termios.ECHOK | termios.ECHONL | termios.ECHOCTL | termios.ECHOPRT
            | termios.ECHOKE | termios.ISIG | termios.FLUSHO | termios.PENDIN)
_QUIET_I = (termios.ISTRIP | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IUCLC | termios.PARMRK
            | termios.IXOFF | termios.IMAXBEL)
_SPECIAL = (termios.VINTR, termios.VQUIT, termios.VERASE, termios.VKILL, termios.VEOF, termios.VSTART,
            termios.VSTOP, termios.VSUSP, termios.VREPRINT, termios.VDISCARD, termios.VWERASE, termios.VLNEXT)


def _transparent(t: dict, data: bytes) -> tuple[dict, int]:
    """Settings under which input bytes go into the queue unchanged and unechoed, keeping canonical line
    structure: no special character may occur in the data. Returns (settings, EOF character)."""
    q = dict(t, lflag=t["lflag"] & ~_QUIET_L, iflag=t["iflag"] & ~_QUIET_I, cc=list(t["cc"]))
    taken = set(data) | _line_ends(t) | {0}
    free = [c for c in range(1, 256) if c not in taken]
    if len(free) < len(_SPECIAL):
        # binary input using nearly every byte value: no line structure (the lines merge into one)
        q["lflag"] &= ~termios.ICANON
        q["iflag"] &= ~termios.IXON
        return q, -1
    for idx, c in zip(_SPECIAL, free):
        q["cc"][idx] = c
    return q, q["cc"][termios.VEOF]


def _put_input(mfd: int, sfd: int, t: dict, chunks: list[list], direct: int | None = None) -> None:
    """Queue unread input at the slave again, as it was (see the module's description): the first `direct`
    chunks (default all) into the line discipline as they are, the others through the master as input not
    processed yet."""
    direct = len(chunks) if direct is None else direct
    try:
        _put_direct(mfd, sfd, t, chunks[:direct])
    finally:
        rest = chunks[direct:]
        if rest:
            eof = t["cc"][termios.VEOF] if t["lflag"] & termios.ICANON else -1
            _write_all(mfd, b"".join(c + (bytes([eof]) if e and eof > 0 else b"") for c, e in rest),
                       "terminal input")


def _put_direct(mfd: int, sfd: int, t: dict, chunks: list[list]) -> None:
    if not chunks:
        return
    q, eof = _transparent(t, b"".join(c for c, _ in chunks))
    payload = b"".join(c + (bytes([eof]) if e and eof >= 0 else b"") for c, e in chunks)
    set_termios(mfd, q)
    try:
        done = 0
        try:
            for i in range(len(payload)):
                fcntl.ioctl(sfd, TIOCSTI, payload[i:i + 1])
                done += 1
        except OSError as e:
            if done:
                raise
            log.debug("TIOCSTI unavailable (%s); queueing terminal input through the master", e.strerror)
            _write_all(mfd, payload, "terminal input")
            if q["lflag"] & termios.ICANON:     # TIOCINQ counts complete lines only
                want = sum(len(c) for c, e in chunks if e or c[-1:] and c[-1] in _line_ends(t))
            else:
                want = len(payload)
            deadline = time.monotonic() + 1.0
            while get_int(sfd, TIOCINQ) < want and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(0.01)             # the unfinished line is not counted by TIOCINQ
    finally:
        set_termios(mfd, t)


def _put_output(mfd: int, sfd: int, t: dict, data: bytes) -> None:
    """Queue bytes for the master to read again: written by the slave without output processing."""
    if not data:
        return
    if sfd < 0:
        for i in range(len(data)):
            fcntl.ioctl(mfd, TIOCSTI, data[i:i + 1])
        return
    set_termios(mfd, dict(t, oflag=t["oflag"] & ~termios.OPOST))
    try:
        _write_all(sfd, data, "terminal output")
    finally:
        set_termios(mfd, t)


_WRITE_CHUNK = 1792                     # a tty flip buffer's page: queues the most before the buffers are full


def _write_all(fd: int, data: bytes, what: str) -> None:
    """Queue bytes in a terminal nobody reads meanwhile; they fitted before, so a full queue is an error."""
    view = memoryview(data)
    deadline = time.monotonic() + 0.5
    while view:
        try:
            view = view[os.write(fd, view[:_WRITE_CHUNK]):]
            deadline = time.monotonic() + 0.5
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise UnsupportedFd(f"pseudo-terminal: {len(view)} of {len(data)} bytes of {what} do not fit in "
                                    f"its buffers again (too much unread data, or output stopped)") from None
            select.select([], [fd], [], 0.05)


def _drain_and_put_back(mfd: int, sfd: int, t: dict) -> tuple[list[list], int, bytes]:
    """The bytes in flight both ways, left in place (read, then queued again at once)."""
    mflags = _set_nonblock(mfd)
    sflags = _set_nonblock(sfd) if sfd >= 0 else None
    packet = get_int(mfd, TIOCGPKT)
    if packet:
        set_int(mfd, TIOCPKT, 0)           # plain reads, and no status bytes from our settings changes
    inp: list[list] = []
    direct, out = 0, b""
    try:
        if sfd >= 0:
            inp, direct = _read_input(sfd, t)
        out = _read_all(mfd)
    finally:
        try:
            try:
                _put_input(mfd, sfd, t, inp, direct)
            finally:
                _put_output(mfd, sfd, t, out)
        finally:
            fcntl.fcntl(mfd, fcntl.F_SETFL, mflags)
            if sflags is not None:
                fcntl.fcntl(sfd, fcntl.F_SETFL, sflags)
            if packet:
                set_int(mfd, TIOCPKT, 1)
    return inp, direct, out


# ------------------------------------------------------------------------------------------- dump --
def pair_dump(ctx, index: int, where: str) -> str:
    """The pty object of the pair with this index (dumped on first use); its id."""
    key = f"pty-index:{index}"
    if key in ctx.index:
        return ctx.index[key]
    masters = [x for x in ctx.entries.values() if is_master(x) and int(x.info.get("tty-index", -1)) == index]
    slaves = [x for x in ctx.entries.values() if is_slave(x) and pty_index(rdev_of(x)) == index]
    if len({x.dev for x in slaves}) > 1:
        raise UnsupportedFd(f"{where}: pseudo-terminals with index {index} from several devpts instances")
    pid = ctx.new_id("t")
    state = PtyState(index=index, hung=False, input=[], output="")
    holders = [x.pid for x in masters + slaves]
    if not masters:
        s = copy_fd(slaves[0]) if slaves else -1
        try:
            get_termios(s)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            state.hung = True               # its master was closed: reads see end of file, writes fail
        finally:
            if s >= 0:
                os.close(s)
        if not state.hung:
            raise UnsupportedFd(f"{where}: terminal /dev/pts/{index} is not the computation's: its master is held "
                                f"by a process outside it")
    else:
        m = copy_fd(masters[0])
        s = copy_fd(slaves[0]) if slaves else -1
        try:
            t = get_termios(m)              # through the master: the slave's settings
            state.termios, state.winsize, state.packet = t, get_winsize(m), bool(get_int(m, TIOCGPKT))
            state.locked, state.path = bool(get_int(m, TIOCGPTLCK)), masters[0].target
            state.exclusive = bool(get_int(s, TIOCGEXCL)) if s >= 0 else False
            state.sid = _int_or_zero(m, TIOCGSID)    # in our PID namespace: the job's own numbers
            state.fg = _int_or_zero(m, TIOCGPGRP)
            inp, direct, out = _drain_and_put_back(m, s, t)
            state.input = [[base64.b64encode(c).decode(), e] for c, e in inp]
            state.input_held = direct
            state.output = base64.b64encode(out).decode()
            state.bytes = [sum(len(c) for c, _ in inp), len(out)]
        finally:
            os.close(m)
            if s >= 0:
                os.close(s)
    ctx.add(pid, state, min(holders))
    ctx.index[key] = pid
    return pid


def _int_or_zero(fd: int, req: int) -> int:
    try:
        return get_int(fd, req)
    except OSError:
        return 0                            # no session has it as controlling terminal


# ----------------------------------------------------------------------------------------- restore --
def _open_ptmx(index: int, path: str) -> int:
    """A new master, with the wanted index if it is free (ptmx hands out the lowest free index)."""
    if not (path.endswith("ptmx") and os.access(path, os.R_OK | os.W_OK)):
        path = "/dev/ptmx"
    held = []
    try:
        for _ in range(_PTMX_TRIES):
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            got = get_int(fd, TIOCGPTN)
            if got == index:
                return fd
            held.append(fd)
            if got > index:
                break
        log.info("pseudo-terminal %d is taken; the restored one is /dev/pts/%d", index, get_int(held[0], TIOCGPTN))
        return held.pop(0)
    finally:
        for fd in held:
            os.close(fd)


def pair(factory, pty_id: str) -> tuple[int, int]:
    """The agent's (master, slave) of a pty object, created on first use with every description of its slave."""
    pairs = factory.extra.setdefault("ptys", {})
    if pty_id in pairs:
        return pairs[pty_id]
    st = factory.state(pty_id)
    master = factory.high(_open_ptmx(st.index, st.path or "/dev/ptmx"))
    set_int(master, TIOCSPTLCK, 0)
    slave = factory.high(fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC))
    pairs[pty_id] = (master, slave)
    t = st.termios
    if t:
        set_termios(master, t)
        set_winsize(master, st.winsize)
        _put_input(master, slave, t, [[base64.b64decode(c), e] for c, e in st.input], st.input_held)
        _put_output(master, slave, t, base64.b64decode(st.output))
    for o in factory.states_of("pts"):
        if o.pty == pty_id:
            factory.fds[o.id] = factory.high(fcntl.ioctl(master, TIOCGPTPEER, open_flags(o.flags)))
    if st.exclusive:
        fcntl.ioctl(slave, TIOCEXCL)
    if st.packet:
        set_int(master, TIOCPKT, 1)
    if st.locked:
        set_int(master, TIOCSPTLCK, 1)
    if st.hung:
        # no process had the master any more: closing ours hangs the slave up, as it was
        os.close(master)
        pairs[pty_id] = (-1, slave)
    return pairs[pty_id]


def open_flags(flags: int) -> int:
    return (flags & (os.O_ACCMODE | os.O_NONBLOCK)) | os.O_NOCTTY | os.O_CLOEXEC


# ---------------------------------------------------------------------------------------- handlers --
class PtyPair(FdKind):
    """A pseudo-terminal pair: settings, session, queued bytes. Only referred to by PtyMaster/PtySlave/DevTty."""
    KIND = "pty"
    DERIVED = True

    @staticmethod
    def create(factory, state: PtyState) -> int:
        raise UnsupportedFd("internal: a pty pair has no descriptor of its own")

    @staticmethod
    def cleanup(factory) -> None:
        for pair in factory.extra.get("ptys", {}).values():
            for fd in pair:
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass


class PtyMaster(FdKind):
    KIND = "ptmx"

    @staticmethod
    def matches(e: FdEntry) -> bool:
        return is_master(e)

    @staticmethod
    def dump(ctx, oid: str, ofd: list[FdEntry]) -> None:
        e = ofd[0]
        pty = pair_dump(ctx, int(e.info.get("tty-index", -1)), e.where())
        ctx.add(oid, PtyMasterState(pty=pty, flags=e.flags), min(x.pid for x in ofd))

    @staticmethod
    def create(factory, state: PtyMasterState) -> int:
        master = pair(factory, state.pty)[0]
        fd = fcntl.fcntl(master, fcntl.F_DUPFD_CLOEXEC, factory.base)   # a master has one description
        fcntl.fcntl(fd, fcntl.F_SETFL, state.flags & os.O_NONBLOCK)
        return fd


class PtySlave(FdKind):
    KIND = "pts"

    @staticmethod
    def matches(e: FdEntry) -> bool:
        return is_slave(e)

    @staticmethod
    def dump(ctx, oid: str, ofd: list[FdEntry]) -> None:
        e = ofd[0]
        pty = pair_dump(ctx, pty_index(rdev_of(e)), e.where())
        ctx.add(oid, PtySlaveState(pty=pty, flags=e.flags, path=e.target), min(x.pid for x in ofd))

    @staticmethod
    def create(factory, state: PtySlaveState) -> int:
        pair(factory, state.pty)                    # opens every description of the slave
        return factory.fds[state.id]



"""Running system calls inside a ptrace-stopped thread ("syscall injection").

The thread's rip is pointed at a `syscall` instruction that already exists in its address space (a `0f 05`
inside its own [vdso] while dumping, our trampoline page while restoring), orig_rax is set to -1 so the kernel
does not apply its syscall-restart fix-ups to our registers, and PTRACE_SYSCALL steps over the entry and exit
stops. Signals that arrive meanwhile are taken off the thread and queued again at the end (see finish()).
"""
from __future__ import annotations

import ctypes
import logging
import os

from . import ptrace
from .errors import InjectionError, ProcessGone
from .linux import ERESTART_RESTARTBLOCK, ERESTARTNOHAND, RESTART_CODES, SYS
from .ptrace import Regs, signed

log = logging.getLogger(__name__)


# (pid, tid) -> the system call a thread was in when we last resumed it through restart_syscall: a thread
# frozen again inside that restart_syscall still has the original arguments in its registers, but only
# restart_syscall's number in orig_rax.
RESTART_ORIGINS: dict[tuple[int, int], int] = {}

# Where a thread sleeps inside restart_syscall tells which call it restarts (fallback when we did not resume it).
_WCHAN_ORIGINS = (("poll_schedule_timeout", 7), ("do_poll", 7), ("futex", SYS.futex),
                  ("nanosleep", SYS.clock_nanosleep), ("hrtimer", SYS.clock_nanosleep))


def original_syscall(pid: int, tid: int, regs: Regs) -> int:
    """The system call a frozen thread is blocked in (-1 if none), seeing through restart_syscall."""
    if signed(regs.rax) not in RESTART_CODES or signed(regs.orig_rax) < 0:
        RESTART_ORIGINS.pop((pid, tid), None)
        return -1
    nr = signed(regs.orig_rax)
    if nr != SYS.restart_syscall:
        return nr
    if (pid, tid) in RESTART_ORIGINS:
        return RESTART_ORIGINS[(pid, tid)]
    try:
        with open(f"/proc/{pid}/task/{tid}/wchan") as f:
            wchan = f.read()
    except OSError:
        wchan = ""
    for key, origin in _WCHAN_ORIGINS:
        if key in wchan:
            if origin == SYS.clock_nanosleep and not (regs.rdi < 16 and regs.rsi in (0, 1)):
                return 35          # nanosleep(req, rem), not clock_nanosleep(clock, flags, req, rem)
            return origin
    log.warning("tid %d is inside restart_syscall of an unknown call (wchan %r); after a restart it will see "
                "EINTR", tid, wchan)
    return nr


def normalize_restart(regs: Regs, new_process: bool, syscall_nr: int = -1) -> Regs:
    """Registers for resuming a thread that may be frozen inside an interrupted system call.

    The kernel only re-issues an interrupted call on its own signal-return path, which our register changes
    bypass; so do it explicitly: point rip back at the `syscall` instruction with rax = the call. For
    ERESTART_RESTARTBLOCK the live process resumes through restart_syscall (its restart block is intact); a new
    process has no restart block, so it re-issues the original call (syscall_nr, see original_syscall) from
    its saved arguments.
    """
    r = regs.copy()
    rax = signed(r.rax)
    if signed(r.orig_rax) >= 0 and rax in RESTART_CODES:
        if rax == -ERESTART_RESTARTBLOCK and not new_process:
            r.rax = SYS.restart_syscall
        else:
            r.rax = syscall_nr if syscall_nr >= 0 else r.orig_rax
        r.rip -= 2
    r.orig_rax = 0xFFFFFFFFFFFFFFFF
    return r


# Calls whose -EINTR is final even though the thread was only stopped: close(2) has already dropped the
# descriptor when it reports EINTR, so issuing it again would close whatever took the number (or fail EBADF).
_NEVER_REISSUE = frozenset({SYS.close})
EINTR = 4
# Signals whose default action is to do nothing: queued only because the thread is traced (the kernel drops
# them for an untraced one), so they cannot be what interrupted the call.
_DEFAULT_IGNORED = frozenset({17, 18, 23, 28})          # SIGCHLD, SIGCONT, SIGURG, SIGWINCH


def _status_masks(pid: int, tid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"):
                out[key] = int(val, 16)
    return out


def real_signal_pending(pid: int, tid: int) -> bool:
    """Whether a signal that would interrupt the thread's system call on its own is pending for it: not
    blocked (the current mask: a temporary ppoll/epoll_pwait mask counts), not ignored, not a default-ignored
    signal left with SIG_DFL. Unknown (status unreadable) counts as pending: then the program keeps its EINTR."""
    try:
        m = _status_masks(pid, tid)
    except OSError:
        return True
    live = (m.get("SigPnd", 0) | m.get("ShdPnd", 0)) & ~m.get("SigBlk", 0) & ~m.get("SigIgn", 0)
    for sig in _DEFAULT_IGNORED:
        bit = 1 << (sig - 1)
        if live & bit and not m.get("SigCgt", 0) & bit:
            live &= ~bit
    return live != 0


def claim_interrupted_call(pid: int, tid: int, regs: Regs) -> bool:
    """A thread frozen on its way out of a system call that failed with EINTR only because we stopped it
    (epoll_wait, semop, sigtimedwait, SO_RCVTIMEO sockets, io_getevents...: signal(7), "Interruption ... by
    stop signals") gets the call back: its rax becomes -ERESTARTNOHAND, so every later step (resume, injection,
    the image's in_syscall, restart) re-issues it exactly like a call the kernel had asked to restart. Without a
    real signal pending for the thread the EINTR cannot be anyone else's. Must run on the registers as frozen,
    before any injection changes the thread's mask. Returns whether the call was claimed."""
    nr = signed(regs.orig_rax)
    if signed(regs.rax) != -EINTR or nr < 0 or nr in _NEVER_REISSUE:
        return False
    if real_signal_pending(pid, tid):
        log.info("tid %d: %d returned EINTR with a signal pending; left to the program", tid, nr)
        return False
    regs.rax = (-ERESTARTNOHAND) & 0xFFFFFFFFFFFFFFFF
    # into the thread too: resumed without any injection (a checkpoint abandoned early), the kernel's own
    # signal-return path then restarts the call, as it does for every -ERESTARTNOHAND without a handler
    ptrace.setregs(tid, regs)
    log.debug("tid %d: system call %d interrupted by the freeze; it will be re-issued", tid, nr)
    return True


class Injector:
    """Injects system calls into one stopped thread; remembers how to put the thread back."""

    def __init__(self, tid: int, tgid: int, syscall_addr: int, regs: Regs | None = None):
        self.tid = tid
        self.tgid = tgid
        self.syscall_addr = syscall_addr
        self.saved = regs.copy() if regs is not None else ptrace.getregs(tid)
        self.deferred: list[bytes] = []   # siginfo of signals that arrived while we injected
        self.touched = False
        # Block every signal while we inject, so none is delivered onto our borrowed registers; finish() puts
        # the thread's own mask back. PTRACE_GETSIGMASK returns the real mask even inside sigsuspend/ppoll
        # (the saved one), and PTRACE_SETSIGMASK of it is exact, so those calls restart correctly.
        self.orig_mask = ptrace.getsigmask(tid)
        ptrace.setsigmask(tid, 0xFFFFFFFFFFFFFFFF)
        self.clone_events: list[int] = []  # tids created by injected clone calls (PTRACE_EVENT_CLONE)

    def _wait_syscall_stop(self) -> ptrace.WaitStatus:
        while True:
            st = ptrace.wait(self.tid)
            if st.gone:
                raise ProcessGone(f"thread {self.tid} {st.describe()} during syscall injection")
            if st.is_syscall_stop:
                return st
            if st.event in (ptrace.EVENT_CLONE, ptrace.EVENT_FORK, ptrace.EVENT_VFORK):
                self.clone_events.append(ptrace.geteventmsg(self.tid))
                ptrace.trace_syscall(self.tid)
                continue
            if st.event == ptrace.EVENT_STOP:   # a group-stop or a stray interrupt trap: not ours to keep
                ptrace.trace_syscall(self.tid)
                continue
            # A signal-delivery stop: keep the signal for later instead of letting it run a handler now.
            sig = st.stopsig
            try:
                self.deferred.append(ptrace.getsiginfo(self.tid))
            except OSError:
                self.deferred.append(_siginfo_for(sig))
            ptrace.trace_syscall(self.tid, 0)

    def call(self, nr: int, *args: int, at: int | None = None) -> int:
        """Run system call nr with up to six arguments; returns the raw (signed) result."""
        r = self.saved.copy()
        r.rip = at if at is not None else self.syscall_addr
        r.rax = nr
        r.orig_rax = 0xFFFFFFFFFFFFFFFF
        names = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
        for name, val in zip(names, args):
            setattr(r, name, val & 0xFFFFFFFFFFFFFFFF)
        self.touched = True
        ptrace.setregs(self.tid, r)
        ptrace.trace_syscall(self.tid)
        self._wait_syscall_stop()       # entry
        ptrace.trace_syscall(self.tid)
        self._wait_syscall_stop()       # exit
        out = ptrace.getregs(self.tid)
        return signed(out.rax)

    def check(self, what: str, nr: int, *args: int) -> int:
        r = self.call(nr, *args)
        if -4096 < r < 0:
            raise InjectionError(f"{what} in pid {self.tgid} (tid {self.tid}) failed: {os.strerror(-r)}")
        return r

    def finish(self, new_process: bool = False, regs: Regs | None = None) -> None:
        """Put the thread's registers back (normalized for resuming) and re-queue deferred signals."""
        if not self.touched and regs is None and not self.deferred:
            ptrace.setsigmask(self.tid, self.orig_mask)
            return
        base = regs if regs is not None else self.saved
        if not new_process and signed(base.rax) == -ERESTART_RESTARTBLOCK and signed(base.orig_rax) >= 0:
            # it goes on through restart_syscall: remember what it really is in
            RESTART_ORIGINS[(self.tgid, self.tid)] = original_syscall(self.tgid, self.tid, base)
        ptrace.setregs(self.tid, normalize_restart(base, new_process))
        ptrace.setsigmask(self.tid, self.orig_mask)

    def requeue_signals(self, scratch_addr: int, write_mem) -> None:
        """Queue again, in the thread itself, the signals taken off it while we injected (same siginfo)."""
        pending, self.deferred = self.deferred, []
        for info in pending:
            sig = int.from_bytes(info[0:4], "little", signed=True)
            write_mem(scratch_addr, info)
            r = self.call(SYS.rt_tgsigqueueinfo, self.tgid, self.tid, sig, scratch_addr)
            if r < 0:
                log.warning("could not re-queue signal %d for tid %d (errno %d)", sig, self.tid, -r)


def _siginfo_for(sig: int) -> bytes:
    b = bytearray(ptrace.SIGINFO_SIZE)
    b[0:4] = sig.to_bytes(4, "little")
    b[8:12] = (0).to_bytes(4, "little")  # SI_USER
    return bytes(b)


def find_syscall_insn(pid: int, start: int, end: int) -> int:
    """Address of bytes 0f 05 in [start, end) of pid (decoding from there executes `syscall`)."""
    from .linux import process_vm_readv
    buf = ctypes.create_string_buffer(end - start)
    process_vm_readv(pid, ctypes.addressof(buf), [(start, end - start)], end - start)
    off = buf.raw.find(b"\x0f\x05")
    if off < 0:
        raise InjectionError(f"no syscall instruction found in pid {pid}'s vdso")
    return start + off

"""Freezing a running process with PTRACE_SEIZE + PTRACE_INTERRUPT, and letting it go again.

Threads can be born while we freeze: the task list is re-read until a pass finds no new thread, and only
threads we have seen stop can create more, so the last pass is complete. Threads that exit meanwhile are
dropped. Nothing here changes the process; resume() puts back exactly what injection touched.

A thread that cannot stop - a parent in vfork() waits, uninterruptibly, for its child to exec or exit - is
never seized if we can see that beforehand (VforkBusy: the caller waits for the vfork to end, bounded). If it
was seized already, it cannot be detached until it stops (PTRACE_DETACH needs a stopped tracee): it becomes a
straggler, with our interrupt still pending; it stops by itself once it can, and release_straggler() (from the
agent's reaping) or the next freeze lets it go. Its stop must never be taken for its death.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field

from ..faults import fault
from . import ptrace
from .errors import FreezeError, ProcessGone, VforkBusy
from .inject import Injector, claim_interrupted_call, find_syscall_insn
from .linux import SYS, syscall
from .maps import read_maps
from .ptrace import Regs

log = logging.getLogger(__name__)


KCMP_VM = 1

# Threads we seized that never reached their stop: they are let go as soon as they stop (see module doc).
_stragglers: set[int] = set()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _state(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return "X"


def vfork_child(pid: int, tid: int) -> int:
    """The child thread tid (of process pid) waits for in vfork(), or 0. A vfork child shares its parent's
    memory until it execs or exits (kcmp KCMP_VM), and the parent sleeps uninterruptibly meanwhile."""
    if _state(pid, tid) != "D":
        return 0
    try:
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            children = [int(x) for x in f.read().split()]
    except OSError:
        return 0
    for c in children:
        if syscall(SYS.kcmp, pid, c, KCMP_VM, 0, 0) == 0:
            return c
    return 0


def in_vfork(pid: int) -> VforkBusy | None:
    """Why pid cannot be frozen right now (one of its threads is in vfork()), or None."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return None
    for tid in tids:
        child = vfork_child(pid, tid)
        if child:
            return VforkBusy(pid, tid, child, _comm(pid))
    return None


def release_straggler(tid: int) -> bool:
    """A stop of a thread we seized but never saw stop: detach it (it runs on untouched). True if it was one."""
    if tid not in _stragglers:
        return False
    _stragglers.discard(tid)
    try:
        ptrace.detach(tid)
    except OSError as e:
        if e.errno != errno.ESRCH:
            log.warning("letting go of tid %d: %s", tid, e)
    log.info("tid %d stopped at last and was let go untouched", tid)
    return True


def settle_stragglers() -> None:
    """Let go of every straggler that has stopped (or is gone) by now."""
    for tid in sorted(_stragglers):
        try:
            st = ptrace.wait(tid, nohang=True)
        except ChildProcessError:
            _stragglers.discard(tid)
            continue
        if st is None:
            continue
        if st.gone:
            _stragglers.discard(tid)
        else:
            release_straggler(tid)


def _let_go(tids) -> None:
    """Seized threads we will not freeze after all: detach those that stopped, the others become stragglers."""
    for tid in tids:
        _stragglers.add(tid)
    settle_stragglers()


@dataclass
class FrozenThread:
    tid: int
    regs: Regs                       # registers exactly as stopped (may carry a syscall restart code)
    injector: Injector | None = None


@dataclass
class FrozenProcess:
    pid: int
    threads: dict[int, FrozenThread] = field(default_factory=dict)
    syscall_addr: int = 0
    frozen_at: float = 0.0

    def injector(self, tid: int | None = None) -> Injector:
        """An injector for one thread (the leader unless told otherwise), created on first use."""
        if tid is None:
            tid = self.pid if self.pid in self.threads else next(iter(self.threads))
        th = self.threads[tid]
        if th.injector is None:
            if not self.syscall_addr:
                vdso = [m for m in read_maps(self.pid, with_flags=False) if m.path == "[vdso]"]
                if not vdso:
                    raise FreezeError(f"pid {self.pid} has no [vdso]; cannot inject system calls")
                self.syscall_addr = find_syscall_insn(self.pid, vdso[0].start, vdso[0].end)
            th.injector = Injector(tid, self.pid, self.syscall_addr, th.regs)
        return th.injector

    def restore_registers(self) -> None:
        """Put back the registers of every thread we injected into (normalized so interrupted system calls
        are re-issued); further injection needs new injectors."""
        for th in self.threads.values():
            if th.injector is not None:
                th.injector.finish(new_process=False)
                th.injector = None

    def resume(self) -> None:
        """Put back registers we changed and detach every thread; the process runs on as if untouched."""
        errors = []
        for th in self.threads.values():
            try:
                if th.injector is not None:
                    th.injector.finish(new_process=False)
                    th.injector = None
                ptrace.detach(th.tid)
            except OSError as e:
                if e.errno != errno.ESRCH:
                    errors.append(f"tid {th.tid}: {e}")
        if errors:
            log.warning("resuming pid %d: %s", self.pid, "; ".join(errors))

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass


def _tids(pid: int) -> set[int]:
    """Live threads of pid (a zombie leader whose other threads still run cannot be stopped and is skipped)."""
    out: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for t in names:
        try:
            with open(f"/proc/{pid}/task/{t}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            out.add(int(t))
    return out


def _wait_stopped(pid: int, tid: int, deadline: float) -> Regs | None:
    """Wait for the interrupt stop of a seized thread; None if it exited. Signals met on the way are delivered
    (they were sent before the freeze). A thread that began a vfork() just before we seized it cannot stop
    until the vfork ends: VforkBusy at once (the caller waits and tries again); any other thread that does not
    stop (e.g. in uninterruptible I/O) makes the freeze fail after the deadline rather than hang."""
    checked_vfork = time.monotonic() + 0.02
    while True:
        st = ptrace.wait(tid, nohang=True)
        if st is None:
            now = time.monotonic()
            if now > checked_vfork:
                checked_vfork = now + 0.05
                child = vfork_child(pid, tid)
                if child:
                    raise VforkBusy(pid, tid, child, _comm(pid))
            if now > deadline:
                raise FreezeError(f"pid {pid} ({_comm(pid)}) tid {tid} did not stop within the freeze timeout "
                                  f"(state {_state(pid, tid)}: uninterruptible I/O?); try again")
            time.sleep(0.0005)
            continue
        if st.gone:
            return None
        if st.event == ptrace.EVENT_STOP:
            return ptrace.getregs(tid)
        if st.event:
            # fork/clone/exec events are not enabled; anything else: keep going until the interrupt trap
            ptrace.cont(tid)
            continue
        ptrace.cont(tid, st.stopsig)   # signal-delivery stop: let the signal through, the trap follows


def freeze(pid: int, timeout: float = 10.0) -> FrozenProcess:
    """Stop every thread of pid under ptrace. Raises ProcessGone if the process is not (or no longer) alive,
    VforkBusy if one of its threads is in vfork() (nothing of it is left stopped or traced then)."""
    fp = FrozenProcess(pid)
    gone: set[int] = set()
    waiting: set[int] = set()          # seized, stop not seen yet
    t0 = time.monotonic()
    try:
        while True:
            new = _tids(pid) - set(fp.threads) - gone
            if not new:
                break
            if time.monotonic() - t0 > timeout:
                raise FreezeError(f"pid {pid}: threads kept appearing for {timeout:.0f} s while freezing")
            for tid in sorted(new):
                if tid in _stragglers:          # seized by an earlier freeze, our interrupt still pending
                    _stragglers.discard(tid)
                    waiting.add(tid)
                    continue
                child = vfork_child(pid, tid)
                if child:
                    raise VforkBusy(pid, tid, child, _comm(pid))
                try:
                    ptrace.seize(tid, ptrace.O_TRACESYSGOOD)
                    waiting.add(tid)
                    ptrace.interrupt(tid)
                except OSError as e:
                    if e.errno == errno.ESRCH:
                        waiting.discard(tid)
                        continue       # exited between listing and seizing
                    if e.errno == errno.EPERM:
                        raise FreezeError(f"pid {pid} tid {tid}: not allowed to trace it ({e}); is it traced "
                                          f"by someone else, or owned by another user?") from None
                    raise
            for tid in sorted(waiting):
                regs = _wait_stopped(pid, tid, t0 + timeout)
                waiting.discard(tid)
                if regs is not None:
                    fp.threads[tid] = FrozenThread(tid, regs)
                else:
                    gone.add(tid)
            if not fp.threads and not _tids(pid):
                raise ProcessGone(f"pid {pid} exited while being frozen")
        if not fp.threads:
            raise ProcessGone(f"pid {pid} has no live threads")
        _claim_interrupted_calls(fp)
    except BaseException:
        fp.resume()
        _let_go(waiting)
        raise
    fp.frozen_at = time.monotonic()
    return fp


def _claim_interrupted_calls(fp: FrozenProcess) -> None:
    """Calls that failed with EINTR only because of our interrupt are re-issued (inject.claim_interrupted_call);
    done while every thread is stopped and before any injection, on the registers as frozen."""
    for th in fp.threads.values():
        claim_interrupted_call(fp.pid, th.tid, th.regs)
    fault("freeze.after_claim")      # tests: a checkpoint abandoned before any injection

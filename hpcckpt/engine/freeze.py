"""Freezing a running process with PTRACE_SEIZE + PTRACE_INTERRUPT, and letting it go again.

Threads can be born while we freeze: the task list is re-read until a pass finds no new thread, and only
threads we have seen stop can create more, so the last pass is complete. Threads that exit meanwhile are
dropped. Nothing here changes the process; resume() puts back exactly what injection touched.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field

from . import ptrace
from ..faults import fault
from .inject import Injector, ProcessGone, claim_interrupted_call, find_syscall_insn
from .maps import read_maps
from .ptrace import Regs

log = logging.getLogger(__name__)


class FreezeError(RuntimeError):
    pass


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
    out = set()
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


def _wait_stopped(tid: int, deadline: float) -> Regs | None:
    """Wait for the interrupt stop of a seized thread; None if it exited. Signals met on the way are delivered
    (they were sent before the freeze). A thread that cannot stop (e.g. a parent waiting in vfork() for its
    child to exec) makes the freeze fail after the deadline rather than hang."""
    while True:
        st = ptrace.wait(tid, nohang=True)
        if st is None:
            if time.monotonic() > deadline:
                raise FreezeError(f"tid {tid} did not stop within the freeze timeout (blocked in vfork() or in "
                                  f"uninterruptible I/O?); try again")
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
    """Stop every thread of pid under ptrace. Raises ProcessGone if the process is not (or no longer) alive."""
    fp = FrozenProcess(pid)
    gone: set[int] = set()
    t0 = time.monotonic()
    try:
        while True:
            new = _tids(pid) - set(fp.threads) - gone
            if not new:
                break
            if time.monotonic() - t0 > timeout:
                raise FreezeError(f"pid {pid}: threads kept appearing for {timeout:.0f} s while freezing")
            seized = []
            for tid in sorted(new):
                try:
                    ptrace.seize(tid, ptrace.O_TRACESYSGOOD)
                    ptrace.interrupt(tid)
                    seized.append(tid)
                except OSError as e:
                    if e.errno == errno.ESRCH:
                        continue       # exited between listing and seizing
                    if e.errno == errno.EPERM:
                        raise FreezeError(f"pid {pid} tid {tid}: not allowed to trace it ({e}); is it traced "
                                          f"by someone else, or owned by another user?") from None
                    raise
            for tid in seized:
                regs = _wait_stopped(tid, t0 + timeout)
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
        raise
    fp.frozen_at = time.monotonic()
    return fp


def _claim_interrupted_calls(fp: FrozenProcess) -> None:
    """Calls that failed with EINTR only because of our interrupt are re-issued (inject.claim_interrupted_call);
    done while every thread is stopped and before any injection, on the registers as frozen."""
    for th in fp.threads.values():
        claim_interrupted_call(fp.pid, th.tid, th.regs)
    fault("freeze.after_claim")      # tests: a checkpoint abandoned before any injection

"""Turning a waiting restore helper into the image's process, by system calls injected through ptrace.

The helper (engine/helpers.py) has the image's descriptors in place, its cwd and umask, and a reserved area
where the image has a gap: a one-page `syscall; int3` trampoline plus scratch pages. From the seize on,
everything happens by injection through the trampoline:

  unregister the helper's rseq -> park [vvar]/[vvar_vclock]/[vdso] in the reserved area -> unmap everything
  else -> prctl(PR_SET_MM_MAP) with the image's mm fields, auxv and exe -> shmat SysV segments, recreate every
  other mapping and write its pages -> move the vdso pages to the image's addresses -> protections -> close the
  helper's own fds, take POSIX record locks -> signal dispositions, personality, rlimits -> the other threads
  (clone3 with set_tid for their own TIDs) -> per-thread state, timers, pending signals -> check the address
  space against the image -> unmap the reserved area -> registers, xstate and mask of every thread. The
  process is left stopped; restore.py releases the whole computation at once.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import struct
import time

from ..image.format import ImageReader
from ..image.records import ImageMeta, ProcessRecord, RegionRecord, unb64
from . import memory, ptrace, remote, signals, threads, timers
from .errors import RestoreError, SysvError
from .fds import locks
from .inject import Injector
from .linux import MREMAP_FIXED, MREMAP_MAYMOVE, PAGE, PR_SET_MM, PR_SET_MM_MAP, RSEQ_FLAG_UNREGISTER, SYS, TASK_SIZE
from .maps import SPECIAL, read_maps
from .procattrs import RLIMITS, pack_mm_map, read_rlimits
from .shm import sysvshm

log = logging.getLogger(__name__)

RESERVE_PAGES = 128               # trampoline (1) + scratch (31) + parking slots for the vdso pages
SCRATCH_OFF = PAGE
SCRATCH_SIZE = 31 * PAGE
PARK_OFF = 32 * PAGE
CLONE_THREAD_FLAGS = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000   # VM|FS|FILES|SIGHAND|THREAD|SYSVSEM
TRAMPOLINE_CODE = b"\x0f\x05\xcc"  # syscall; int3


class Scratch(remote.Scratch):
    """The scratch pages inside the reserved area (mapped by the helper itself, not by an injected mmap)."""

    def __init__(self, pid: int, addr: int):      # (no remote.Scratch.__init__: nothing to map)
        self.pid = pid
        self.addr = addr

    def write(self, off: int, data: bytes) -> None:
        if off + len(data) > SCRATCH_SIZE:
            raise RestoreError("internal: scratch area too small")
        remote.write(self.pid, self.addr + off, data)


def _merge_rows(rows):
    out = []
    for s, e, perms, path in rows:
        if out and out[-1][1] == s and out[-1][2] == perms and out[-1][3] == path:
            out[-1] = (out[-1][0], e, perms, path)
        else:
            out.append((s, e, perms, path))
    return out


def _expected_path(r: RegionRecord) -> str | None:
    if r.backing in ("file", "special") or r.path in ("[heap]", "[stack]"):
        return r.path
    return None   # anonymous: the kernel's label ("" or "/dev/zero (deleted)") is not compared


def _observed_path(m) -> str | None:
    if m.special or m.path in ("[heap]", "[stack]"):
        return m.path
    if m.inode == 0 or m.path.startswith(("/dev/zero", "/SYSV", "/memfd:")):
        return None
    return m.path


def check_layout(pid: int, regions: list[RegionRecord]) -> None:
    """The restored address space must be the image's: same ranges, permissions and file backing (adjacent
    mappings the kernel merged are compared merged)."""
    want = _merge_rows([(r.start, r.end, r.perms, _expected_path(r)) for r in regions])
    have = _merge_rows([(m.start, m.end, m.perms, _observed_path(m))
                        for m in read_maps(pid, with_flags=False) if m.path != "[vsyscall]"])
    if want != have:
        diff = sorted(set(have) ^ set(want))[:6]
        text = "; ".join(f"{'restored' if d in have else 'image'} {d[0]:#x}-{d[1]:#x} {d[2]} {d[3] or ''}"
                         for d in diff)
        raise RestoreError(f"restored address space differs from the image: {text}")


@functools.cache
def _own_specials() -> tuple[tuple[str, int], ...]:
    """Our vdso/vvar layout: fixed for the life of this process (read once, not once per image: our own maps
    are long, ~1 ms of parsing each)."""
    return tuple(sorted((m.path, m.size) for m in read_maps("self", with_flags=False)
                        if m.special and m.path != "[vsyscall]"))


def check_specials(regions: list[RegionRecord]) -> None:
    mine = dict(_own_specials())
    theirs = {r.path: r.end - r.start for r in regions if r.backing == "special"}
    if mine != theirs:
        raise RestoreError(f"this kernel's vdso layout {sorted(mine.items())} differs from the image's "
                           f"{sorted(theirs.items())}; restart on a machine running the same kernel")


def transform(pid: int, meta: ImageMeta, reader: ImageReader, plan, opts, tids: list[int]) -> dict:
    """Turn the helper `pid` (blocked, waiting) into the image's process, leaving it stopped under ptrace;
    tids collects every thread created (for cleanup on failure). Returns timings."""
    proc = meta.process
    try:
        ptrace.seize(pid, ptrace.O_TRACESYSGOOD | ptrace.O_TRACECLONE | ptrace.O_EXITKILL)
        ptrace.interrupt(pid)
    except OSError as e:
        raise RestoreError(f"cannot take hold of the restore helper {pid}: {e}") from None
    while True:
        st = ptrace.wait(pid)
        if st.gone:
            raise RestoreError(f"restore helper {pid} {st.describe()}")
        if st.event == ptrace.EVENT_STOP:
            break
        ptrace.cont(pid)     # a signal-delivery stop before our trap: the helper's signals do not matter
    helper_maps = read_maps(pid, with_flags=False)
    reserve = next((a for a in plan.reserve_candidates if any(m.start == a for m in helper_maps)), None)
    if reserve is None:
        raise RestoreError("internal: restore helper's trampoline not found")
    # Block every signal while we work: signals made pending again (the image's, and any arriving now) must
    # stay pending until the process runs with its own mask (threads cloned later inherit this).
    ptrace.setsigmask(pid, 0xFFFFFFFFFFFFFFFF)
    inj = Injector(pid, pid, reserve)
    scratch = Scratch(pid, reserve + SCRATCH_OFF)
    timings = {}
    t = time.monotonic()

    here_xstate = ptrace.get_xstate(pid)
    for th in proc.threads:
        threads.check_xstate(unb64(th.xstate), here_xstate)

    rseq = ptrace.get_rseq(pid)
    if rseq.rseq_abi_pointer:
        inj.check("rseq(unregister)", SYS.rseq, rseq.rseq_abi_pointer, rseq.rseq_abi_size, RSEQ_FLAG_UNREGISTER,
                  rseq.signature)

    # Park the kernel's special mappings inside the reserved area, then unmap everything else.
    parked = {}
    slot = reserve + PARK_OFF
    for m in helper_maps:
        if m.path in SPECIAL and m.path != "[vsyscall]":
            inj.check(f"mremap({m.path})", SYS.mremap, m.start, m.size, m.size, MREMAP_MAYMOVE | MREMAP_FIXED, slot)
            parked[m.path] = slot
            slot += m.size + PAGE
    size = RESERVE_PAGES * PAGE
    inj.check("munmap(low)", SYS.munmap, 0, reserve)
    if reserve + size < TASK_SIZE:
        inj.check("munmap(high)", SYS.munmap, reserve + size, TASK_SIZE - (reserve + size))

    # mm fields, auxv and exe link
    auxv = unb64(proc.auxv)
    scratch.write(1024, auxv)
    scratch.write(0, pack_mm_map(proc.mm, proc.brk, scratch.addr + 1024, len(auxv), plan.exe_fd))
    r = inj.call(SYS.prctl, PR_SET_MM, PR_SET_MM_MAP, scratch.addr, 104, 0)
    if r < 0 and plan.exe_fd >= 0:
        log.warning("prctl(PR_SET_MM_MAP) with the executable failed (%s); retrying without it", os.strerror(-r))
        scratch.write(0, pack_mm_map(proc.mm, proc.brk, scratch.addr + 1024, len(auxv), -1))
        r = inj.call(SYS.prctl, PR_SET_MM, PR_SET_MM_MAP, scratch.addr, 104, 0)
    if r < 0:
        raise RestoreError(f"prctl(PR_SET_MM_MAP) failed: {os.strerror(-r)}")
    timings["setup_s"] = round(time.monotonic() - t, 6)

    # Mappings and their pages; SysV attachments first, as nothing else may be mapped where a partly unmapped one
    # is attached whole
    t = time.monotonic()
    try:
        sysvshm.attach_all(inj, proc.regions, plan.sysv)
    except SysvError as e:
        raise RestoreError(str(e)) from None
    for reg in proc.regions:
        if reg.backing == "sysv":
            continue
        if reg.backing == "special":
            src = parked.get(reg.path)
            if src is None:
                raise RestoreError(f"the restoring kernel has no {reg.path} to put at {reg.start:#x}")
            inj.check(f"mremap({reg.path} -> {reg.start:#x})", SYS.mremap, src, reg.end - reg.start,
                      reg.end - reg.start, MREMAP_MAYMOVE | MREMAP_FIXED, reg.start)
        else:
            key = f"shm:{reg.shm}" if reg.backing == "shared-anon" else reg.path
            memory.map_region(inj, reg, plan.map_fds.get(key, -1))
    filler = memory.MemoryFiller(pid, reader, verify=opts.verify_checksums)
    filler.fill(proc.regions)
    for reg in proc.regions:
        if reg.backing != "special":
            memory.protect_region(inj, reg)
    timings["memory_s"] = round(time.monotonic() - t, 6)
    timings["bytes"] = filler.bytes

    # Helper-only fds, process-wide state
    for fd in plan.helper_fds():
        inj.call(SYS.close, fd)
    locks.restore_posix(inj, scratch, proc.pid, plan.posix_locks)    # after the closes, which would drop them
    signals.restore_dispositions(inj, scratch, proc.sigactions)
    inj.call(SYS.personality, proc.personality)
    _restore_rlimits(inj, scratch, proc)

    # Threads: the helper is the main thread; the others are cloned from it.
    main_rec = next((t for t in proc.threads if t.tid == proc.pid), proc.threads[0])
    injectors = {main_rec.tid: inj}
    for rec in proc.threads:
        if rec is main_rec:
            continue
        inj.clone_events.clear()
        if opts.same_pids:
            # struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
            # set_tid (pointer to the TID we want), set_tid_size
            scratch.write(256, struct.pack("<i", rec.tid))
            scratch.write(0, struct.pack("<11Q", CLONE_THREAD_FLAGS, 0, 0, 0, 0, 0, 0, 0, scratch.addr + 256, 1, 0))
            r = inj.call(SYS.clone3, scratch.addr, 88)
            if r == -errno.EEXIST:
                raise RestoreError(f"TID {rec.tid} is already taken; cannot restore the thread with its own TID")
        else:
            r = inj.call(SYS.clone, CLONE_THREAD_FLAGS, 0, 0, 0, 0)
        if r < 0 or not inj.clone_events:
            raise RestoreError(f"creating thread for tid {rec.tid} failed: {os.strerror(-r) if r < 0 else r}")
        newtid = inj.clone_events[-1]
        tids.append(newtid)
        st = ptrace.wait(newtid)
        if not st.stopped:
            raise RestoreError(f"new thread {newtid} did not stop ({st.describe()})")
        injectors[rec.tid] = Injector(newtid, pid, reserve, ptrace.getregs(newtid))
    for rec in proc.threads:
        threads.restore_thread_state(injectors[rec.tid], rec, scratch)
    if not opts.same_pids:
        _fix_cached_tids(pid, proc, injectors)
    for rec in proc.threads:
        threads.restore_credentials(injectors[rec.tid], proc.creds, scratch)
    tid_map = {rec.tid: injectors[rec.tid].tid for rec in proc.threads}
    try:
        timers.restore_posix_timers(inj, scratch, proc.posix_timers, tid_map)
    except OSError as e:
        raise RestoreError(f"cannot restore POSIX timers: {e.strerror or e}") from None
    timers.restore_itimers(inj, scratch, proc.itimers)
    if proc.pending:
        signals.requeue_pending(inj, scratch, [unb64(p) for p in proc.pending], process_wide=True)

    # Unmap the reserved area last (the munmap returns to a stop; nobody executes there again).
    inj.check("munmap(trampoline)", SYS.munmap, reserve, size)
    if opts.check_layout:
        check_layout(pid, proc.regions)
    for rec in proc.threads:
        threads.set_final_registers(injectors[rec.tid], rec)
    return timings


def _fix_cached_tids(pid: int, proc: ProcessRecord, injectors: dict[int, Injector]) -> None:
    """Without our own PID namespace threads get new TIDs. The C library keeps each thread's TID in its thread
    descriptor, at the very address the thread registered with set_tid_address (clear_child_tid): glibc and
    others hand the kernel &descriptor->tid. Where that word still holds the old TID, write the new one, so
    pthread_kill(), raise() and mutex owner checks keep working."""
    fixed = 0
    for rec in proc.threads:
        new = injectors[rec.tid].tid
        addr = rec.clear_child_tid
        if not addr or new == rec.tid:
            continue
        try:
            if struct.unpack("<i", remote.read(pid, addr, 4))[0] == rec.tid:
                remote.write(pid, addr, struct.pack("<i", new))
                fixed += 1
        except OSError:
            continue
    log.info("restored pid %d with new PIDs (no PID namespace): fixed %d cached thread id(s)", pid, fixed)


def _restore_rlimits(inj: Injector, scratch: Scratch, proc: ProcessRecord) -> None:
    try:       # the helper's own limits, read from outside: those already right need no injected call (most)
        now = read_rlimits(inj.tgid)
    except OSError:
        now = {}
    for name, (cur, mx) in proc.rlimits.items():
        res = RLIMITS.get(name)
        if res is None or now.get(name) == [cur, mx]:
            continue
        scratch.write(0, struct.pack("<QQ", cur, mx))
        r = inj.call(SYS.prlimit64, 0, res, scratch.addr, 0)
        if r < 0:
            # raising a hard limit needs privilege; keep going with what this environment allows
            log.info("rlimit %s=%s:%s not restored (%s)", name, cur, mx, os.strerror(-r))



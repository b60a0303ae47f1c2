"""Restoring one process from its image.

The agent forks a helper that puts the image's file descriptors at their numbers, enters the image's cwd
and umask, maps a small reserved area (a `syscall; int3` trampoline page plus scratch pages) at an address
the image does not use, and stops itself under ptrace. From then on the agent drives it entirely by injected
system calls through the trampoline:

  unregister the helper's rseq -> park [vvar]/[vvar_vclock]/[vdso] in the reserved area -> unmap everything
  else -> prctl(PR_SET_MM_MAP) with the image's mm fields, auxv and exe -> recreate every mapping at its
  address and write the pages -> move the vdso pages to the image's addresses -> restore protections, signal
  dispositions, personality, rlimits -> create the other threads -> per-thread kernel state -> check the new
  address space against the image -> unmap the reserved area -> set every thread's registers, xstate and
  mask -> detach.

Any failure kills the helper: a half-restored process is never left running.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import struct
import os
import signal
import time
from dataclasses import dataclass, field

from ..image.format import ImageError, ImageReader
from ..image.records import ImageMeta, ProcessRecord, RegionRecord, unb64
from . import files, memory, ptrace, signals, threads, timers
from .inject import Injector, ProcessGone
from .linux import (MAP_ANONYMOUS, MAP_FIXED, MAP_FIXED_NOREPLACE, MAP_PRIVATE, MREMAP_FIXED, MREMAP_MAYMOVE,
                    PAGE, PR_SET_MM, PR_SET_MM_MAP, PROT_EXEC, PROT_READ, PROT_WRITE, RSEQ_FLAG_UNREGISTER, SYS,
                    TASK_SIZE, mmap)
from .maps import SPECIAL, read_maps
from .procattrs import RLIMITS, pack_mm_map
from .ptrace import Regs

log = logging.getLogger(__name__)

RESERVE_PAGES = 128               # trampoline (1) + scratch (31) + parking slots for the vdso pages
SCRATCH_OFF = PAGE
SCRATCH_SIZE = 31 * PAGE
PARK_OFF = 32 * PAGE
CLONE_THREAD_FLAGS = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000   # VM|FS|FILES|SIGHAND|THREAD|SYSVSEM
TRAMPOLINE_CODE = b"\x0f\x05\xcc"  # syscall; int3


class RestoreError(RuntimeError):
    """Restore failed; the message says why (the helper process has been killed)."""


@dataclass
class RestoreOptions:
    verify_checksums: bool = True
    check_layout: bool = True
    # True inside a PID namespace of our own: every process and thread gets its original PID/TID back.
    # False: new PIDs; glibc's cached thread IDs are fixed up where they can be found (see _fix_cached_tids).
    same_pids: bool = False


@dataclass
class RestoredProcess:
    """A restored process, still stopped under ptrace until release() lets it run (so a computation can be
    released all at once, and not at all if joining the coordinator fails)."""
    pid: int
    meta: ImageMeta
    stats: dict = field(default_factory=dict)
    tids: list[int] = field(default_factory=list)
    released: bool = False

    def release(self, cut_back_files: bool = True) -> None:
        if cut_back_files:
            files.cut_back(self.meta.process.fds)
        for tid in self.tids:
            ptrace.detach(tid)
        self.released = True

    def kill(self) -> None:
        _kill_helper(self.pid, self.tids)


class _Scratch:
    """The scratch pages inside the reserved area (same interface as remote.Scratch)."""

    def __init__(self, pid: int, addr: int):
        from . import remote
        self._remote = remote
        self.pid = pid
        self.addr = addr

    def read(self, off: int, n: int) -> bytes:
        return self._remote.read(self.pid, self.addr + off, n)

    def write(self, off: int, data: bytes) -> None:
        if off + len(data) > SCRATCH_SIZE:
            raise RestoreError("internal: scratch area too small")
        self._remote.write(self.pid, self.addr + off, data)


def _intervals(ranges):
    out = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def choose_reserve(regions: list[RegionRecord], count: int = 4) -> list[int]:
    """Candidate addresses for the reserved area: gaps in both the image's and our own address space."""
    size = RESERVE_PAGES * PAGE
    guard = 16 * PAGE
    used = [(r.start, r.end) for r in regions] + [(m.start, m.end) for m in read_maps("self", with_flags=False)]
    used = _intervals([(max(0, s - guard), min(TASK_SIZE, e + guard)) for s, e in used if s < TASK_SIZE])
    gaps = []
    prev = 0x10000000
    for s, e in used + [[TASK_SIZE, TASK_SIZE]]:
        if s - prev >= size:
            gaps.append((prev, s))
        prev = max(prev, e)
    cands = [g[1] - size for g in reversed(gaps)]   # highest first: near where mmap places things anyway
    if not cands:
        raise RestoreError("no free address range for the restore trampoline")
    return [c & ~(PAGE - 1) for c in cands[:count]]


@dataclass
class _Plan:
    fds: list[tuple[int, int, bool]]          # (target fd, source fd in agent, cloexec)
    close: list[int]                           # target fds the image does not have (0-2 only)
    map_fds: dict[str, int]                    # path -> fd
    exe_fd: int
    cwd: str
    umask: int
    reserve_candidates: list[int]


def _dup_high(fd: int, base: int) -> int:
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base)
    os.close(fd)
    return new


def _prepare(proc: ProcessRecord, opts: RestoreOptions) -> _Plan:
    base = max([r.fd for r in proc.fds] + [2]) + 1
    plan = _Plan([], [], {}, -1, proc.cwd, proc.umask, choose_reserve(proc.regions))
    have = {r.fd for r in proc.fds}
    plan.close = [fd for fd in (0, 1, 2) if fd not in have]
    try:
        for rec in proc.fds:
            if rec.kind == "stdio":
                try:
                    src = _dup_high(os.dup(rec.fd), base)
                except OSError:
                    src = _dup_high(os.open(os.devnull, os.O_RDWR), base)
            else:
                src = _dup_high(files.reopen(rec), base)
            plan.fds.append((rec.fd, src, rec.cloexec))
        for r in proc.regions:
            if r.backing == "file" and r.path not in plan.map_fds:
                rw = any(x.path == r.path and x.perms[3] == "s" and x.perms[1] == "w" for x in proc.regions)
                try:
                    fd = os.open(r.path, (os.O_RDWR if rw else os.O_RDONLY) | os.O_CLOEXEC)
                except OSError as e:
                    raise RestoreError(f"cannot open mapped file {r.path}: {e.strerror}") from None
                plan.map_fds[r.path] = _dup_high(fd, base)
        exe = proc.exe.removesuffix(" (deleted)")
        try:
            plan.exe_fd = _dup_high(os.open(exe, os.O_RDONLY | os.O_CLOEXEC), base)
        except OSError:
            log.warning("executable %s is gone; /proc/PID/exe of the restored process will not point to it", exe)
    except BaseException:
        _close_plan(plan)
        raise
    return plan


def _close_plan(plan: _Plan) -> None:
    for _, src, _ in plan.fds:
        os.close(src)
    for fd in plan.map_fds.values():
        os.close(fd)
    if plan.exe_fd >= 0:
        os.close(plan.exe_fd)


def _helper(plan: _Plan) -> None:
    """Runs in the forked child. Never returns."""
    try:
        for target, src, cloexec in plan.fds:
            os.dup2(src, target, inheritable=not cloexec)
        for fd in plan.close:
            try:
                os.close(fd)
            except OSError:
                pass
        keep = {t for t, _, _ in plan.fds} | set(plan.map_fds.values()) | {plan.exe_fd}
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        os.chdir(plan.cwd)
        os.umask(plan.umask)
        size = RESERVE_PAGES * PAGE
        for addr in plan.reserve_candidates:
            try:
                mmap(addr, size, 0, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE)
                break
            except OSError:
                continue
        else:
            os._exit(126)
        mmap(addr, PAGE, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        import ctypes
        ctypes.memmove(addr, TRAMPOLINE_CODE, len(TRAMPOLINE_CODE))
        mmap(addr + SCRATCH_OFF, SCRATCH_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        ptrace.traceme()
        os.kill(os.getpid(), signal.SIGSTOP)
    except BaseException:
        pass
    os._exit(127)


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


def restore_process(reader: ImageReader, opts: RestoreOptions | None = None) -> RestoredProcess:
    """Recreate the process of an image as a child of the caller, stopped; call release() to run it."""
    opts = opts or RestoreOptions()
    meta = ImageMeta.from_dict(reader.meta)
    proc = meta.process
    t0 = time.monotonic()
    memory.check_backing_files(proc.regions)
    _check_specials(proc.regions)
    plan = _prepare(proc, opts)
    try:
        if opts.same_pids:
            _claim_pid(proc.pid)
        pid = os.fork()
        if pid == 0:
            _helper(plan)
    finally:
        _close_plan(plan)
    tids = [pid]
    if opts.same_pids and pid != proc.pid:
        _kill_helper(pid, tids)
        raise RestoreError(f"PID {proc.pid} is already taken in this PID namespace; cannot restore "
                           f"{meta.program} with its own PID")
    try:
        stats = _drive(pid, meta, reader, plan, opts, tids)
    except BaseException as e:
        _kill_helper(pid, tids)
        if isinstance(e, (RestoreError, ImageError)):
            raise
        if isinstance(e, (OSError, ProcessGone, RuntimeError)):
            raise RestoreError(f"restoring pid {proc.pid} from {reader.path} failed: {e}") from e
        raise
    stats["total_s"] = round(time.monotonic() - t0, 6)
    return RestoredProcess(pid, meta, stats, tids)


def _claim_pid(pid: int) -> None:
    from ..agent.namespaces import set_next_pid
    if os.path.exists(f"/proc/{pid}"):
        raise RestoreError(f"PID {pid} is already taken in this PID namespace; cannot restore it with its own PID")
    try:
        set_next_pid(pid)
    except OSError as e:
        raise RestoreError(f"cannot choose PID {pid} (ns_last_pid: {e.strerror})") from None


def _kill_helper(pid: int, tids: list[int]) -> None:
    """Kill a (possibly traced, multi-threaded) helper and reap it: the other threads first, or waiting for
    the leader can hang."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for tid in [t for t in tids if t != pid] + [pid]:
        while True:
            try:
                st = ptrace.wait(tid)
            except ChildProcessError:
                break
            if st.gone:
                break


def _check_specials(regions: list[RegionRecord]) -> None:
    mine = {m.path: m.size for m in read_maps("self", with_flags=False) if m.special and m.path != "[vsyscall]"}
    theirs = {r.path: r.end - r.start for r in regions if r.backing == "special"}
    if mine != theirs:
        raise RestoreError(f"this kernel's vdso layout {sorted(mine.items())} differs from the image's "
                           f"{sorted(theirs.items())}; restart on a machine running the same kernel")


def _drive(pid: int, meta: ImageMeta, reader: ImageReader, plan: _Plan, opts: RestoreOptions,
           tids: list[int]) -> dict:
    """Rebuild the process in the stopped helper; tids collects every thread created (for cleanup)."""
    proc = meta.process
    st = ptrace.wait(pid)
    if not st.stopped or st.stopsig != signal.SIGSTOP:
        code = st.exit_code
        raise RestoreError(f"restore helper failed to start ({st.describe()}"
                           f"{': no free address for the trampoline' if code == 126 else ''})")
    ptrace.setoptions(pid, ptrace.O_TRACESYSGOOD | ptrace.O_TRACECLONE | ptrace.O_EXITKILL)
    helper_maps = read_maps(pid, with_flags=False)
    reserve = next((a for a in plan.reserve_candidates if any(m.start == a for m in helper_maps)), None)
    if reserve is None:
        raise RestoreError("internal: restore helper's trampoline not found")
    # Block every signal while we work: signals made pending again (the image's, and any arriving now) must
    # stay pending until the process runs with its own mask (threads cloned later inherit this).
    ptrace.setsigmask(pid, 0xFFFFFFFFFFFFFFFF)
    inj = Injector(pid, pid, reserve)
    scratch = _Scratch(pid, reserve + SCRATCH_OFF)
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

    # Mappings and their pages
    t = time.monotonic()
    for reg in proc.regions:
        if reg.backing == "special":
            src = parked.get(reg.path)
            inj.check(f"mremap({reg.path} -> {reg.start:#x})", SYS.mremap, src, reg.end - reg.start,
                      reg.end - reg.start, MREMAP_MAYMOVE | MREMAP_FIXED, reg.start)
        else:
            memory.map_region(inj, reg, plan.map_fds.get(reg.path, -1))
    filler = memory.MemoryFiller(pid, reader, verify=opts.verify_checksums)
    try:
        filler.fill(proc.regions)
    finally:
        filler.close()
    for reg in proc.regions:
        if reg.backing != "special":
            memory.protect_region(inj, reg)
    timings["memory_s"] = round(time.monotonic() - t, 6)
    timings["bytes"] = filler.bytes

    # Helper-only fds, process-wide state
    for fd in list(plan.map_fds.values()) + ([plan.exe_fd] if plan.exe_fd >= 0 else []):
        inj.call(SYS.close, fd)
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
    from . import remote
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


def _restore_rlimits(inj: Injector, scratch: _Scratch, proc: ProcessRecord) -> None:
    for name, (cur, mx) in proc.rlimits.items():
        res = RLIMITS.get(name)
        if res is None:
            continue
        scratch.write(0, struct.pack("<QQ", cur, mx))
        r = inj.call(SYS.prlimit64, 0, res, scratch.addr, 0)
        if r < 0:
            # raising a hard limit needs privilege; keep going with what this environment allows
            log.info("rlimit %s=%s:%s not restored (%s)", name, cur, mx, os.strerror(-r))



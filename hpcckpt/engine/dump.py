"""Dumping one frozen process into one image file.

Order matters: everything that needs injected system calls (signal dispositions, per-thread kernel state,
brk) is gathered first through a scratch page that is unmapped again before /proc/PID/maps is read, so the
image shows the process exactly as it was.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .. import __version__
from ..image.blobs import write_blobs
from ..image.format import ImageError, ImageReader, ImageWriter
from ..image.incremental import previous_hashes
from ..image.pagehash import HASH_ALGO
from ..image.records import SCHEMA, ImageMeta, ProcessRecord, b64
from . import forker, memory, procattrs, ptrace, signals, threads, timers, wptrack
from .errors import SnapshotError
from .fds.fdtable import FdTable
from .freeze import FrozenProcess
from .linux import SYS
from .maps import read_maps_fast
from .remote import Scratch
from .shm import sysvshm

log = logging.getLogger(__name__)


def check_supported(pids: list[int]) -> None:
    """Refuse early, with every process untouched, what this engine cannot save (named precisely)."""
    FdTable(pids).check()
    sysvshm.check(pids)
    for pid in pids:
        try:
            maps = memory.read_maps(pid, with_flags=False)
        except (FileNotFoundError, ProcessLookupError):
            continue                     # exited meanwhile: no longer part of the computation
        for m in maps:
            memory.classify(m)


@dataclass
class Placement:
    """What the computation-level scan decided for one process: its fds, the objects and bulk data its image
    stores, and its place in the process tree."""
    fds: list
    objects: list
    blobs: dict
    pgid: int = 0
    sid: int = 0
    root: bool = False
    zombies: list | None = None


def placement_alone(pid: int) -> Placement:
    """For a process checkpointed on its own (tests, benchmarks): scan just its descriptors."""
    t = FdTable([pid])
    t.scan()
    return Placement(t.records.get(pid, []), t.objects_of(pid), t.blobs_of(pid), root=True)


@dataclass
class Capture:
    """Everything about one process that has to be read while it is frozen; its memory is written later
    (write_image) from the process itself or from a copy-on-write fork of it."""
    fp: FrozenProcess
    proc: ProcessRecord
    plans: list
    blobs: dict
    t0: float
    inject_s: float
    snapshot_pid: int = 0
    tracked_since: int = 0         # plans' `written` count from the checkpoint of this generation (0: none)


def capture(fp: FrozenProcess, place: Placement | None = None, pid_namespace: bool = False,
            vmflags_hint: dict | None = None, forked: bool = False, tracker: wptrack.Tracker | None = None,
            generation: int = 0) -> Capture:
    """Read the frozen process's state: injected queries first, through a scratch page that is unmapped again
    before /proc/PID/maps is read, so the image shows the process exactly as it was. tracker: track writes
    from this checkpoint (`generation`) on, and say which pages were written since the last (wptrack.py)."""
    t0 = time.monotonic()
    pid = fp.pid
    place = place or placement_alone(pid)
    leader = fp.injector()
    scratch = Scratch(leader)
    try:
        sigactions = signals.dump_dispositions(leader, scratch)
        thread_recs = []
        for tid, th in fp.threads.items():
            thread_recs.append(threads.dump_thread(fp.injector(tid), th.regs, scratch, pid))
        brk = leader.check("brk(0)", SYS.brk, 0)
        forker.reap_left(fp, leader)        # zombie snapshots of the last checkpoint under this process
        itimers = timers.dump_itimers(leader, scratch)
        posix_timers = timers.dump_posix_timers(leader, scratch, pid)
        pending_raw = signals.dump_pending(pid, shared=True)
        pending = [b64(i) for i in timers.fire_due_timers(itimers, posix_timers, pending_raw)]
        for th in fp.threads.values():
            if th.injector and th.injector.deferred:
                th.injector.requeue_signals(scratch.addr, scratch.write_abs)
    finally:
        scratch.release()
        # Put registers back now: if we die later, the kernel detaches a process that is exactly as it was.
        fp.restore_registers()
    t_inject = time.monotonic()
    status = procattrs.read_status(pid)
    proc = ProcessRecord(
        pid=pid, ppid=procattrs.ppid_of(pid), comm=status.get("Name", ""),
        exe=os.readlink(f"/proc/{pid}/exe"), cwd=os.readlink(f"/proc/{pid}/cwd"),
        umask=int(status.get("Umask", "0022"), 8), personality=procattrs.read_personality(pid), brk=brk,
        mm=procattrs.read_mm(pid), auxv=b64(procattrs.read_auxv(pid)), threads=thread_recs,
        sigactions=sigactions, regions=[], fds=place.fds, rlimits=procattrs.read_rlimits(pid), pending=pending,
        argv=procattrs.read_cmdline(pid), creds=procattrs.read_creds(status),
        pid_namespace=pid_namespace, itimers=itimers, posix_timers=posix_timers, objects=place.objects,
        pgid=place.pgid, sid=place.sid, root=place.root, zombies=place.zombies or [])
    plans = memory.plan_memory(pid, read_maps_fast(pid, vmflags_hint), defer=forked)
    since = 0
    if tracker is not None:
        wptrack.register(fp, plans, tracker)
        since = wptrack.collect(plans, tracker, generation)
    return Capture(fp, proc, plans, place.blobs, t0, round(t_inject - t0, 6), tracked_since=since)


def snapshot(cap: Capture, parent_is_agent: bool, preread_limit: int = 1 << 30) -> int:
    """Make a copy-on-write fork of the frozen process to dump its memory from while it runs again. Regions a
    fork does not hold as they are (shared, MADV_DONTFORK, MADV_WIPEONFORK) are read now. Returns the fork's
    PID (stopped under our ptrace), or 0 if a fork is not suitable (the caller dumps while frozen)."""
    try:
        memory.preread_live(cap.fp.pid, cap.plans, preread_limit)
    except MemoryError as e:
        log.info("pid %d: not forking for the checkpoint (%s)", cap.fp.pid, e)
        _undefer(cap)
        return 0
    try:
        cap.snapshot_pid = forker.fork_snapshot(cap.fp, parent_is_agent)
    except (SnapshotError, OSError) as e:
        log.warning("pid %d: no copy-on-write snapshot (%s); writing its image while it is stopped", cap.fp.pid, e)
        _undefer(cap)
        return 0
    _detach_sysv(cap)
    return cap.snapshot_pid


def _detach_sysv(cap: Capture) -> None:
    """The snapshot's copies of SysV attachments would show in the segments' nattch while the images are
    written (the job may look at it); their contents are saved from the segments themselves (sysvshm.py)."""
    from .inject import Injector
    regions = [p.m for p in cap.plans if p.rec.backing == "sysv"]
    if not regions:
        return
    inj = Injector(cap.snapshot_pid, cap.snapshot_pid, cap.fp.syscall_addr, ptrace.getregs(cap.snapshot_pid))
    for m in regions:
        inj.call(SYS.munmap, m.start, m.size)


def _undefer(cap: Capture) -> None:
    """Back to a dump while frozen: plan every region from the process itself."""
    for p in cap.plans:
        p.data.clear()
    pagemap = os.open(f"/proc/{cap.fp.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for p in cap.plans:
            if p.deferred:
                p.runs, p.deferred = memory._runs(pagemap, p.m, p.mode), False
    finally:
        os.close(pagemap)


def write_image(cap: Capture, path: str, *, computation: str, generation: int, unique_id: str,
                compress: bool = False, level: int = 1, progress=None, incremental: bool = False,
                base: str | None = None, agent: dict | None = None, pool: ThreadPoolExecutor | None = None,
                durable: bool = True, direct: bool = True) -> ImageMeta:
    """Write the image of a captured process (atomically), its memory read from the snapshot fork if one was
    made, else from the (still frozen) process. incremental: keep page hashes; with base (the previous
    generation's image of this process), store only the pages that changed since. pool: the agent's chunk
    writers (format.chunk_pool); durable=False: left as PATH.tmp for format.commit_images(); direct: full chunks
    with O_DIRECT (Settings.direct_io)."""
    proc = cap.proc
    previous, base_meta = {}, None
    if incremental and base:
        try:
            previous = previous_hashes(base)
            with ImageReader(base) as br:
                base_meta = br.meta
        except (ImageError, OSError) as e:
            log.warning("pid %d: previous image %s unusable (%s); writing a full image", cap.fp.pid, base, e)
            previous, base_meta = {}, None
    # pages written since the base's checkpoint are known exactly if tracking was armed at that very checkpoint
    tracked = base_meta is not None and bool(previous) and cap.tracked_since > 0 and \
        base_meta.get("generation") == cap.tracked_since
    source = cap.snapshot_pid or cap.fp.pid
    t_mem0 = time.monotonic()
    writer = ImageWriter(path, compress=compress, level=level, pool=pool, direct=direct)
    dumper = memory.MemoryDumper(source, writer, progress, snapshot=bool(cap.snapshot_pid))
    try:
        proc.regions = dumper.write(cap.plans, hashes=incremental, previous=previous, tracked=tracked)
        blobs = write_blobs(writer, cap.blobs)
        hash_blobs = write_blobs(writer, {f"hashes:{i}": bytes(p.hashes) for i, p in enumerate(cap.plans)
                                                 if p.hashes is not None})
        t_mem = time.monotonic()
        meta = ImageMeta(schema=SCHEMA, hpcckpt_version=__version__, computation=computation,
                         generation=generation, unique_id=unique_id, hostname=socket.gethostname(),
                         created=time.time(), program=os.path.basename(proc.exe.split(" (deleted)")[0]),
                         process=proc, **(agent or {}))
        writer.drain()
        memory.finalize_chunks(proc.regions, {**blobs, **hash_blobs})
        proc.blobs = blobs
        for i, p in enumerate(cap.plans):
            if p.hashes is not None:
                p.rec.hashes = {**hash_blobs[f"hashes:{i}"], "algo": HASH_ALGO}
        if base_meta is not None and previous and base:
            meta.base = os.path.relpath(base, os.path.dirname(os.path.abspath(path)))
            meta.needs = sorted(set(base_meta.get("needs") or [base_meta["generation"]]) | {generation})
        else:
            meta.needs = [generation]
        meta.stats = {"pages_dumped": dumper.pages_dumped - writer.zero_pages,
                      "pages_skipped": dumper.pages_skipped, "zero_pages": writer.zero_pages,
                      "bytes_in": writer.bytes_in, "bytes_out": writer.bytes_out, "forked": bool(cap.snapshot_pid),
                      "incremental": incremental, "base": bool(meta.base), "write_tracked": tracked,
                      "inject_s": cap.inject_s, "memory_s": round(t_mem - t_mem0, 6)}
        writer.finish(meta.to_dict(), durable=durable)
    except BaseException:
        writer.abort()
        raise
    finally:
        dumper.close()
    meta.stats["total_s"] = round(time.monotonic() - cap.t0, 6)
    log.debug("dumped pid %d to %s: %s", cap.fp.pid, path, meta.stats)
    return meta



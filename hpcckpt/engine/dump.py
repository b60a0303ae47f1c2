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
from dataclasses import dataclass

from .. import __version__
from ..image.format import ImageWriter
from ..image.records import SCHEMA, ImageMeta, ProcessRecord, b64
from . import memory, procattrs, signals, threads, timers
from .fdtable import FdTable
from .freeze import FrozenProcess
from .linux import SYS
from .remote import Scratch

log = logging.getLogger(__name__)


def check_supported(pids: list[int]) -> None:
    """Refuse early, with every process untouched, what this engine cannot save (named precisely)."""
    FdTable(pids).check()
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


def dump_process(fp: FrozenProcess, path: str, *, computation: str, generation: int, unique_id: str,
                 compress: bool = False, level: int = 1, progress=None, pid_namespace: bool = False,
                 place: Placement | None = None) -> ImageMeta:
    """Write the image of a frozen process to path (atomically). The process stays frozen."""
    t0 = time.monotonic()
    pid = fp.pid
    place = place or placement_alone(pid)
    fds = place.fds
    leader = fp.injector()
    scratch = Scratch(leader)
    try:
        sigactions = signals.dump_dispositions(leader, scratch)
        thread_recs = []
        for tid, th in fp.threads.items():
            thread_recs.append(threads.dump_thread(fp.injector(tid), th.regs, scratch, pid))
        brk = leader.check("brk(0)", SYS.brk, 0)
        itimers = timers.dump_itimers(leader, scratch)
        posix_timers = timers.dump_posix_timers(leader, scratch, pid)
        pending_raw = signals.dump_pending(pid, shared=True)
        pending = [b64(i) for i in timers.fire_due_timers(itimers, posix_timers, pending_raw)]
        for th in fp.threads.values():
            if th.injector and th.injector.deferred:
                th.injector.requeue_signals(scratch.addr, scratch.write_abs)
    finally:
        scratch.release()
        # Put registers back now: if we die during the (long) memory dump, the kernel detaches a process
        # that is exactly as it was.
        fp.restore_registers()
    t_inject = time.monotonic()

    status = procattrs.read_status(pid)
    proc = ProcessRecord(
        pid=pid, ppid=procattrs.ppid_of(pid), comm=status.get("Name", ""),
        exe=os.readlink(f"/proc/{pid}/exe"), cwd=os.readlink(f"/proc/{pid}/cwd"),
        umask=int(status.get("Umask", "0022"), 8), personality=procattrs.read_personality(pid), brk=brk,
        mm=procattrs.read_mm(pid), auxv=b64(procattrs.read_auxv(pid)), threads=thread_recs,
        sigactions=sigactions, regions=[], fds=fds, rlimits=procattrs.read_rlimits(pid), pending=pending,
        argv=procattrs.read_cmdline(pid), creds=procattrs.read_creds(status),
        pid_namespace=pid_namespace, itimers=itimers, posix_timers=posix_timers, objects=place.objects,
        pgid=place.pgid, sid=place.sid, root=place.root, zombies=place.zombies or [])

    writer = ImageWriter(path, compress=compress, level=level)
    dumper = memory.MemoryDumper(pid, writer, progress)
    try:
        proc.regions = dumper.dump()
        blobs = memory.write_blobs(writer, place.blobs)
        t_mem = time.monotonic()
        meta = ImageMeta(schema=SCHEMA, hpcckpt_version=__version__, computation=computation,
                         generation=generation, unique_id=unique_id, hostname=socket.gethostname(),
                         created=time.time(), program=os.path.basename(proc.exe.split(" (deleted)")[0]),
                         process=proc)
        writer.drain()
        memory.finalize_chunks(proc.regions, blobs)
        proc.blobs = blobs
        meta.stats = {"pages_dumped": dumper.pages_dumped, "pages_skipped": dumper.pages_skipped,
                      "bytes_in": writer.bytes_in, "bytes_out": writer.bytes_out,
                      "inject_s": round(t_inject - t0, 6), "memory_s": round(t_mem - t_inject, 6)}
        writer.finish(meta.to_dict())
    except BaseException:
        writer.abort()
        raise
    finally:
        dumper.close()
    meta.stats["total_s"] = round(time.monotonic() - t0, 6)
    log.debug("dumped pid %d to %s: %s", pid, path, meta.stats)
    return meta

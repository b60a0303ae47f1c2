"""Exact write tracking for incremental images: which pages a process wrote since its last checkpoint.

This kernel has no soft-dirty bits; it has their successor (Linux 6.7+): a userfaultfd registered in
write-protect mode with UFFD_FEATURE_WP_ASYNC, whose write faults the kernel resolves itself (no handler
thread) by clearing the page's write-protect bit, read and re-armed from outside with the PAGEMAP_SCAN ioctl
on /proc/PID/pagemap. bench/wptrack.c shows the facts this rests on: arming 1 GiB takes ~9 ms, finding the
5 % written pages and re-arming them ~1 ms; first touches count as writes (UFFD_FEATURE_WP_UNPOPULATED), so do
pages dropped with MADV_DONTNEED; reads do not. Kernel writes into the process (read(2), process_vm_writev,
a debugger's) fault like the process's own.

While a process is frozen for a checkpoint we inject userfaultfd(UFFD_USER_MODE_ONLY) once (the descriptor
moves to a high number, stays in the process, and is left out of its fd table: list_fds), register every
private writable anonymous region once, and scan: the scan returns the pages written since the previous scan
and write-protects them again, at the same instant as the snapshot. The next incremental image then reads and
hashes only those pages; the other pages keep the previous image's hashes. That is only right if the previous
scan happened at the checkpoint whose image is the base: the caller checks the generation (a failed
checkpoint's scan is never trusted). Any refusal - no userfaultfd here, a region not registered (new, moved,
remapped), the program closed or replaced our descriptor, exec - leaves that region to content hashing.

Not seen by write faults, and so not covered: memory written by devices or the kernel through long-term pins
(RDMA registered memory, io_uring fixed buffers); device mappings are refused already, and
HPCCKPT_WRITE_TRACKING=0 turns tracking off.
"""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field

from . import uffd
from .linux import SYS
from .maps import PAGE_IS_WRITTEN, scan_runs, sparse_reservation
from .uffd import (
    F_DUPFD_CLOEXEC,
    FEATURE_WP_ASYNC,
    FEATURE_WP_UNPOPULATED,
    IOCTL,
    O_CLOEXEC,
    REGISTER_MODE_WP,
    SCAN_CHECK_WPASYNC,
    SCAN_WP_MATCHING,
    UFFD_API,
    UFFD_USER_MODE_ONLY,
    UFFDIO_API,
    UFFDIO_REGISTER,
    USERFAULTFD,
    is_ours,
)

log = logging.getLogger(__name__)

FD_MIN = 1000                     # where the descriptor goes in the process, out of the way of its own

@dataclass
class Tracker:
    """Write tracking of one process, kept by its agent from one checkpoint to the next."""
    pid: int
    fd: int = -1                                   # our userfaultfd in the process (-1: none yet)
    registered: set = field(default_factory=set)   # (start, end, offset) of the regions registered
    armed: set = field(default_factory=set)        # regions whose last scan succeeded...
    generation: int = 0                            # ...at this checkpoint (0: never)
    off: str = ""                                  # why tracking is off for this process ("" if it is not)
    started: int = 0                               # the process's start time (a reused PID is another one)

    def forget(self) -> None:
        """Nothing is registered or armed any more (a new descriptor is made at the next checkpoint)."""
        self.fd, self.registered, self.armed, self.generation = -1, set(), set(), 0


def eligible(plan) -> bool:
    """Private, writable, anonymous, and read from the snapshot or the frozen process the usual way; not a
    sparse reservation (arming marks every never-touched page too, WP_UNPOPULATED, which builds the page tables
    of the whole range: 4 GiB of them for a 2 TiB MAP_NORESERVE reservation)."""
    m = plan.m
    return plan.rec.backing == "anon" and plan.mode == "touched" and not m.shared and not plan.live \
        and "w" in m.perms and not sparse_reservation(m)


def _key(m) -> tuple:
    # the offset of an anonymous mapping is its address at creation: a region moved by mremap onto another's
    # old place does not pass for it
    return (m.start, m.end, m.offset)


def _descriptor_is_ours(t: Tracker) -> bool:
    from .fds.entry import read_fd
    e = read_fd(t.pid, t.fd)
    return e is not None and is_ours(e.fd, e.target, e.info_text)


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def register(fp, plans: list, t: Tracker) -> None:
    """(frozen) Give the process our userfaultfd if it has none, and register the regions not registered yet.
    Injects system calls through a scratch page of its own; failures turn tracking off, never the checkpoint."""
    from .errors import InjectionError
    from .remote import Scratch
    started = _start_time(t.pid)
    if started != t.started:
        t.forget()
        t.off, t.started = "", started
    if t.off:
        return
    if t.fd >= 0 and not _descriptor_is_ours(t):
        log.info("pid %d: its write-tracking descriptor %d is gone (closed, replaced, exec); tracking anew",
                 t.pid, t.fd)
        t.forget()
    todo = [p.m for p in plans if eligible(p) and _key(p.m) not in t.registered]
    if t.fd >= 0 and not todo:
        return
    inj = fp.injector()
    scratch = Scratch(inj)
    try:
        if t.fd < 0:
            _create(inj, scratch, t)
        if t.fd >= 0:
            for m in todo:
                scratch.write(0, struct.pack("<QQQQ", m.start, m.end - m.start, REGISTER_MODE_WP, 0))
                r = inj.call(IOCTL, t.fd, UFFDIO_REGISTER, scratch.addr)
                if r < 0:
                    log.debug("pid %d: region %#x-%#x not write-tracked: %s", t.pid, m.start, m.end,
                              os.strerror(-r))
                    continue
                t.registered.add(_key(m))
        if inj.deferred:
            inj.requeue_signals(scratch.addr, scratch.write_abs)
    except InjectionError as e:
        t.off = str(e)
        log.info("pid %d: no write tracking (%s); incremental images hash its pages", t.pid, e)
    finally:
        scratch.release()
        fp.restore_registers()


def _create(inj, scratch, t: Tracker) -> None:
    fd = inj.call(USERFAULTFD, O_CLOEXEC | UFFD_USER_MODE_ONLY)
    if fd < 0:
        t.off = f"userfaultfd: {os.strerror(-fd)}"
        log.info("pid %d: no write tracking (%s); incremental images hash its pages", t.pid, t.off)
        return
    try:
        scratch.write(0, struct.pack("<QQQ", UFFD_API, FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED, 0))
        r = inj.call(IOCTL, fd, UFFDIO_API, scratch.addr)
        if r < 0:
            t.off = f"UFFDIO_API with asynchronous write-protect: {os.strerror(-r)} (kernel older than 6.7?)"
            return
        high = inj.call(SYS.fcntl, fd, F_DUPFD_CLOEXEC, FD_MIN)
        if high < 0:
            t.off = f"no descriptor number >= {FD_MIN} ({os.strerror(-high)}; RLIMIT_NOFILE too low?)"
            return
        t.fd = high
        uffd.our_fds.add(high)
    finally:
        inj.call(SYS.close, fd)
        if t.off:
            log.info("pid %d: no write tracking (%s); incremental images hash its pages", t.pid, t.off)


def scan(pagemap_fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """Runs (first page, pages) of [start, end) written since the last scan, write-protected again; OSError if
    the range is not registered for asynchronous write-protect."""
    return scan_runs(pagemap_fd, start, end, flags=SCAN_WP_MATCHING | SCAN_CHECK_WPASYNC,
                     category_mask=PAGE_IS_WRITTEN)


def collect(plans: list, t: Tracker, generation: int) -> int:
    """(frozen, after register) Scan every tracked region: plan.written gets the pages written since the last
    scan where that scan is trusted. Returns the checkpoint at which that last scan happened (0: none)."""
    since = t.generation
    if t.off or t.fd < 0:
        return 0
    armed = set()
    pagemap = os.open(f"/proc/{t.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for p in plans:
            if not eligible(p) or _key(p.m) not in t.registered:
                continue
            try:
                written = scan(pagemap, p.m.start, p.m.end)
            except OSError as e:
                log.debug("pid %d: region %#x-%#x: no write tracking (%s)", t.pid, p.m.start, p.m.end, e)
                t.registered.discard(_key(p.m))         # unmapped and mapped again: register anew next time
                continue
            armed.add(_key(p.m))
            if _key(p.m) in t.armed:
                p.written = written
    finally:
        os.close(pagemap)
    t.armed, t.generation = armed, generation
    return since

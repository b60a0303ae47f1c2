"""Memory: which pages of each mapping go into the image, and how mappings come back at restore.

Dump rules, per mapping of /proc/PID/maps:
  - private anonymous ([heap], [stack], anonymous): every page that was ever touched (pagemap present or
    swapped); never-touched pages cost nothing.
  - private file-backed whose file is still the one mapped: only pages the process has written (private
    copies); the rest is mapped from the file again at restore, after checking the file's size and mtime.
  - private file-backed whose file is gone or replaced: every page, restored as anonymous memory.
  - shared file-backed: nothing here, the mapping comes back from the file (named shared memory files - in
    /dev/shm, on tmpfs, or mapped writable - are saved whole and put back first: shmfiles.py).
  - shared anonymous (incl. deleted /dev/shm and memfd files): touched pages, restored as shared anonymous
    memory.
  - SysV shm attachments (`/SYSV<key> (deleted)`, inode = shmid): nothing here; each segment's contents are
    saved once for the computation and it is attached again at restore (sysvshm.py).
  - [vdso], [vvar], [vvar_vclock]: nothing; the restoring kernel's own are moved to the same addresses.
"""
from __future__ import annotations

import logging
import mmap as _mmap
import os
import threading
from dataclasses import dataclass, field

from ..faults import fault
from ..image.format import CHUNK_PAGES, CODEC_RAW, Chunk, ImageError, ImageReader, ImageWriter
from ..image.records import RegionRecord
from .errors import UnsupportedMapping
from .inject import Injector
from .linux import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_GROWSDOWN,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE,
    PROT_READ,
    PROT_WRITE,
    SYS,
    buffer_address,
    process_vm_readv,
    process_vm_writev,
    process_vm_writev_scattered,
)
from .maps import Mapping, populated_runs, read_maps, sparse_reservation

log = logging.getLogger(__name__)


def _file_identity(path: str, inode: int) -> tuple[int, int] | None:
    """(size, mtime_ns) of the file still at path if it is the mapped inode, else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_ino != inode:
        return None
    return st.st_size, st.st_mtime_ns


def classify(m: Mapping) -> tuple[str, str, tuple[int, int] | None]:
    """(backing, content mode, file identity). content mode: none | touched | written | all."""
    path = m.path
    if path == "[vsyscall]":
        return "skip", "none", None
    if m.special:
        return "special", "none", None
    if path.startswith("/SYSV"):
        return "sysv", "none", None
    if path.startswith("/dev/zero"):
        return ("shared-anon" if m.shared else "anon"), "touched", None
    if path.startswith("/dev/") and not path.startswith("/dev/shm/"):
        raise UnsupportedMapping(f"device mapping {path} at {m.start:#x} cannot be checkpointed")
    if m.inode and path.startswith("/"):
        ident = None if m.deleted else _file_identity(path, m.inode)
        if m.shared:
            # a live file keeps its own data; a deleted one (memfd, unlinked /dev/shm file) is saved whole
            return ("file", "none", ident) if ident else ("shared-anon", "all", None)
        return ("file", "written", ident) if ident else ("anon", "all", None)
    return ("shared-anon" if m.shared else "anon"), "touched", None


@dataclass
class RegionPlan:
    """What to save of one mapping, decided while the process is frozen."""
    m: Mapping
    rec: RegionRecord
    runs: list[tuple[int, int]]          # (first page, pages) holding data (see deferred)
    mode: str                            # touched | written | all | none
    live: bool                           # must be read from the process itself, not from a fork of it
    zero_skip: bool                      # all-zero pages need not be stored (anonymous memory)
    data: dict[int, bytes] = field(default_factory=dict)   # pre-read runs (first page -> bytes)
    hashes: bytearray | None = None      # incremental images: 8 bytes per page of the region
    prev: bytes | None = None            # the previous generation's hashes of this region
    written: list[tuple[int, int]] | None = None    # pages written since the last checkpoint (wptrack.py)
    deferred: bool = False               # runs not read yet: planned from a fork later (plan_memory's defer)

    def hashing(self, first: int, n: int):
        """The HashSpec for pages [first, first+n) (None when not hashing)."""
        if self.hashes is None:
            return None
        from ..image.pagehash import HASH_SIZE, HashSpec
        lo, hi = first * HASH_SIZE, (first + n) * HASH_SIZE
        return HashSpec(memoryview(self.hashes)[lo:hi], self.prev[lo:hi] if self.prev is not None else None)


def plan_memory(pid: int, maps: list[Mapping] | None = None, defer: bool = False) -> list[RegionPlan]:
    """Which pages of which mappings hold data (pagemap), while the process is frozen. defer: leave the runs of
    regions a fork holds as they are (not live) to be read later from the fork's own pagemap (fork copies the
    page table entries of every mapping that holds written pages), so the process is stopped for less time."""
    maps = maps if maps is not None else read_maps(pid)
    out = []
    pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for m in maps:
            backing, mode, ident = classify(m)
            if backing == "skip":
                continue
            rec = RegionRecord(start=m.start, end=m.end, perms=m.perms, offset=m.offset, path=m.path,
                               dev=m.dev, inode=m.inode, vmflags=m.vmflags, backing=backing)
            if ident:
                rec.file_size, rec.file_mtime_ns = ident
            if backing == "shared-anon":
                rec.shm = f"{m.dev}:{m.inode}"       # same key as an fd to the same object (files.py)
            # a fork of the process does not hold these as they were: shared pages keep changing, MADV_DONTFORK
            # pages are missing and MADV_WIPEONFORK pages are zero in the fork
            live = m.shared or "dc" in m.vmflags or "wf" in m.vmflags
            plan = RegionPlan(m, rec, [], mode, live, zero_skip=backing in ("anon", "shared-anon"))
            if defer and not live and mode in ("touched", "written"):
                plan.deferred = True
            else:
                plan.runs = _runs(pagemap, m, mode)
            out.append(plan)
    finally:
        os.close(pagemap)
    return out


def _runs(pagemap: int, m: Mapping, mode: str) -> list[tuple[int, int]]:
    if mode == "all":
        return [(0, m.npages)]
    if mode in ("touched", "written"):
        return populated_runs(pagemap, m.start, m.npages, anon_only=(mode == "written"))
    return []


def intersect_runs(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Pages in both lists of sorted (first, count) runs, as runs."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][0] + a[i][1], b[j][0] + b[j][1])
        if lo < hi:
            out.append((lo, hi - lo))
        if a[i][0] + a[i][1] < b[j][0] + b[j][1]:
            i += 1
        else:
            j += 1
    return out


def preread_live(pid: int, plans: list[RegionPlan], limit: int) -> int:
    """Read the regions a fork cannot provide from the frozen process itself; returns the bytes read. Raises
    MemoryError past `limit` bytes (the caller then checkpoints without a fork)."""
    total = 0
    reader = MemoryDumper(pid, None)
    try:
        for p in plans:
            if not p.live:
                continue
            for first, n in p.runs:
                total += n * PAGE
                if total > limit:
                    raise MemoryError(f"{total} bytes of shared memory to read while frozen")
                buf = bytearray(n * PAGE)
                try:
                    reader._read(p.m, p.m.start + first * PAGE, n * PAGE, memoryview(buf))
                except OSError:
                    if p.mode != "all":
                        raise
                    continue           # deleted-file pages beyond the end: read page by page later (none)
                p.data[first] = bytes(buf)
    finally:
        reader.close()
    return total


class MemoryDumper:
    """Copies pages into an image writer, from a stopped process or a copy-on-write fork of it (`pid`)."""

    def __init__(self, pid: int, writer: ImageWriter | None, progress=None, snapshot: bool = False):
        self.pid = pid
        self.writer = writer
        # A snapshot shares its pages copy-on-write with the running process: process_vm_readv pins them,
        # which makes the kernel copy every page (1.8 s/GiB here); /proc/PID/mem reads them as they are
        # (0.35 s/GiB).
        self.snapshot = snapshot
        self.progress = progress        # called with bytes dumped so far, after every chunk
        self.pages_dumped = 0
        self.pages_skipped = 0
        self._mem_fd = -1
        self._mem_lock = threading.Lock()

    @property
    def out(self) -> ImageWriter:
        if self.writer is None:
            raise RuntimeError("internal: this MemoryDumper only reads pages")
        return self.writer

    def dump(self, maps: list[Mapping] | None = None) -> list[RegionRecord]:
        """Plan and write in one go (the process stays frozen throughout)."""
        return self.write(plan_memory(self.pid, maps))

    def write(self, plans: list[RegionPlan], hashes: bool = False, previous: dict | None = None,
              tracked: bool = False) -> list[RegionRecord]:
        """Write every planned region. hashes: keep 8-byte page hashes (plan.hashes) for incremental images;
        previous: the last generation's hashes by region, to store only pages that changed; tracked: the
        previous generation is the one plan.written counts from, so only those pages are read and hashed."""
        out = []
        if any(p.deferred for p in plans):
            pagemap = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            try:
                for p in plans:
                    if p.deferred:
                        p.runs, p.deferred = _runs(pagemap, p.m, p.mode), False
            finally:
                os.close(pagemap)
        for p in plans:
            # (a reservation's few pages: stored as they are; a region of mode none - a shared file mapping - has no
            # pages here to hash)
            if hashes and p.mode != "none" and not sparse_reservation(p.m, p.runs):
                from ..image.incremental import region_key
                from ..image.pagehash import HASH_SIZE
                p.hashes = bytearray(HASH_SIZE * p.m.npages)
                prev = (previous or {}).get(region_key(p.rec))
                p.prev = prev if prev is not None and len(prev) == len(p.hashes) else None
                if tracked and p.prev is not None and p.written is not None:
                    # unwritten pages are as they were: their hashes are the previous ones
                    p.hashes[:] = p.prev
                    for first, n in p.written:
                        p.hashes[first * HASH_SIZE:(first + n) * HASH_SIZE] = bytes(n * HASH_SIZE)
                    p.runs = intersect_runs(p.runs, p.written)
                    self._dump_scattered(p)
                    self.pages_skipped += p.m.npages - sum(n for _, n in p.runs)
                    out.append(p.rec)
                    continue
            for first, n in p.runs:
                if first in p.data:
                    self._from_bytes(p, first, n)
                else:
                    self._dump_run(p, first, n)
            self.pages_skipped += p.m.npages - sum(n for _, n in p.runs)
            out.append(p.rec)
        self.out.drain()
        return out

    def _dump_scattered(self, p: RegionPlan) -> None:
        """Runs of written pages, scattered over the region: packed together up to a chunk's worth per job (one
        read per run, one write per job), not a job per page."""
        batch: list[tuple[int, int]] = []
        m, size = p.m, 0
        if p.hashes is None:
            raise RuntimeError("internal: a scattered dump is for hashed (incremental) regions only")
        hashes = memoryview(p.hashes)

        def flush():
            def produce(buf, runs=tuple(batch)):
                pos = 0
                for first, n in runs:
                    self._read(m, m.start + first * PAGE, n * PAGE, buf[pos * PAGE:(pos + n) * PAGE])
                    pos += n
            p.rec.chunks.append(self.out.submit(0, size, produce, zero_skip=p.zero_skip,
                                                   scattered=(list(batch), hashes, p.prev)))
            self.pages_dumped += size
            if self.progress:
                self.progress(self.pages_dumped * PAGE)
        for first, n in p.runs:
            while n:
                k = min(n, CHUNK_PAGES - size)
                batch.append((first, k))
                size += k
                first, n = first + k, n - k
                if size == CHUNK_PAGES:
                    flush()
                    batch, size = [], 0
        if batch:
            flush()

    def _from_bytes(self, p: RegionPlan, first: int, n: int) -> None:
        data = p.data.pop(first)
        for off in range(0, n, CHUNK_PAGES):
            cnt = min(CHUNK_PAGES, n - off)
            piece = data[off * PAGE:(off + cnt) * PAGE]
            p.rec.chunks.append(self.out.submit(first + off, cnt, _filler(piece), zero_skip=p.zero_skip,
                                                   hashing=p.hashing(first + off, cnt)))
            self.pages_dumped += cnt

    def close(self) -> None:
        with self._mem_lock:
            if self._mem_fd >= 0:
                os.close(self._mem_fd)
                self._mem_fd = -1

    def _read(self, m: Mapping, addr: int, length: int, buf) -> None:
        """Copy [addr, addr+length) of the process into buf (thread-safe: called from writer workers)."""
        if m.prot & PROT_READ and not self.snapshot:
            got = process_vm_readv(self.pid, buffer_address(buf), [(addr, length)], length)
        else:   # unreadable pages: /proc/PID/mem reads them like a debugger would
            got = os.preadv(self._mem(), [buf[:length]], addr)
        if got != length:
            raise OSError(5, f"short read of pid {self.pid} memory at {addr:#x} ({got} of {length} bytes)")

    def _mem(self) -> int:
        # Writer workers ask for it at once: opened under a lock, or two of them each open one and the
        # descriptor of the loser is never closed (one leaked fd every few forked checkpoints).
        with self._mem_lock:
            if self._mem_fd < 0:
                self._mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            return self._mem_fd

    def _dump_run(self, p: RegionPlan, first: int, n: int) -> None:
        m, rec = p.m, p.rec
        tolerate_holes = p.mode == "all"
        page = first
        end = first + n
        while page < end:
            cnt = min(CHUNK_PAGES, end - page)
            addr = m.start + page * PAGE
            if tolerate_holes:
                # whole deleted files may have pages beyond their end: read here, page by page if need be
                buf = bytearray(cnt * PAGE)
                try:
                    self._read(m, addr, cnt * PAGE, memoryview(buf))
                except OSError:
                    self._dump_pagewise(p, page, cnt)
                    page += cnt
                    continue
                rec.chunks.append(self.out.submit(page, cnt, _filler(bytes(buf)), zero_skip=p.zero_skip,
                                                     hashing=p.hashing(page, cnt)))
            else:
                rec.chunks.append(self.out.submit(
                    page, cnt, lambda buf, m=m, addr=addr, length=cnt * PAGE: self._read(m, addr, length, buf),
                    zero_skip=p.zero_skip, hashing=p.hashing(page, cnt)))
            self.pages_dumped += cnt
            page += cnt
            if self.progress:
                self.progress(self.pages_dumped * PAGE)
            fault("dump.after_chunk")

    def _dump_pagewise(self, p: RegionPlan, first: int, n: int) -> None:
        for pg in range(first, first + n):
            b = bytearray(PAGE)
            try:
                self._read(p.m, p.m.start + pg * PAGE, PAGE, memoryview(b))
            except OSError:
                continue
            p.rec.chunks.append(self.out.submit(pg, 1, _filler(bytes(b)), zero_skip=p.zero_skip,
                                                   hashing=p.hashing(pg, 1)))
            self.pages_dumped += 1


def _filler(data: bytes):
    def produce(buf, data=data):
        buf[:len(data)] = data
    return produce


def _rows(chunks) -> list:
    """Chunk objects (or groups of them, when all-zero pages were left out) as their JSON rows."""
    out = []
    for c in chunks:
        if isinstance(c, Chunk):
            out.append(c.to_json())
        elif isinstance(c, list):
            out.extend(x.to_json() for x in c)
        else:
            out.append(c)
    return out


def finalize_chunks(regions: list[RegionRecord], blobs: dict[str, dict] | None = None) -> None:
    """Turn the Chunk objects (filled in as the writer commits them) into their JSON rows."""
    for r in regions:
        r.chunks = _rows(r.chunks)
    for spec in (blobs or {}).values():
        spec["chunks"] = _rows(spec["chunks"])


# ---------------------------------------------------------------------------------------------- restore --

def check_backing_files(regions: list[RegionRecord]) -> None:
    """Every file a mapping comes back from must be the file that was mapped (same size and mtime)."""
    for r in regions:
        if r.backing != "file":
            continue
        try:
            st = os.stat(r.path)
        except OSError as e:
            raise ImageError(f"mapped file {r.path} (at {r.start:#x}) is missing: {e.strerror}") from None
        if (st.st_size, st.st_mtime_ns) != (r.file_size, r.file_mtime_ns):
            raise ImageError(f"mapped file {r.path} changed since the checkpoint (size/mtime differ); "
                             f"restore needs the same file")


def map_flags(r: RegionRecord) -> int:
    if r.backing == "file":
        flags = MAP_SHARED if r.perms[3] == "s" else MAP_PRIVATE
    elif r.backing == "shared-anon":
        flags = MAP_SHARED                # of the computation's memfd standing for the shared object
    else:
        flags = MAP_PRIVATE | MAP_ANONYMOUS
    if "gd" in r.vmflags:
        flags |= MAP_GROWSDOWN
    uncharged = r.vmflags and "ac" not in r.vmflags and not prot_of(r.perms) & PROT_WRITE
    if "nr" in r.vmflags or (flags & MAP_PRIVATE and uncharged and filled(r)):
        # MAP_NORESERVE reservations (Go, Java, sanitizers: terabytes, a few pages used) must not be charged
        # against the commit limit; nor must a read-only or PROT_NONE region the original was never charged for
        # ("ac" absent) while it is writable for a moment to be filled
        flags |= MAP_NORESERVE
    return flags | MAP_FIXED


def prot_of(perms: str) -> int:
    return (1 if perms[0] == "r" else 0) | (2 if perms[1] == "w" else 0) | (4 if perms[2] == "x" else 0)


def filled(r: RegionRecord) -> bool:
    """Will pages be written into this mapping at restore (its own chunks, or an incremental chain's)? Never into
    a shared file mapping: the file holds its data (images of older versions kept page hashes for it, which made
    a read-only one writable: EACCES on a file opened read-only, e.g. Python's gconv-modules.cache)."""
    if r.backing == "file" and r.perms[3] == "s":
        return False
    return bool(r.chunks or r.hashes)


def map_region(inj: Injector, r: RegionRecord, fd: int) -> None:
    """Create the mapping, writable for now if pages must be written into it."""
    prot = prot_of(r.perms)
    if filled(r):
        prot |= PROT_READ | PROT_WRITE
    uses_fd = r.backing in ("file", "shared-anon")
    got = inj.call(SYS.mmap, r.start, r.end - r.start, prot, map_flags(r), fd if uses_fd else -1,
                   r.offset if uses_fd else 0)
    if got != r.start:
        err = os.strerror(-got) if -4096 < got < 0 else f"landed at {got:#x}"
        raise ImageError(f"cannot recreate mapping {r.start:#x}-{r.end:#x} {r.path or '[anon]'}: {err}")
    for flag, advice in _ADVICE.items():
        if flag in r.vmflags:
            e = inj.call(SYS.madvise, r.start, r.end - r.start, advice)
            if e < 0:
                log.debug("madvise(%#x, %d) on %#x: %s", r.start, advice, r.start, os.strerror(-e))


# VmFlags set by madvise (or by MAP_STACK: "nh"), put back the same way: besides their own effect they keep
# the region from merging with a neighbour that lacks them, so the restored maps read as the original's
_ADVICE = {"nh": 15, "hg": 14, "dd": 16, "dc": 10, "wf": 18, "mg": 12}   # MADV_NOHUGEPAGE, _HUGEPAGE, ...


def protect_region(inj: Injector, r: RegionRecord) -> None:
    if filled(r):
        inj.check(f"mprotect({r.start:#x})", SYS.mprotect, r.start, r.end - r.start, prot_of(r.perms))


class MemoryFiller:
    """Writes image pages into a restored process on a few threads (process_vm_writev, CRC-32 and zstd release
    the GIL): raw chunks straight from a private mapping of the image file (no copy through Python: reading
    them into fresh buffers made restoring an incremental chain three times slower than one image),
    compressed ones decompressed first."""

    def __init__(self, pid: int, reader: ImageReader, verify: bool = True, threads: int = 0):
        self.pid = pid
        self.reader = reader
        self.verify = verify
        self.threads = threads or (os.cpu_count() or 1)
        self.bytes = 0

    def fill(self, regions: list[RegionRecord]) -> None:
        if self.reader.meta.get("base"):
            self._fill_chain(regions)
            return
        self._run([(self.reader, c, [(c.page, c.npages)], r.start)
                   for r in regions for c in map(Chunk.from_json, r.chunks)])

    def _fill_chain(self, regions: list[RegionRecord]) -> None:
        """An incremental image: each page from the newest image of the chain that holds its content."""
        from ..image.incremental import open_chain, region_key, resolve
        chain = open_chain(self.reader)
        try:
            self._run([(reader, c, runs, r.start) for r in regions if r.hashes and filled(r)
                       for reader, c, runs in resolve(chain, region_key(r), (r.end - r.start) // PAGE)] +
                      [(self.reader, c, [(c.page, c.npages)], r.start)        # sparse reservations: stored whole
                       for r in regions if not r.hashes for c in map(Chunk.from_json, r.chunks)])
        finally:
            for link in chain[1:]:
                link.reader.close()

    def _run(self, jobs: list) -> None:
        """jobs: (reader, chunk, [(first page, pages) of the chunk to write], region start), a chunk per job."""
        for reader, c, _, _ in jobs:
            if c.off + c.length > reader.size:
                raise ImageError(f"{reader.path}: truncated image (chunk at {c.off} beyond the end)")
        maps = {}                        # image -> (mapping, view, address), for raw chunks
        for reader, c, _, _ in jobs:
            if c.codec == CODEC_RAW and id(reader) not in maps:
                m = _mmap.mmap(reader.fd, 0, flags=_mmap.MAP_PRIVATE, prot=_mmap.PROT_READ | _mmap.PROT_WRITE)
                maps[id(reader)] = (m, memoryview(m), buffer_address(m))

        per_thread = threading.local()

        def one(task):
            pieces, keep = [], []        # (local address, remote address, length); decompressed data kept alive
            scratch = getattr(per_thread, "buf", None)
            if scratch is None:          # a thread's decompressed chunks of one task, reused by the next task
                scratch = per_thread.buf = bytearray(CHUNK_PAGES * PAGE)
            used = 0
            for reader, c, runs, start in task:
                if c.codec == CODEC_RAW:
                    _, view, addr = maps[id(reader)]
                    if self.verify and not reader.chunk_ok(c, view[c.off:c.off + c.length]):
                        raise ImageError(f"{reader.path}: corrupted or altered image (checksum or MAC mismatch in "
                                         f"chunk at offset {c.off})")
                    base = addr + c.off
                else:
                    room = memoryview(scratch)[used:] if used + c.npages * PAGE <= len(scratch) else None
                    keep.append(reader.read_chunk(c, room))
                    base = buffer_address(keep[-1])
                    if room is not None and base == buffer_address(room):
                        used += c.npages * PAGE
                pieces += [(base + (first - c.page) * PAGE, start + first * PAGE, n * PAGE) for first, n in runs]
            for i in range(0, len(pieces), 1024):      # IOV_MAX pieces per system call
                part = pieces[i:i + 1024]
                if len(part) == 1 or process_vm_writev_scattered(self.pid, part) != sum(n for _, _, n in part):
                    for local, remote, n in part:      # (short: again one by one, the error names the piece)
                        self._write(local, n, remote)
            return sum(n for _, _, n in pieces)
        # small chunks (an incremental image stores a chunk per run of changed pages, often a single page) go
        # to a thread together, up to a chunk's worth of pages: a job and a system call per page cost more
        # than the page
        tasks: list = []
        size = CHUNK_PAGES
        for job in jobs:
            n = sum(k for _, k in job[2])
            if size + n > CHUNK_PAGES:
                tasks.append([])
                size = 0
            tasks[-1].append(job)
            size += n
        try:
            if len(tasks) > 1 and self.threads > 1:
                from concurrent.futures import ThreadPoolExecutor
                with ThreadPoolExecutor(self.threads, thread_name_prefix="fill") as pool:
                    self.bytes += sum(pool.map(one, tasks))
            else:
                self.bytes += sum(map(one, tasks))
        finally:
            for m, view, _ in maps.values():
                view.release()
                try:
                    m.close()
                except BufferError:      # a view still exported (an exception's traceback): freed with it
                    pass

    def _write(self, local: int, length: int, remote: int) -> None:
        done = 0
        while done < length:
            done += process_vm_writev(self.pid, local + done, length - done, remote + done)

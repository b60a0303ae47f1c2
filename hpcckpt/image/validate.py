"""Semantic checks of images' metadata, before anything is restored from them.

A CRC-32 only shows that the metadata is as it was written. Metadata edited by hand (or by a tool) with a
recomputed checksum could otherwise restore wrong memory and report success (two chunks at one file offset),
crash the restored process (an instruction pointer outside any code), or point reads at arbitrary bytes of the
image file. Every image of a restart is checked as a whole here first: the first inconsistency stops the restart
with one line naming the image and what is wrong, before any process, file or segment is created.

Checked: the metadata's shape and types; regions sorted, page-aligned, not overlapping, inside the user
address space, of a known backing; chunks inside their region, not overlapping one another (pages) nor other
chunks (file bytes), inside the data area of the file, of a known codec, raw chunks exactly their pages long;
blobs and page-hash tables likewise; threads with unique positive ids, an instruction pointer inside an
executable mapping (or the vsyscall page) and a stack pointer inside a mapping; file descriptors unique,
within the kernel's limit, of a known kind, their open file descriptions present in the images.
"""
from __future__ import annotations

import re

from .codec import CODECS
from .fdstate import FD_KINDS
from .format import ALIGN, CHUNK_PAGES, CODEC_RAW, HEADER_SIZE, PAGE_SIZE, ImageError

USER_END = 0x00FF_FFFF_FFFF_F000          # the top of user space with 5-level paging (47-bit machines: lower)
VSYSCALL = (0xFFFF_FFFF_FF60_0000, 0xFFFF_FFFF_FF60_1000)
BACKINGS = ("anon", "file", "shared-anon", "special", "sysv")
HASH_SIZE = 8
_PERMS = re.compile(r"^[r-][w-][x-][ps]$")
_U32 = 1 << 32
_U64 = 1 << 64
_NR_OPEN_DEFAULT = 1 << 20
_USER_CS = (0x33, 0x23)                    # 64-bit and 32-bit user code segments


class Invalid(Exception):
    """One inconsistency (turned into an ImageError naming the image)."""


def _int(v, what: str, lo: int = 0, hi: int = _U64) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
        raise Invalid(f"{what} is {v!r}, expected an integer in {lo}..{hi - 1}")
    return v


def _typed(v, typ, what: str):
    if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
        name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise Invalid(f"{what} is {type(v).__name__}, expected {name}")
    return v


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return _NR_OPEN_DEFAULT


def _known_fd_kinds() -> set[str]:
    return set(FD_KINDS)


class _Extents:
    """File byte ranges [off, off+length) the chunks of one image use: none may overlap another."""

    def __init__(self, data_end: int):
        self.data_end = data_end
        self.rows: list[tuple[int, int, str]] = []

    def add(self, off: int, length: int, where: str) -> None:
        if off < HEADER_SIZE or off % ALIGN:
            raise Invalid(f"{where}: file offset {off} is not a {ALIGN}-byte boundary after the header")
        if off + length > self.data_end:
            raise Invalid(f"{where}: bytes {off}+{length} lie beyond the page data (which ends at {self.data_end})")
        self.rows.append((off, length, where))

    def check(self) -> None:
        self.rows.sort()
        for (a, alen, aw), (b, _, bw) in zip(self.rows, self.rows[1:]):
            if a + alen > b:
                raise Invalid(f"{bw} overlaps {aw} in the file (offsets {a}+{alen} and {b})")


def _chunk(row, where: str, extents: _Extents, limit_pages: int) -> tuple[int, int]:
    """Check one chunk row; returns its page range (first, end)."""
    _typed(row, list, where)
    if len(row) not in (6, 7):        # format 2 adds the chunk's keyed tag (image/auth.py)
        raise Invalid(f"{where} has {len(row)} fields, expected 6 or 7")
    page, npages, off, length, crc, codec = row[:6]
    if len(row) == 7 and not isinstance(row[6], str):
        raise Invalid(f"{where}: its tag is not a string")
    _int(page, f"{where} first page", 0, _U64)
    _int(npages, f"{where} page count", 1, CHUNK_PAGES + 1)
    _int(off, f"{where} file offset")
    _int(length, f"{where} stored length", 1, _U64)
    _int(crc, f"{where} checksum", 0, _U32)
    if codec != CODEC_RAW and codec not in CODECS:
        raise Invalid(f"{where}: unknown codec {codec!r}")
    if page + npages > limit_pages:
        raise Invalid(f"{where}: pages {page}..{page + npages - 1} lie outside its region or blob "
                      f"({limit_pages} page(s))")
    if codec == CODEC_RAW and length != npages * PAGE_SIZE:
        raise Invalid(f"{where}: a raw chunk of {npages} page(s) stored in {length} bytes")
    extents.add(off, length, where)
    return page, page + npages


def _blob(spec, where: str, extents: _Extents, length: int | None = None) -> None:
    _typed(spec, dict, where)
    n = _int(spec.get("length"), f"{where} length", 0, _U64)
    if length is not None and n != length:
        raise Invalid(f"{where}: {n} bytes, expected {length}")
    chunks = _typed(spec.get("chunks"), list, f"{where} chunks")
    pages = -(-n // PAGE_SIZE)
    ranges = sorted(_chunk(c, f"{where} chunk {i}", extents, max(pages, 1)) for i, c in enumerate(chunks))
    _no_overlap(ranges, where)


def _no_overlap(ranges: list[tuple[int, int]], where: str) -> None:
    for (a, ae), (b, _) in zip(ranges, ranges[1:]):
        if ae > b:
            raise Invalid(f"{where}: two chunks hold page {b} (pages {a}..{ae - 1} and {b}..)")


def _regions(proc: dict, extents: _Extents) -> list[tuple[int, int, str, str]]:
    regions = _typed(proc.get("regions"), list, "process.regions")
    out = []
    prev_end = 0
    for i, r in enumerate(regions):
        _typed(r, dict, f"region {i}")
        start = _int(r.get("start"), f"region {i} start", 0, USER_END)
        end = _int(r.get("end"), f"region {i} end", 1, USER_END + 1)
        where = f"region {start:#x}-{end:#x}"
        if start % PAGE_SIZE or end % PAGE_SIZE or end <= start:
            raise Invalid(f"{where} is empty or not page-aligned")
        if start < prev_end:
            raise Invalid(f"{where} overlaps or precedes the region before it (ending at {prev_end:#x})")
        prev_end = end
        perms = _typed(r.get("perms"), str, f"{where} perms")
        if not _PERMS.match(perms):
            raise Invalid(f"{where}: permissions {perms!r} are not like 'rw-p'")
        backing = r.get("backing", "anon")
        if backing not in BACKINGS:
            raise Invalid(f"{where}: unknown backing {backing!r}")
        path = _typed(r.get("path", ""), str, f"{where} path")
        _int(r.get("offset", 0), f"{where} file offset")
        pages = (end - start) // PAGE_SIZE
        chunks = _typed(r.get("chunks", []), list, f"{where} chunks")
        if chunks and backing in ("special", "sysv"):
            raise Invalid(f"{where}: a {backing} mapping has no page data of its own, but {len(chunks)} chunk(s)")
        ranges = sorted(_chunk(c, f"{where} chunk {j}", extents, pages) for j, c in enumerate(chunks))
        _no_overlap(ranges, where)
        if r.get("hashes") is not None:
            _blob(r["hashes"], f"{where} page hashes", extents, pages * HASH_SIZE)
        out.append((start, end, perms, path))
    return out


def _threads(proc: dict, regions: list[tuple[int, int, str, str]]) -> None:
    threads = _typed(proc.get("threads"), list, "process.threads")
    if not threads:
        raise Invalid("the process has no threads")
    tids = set()
    for i, t in enumerate(threads):
        _typed(t, dict, f"thread {i}")
        tid = _int(t.get("tid"), f"thread {i} tid", 1, 1 << 31)
        if tid in tids:
            raise Invalid(f"thread id {tid} appears twice")
        tids.add(tid)
        regs = _typed(t.get("regs"), dict, f"thread {tid} registers")
        for name in ("rip", "rsp", "cs"):
            _int(regs.get(name), f"thread {tid} register {name}")
        for name, v in regs.items():
            _int(v, f"thread {tid} register {name}")
        rip, rsp = regs["rip"], regs["rsp"]
        if regs["cs"] not in _USER_CS:
            raise Invalid(f"thread {tid}: code segment {regs['cs']:#x} is not a user code segment")
        if not (VSYSCALL[0] <= rip < VSYSCALL[1]
                or any(s <= rip < e and p[2] == "x" for s, e, p, _ in regions)):
            raise Invalid(f"thread {tid}: instruction pointer {rip:#x} is not inside an executable mapping")
        if not any(s <= rsp <= e for s, e, _, _ in regions):
            raise Invalid(f"thread {tid}: stack pointer {rsp:#x} is not inside a mapping")
        _typed(t.get("xstate"), str, f"thread {tid} xstate")
        _int(t.get("sigmask"), f"thread {tid} signal mask")


def _fds(proc: dict, kinds: set[str], nr_open: int) -> list[str]:
    """Checks the fd table; returns the open file descriptions (object ids) it refers to."""
    fds = _typed(proc.get("fds"), list, "process.fds")
    seen = set()
    refs = []
    for i, f in enumerate(fds):
        _typed(f, dict, f"fd entry {i}")
        fd = _int(f.get("fd"), f"fd entry {i} number", 0, nr_open)
        if fd in seen:
            raise Invalid(f"file descriptor {fd} appears twice")
        seen.add(fd)
        kind = f.get("kind")
        if not isinstance(kind, str) or kind not in kinds:
            raise Invalid(f"file descriptor {fd}: unknown kind {kind!r}")
        _typed(f.get("path", ""), str, f"fd {fd} path")
        _int(f.get("flags", 0), f"fd {fd} flags", 0, _U32)
        _int(f.get("pos", 0), f"fd {fd} position", 0, 1 << 63)
        ofd = _typed(f.get("ofd", ""), str, f"fd {fd} open file description")
        if ofd.startswith("stdio:"):
            if ofd not in ("stdio:0", "stdio:1", "stdio:2"):
                raise Invalid(f"file descriptor {fd}: {ofd!r} is not one of the launcher's stdio")
        elif kind == "null" or ofd == "null:":
            if (kind, ofd) != ("null", "null:"):
                raise Invalid(f"file descriptor {fd}: kind {kind!r} with open file description {ofd!r}")
        elif ofd:
            refs.append(ofd)
        elif kind != "stdio":
            raise Invalid(f"file descriptor {fd} ({kind}) names no open file description")
    return refs


def check_meta(meta: dict, size: int, kinds: set[str] | None = None, nr_open: int | None = None,
               parsed: list | None = None) -> list[str]:
    """Check one image's metadata against the image file's size; raises Invalid. Returns the object ids its
    file descriptors refer to (checked against every image's objects by check_images)."""
    _typed(meta, dict, "metadata")
    for key in ("computation", "unique_id", "program"):
        _typed(meta.get(key), str, key)
    _int(meta.get("generation"), "generation", 1, 1 << 62)
    for key, typ in (("hostname", str), ("hpcckpt_version", str), ("schema", str), ("stats", dict),
                     ("agents", dict), ("needs", list), ("base", str), ("agent_id", str)):
        if key in meta:              # (optional in older images; restart reads them before the records exist)
            _typed(meta[key], typ, key)
    _typed(meta.get("created", 0), (int, float), "created")
    for g in meta.get("needs", []):
        _int(g, "a generation in needs", 1, 1 << 62)
    proc = _typed(meta.get("process"), dict, "process")
    _typed(proc.get("root"), bool, "process.root")
    for key, typ in (("argv", list), ("rlimits", dict), ("creds", dict), ("mm", dict), ("exe", str), ("cwd", str),
                     ("comm", str), ("auxv", str), ("itimers", list), ("posix_timers", list), ("pending", list),
                     ("zombies", list)):
        if key in proc:
            _typed(proc[key], typ, f"process.{key}")
    _int(proc.get("pid"), "pid", 1, 1 << 31)
    _int(proc.get("ppid", 0), "ppid", 0, 1 << 31)
    extents = _Extents(size)
    regions = _regions(proc, extents)
    blobs = _typed(proc.get("blobs", {}), dict, "process.blobs")
    for oid, spec in blobs.items():
        _blob(spec, f"blob {oid!r}", extents)
    extents.check()
    _threads(proc, regions)
    refs = _fds(proc, kinds if kinds is not None else _known_fd_kinds(), nr_open or _nr_open())
    sigactions = _typed(proc.get("sigactions", []), list, "sigactions")
    if len(sigactions) > 64:
        raise Invalid(f"{len(sigactions)} signal actions, at most 64")
    for i, row in enumerate(sigactions):
        if not isinstance(row, list) or len(row) != 4:
            raise Invalid(f"signal action {i + 1} is not [handler, flags, restorer, mask]")
        for v in row:
            _int(v, f"signal action {i + 1}")
    objects = _typed(proc.get("objects", []), list, "process.objects")
    for i, o in enumerate(objects):
        _typed(o, dict, f"object {i}")
        _typed(o.get("id"), str, f"object {i} id")
        _typed(o.get("kind"), str, f"object {i} kind")
    try:                        # what restore builds from it: every field of the typed records
        from .records import ImageMeta
        rec = ImageMeta.from_dict(meta)
        if parsed is not None:
            parsed.append(rec)       # (restore uses it: parsing each image's records again cost ~1.5 ms an image)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise Invalid(f"metadata does not describe a process ({type(e).__name__}: {e})") from None
    return refs


def check_image(path: str, meta: dict, size: int) -> None:
    """check_meta, as an ImageError naming the image."""
    try:
        check_meta(meta, size)
    except Invalid as e:
        raise ImageError(f"{path}: invalid image metadata: {e}; refusing to restore from it") from None


def check_images(readers) -> list:
    """Check every image of a restart (ImageReaders), alone and together, before anything is restored. Returns
    their typed metadata (records.ImageMeta), in the readers' order."""
    kinds, nr_open = _known_fd_kinds(), _nr_open()
    parsed: list = []
    ids: dict[str, str] = {}
    refs: list[tuple[str, str]] = []
    pids: dict[int, str] = {}
    for r in readers:
        try:
            found = check_meta(r.meta, r.size, kinds, nr_open, parsed)
        except Invalid as e:
            raise ImageError(f"{r.path}: invalid image metadata: {e}; refusing to restore from it") from None
        refs += [(r.path, oid) for oid in found]
        pid = r.meta["process"]["pid"]
        if pid in pids:
            raise ImageError(f"{r.path}: process {pid} is also in {pids[pid]}: two images of one process given")
        pids[pid] = r.path
        for o in r.meta["process"].get("objects", []):
            ids.setdefault(o["id"], r.path)
    for path, oid in refs:
        if oid not in ids:
            raise ImageError(f"{path}: invalid image metadata: a file descriptor refers to object {oid!r}, which "
                             f"no given image holds (give every image of the checkpoint); refusing to restore from it")
    return parsed

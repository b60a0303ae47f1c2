"""The checkpoint image file: one per process, versioned and self-describing (docs/image-format.md).

Layout:
    [0, 4096)        header: magic, format version, where the metadata is, its checksum; signer uid and MAC
    [4096, ...)      page-data chunks, each starting on a 4096-byte boundary (raw or one zstd frame each, see codec.py)
    [meta_off, ...)  metadata: UTF-8 JSON describing the process and pointing at every chunk

A chunk holds up to CHUNK_PAGES contiguous pages of one memory region and carries its own CRC-32 (of the
stored bytes) in the metadata; zstd frames are independent so restore can decompress them in parallel.
Raw chunks are page-aligned in the file so restore can map the image and write pages without a copy.
Format 2 authenticates images (auth.py): the header holds the uid whose key signed the image and an
HMAC-SHA256 of the header's fields and the metadata; every chunk carries a keyed tag of its stored bytes in the
metadata. Format 1 images (no MAC) are read only when trusted explicitly (restart --trust-unsigned).
Images are written as NAME.tmp (mode 0600), fsync'ed, then renamed: a file with a final name is complete. An
agent writes all its images of a generation first and makes them durable together (finish(durable=False), then
commit_images): one journal commit serves many small images instead of one each.
"""
from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import stat
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..faults import fault
from . import auth
from .codec import CODECS, Compressor, decompress
from .fileio import DIRECT_MIN, ZEROS, open_direct, pwrite_all, pwritev_all, write_behind
from .pagehash import changed_runs, changed_runs_scattered

try:                  # the same CRC-32 as zlib's, ~10x faster (ISA-L, carry-less multiply): 0.03 s/GiB, not 0.3
    from isal.isal_zlib import crc32
except ImportError:   # pragma: no cover - isal is a dependency; zlib computes the same checksum
    from zlib import crc32

MAGIC = b"HPCCKPT\x00"
FORMAT_VERSION = 2
UNSIGNED_VERSION = 1          # images written before authentication: no MAC
HEADER_SIZE = 4096
ALIGN = 4096
PAGE_SIZE = 4096
CHUNK_PAGES = 1024            # 4 MiB of pages per chunk: large writes, fine-grained parallel (de)compression
INLINE_MAX = 256 << 10        # runs up to this long are written by the image's own thread, not the chunk pool
WRITE_BEHIND_MIN = 2 << 20    # writeback of a smaller write starts with the others at commit (one call a file)
_HEADER = struct.Struct("<8sIIQQIQ")  # magic, version, flags, meta_off, meta_len, meta_crc, data_end
_AUTH = struct.Struct("<I32s")         # (format 2, right after _HEADER) signer uid, HMAC-SHA256

CODEC_RAW = "raw"
log = logging.getLogger(__name__)


class ImageError(Exception):
    """An image is missing, truncated, corrupted or of an unknown format; the message names the file."""


@dataclass
class Chunk:
    page: int          # first page, relative to the start of its region
    npages: int
    off: int           # byte offset in the image file
    length: int        # stored length in bytes
    crc: int           # CRC-32 of the stored bytes
    codec: str = CODEC_RAW
    mac: str = ""      # keyed tag of the stored bytes (hex; auth.ChunkTagger), format 2

    def to_json(self) -> list:
        return [self.page, self.npages, self.off, self.length, self.crc, self.codec, self.mac]

    @classmethod
    def from_json(cls, v: list) -> Chunk:
        return cls(*v)


class ImageWriter:
    """Writes one image file. Page data is added chunk by chunk; finish() writes the metadata and commits.

    Chunks are produced, checksummed (and compressed) and written by a small thread pool: reading another
    process's memory, CRC-32, zstd and pwrite(2) all release the GIL, so they overlap. A worker reserves file
    space for a chunk once it knows its stored length, so chunks lie in the file in the order they were
    finished; the metadata says where each is. Writeback to disk starts as chunks are written (write_behind)."""

    def __init__(self, final_path: str, compress: bool = False, level: int = 1, threads: int = 0,
                 shuffle: bool = True, pool: ThreadPoolExecutor | None = None, direct: bool = True):
        self.final_path = final_path
        self.tmp_path = final_path + ".tmp"
        self.signer, self._key, self._tagger = _signing_key(final_path)
        self.compress = compress
        self.level = level
        self.shuffle = shuffle           # compressed chunks may be byte-shuffled first (codec.py)
        try:                  # (a leftover of a crashed attempt; never written through: O_EXCL|O_NOFOLLOW)
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass
        self.fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.fchmod(self.fd, 0o600)
        # direct: large raw data around the page cache (_write_direct); off: everything through the page cache
        self._direct = direct and not compress
        self.dfd = self._dfd_open = -1        # opened at the first large write (small images never need it)
        self.pos = HEADER_SIZE
        os.pwrite(self.fd, b"\0" * HEADER_SIZE, 0)
        self.bytes_in = 0
        self.bytes_out = 0
        # pool: an agent's one chunk pool shared by all its images (chunk_pool()); starting and joining a pool of
        # threads per image cost ~16 % of writing 256 small images (bench/RESULTS-many.md)
        self._own_pool = pool is None
        self._pool = pool if pool is not None else chunk_pool(compress, threads)
        n = self._pool._max_workers
        self._max_pending = 2 * n
        self._pending: list[tuple[ChunkGroup, Future]] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        self._closed = False
        self.zero_pages = 0

    # -- page data -------------------------------------------------------------------------------------------
    def submit(self, page: int, npages: int, produce, zero_skip: bool = False, hashing=None,
               scattered: tuple | None = None) -> ChunkGroup:
        """Queue npages pages of data that produce(buffer) writes into a buffer (in a worker thread). Returns a
        ChunkGroup, filled in once written (see drain()): one chunk, or several when all-zero pages were left
        out (zero_skip: for anonymous memory, where a missing page reads back as zeros). scattered: the buffer
        holds several runs of a region's pages packed together, (runs [(first page, pages)], the region's page
        hashes, the previous generation's) - page is then 0 - and only the changed pages are stored."""
        length = npages * PAGE_SIZE
        self.bytes_in += length
        group = ChunkGroup()
        if length <= INLINE_MAX:
            # a small run is written by the calling thread: handing it to the pool and back cost more than the
            # work (a process has ~20 small regions; 256 small images spent most of their time in the hand-offs)
            self._collect(group, *self._work(group, page, npages, produce, zero_skip, hashing, scattered))
            return group
        fut = self._pool.submit(self._work, group, page, npages, produce, zero_skip, hashing, scattered)
        self._pending.append((group, fut))
        if len(self._pending) >= self._max_pending:
            self.drain(keep=self._max_pending // 2)
        return group

    def add_chunk(self, page: int, npages: int, data) -> ChunkGroup:
        """Queue a chunk from bytes already in hand."""
        def produce(buf, data=bytes(data)):
            buf[:len(data)] = data
        return self.submit(page, npages, produce)

    def _buffer(self, length: int):
        """A per-thread buffer, page-aligned (an anonymous mapping) so that direct I/O can write from it."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < length:
            buf = self._local.buf = mmap.mmap(-1, max(length, CHUNK_PAGES * PAGE_SIZE))
        return buf

    def _reserve(self, length: int) -> int:
        """File space for a chunk, taken by the worker that wrote it once it knows its stored length; every
        chunk starts on an ALIGN boundary (the gap after a compressed one is zero padding)."""
        with self._lock:
            off = self.pos
            self.pos += length + (-length) % ALIGN
            return off

    def _work(self, group: ChunkGroup, page: int, npages: int, produce, zero_skip: bool, hashing,
              scattered: tuple[list, Any, bytes] | None):
        raw = self._buffer(npages * PAGE_SIZE)
        view = memoryview(raw)[:npages * PAGE_SIZE]
        produce(view)
        if scattered is not None:        # (write tracking: one hashing call for all the runs, not one a run)
            runs = changed_runs_scattered(view, *scattered, zero_skip)     # (page in the buffer, pages, in region)
        else:
            if hashing is not None:      # incremental images: hash pages, store the changed ones
                found = changed_runs(view, npages, hashing, zero_skip)
            else:
                found = _nonzero_runs(view, npages) if zero_skip else [(0, npages)]
            runs = [(first, k, page + first) for first, k in found]
        # all runs of a chunk go to one reserved extent in one pwritev and one write-behind: an incremental image
        # has a run per changed page, and a system call or two per 4 KiB page cost ~50 us each
        parts: list[tuple[int, int, bytes | memoryview, str]] = []
        for first, n, page in runs:
            part = view[first * PAGE_SIZE:(first + n) * PAGE_SIZE]
            if self.compress:
                data, codec = self._compressor().compress(part)
                parts.append((page, n, data, codec))
            else:
                parts.append((page, n, part, CODEC_RAW))
        stored = []
        if parts:
            total = sum(len(d) + (-len(d)) % ALIGN for _, _, d, _ in parts)
            off = base = self._reserve(total)
            iov: list[bytes | memoryview] = []
            for page, n, piece, codec in parts:
                stored.append(Chunk(page, n, off, len(piece), crc32(piece), codec, self._tagger.tag(piece)))
                iov.append(piece)
                pad = (-len(piece)) % ALIGN
                if pad:
                    iov.append(ZEROS[:pad])
                off += len(piece) + pad
            if not self._write_direct(iov, base, total):
                pwritev_all(self.fd, iov, base)
                if total >= WRITE_BEHIND_MIN:         # (smaller: all at once in commit_images)
                    write_behind(self.fd, base, total)
        return npages - sum(n for _, n, _ in runs), stored   # pages left out (all zero, or unchanged)

    def _write_direct(self, iov: list, off: int, total: int) -> bool:
        """Large raw page data goes to the disk from our buffer with O_DIRECT: no copy into the page cache, no
        writeback work, no page-cache memory to allocate (on this VM ~1.6 s/GiB when the memory went back to the
        host) - 0.08 CPU s/GiB against 0.33 written through the page cache, and several writers of one file do
        not contend for its pages (bench/RESULTS-mpi.md). Raw pieces are page-aligned slices of the page-aligned
        buffer (_buffer), so the alignment O_DIRECT wants holds by construction. False: write it buffered (small
        or compressed, no direct I/O on this file system, or it refused this write). Durability is unchanged:
        the image is fsync'ed (allocation, the device's cache) before it is given its final name."""
        if not self._direct or total < DIRECT_MIN:
            return False
        if self.dfd < 0:
            with self._lock:
                if self.dfd < 0 and self._direct:
                    self.dfd = self._dfd_open = open_direct(self.fd)
                    self._direct = self.dfd >= 0
            if self.dfd < 0:
                return False
        try:
            pwritev_all(self.dfd, iov, off, rest_fd=self.fd)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            log.info("%s: direct I/O refused (%s); writing through the page cache", self.final_path, e)
            self.dfd, self._direct = -1, False      # (closed with the writer; the range is redone buffered)
            return False
        return True

    def _compressor(self) -> Compressor:
        z = getattr(self._local, "zstd", None)
        if z is None:
            z = self._local.zstd = Compressor(self.level, self.shuffle)
        return z

    def drain(self, keep: int = 0) -> None:
        """Wait for queued chunks (all but `keep` of them) to be written; fills in their ChunkGroups."""
        while len(self._pending) > keep:
            group, fut = self._pending.pop(0)
            self._collect(group, *fut.result())

    def _collect(self, group: ChunkGroup, left_out: int, stored: list[Chunk]) -> None:
        self.zero_pages += left_out
        for chunk in stored:
            self.bytes_out += chunk.length
            group.append(chunk)

    # -- commit ----------------------------------------------------------------------------------------------
    def finish(self, meta: dict, durable: bool = True) -> str:
        """Write metadata and header, fsync, and atomically give the file its final name. Chunks get their
        file offsets when written: call drain() before putting them into the metadata. durable=False: the image
        is left complete but not fsync'ed under its .tmp name, for commit_images() to make durable together
        with the other images of its generation."""
        self.drain()
        self._release_pool()
        self._close_direct()
        if isinstance(meta, dict):       # (tests write other JSON on purpose: refused when read back)
            meta = dict(meta, auth={"signer_uid": self.signer, "chunk_mac": self._tagger.algo})
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
        meta_off = self.pos
        pwrite_all(self.fd, meta_bytes, meta_off)
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, meta_off, len(meta_bytes), crc32(meta_bytes),
                              meta_off)
        signed = header + struct.pack("<I", self.signer)
        os.pwrite(self.fd, signed + auth.meta_mac(self._key, signed, meta_bytes), 0)
        if not durable:
            os.close(self.fd)
            self._closed = True
            return self.tmp_path
        os.fsync(self.fd)
        fault("dump.before_commit")
        os.close(self.fd)
        self._closed = True
        os.rename(self.tmp_path, self.final_path)
        return self.final_path

    def abort(self) -> None:
        for _, f in self._pending:
            f.cancel()
        if self._own_pool:
            self._pool.shutdown(wait=True)
        else:                  # (a shared pool runs on; our chunks still running must not write after the unlink)
            for _, f in self._pending:
                if not f.cancelled():
                    try:
                        f.result()
                    except BaseException:
                        pass
        self._pending.clear()
        self._close_direct()
        if not self._closed:
            os.close(self.fd)
            self._closed = True
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass


    def _close_direct(self) -> None:
        fd, self.dfd = getattr(self, "_dfd_open", -1), -1
        if fd >= 0:
            os.close(fd)
            self._dfd_open = -1

    def _release_pool(self) -> None:
        if self._own_pool:
            self._pool.shutdown()


def chunk_pool(compress: bool = False, threads: int = 0) -> ThreadPoolExecutor:
    """The threads that read, checksum, tag (compress) and write chunks: one per core compressing, else up to
    4 (reading another process's memory and pwrite release the GIL and overlap)."""
    ncpu = max(1, os.cpu_count() or 1)
    n = threads or (ncpu if compress else min(4, ncpu + 1))
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="imgw")
    # start all n threads now: an executor adds threads only when none is idle, so a pool made lazily would
    # still be growing at a later checkpoint (a thread started mid-write, in the program's time)
    gate = threading.Barrier(n)
    for f in [pool.submit(gate.wait) for _ in range(n)]:
        f.result()
    return pool


_SYNC_BATCH = 256             # files open at once while committing (within a default limit of 1024 descriptors)


def commit_images(final_paths: list[str]) -> None:
    """Make images written with finish(durable=False) durable, then give each its final name: every image is
    fsync'ed before any is renamed, so a crash or an error anywhere here leaves no image of the batch with a
    final name that is not durable, and the generation is not reported written (the caller fsyncs the directory
    and only then reports). Writeback of every image was started while it was written (write_behind): the
    fsyncs mostly wait, and the first one's journal commit covers the other files' metadata."""
    fault("dump.before_fsync")
    for i in range(0, len(final_paths), _SYNC_BATCH):
        fds: list[int] = []
        try:
            for path in final_paths[i:i + _SYNC_BATCH]:     # writeback of every file started, then waited for
                fds.append(os.open(path + ".tmp", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
                write_behind(fds[-1], 0, 0)
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
    for path in final_paths:
        fault("dump.before_commit")
        os.rename(path + ".tmp", path)


class ChunkGroup(list):
    """The chunks one submitted run of pages became (filled in when written)."""


ZERO_PAGE = bytes(PAGE_SIZE)


def _nonzero_runs(view: memoryview, npages: int) -> list[tuple[int, int]]:
    """Runs (first, count) of pages that are not all zero. Only pages whose first 8 bytes are zero are compared
    in full, so data pages cost one cache line each."""
    heads = view.cast("Q")[::PAGE_SIZE // 8].tolist()
    if 0 not in heads:
        return [(0, npages)]              # the common case
    runs: list[tuple[int, int]] = []
    for i, head in enumerate(heads):
        if head == 0 and view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] == ZERO_PAGE:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _signing_key(path: str) -> tuple[int, bytes, auth.ChunkTagger]:
    """Our uid, key (made if missing) and chunk tagger, for a writer."""
    try:
        key = auth.key_for(create=True)
    except auth.AuthError as e:
        raise ImageError(f"{path}: cannot sign the image: {e}") from None
    return os.geteuid(), key, auth.ChunkTagger(key)


def _authenticate(path: str, version: int, head: bytes, raw: bytes, meta, trust: bool | None):
    """(signer uid or None, chunk tagger or None) of an image whose metadata raw is; raises ImageError for an
    image that is not authentic, unless trusted explicitly (trust; default: auth.trust_unsigned())."""
    trust = auth.trust_unsigned() if trust is None else trust
    how = "restart with --trust-unsigned only if you know where it came from"
    if version == UNSIGNED_VERSION:
        if trust:
            return None, None
        raise ImageError(f"{path}: unsigned image (format {version}, no MAC); {how}")
    signer, mac = _AUTH.unpack(head[_HEADER.size:_HEADER.size + _AUTH.size])
    try:
        key = auth.key_for(signer)
        algo = meta.get("auth", {}).get("chunk_mac", "")
        ok = auth.hmac.compare_digest(auth.meta_mac(key, head[:_HEADER.size + 4], raw), mac)
        if ok:
            return signer, auth.ChunkTagger(key, algo)
        why = "its MAC does not match: it was altered, or signed with another key"
    except (auth.AuthError, ValueError, AttributeError) as e:
        why = str(e)
    if trust:
        return None, None
    raise ImageError(f"{path}: not authentic ({why}); {how}")


def resign(path: str) -> None:
    """Sign an image again with our key (its header and metadata as they are now): for tools and tests that
    edit an image's metadata on purpose (format 2 images only)."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        head = bytearray(os.pread(fd, HEADER_SIZE, 0))
        magic, version, flags, meta_off, meta_len, meta_crc, data_end = _HEADER.unpack_from(head)
        if magic != MAGIC or version != FORMAT_VERSION:
            raise ImageError(f"{path}: not a format {FORMAT_VERSION} image, cannot sign it")
        raw = os.pread(fd, meta_len, meta_off)
        key = auth.key_for(create=True)
        signed = bytes(head[:_HEADER.size]) + struct.pack("<I", os.geteuid())
        os.pwrite(fd, signed + auth.meta_mac(key, signed, raw), 0)
    finally:
        os.close(fd)


class ImageReader:
    """Reads an image's metadata and chunks, checking what it reads: the metadata's MAC on opening (refused
    if it does not verify), each chunk's checksum and tag when the chunk is read."""

    def __init__(self, path: str, trust_unsigned: bool | None = None):
        self.path = path
        self.fd = -1
        self.fd, self.size = open_image_file(path)
        try:
            self.meta = self._read_meta(trust_unsigned)
        except BaseException:
            self.close()
            raise
        self.authenticated = self.signer is not None

    def _read_meta(self, trust_unsigned: bool | None) -> dict:
        path = self.path
        head = os.pread(self.fd, _HEADER.size + _AUTH.size, 0)
        if len(head) < _HEADER.size + _AUTH.size or not head.startswith(MAGIC):
            raise ImageError(f"{path}: not an hpcckpt checkpoint image (bad magic)")
        _, version, _, meta_off, meta_len, meta_crc, _ = _HEADER.unpack(head[:_HEADER.size])
        if version not in (FORMAT_VERSION, UNSIGNED_VERSION):
            raise ImageError(f"{path}: image format version {version}, this hpcckpt reads {FORMAT_VERSION}")
        if meta_off < HEADER_SIZE or meta_len == 0 or meta_off + meta_len > self.size:
            raise ImageError(f"{path}: truncated or unfinished image ({self.size} bytes, metadata expected at "
                             f"{meta_off}+{meta_len})")
        raw = os.pread(self.fd, meta_len, meta_off)
        if len(raw) != meta_len or crc32(raw) != meta_crc:
            raise ImageError(f"{path}: corrupted image (metadata checksum mismatch)")
        meta = parse_meta(path, raw)
        try:
            self.signer, self._tagger = _authenticate(path, version, head, raw, meta, trust_unsigned)
        except ValueError as e:
            raise ImageError(f"{path}: corrupted image ({e})") from None
        return meta

    def chunk_ok(self, chunk: Chunk, stored) -> bool:
        """The stored bytes are the chunk's: the keyed tag of an authenticated image (which also catches what
        the CRC would: ~0.07 CPU-s/GiB less at restore), else the CRC-32."""
        if len(stored) != chunk.length:
            return False
        if self._tagger is not None:
            return self._tagger.ok(stored, chunk.mac)
        return crc32(stored) == chunk.crc

    def read_chunk(self, chunk: Chunk, out=None):
        """The chunk's page data (decompressed), verified against its checksum. out: a writable buffer the data
        may be put in (then returned as a view of it) instead of new memory."""
        if chunk.off + chunk.length > self.size:
            raise ImageError(f"{self.path}: truncated image (chunk at {chunk.off} beyond end of file)")
        stored = os.pread(self.fd, chunk.length, chunk.off)
        if not self.chunk_ok(chunk, stored):
            raise ImageError(f"{self.path}: corrupted or altered image (checksum or MAC mismatch in chunk at offset "
                             f"{chunk.off})")
        if chunk.codec == CODEC_RAW:
            return stored
        if chunk.codec in CODECS:
            return decode_chunk(self.path, chunk, stored, out)
        raise ImageError(f"{self.path}: unknown chunk codec {chunk.codec!r}")

    def verify(self) -> int:
        """Check every chunk's checksum; returns the number of chunks checked."""
        n = 0
        for chunk in iter_chunks(self.meta):
            self.read_chunk(chunk)
            n += 1
        return n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_image_file(path: str) -> tuple[int, int]:
    """Open an image for reading: (fd, size). Only a regular file is an image: a FIFO would block the open (or
    the reads) forever, a directory or device would fail or read endlessly. O_NONBLOCK makes the open of a FIFO
    return at once so fstat can refuse it; it has no effect on a regular file's reads. Symbolic links are
    followed (checkpoint directories are often reached through them)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise ImageError(f"{path or repr(path)}: no such checkpoint image") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except OSError as e:
        try:                      # (a socket cannot be opened at all: ENXIO; say what it is)
            kind = _file_kind(os.stat(path).st_mode)
        except OSError:
            kind = ""
        if kind and kind != "special file":
            raise ImageError(f"{path}: is a {kind}, not a checkpoint image") from None
        raise ImageError(f"{path}: cannot open checkpoint image: {e.strerror}") from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise ImageError(f"{path}: cannot stat checkpoint image: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ImageError(f"{path}: is a {_file_kind(st.st_mode)}, not a checkpoint image")
    return fd, st.st_size


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def parse_meta(path: str, raw: bytes) -> dict:
    """The metadata JSON of an image (a CRC-valid header says where it is): a JSON object or an ImageError;
    its contents are checked by image/validate.py."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ImageError(f"{path}: corrupted image (metadata is not valid UTF-8 JSON: {str(e)[:80]})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("process", {}), dict):
        raise ImageError(f"{path}: corrupted image (metadata is not an image description)")
    return meta


def decode_chunk(path: str, chunk: Chunk, stored: bytes, out=None):
    """A compressed chunk's pages: exactly npages pages, or an ImageError (a frame that does not decompress or
    decompresses to another size would restore wrong memory: only possible with edited metadata, whose chunk
    checksum was recomputed)."""
    want = chunk.npages * PAGE_SIZE
    try:
        data = decompress(stored, chunk.codec, want, out)
    except Exception as e:            # zstandard.ZstdError and alike: the library's own error types
        raise ImageError(f"{path}: corrupted image (chunk at offset {chunk.off} does not decompress: "
                         f"{str(e)[:80]})") from None
    if len(data) != want:
        raise ImageError(f"{path}: corrupted image (chunk at offset {chunk.off} holds {len(data)} bytes, "
                         f"{want} expected)")
    return data


def iter_chunks(meta: dict):
    for region in meta.get("process", {}).get("regions", []):
        for c in region.get("chunks", []):
            yield Chunk.from_json(c)

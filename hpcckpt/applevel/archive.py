"""The archive of a program's restart files: what an agent records for a generation in application-level mode.

    <magic> <file 1 bytes> <file 2 bytes> ... <header JSON> <u64 header length> <32-byte HMAC-SHA256>

The header names the computation, generation, the files (absolute path, size, mode, mtime, keyed tags of their
4 MiB chunks: image/auth.py's ChunkTagger) and the program's restart command; the HMAC (the user's key,
its own subkey) covers magic, header and length, so an edited header or file is refused at restart, as an
edited image is. Written as NAME.tmp, fsync'ed, renamed: an archive exists only complete.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import time
from dataclasses import asdict, dataclass, field

from ..image import auth
from .trigger import FileState

MAGIC = b"HPCCKPT-APPLEVEL-1\n"
CHUNK = 4 << 20
_TRAILER = struct.Struct("<Q32s")


class ArchiveError(Exception):
    """Not an archive, not authentic, or a file in it does not match; one line naming the archive."""


@dataclass
class Header:
    computation: str
    generation: int
    unique_id: str
    program: str
    host: str
    cwd: str
    restart: str | None                     # the program's restart command (app_restart) when recorded
    patterns: list[str]                     # the globs the files were found by
    files: list[dict] = field(default_factory=list)   # path, size, mode, mtime_ns, tags
    settings: dict = field(default_factory=dict)       # app_signal, app_command, app_settle, app_timeout
    path_prefix: str = ""                   # DMTCP_PATH_PREFIX at checkpoint (engine/pathvirt.py)
    created: float = 0.0
    signer_uid: int = 0


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(auth.subkey(key, "applevel archive"), body, hashlib.sha256).digest()


def write(path: str, header: Header, files: list[FileState]) -> int:
    """Copy the files into the archive at path; returns its size. ArchiveError if a file changed meanwhile."""
    key = auth.key_for(create=True)
    tagger = auth.ChunkTagger(key)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, MAGIC)
        for f in files:
            tags = []
            try:
                src = os.open(f.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as e:
                raise ArchiveError(f"cannot read restart file {f.path}: {e.strerror}") from None
            try:
                left = f.size
                while left > 0:
                    data = os.read(src, min(CHUNK, left))
                    if not data:
                        break
                    tags.append(tagger.tag(data))
                    _write_all(fd, data)
                    left -= len(data)
                st = os.fstat(src)
            finally:
                os.close(src)
            if left or (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
                raise ArchiveError(f"restart file {f.path} changed while it was being recorded")
            header.files.append({"path": f.path, "size": f.size, "mode": f.mode, "mtime_ns": f.mtime_ns,
                                 "tags": tags})
        header.created = time.time()
        header.signer_uid = os.geteuid()
        body = json.dumps(dict(asdict(header), algo=tagger.algo), sort_keys=True).encode()
        _write_all(fd, body + _TRAILER.pack(len(body), _mac(key, MAGIC + body + struct.pack("<Q", len(body)))))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    size = os.fstat(fd).st_size
    os.close(fd)
    os.rename(tmp, path)
    return size


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Reader:
    """An archive opened and its header authenticated (ArchiveError otherwise)."""

    def __init__(self, path: str, trust: bool | None = None):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise ArchiveError(f"{path}: cannot open: {e.strerror}") from None
        try:
            self.header, self.algo = self._read_header(auth.trust_unsigned() if trust is None else trust)
        except BaseException:
            os.close(self.fd)
            raise

    def _read_header(self, trust: bool) -> tuple[Header, str]:
        size = os.fstat(self.fd).st_size
        if size < len(MAGIC) + _TRAILER.size or os.pread(self.fd, len(MAGIC), 0) != MAGIC:
            raise ArchiveError(f"{self.path}: not an application-level checkpoint archive")
        n, mac = _TRAILER.unpack(os.pread(self.fd, _TRAILER.size, size - _TRAILER.size))
        if n > min(size, 64 << 20):
            raise ArchiveError(f"{self.path}: damaged (header length {n})")
        body = os.pread(self.fd, n, size - _TRAILER.size - n)
        try:
            d = json.loads(body)
            signer = int(d["signer_uid"])
        except (ValueError, KeyError, TypeError):
            raise ArchiveError(f"{self.path}: damaged (header is not readable)") from None
        how = "restart with --trust-unsigned only if you know where it came from"
        if not trust:
            try:
                key = auth.key_for(signer)
            except auth.AuthError as e:
                raise ArchiveError(f"{self.path}: not authentic ({e}); {how}") from None
            if not hmac.compare_digest(_mac(key, MAGIC + body + struct.pack("<Q", n)), mac):
                raise ArchiveError(f"{self.path}: not authentic (its MAC does not match: it was altered, or "
                                   f"signed with another key); {how}")
        algo = d.pop("algo", auth.CHUNK_ALGO)
        try:
            h = Header(**d)
            total = sum(int(f["size"]) for f in h.files)
        except (TypeError, KeyError, ValueError):
            raise ArchiveError(f"{self.path}: damaged (header fields)") from None
        if len(MAGIC) + total + n + _TRAILER.size != size:
            raise ArchiveError(f"{self.path}: damaged (size does not match its header)")
        return h, algo

    def close(self) -> None:
        os.close(self.fd)

    def extract(self, target: dict[str, str], verify: bool = True) -> list[tuple[str, str, dict]]:
        """Write each file to a new temporary file next to target[path] (the path it is restored to), checking
        its tags; returns (tmp, final, file) rows. Nothing is renamed here: the caller renames them all once
        every file verified (restore.put_back). ArchiveError (temporary files removed) if one does not verify."""
        key = auth.key_for(self.header.signer_uid) if verify and not auth.trust_unsigned() else None
        tagger = auth.ChunkTagger(key, self.algo) if key is not None else None
        done: list[tuple[str, str, dict]] = []
        off = len(MAGIC)
        try:
            for f in self.header.files:
                final = target[f["path"]]
                tmp = f"{final}.hpcckpt-{os.urandom(4).hex()}.tmp"
                out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                done.append((tmp, final, f))
                try:
                    left, i = int(f["size"]), 0
                    while left > 0:
                        data = os.pread(self.fd, min(CHUNK, left), off)
                        if not data:
                            raise ArchiveError(f"{self.path}: truncated")
                        if tagger is not None and (i >= len(f["tags"]) or not tagger.ok(data, f["tags"][i])):
                            raise ArchiveError(f"{self.path}: the recorded copy of {f['path']} does not match "
                                               f"its checksum (altered or damaged); restart refused")
                        _write_all(out, data)
                        off += len(data)
                        left -= len(data)
                        i += 1
                    os.fchmod(out, int(f["mode"]) & 0o7777)
                    os.fsync(out)
                finally:
                    os.close(out)
                os.utime(tmp, ns=(int(f["mtime_ns"]), int(f["mtime_ns"])))
        except BaseException:
            for tmp, _, _ in done:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            raise
        return done


def describe(path: str, verify: bool = False, as_json: bool = False) -> str:
    """What `hpcckpt inspect` prints for an archive; verify: check the MAC (else only read) and every file's
    chunk tags. ArchiveError names what is wrong."""
    r = Reader(path, trust=not verify)
    try:
        h = r.header
        if verify:
            tagger = auth.ChunkTagger(auth.key_for(h.signer_uid), r.algo)
            off, n = len(MAGIC), 0
            for f in h.files:
                left, i = int(f["size"]), 0
                while left > 0:
                    data = os.pread(r.fd, min(CHUNK, left), off)
                    if not data or i >= len(f["tags"]) or not tagger.ok(data, f["tags"][i]):
                        raise ArchiveError(f"{path}: the recorded copy of {f['path']} does not match its checksum")
                    off, left, i, n = off + len(data), left - len(data), i + 1, n + 1
        if as_json:
            return json.dumps(asdict(h), indent=1)
        lines = [f"{path}: application-level checkpoint of {h.program} (computation {h.computation}, generation "
                 f"{h.generation}, host {h.host}, signed by uid {h.signer_uid})",
                 f"  working directory {h.cwd}; restart command: {h.restart or '(none recorded)'}",
                 f"  files ({' '.join(h.patterns)}):"]
        lines += [f"    {f['path']}  {f['size']} bytes  mode {int(f['mode']):o}" for f in h.files]
        if verify:
            lines.append(f"  verified {n} chunks (MAC and keyed tags): OK")
        return "\n".join(lines)
    finally:
        r.close()

"""--checkpoint-open-files (DMTCP_CHECKPOINT_OPEN_FILES): the contents of every regular file open at checkpoint
are saved in the image, so that a file changed or deleted later comes back as it was.

At restart (DMTCP's rules):
  - the file is missing: it is created (with its directories) from the saved copy;
  - it holds the saved contents (possibly followed by more, written after the checkpoint: compared over the saved
    length, as DMTCP does; a writable file is then cut back to it): nothing to do;
  - it holds other contents: with --allow-file-overwrite the existing file is kept as PATH.<time>.bk and the saved
    copy put in its place; without, the restart refuses, naming the file.
Files of pseudo file systems (/proc, /sys, /dev) and files over `max_bytes` are not saved (logged).
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass

from ...image.fdstate import FileState
from ..errors import UnsupportedFd

log = logging.getLogger(__name__)

_PSEUDO = ("/proc/", "/sys/", "/dev/")


def _env_flag(*names: str) -> bool:
    return any(os.environ.get(n, "").strip().lower() in ("1", "yes", "true", "on", "y") for n in names)


@dataclass
class Policy:
    enabled: bool = False
    max_bytes: int = 256 << 20
    allow_overwrite: bool = False


def _from_env() -> Policy:
    try:
        limit = int(os.environ.get("HPCCKPT_OPEN_FILE_MAX_BYTES") or (256 << 20))
    except ValueError:
        limit = 256 << 20
    return Policy(_env_flag("DMTCP_CHECKPOINT_OPEN_FILES", "DMTCP_CKPT_OPEN_FILES"), limit,
                  _env_flag("DMTCP_ALLOW_FILE_OVERWRITE", "DMTCP_ALLOW_OVERWRITE_WITH_CKPTED_FILES"))


POLICY = _from_env()


def configure(enabled: bool, max_bytes: int, allow_overwrite: bool) -> None:
    POLICY.enabled, POLICY.max_bytes, POLICY.allow_overwrite = enabled, max_bytes, allow_overwrite


def save(ctx, oid: str, state: FileState, pid: int, fd: int) -> None:
    """Put the file's contents into the image (blob `oid`), if the policy says so."""
    path = state.path
    if not POLICY.enabled or path.startswith(_PSEUDO):
        return
    link = f"/proc/{pid}/fd/{fd}"
    try:
        size = os.stat(link).st_size
        if size > POLICY.max_bytes:
            log.warning("open file %s (pid %d fd %d) is %d bytes, over the %d of HPCCKPT_OPEN_FILE_MAX_BYTES: its "
                        "contents are not saved", path, pid, fd, size, POLICY.max_bytes)
            return
        with open(link, "rb") as f:        # a description of our own: the process's offset stays
            data = f.read()
    except OSError as e:
        log.warning("cannot save the contents of open file %s (pid %d fd %d): %s", path, pid, fd, e.strerror)
        return
    ctx.blobs[oid] = data
    state.saved = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                      "mode": os.stat(link).st_mode & 0o7777}
    log.info("saved the %d bytes of open file %s (pid %d fd %d)", len(data), path, pid, fd)


def _same(path: str, digest: str, size: int) -> bool:
    """The file still starts with the saved contents. Like DMTCP, only the saved length is compared: a file that
    only grew since (a log) is not "changed"; a writable one is cut back to that length on release (files.py)."""
    h = hashlib.sha256()
    left = size
    with open(path, "rb") as f:
        while left > 0:
            block = f.read(min(1 << 20, left))
            if not block:
                return False            # shorter than at the checkpoint
            h.update(block)
            left -= len(block)
    return h.hexdigest() == digest


def _write(path: str, data: bytes, mode: int) -> None:
    tmp = f"{path}.hpcckpt-restore-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def restore(factory, state: FileState) -> None:
    """Before the file is reopened: make it hold its saved contents (the rules above)."""
    saved = state.saved
    if not saved:
        return
    path = state.path
    try:
        if os.path.exists(path) and _same(path, saved["sha256"], saved["size"]):
            return
    except OSError as e:
        raise UnsupportedFd(f"cannot read {path} to compare it with its checkpointed copy: {e.strerror}") from None
    data = factory.read_blob(state.id)
    try:
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            _write(path, data, saved.get("mode", 0o600))
            log.info("restored %s (%d bytes) from its checkpointed copy", path, len(data))
            return
        if not POLICY.allow_overwrite:
            raise UnsupportedFd(f"{path} changed since the checkpoint and its checkpointed copy cannot be put back: "
                                f"delete or move it, or restart with --allow-file-overwrite "
                                f"(DMTCP_ALLOW_FILE_OVERWRITE=1)")
        backup = f"{path}.{time.strftime('%Y-%m-%d-%H-%M-%S')}.bk"
        os.link(path, backup)
        _write(path, data, saved.get("mode", 0o600))
        log.warning("%s changed since the checkpoint: its checkpointed copy put back, the changed file kept as %s",
                    path, backup)
    except OSError as e:
        raise UnsupportedFd(f"cannot put back the checkpointed copy of {path}: {e.strerror}") from None

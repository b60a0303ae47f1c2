"""The checkpoint directory's event journal: one JSON object per line in <ckptdir>/hpcckpt-events.jsonl, appended
by the coordinator (checkpoints committed or failed) and by the batch driver (runs, deadlines, requeues), read
by `hpcckpt status`. It is a history for people, never an input to a restart: manifests alone say what is
complete.

Lines are appended with O_APPEND in one write each (whole lines even with several writers on one host); the
file is created 0600 without following a symlink planted in its place, and refused if it is not ours. Past
4 MiB it is moved to hpcckpt-events.jsonl.1 (one older file kept): a week of one-minute checkpoints is ~2 MB.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import time

log = logging.getLogger(__name__)

NAME = "hpcckpt-events.jsonl"
MAX_BYTES = 4 << 20


def path_in(ckptdir: str) -> str:
    return os.path.join(os.path.abspath(ckptdir), NAME)


def record(ckptdir: str, event: str, **fields) -> None:
    """Append one event; a failure to write the journal is logged and otherwise ignored (it is history)."""
    path = path_in(ckptdir)
    line = json.dumps({"time": round(time.time(), 3), "event": event, **fields}, separators=(",", ":")) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        log.debug("cannot open the event journal %s: %s", path, e)
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            log.warning("event journal %s is not a regular file of ours; not writing to it", path)
            return
        if st.st_size > MAX_BYTES:
            try:
                os.rename(path, path + ".1")
            except OSError:
                pass
        os.write(fd, line.encode())
    except OSError as e:
        log.debug("cannot write the event journal %s: %s", path, e)
    finally:
        os.close(fd)


def read(ckptdir: str, limit: int = 100_000) -> list[dict]:
    """The events, oldest first (the rotated file's too); lines that are not JSON objects are skipped."""
    out: list[dict] = []
    for p in (path_in(ckptdir) + ".1", path_in(ckptdir)):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            with os.fdopen(fd, "rb", closefd=False) as f:
                for raw in f:
                    try:
                        ev = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(ev, dict) and isinstance(ev.get("event"), str):
                        out.append(ev)
        finally:
            os.close(fd)
    return out[-limit:]

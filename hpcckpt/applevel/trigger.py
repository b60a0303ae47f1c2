"""Ask the program for its restart files, and wait until they are written: new since the request, and unchanged
(names, sizes, modification times) for the settle time. Bounded: a timeout fails the round."""
from __future__ import annotations

import glob
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..settings import Settings, signal_number

log = logging.getLogger("hpcckpt.applevel")


class AppLevelError(Exception):
    """The round cannot record the program's files; one line naming what and what to do."""


@dataclass(frozen=True)
class FileState:
    path: str            # absolute
    size: int
    mtime_ns: int
    mode: int


def catches(pid: int, signo: int) -> bool:
    """Does the process have a handler for signo (SigCgt of /proc/PID/status)?"""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signo - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def ask(s: Settings, pids: list[int], root: int, cwd: str, generation: int, tick: Callable[[], None]) -> None:
    """Tell the program to write its restart files: run app_command, or send app_signal to every process of the
    job that handles it (a wrapper shell that does not is left alone; with no handler anywhere, the root)."""
    if s.app_command:
        env = dict(os.environ, HPCCKPT_GENERATION=str(generation), HPCCKPT_PIDS=" ".join(map(str, pids)))
        log.info("generation %d: running %s", generation, s.app_command)
        try:
            p = subprocess.Popen(shlex.split(s.app_command), cwd=cwd, env=env, stdin=subprocess.DEVNULL)
        except OSError as e:
            raise AppLevelError(f"app_command {s.app_command!r} cannot run: {e.strerror}") from None
        deadline = time.monotonic() + s.app_timeout
        while p.poll() is None:
            if time.monotonic() > deadline:
                p.kill()
                p.wait()
                raise AppLevelError(f"app_command {s.app_command!r} did not end within {s.app_timeout:.0f} s")
            tick()
            time.sleep(0.05)
        if p.returncode != 0:
            raise AppLevelError(f"app_command {s.app_command!r} failed with status {p.returncode}")
        return
    signo = signal_number(s.app_signal)
    targets = [pid for pid in pids if catches(pid, signo)] or [root]
    if targets == [root] and not catches(root, signo):
        raise AppLevelError(f"no process of the job handles SIG{signal.Signals(signo).name.removeprefix('SIG')} "
                            f"(app_signal) yet: sending it would kill the program; install its handler first "
                            f"or set app_command")
    log.info("generation %d: sending %s to %s", generation, signal.Signals(signo).name,
             ", ".join(map(str, targets)))
    for pid in targets:
        try:
            os.kill(pid, signo)
        except ProcessLookupError:
            pass


def scan(patterns: list[str], cwd: str) -> dict[str, FileState]:
    """The regular files the globs match now (relative globs are relative to the job's working directory)."""
    out = {}
    for pat in patterns:
        for path in glob.glob(pat if os.path.isabs(pat) else os.path.join(cwd, pat)):
            try:
                st = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if os.path.isfile(path) and not os.path.islink(path):
                out[os.path.abspath(path)] = FileState(os.path.abspath(path), st.st_size, st.st_mtime_ns,
                                                       st.st_mode & 0o7777)
    return out


def wait_stable(s: Settings, patterns: list[str], cwd: str, since_ns: int, tick: Callable[[], None],
                alive: Callable[[], bool]) -> list[FileState]:
    """Wait until some file the globs match was written after since_ns and none has changed for app_settle
    seconds; returns them. AppLevelError after app_timeout, or when the program ended meanwhile."""
    start = time.monotonic()
    deadline = start + s.app_timeout
    last: dict[str, FileState] = {}
    stable_since = time.monotonic()
    while True:
        now_files = scan(patterns, cwd)
        now = time.monotonic()
        if now_files != last:
            last, stable_since = now_files, now
        fresh = any(f.mtime_ns >= since_ns for f in last.values())
        if fresh and now - stable_since >= s.app_settle:
            log.info("restart files stable for %.1f s after %.1f s: %s", s.app_settle, now - start,
                     ", ".join(sorted(os.path.basename(p) for p in last)))
            return sorted(last.values(), key=lambda f: f.path)
        if now > deadline:
            what = "still changing" if fresh else "not written" if not last else "not rewritten (all older than " \
                "the request)"
            raise AppLevelError(f"the program's restart files ({' '.join(patterns)}) were {what} after "
                                f"{s.app_timeout:.0f} s (app_timeout); the previous checkpoint is kept")
        if not alive():
            raise AppLevelError("the program ended before its restart files were complete")
        tick()
        time.sleep(min(0.1, s.app_settle / 4))

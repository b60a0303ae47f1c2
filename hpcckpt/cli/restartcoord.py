"""The coordinator of a restart, found or started from the restart's first moments (issue 20: restart-to-running).

Starting a coordinator is a Python process of its own (0.2-0.6 s until it listens). Started only once the
restart had imported its engine, opened its images and restored its processes, it was the longest step between
`dmtcp_restart` and the program running again. Now `begin()` forks a small starter as soon as the settings are
known, before the restart imports anything heavy or opens any image (so the starter holds no image, lock or
secret of the restart's), and the starter finds or starts the coordinator (agent/join.find_or_start) while the
restart goes on. The first `ask()` - the agent about to join, or the restart itself for a multi-host restart -
takes its answer; later ones look anew (an agent that lost its coordinator).

What finding it logs ("started a coordinator on ...") is passed along and logged by the first ask(), so a
restart that fails first (a bad image, a computation still running) says its one line alone. Such a restart
never asks: the starter waits for the verdict on a pipe whose write end the restart's processes hold - "used"
from ask(), or end of file when they are all gone without asking - and on the latter stops the coordinator it
started (one it merely joined is left alone). Nobody waits for that."""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable

from ..coordinator.client import CoordinatorUnreachable, command, port_is_open
from .common import Fail

log = logging.getLogger("hpcckpt")


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, record.levelno, record.getMessage()))


class EarlyCoordinator:
    """find(): the coordinator's (host, port) per the restart's policy; may raise Fail. host, port, port_file:
    where the settings look (to tell a coordinator started from one joined)."""

    def __init__(self, find: Callable[[], tuple[str, int]], host: str, port: int, port_file: str | None):
        self.find = find
        self.where = (host, port, port_file)
        self.result_r = self.verdict_w = -1
        self.asked = False

    def begin(self) -> None:
        """Fork the starter (double fork: nobody needs to reap it). Call before opening any image or lock."""
        result_r, result_w = os.pipe2(os.O_CLOEXEC)
        verdict_r, verdict_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(result_r)
                os.close(verdict_w)
                if os.fork() == 0:
                    self._starter(result_w, verdict_r)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(result_w)
        os.close(verdict_r)
        os.waitpid(pid, 0)
        self.result_r, self.verdict_w = result_r, verdict_w

    def _starter(self, result_w: int, verdict_r: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)      # the restart's Ctrl-C is the restart's to handle
        # not the restart's terminal or pipes: whoever reads the restart's output sees its end when it ends
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        held = _Held()
        root = logging.getLogger()
        root.handlers = [held]
        out: dict = {}
        started = None
        try:
            host, port, port_file = self.where
            fresh = not port_file and (not port or not port_is_open(host, port))
            found = self.find()
            started = found if fresh else None
            out = {"ok": list(found), "started": started is not None}
        except Fail as e:
            out = {"error": str(e), "code": e.code}
        except BaseException as e:
            out = {"error": f"internal error finding the coordinator: {type(e).__name__}: {e}", "code": None}
        out["log"] = held.lines
        try:
            os.write(result_w, json.dumps(out).encode())
            os.close(result_w)
            verdict = os.read(verdict_r, 16)     # "used", or end of file: everyone left without asking
        except OSError:
            verdict = b""
        if not verdict and started is not None:
            try:
                command(started[0], started[1], "quit", timeout=2.0)
            except CoordinatorUnreachable:
                pass
        os._exit(0)

    def _result(self) -> dict:
        """What the starter found (waits for it)."""
        chunks = []
        while chunk := os.read(self.result_r, 65536):
            chunks.append(chunk)
        os.close(self.result_r)
        self.result_r = -1
        try:
            out = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            out = {}
        return out if isinstance(out, dict) else {}

    def abandon(self) -> None:
        """Not that coordinator after all (root restarting another user's images: theirs is started as them):
        the starter stops the one it started, and we wait until it no longer listens."""
        if self.result_r < 0:
            return
        out = self._result()
        os.close(self.verdict_w)            # end of file: the starter stops what it started
        self.verdict_w = -1
        if out.get("started") and "ok" in out:
            host, port = out["ok"]
            deadline = time.monotonic() + 10
            while port_is_open(host, port) and time.monotonic() < deadline:
                time.sleep(0.02)

    def ask(self) -> tuple[str, int]:
        """The coordinator's (host, port): the starter's answer the first time, a new look afterwards."""
        if self.asked or self.result_r < 0:
            return self.find()
        self.asked = True
        out = self._result()
        try:
            os.write(self.verdict_w, b"used")
        except OSError:
            pass
        for name, level, text in out.get("log", []):
            logging.getLogger(name).log(level, "%s", text)
        if "ok" in out:
            host, port = out["ok"]
            return str(host), int(port)
        if "error" in out:
            raise Fail(out["error"], out.get("code"))
        return self.find()          # the starter died: look ourselves

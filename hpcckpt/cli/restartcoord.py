"""The coordinator of a restart, found or started while the agent restores (issue 20: restart-to-running).

Starting a coordinator is a Python process of its own (~0.2-0.6 s to listen); started only once the agent had
restored and asked for it, it was the longest step between `dmtcp_restart` and the program running again. Now
the restart's coordinator service (cli/jobrun.py) finds or starts it as soon as it is forked, and answers the
agent's first request with that. What finding it logs ("started a coordinator on ...") is held until the agent
asks, and a coordinator started for a restart that failed before asking (an image that fails its checks while
restored) is stopped again: a failed restart still says one line and leaves nothing behind."""
from __future__ import annotations

import logging
from collections.abc import Callable

from ..coordinator.client import CoordinatorUnreachable, command, port_is_open
from .common import Fail


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class EarlyCoordinator:
    """find(): the coordinator's (host, port) per the restart's policy; may raise Fail. Use ask as run_job's
    find_coordinator and (start, end) as its service_hooks."""

    def __init__(self, find: Callable[[], tuple[str, int]], host: str, port: int, port_file: str | None):
        self.find = find
        # a coordinator we start ourselves (not one we join): nothing answered where we look
        self.starts_one = lambda: not port_file and (not port or not port_is_open(host, port))
        self.first: tuple[str, int] | Fail | None = None
        self.started: tuple[str, int] | None = None
        self.asked = False
        self.held = _Held()

    @property
    def hooks(self) -> tuple[Callable[[], None], Callable[[], None]]:
        return self.start, self.end

    def start(self) -> None:
        root = logging.getLogger()
        handlers, root.handlers = root.handlers, [self.held]
        try:
            fresh = self.starts_one()
            self.first = self.find()
            if fresh:
                self.started = self.first
        except Fail as e:
            self.first = e
        finally:
            root.handlers = handlers

    def ask(self) -> tuple[str, int]:
        """The first request gets what start() found (and its log lines appear now); later ones look anew (the
        agent lost its coordinator)."""
        if self.asked or self.first is None:
            return self.find()
        self.asked = True
        for record in self.held.records:
            logging.getLogger().handle(record)
        self.held.records.clear()
        if isinstance(self.first, Fail):
            raise self.first
        return self.first

    def end(self) -> None:
        """The agent is gone: if it never asked, stop the coordinator started for it."""
        if self.asked or self.started is None:
            return
        host, port = self.started
        try:
            command(host, port, "quit", timeout=2.0)
        except CoordinatorUnreachable:
            pass

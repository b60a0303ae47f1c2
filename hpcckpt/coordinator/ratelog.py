"""A log that cannot be flooded: the first `burst` lines of each period, then one summary line for the rest.
Used for what strangers can trigger at will (rejected messages): 200k bad messages must not write 200k lines."""
from __future__ import annotations

import logging
import time


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, what: str, burst: int = 10, period: float = 60.0):
        self.log, self.what, self.burst, self.period = logger, what, burst, period
        self.start = time.monotonic()
        self.count = 0
        self.suppressed = 0

    def warning(self, fmt: str, *args) -> None:
        self.flush()
        self.count += 1
        if self.count <= self.burst:
            self.log.warning(fmt, *args)
        else:
            self.suppressed += 1

    def flush(self, now: float | None = None) -> None:
        """End the period if it is over: say how many lines were left out (call it from a timer too)."""
        now = time.monotonic() if now is None else now
        if now - self.start < self.period:
            return
        if self.suppressed:
            self.log.warning("suppressed %d more %s in the last %.0f s", self.suppressed, self.what,
                             now - self.start)
        self.start, self.count, self.suppressed = now, 0, 0

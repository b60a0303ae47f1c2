"""--debug-restart-pause N / DMTCP_RESTART_PAUSE=N (DMTCP's levels 1..7; one meaning here): once restored, the
processes are left stopped and no longer traced by us, so a debugger can attach (`gdb -p PID`); the restart
joins the coordinator and lets the computation go only when every one of them has been continued (`kill -CONT
PID`, or gdb's `continue` then `detach`). Until then the coordinator sees no process of this restart."""
from __future__ import annotations

import logging
import os
import signal
import sys
import time

from ..engine import ptrace
from ..engine.fds import files

log = logging.getLogger("hpcckpt")


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def pause(restored, level: int) -> None:
    """Hand the restored processes (stopped under our ptrace) over stopped, and wait until they are continued.
    They are then released: the caller must not release them again."""
    for rp in restored:
        files.cut_back(rp.meta.process.fds)
    for rp in restored:
        os.kill(rp.pid, signal.SIGSTOP)              # group stop as soon as we let go: no user code runs
        for tid in rp.tids:
            ptrace.detach(tid)
        rp.released = True
    names = ", ".join(f"{rp.meta.program} pid {rp.pid}" for rp in restored)
    # stderr directly, at any quiet level: the user asked for it and must learn the PIDs
    print(f"dmtcp_restart: --debug-restart-pause {level}: restored and stopped: {names} (PIDs as the job sees them; "
          f"with its own PID namespace the host PID is in /proc/*/status NSpid); attach with gdb -p PID, "
          f"continue each with kill -CONT PID (the restart then goes on)", file=sys.stderr, flush=True)
    # the stop takes effect as each one leaves our hands: see every one stopped before watching for continues
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_state(rp.pid) not in ("T", "t", None) for rp in restored):
        time.sleep(0.01)
    waiting = {rp.pid for rp in restored}
    try:
        while waiting:
            for pid in list(waiting):
                st = _state(pid)
                if st is None or st not in ("T", "t"):
                    waiting.discard(pid)
            time.sleep(0.1)
    except BaseException:
        for rp in restored:          # no longer ours to release: never leave them stopped behind us
            try:
                os.kill(rp.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise
    log.info("restart pause over: every restored process was continued")

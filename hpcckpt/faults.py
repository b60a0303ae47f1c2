"""Named fault-injection points, switched on by the environment, so tests can fail a checkpoint at an exact
step ("killed mid-write" and "disk full" are tests, not hopes).

    HPCCKPT_FAULT="point:action[,point:action...]"
    actions: exit           the process dies at once (os._exit(97)), like a crash or SIGKILL
             error=ERRNO    an OSError with that errno is raised (e.g. error=ENOSPC for a full disk)
             sleep=SECONDS  the step is slowed down
    an action ending in @N fires only the Nth time the point is reached (e.g. error=ENOSPC@2: the second
    checkpoint fails, the first one completes)

Points: dump.after_chunk (agent, after each chunk of page data), dump.before_fsync (agent, every image of the
generation written, none fsync'ed yet), dump.before_commit (agent, image written
but not yet renamed), coordinator.script (restart script in place, its link not yet), coordinator.before_commit
(restart script in place, before the manifest is written), batch.after_requeue (batch driver, right after the
requeue / continuation was submitted), agent.after_suspend (agent, the job's processes just frozen and the
suspend acknowledged), freeze.after_claim (agent, a process
just frozen, before anything is injected), restart.before_restore (restarting agent, before its first process is
restored), restore.before_release (restarting agent, every process restored, none released yet), drain.start
(agent, a generation's drain to the shared level starting), drain.before_manifest (agent, the shared copies in
place, the shared manifest not yet written), partner.before_send (agent, before an image goes to its partner).
"""
from __future__ import annotations

import errno
import os
import time

_SPEC: dict[str, str] | None = None
_HITS: dict[str, int] = {}


def _spec() -> dict[str, str]:
    global _SPEC
    if _SPEC is None:
        _SPEC = {}
        for item in filter(None, os.environ.get("HPCCKPT_FAULT", "").split(",")):
            point, _, action = item.partition(":")
            _SPEC[point.strip()] = action.strip()
    return _SPEC


def fault(point: str) -> None:
    action = _spec().get(point)
    if not action:
        return
    action, _, nth = action.partition("@")
    if nth:
        _HITS[point] = _HITS.get(point, 0) + 1
        if _HITS[point] != int(nth):
            return
    if action == "exit":
        os._exit(97)
    if action.startswith("error="):
        name = action[6:]
        code = getattr(errno, name, None) if not name.isdigit() else int(name)
        raise OSError(code or errno.EIO, f"{os.strerror(code or errno.EIO)} (injected fault at {point})")
    if action.startswith("sleep="):
        time.sleep(float(action[6:]))

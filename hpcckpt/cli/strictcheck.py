"""DMTCP's strict checking at restart (on by default; --no-strict-checking / DMTCP_DISABLE_STRICT_CHECKING turn it
off): an image owned by another user is refused. Restarting it would run that user's saved program, with what it
had open, as us; DMTCP refuses for the same reason. Root restarting a user's images runs them as that user (engine/identity.py)."""
from __future__ import annotations

import logging
import os

from .common import Fail

log = logging.getLogger("hpcckpt")


def check_images(paths: list[str], no_strict_checking: bool) -> None:
    me = os.geteuid()
    if me == 0:
        return          # root restarts a user's (authenticated) images as that user: engine/identity.py
    for p in paths:
        try:
            uid = os.stat(p).st_uid
        except OSError:
            continue            # the image reader names a missing or unreadable image
        if uid == me:
            continue
        if no_strict_checking:
            log.warning("restarting %s, owned by uid %d (not you, uid %d): --no-strict-checking", p, uid, me)
            continue
        raise Fail(f"checkpoint image {p} belongs to uid {uid}, not to you (uid {me}): restarting it would run another "
                   f"user's saved program as you; if you trust it, restart with --no-strict-checking "
                   f"(DMTCP_DISABLE_STRICT_CHECKING=1)")

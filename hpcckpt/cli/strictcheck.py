"""DMTCP's strict checking at restart (on by default; --no-strict-checking / DMTCP_DISABLE_STRICT_CHECKING turn it
off): an image owned by another user is refused. Restarting it would run that user's saved program, with what it
had open, as us; DMTCP refuses for the same reason. Root restarting a user's own (owned and signed) images runs them
as that user (engine/identity.py)."""
from __future__ import annotations

import logging
import os

from .common import Fail

log = logging.getLogger("hpcckpt")


def check_images(readers, no_strict_checking: bool) -> None:
    """Refuse an image owned by another user, unless it is root restarting a user's own image (owned and signed
    by that user: the restart then runs as them, engine/identity.py) or strict checking is off."""
    me = os.geteuid()
    for r in readers:
        try:
            uid = os.fstat(r.fd).st_uid
        except OSError:
            continue
        if uid == me or (me == 0 and getattr(r, "signer", None) == uid):
            continue
        if no_strict_checking:
            log.warning("restarting %s, owned by uid %d (not you, uid %d): --no-strict-checking", r.path, uid, me)
            continue
        raise Fail(f"checkpoint image {r.path} belongs to uid {uid}, not to you (uid {me}): restarting it would run "
                   f"another user's saved program as you; if you trust it, restart with --no-strict-checking "
                   f"(DMTCP_DISABLE_STRICT_CHECKING=1)")

"""restart of an application-level checkpoint (hpcckpt/applevel/restart.py puts the files back): the program's
restart command runs under an agent of the same computation, as `launch` runs a command."""
from __future__ import annotations

import argparse
import logging
import shlex
from collections.abc import Callable

from ..applevel import restart as applevel_restart
from ..settings import Settings
from . import launch
from .common import Fail
from .jobrun import run_job

log = logging.getLogger("hpcckpt")

is_archives = applevel_restart.is_archives


def run(s: Settings, prog: str, args: argparse.Namespace, paths: list[str], remote: list,
        expect: tuple[str, int] | None, find: Callable[[], tuple[str, int]]) -> int:
    if remote:
        raise Fail("an application-level checkpoint restarts on one host: its archive is on "
                   f"{remote[0][0]}; run the restart there")
    try:
        given = {k for k in applevel_restart.CARRIED if getattr(args, k, None) is not None}
        s, command, computation = applevel_restart.prepare(s, paths, args.force, expect, given)
    except applevel_restart.RestartError as e:
        raise Fail(str(e)) from None
    log.info("running the restart command: %s", shlex.join(command))
    return run_job(s, prog, find, lambda in_ns, get, not_job: launch._agent(s, get, command, in_ns, not_job,
                                                                           computation=computation))

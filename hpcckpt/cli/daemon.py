"""Detached daemons (the coordinator's and the relay's `--daemon`): double fork, a new session, stdin from
/dev/null, and one line back through a pipe once the daemon is ready ("ok ...") or could not start ("error ...")."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

from .common import Fail


def start_daemon(serve: Callable[[int], int], what: str,
                 reported: tuple[type[BaseException], ...] = ()) -> str:
    """Run serve(ready_fd) in a detached daemon and wait for its first line: returns what follows "ok ". A daemon
    that fails raises Fail here, with its "error ..." line (exceptions of the `reported` types, raised before it
    was ready, are turned into that line) or "<what> failed to start"."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        rc = 1
        try:
            rc = serve(w)
        except Fail:
            rc = 1
        except reported as e:                # (before it is ready: the parent prints the line)
            try:
                os.write(w, f"error {e}\n".encode())
            except OSError:
                pass
        except BaseException:
            logging.getLogger("hpcckpt").exception("%s crashed", what)
        os._exit(rc)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        line = f.readline().strip()
    if not line.startswith("ok "):
        raise Fail(line[len("error "):] if line.startswith("error ") else f"{what} failed to start")
    return line[len("ok "):]

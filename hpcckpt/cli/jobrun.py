"""Running an agent for launch/restart: inside the job's own namespaces (the agent as PID 1, the user's command
waiting outside) or, where namespaces are unavailable, in this very process."""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from ..agent import namespaces
from ..agent.agent import FORWARDED_SIGNALS
from ..engine.linux import PR_SET_PDEATHSIG, prctl
from ..settings import Settings
from .common import Fail

log = logging.getLogger("hpcckpt")

_ROOT_EXIT_W: int | None = None     # (the agent, in the job's namespaces) tells the launching command here


def root_exited(code: int) -> None:
    """The agent's on_root_exit: the launched process ended but other processes of the computation live on.
    The user's command returns with the root's status (as DMTCP's dmtcp_launch, which is the launched program,
    would); the agent stays, no longer tied to it, until the last process of the job ends."""
    global _ROOT_EXIT_W
    if _ROOT_EXIT_W is None:
        return
    try:
        prctl(PR_SET_PDEATHSIG, 0)
        os.write(_ROOT_EXIT_W, f"{code}\n".encode())
        os.close(_ROOT_EXIT_W)
    except OSError:
        pass
    _ROOT_EXIT_W = None


def run_job(s: Settings, prog: str, find_coordinator: Callable[[], tuple[str, int]],
            agent_body: Callable[[bool, Callable[[], tuple[str, int]], set[int]], int]) -> int:
    """agent_body(in_namespace, get_coordinator, not_job) runs the agent and returns the job's exit status;
    not_job are PIDs of our own helpers among the agent's children (never part of the job). It calls
    get_coordinator() when it is ready to join; the coordinator is found or started by a small service process
    that stays outside the job's namespaces (a process that created a PID namespace cannot start threads, and a
    coordinator started inside the namespace would die with the job)."""
    svc_agent, svc = socket.socketpair()
    service = os.fork()
    if service == 0:
        svc_agent.close()
        _serve_coordinator_requests(svc, find_coordinator)
    svc.close()
    detached = False
    try:
        mode = namespaces.enter(s.pid_namespace)
        get = lambda: _ask_service(svc_agent)   # noqa: E731
        if not mode.pid_namespace:
            (log.debug if not s.pid_namespace else log.warning)("job mode: %s", mode.describe())
            return agent_body(False, get, {service})
        root_r, root_w = os.pipe2(os.O_CLOEXEC)
        child = os.fork()
        if child == 0:
            code = s.fail_rc
            os.close(root_r)
            global _ROOT_EXIT_W
            _ROOT_EXIT_W = root_w
            try:
                # the user's command owns the job: if it is killed, the agent (and with it, as the namespace's
                # init, every process of the job) goes too
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                namespaces.become_init()
                log.debug("job mode: %s", mode.describe())
                code = agent_body(True, get, set())
            except Fail as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                code = e.code if e.code is not None else s.fail_rc
            except BaseException as e:   # a bug of ours: one line (details at debug level), never a traceback
                log.debug("internal error", exc_info=True)
                print(f"{prog}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        svc_agent.close()
        os.close(root_w)
        code, detached = namespaces.supervise(child, list(FORWARDED_SIGNALS), root_r)
        os.close(root_r)
        return code
    finally:
        svc_agent.close()
        # (when the agent lives on after the root, the service keeps answering it and ends with it)
        if not detached:
            os.waitpid(service, 0)


def _serve_coordinator_requests(sock: socket.socket, find_coordinator) -> None:
    """The service process: answers 'coordinator?' with 'ok HOST PORT' or 'error MESSAGE'. Never returns."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = 0
    try:
        with sock:
            f = sock.makefile("rw")
            for _ in f:
                try:
                    host, port = find_coordinator()
                    f.write(f"ok {host} {port}\n")
                except Fail as e:
                    f.write(f"error {e}\n")
                f.flush()
    except BaseException:
        code = 1
    os._exit(code)


def _ask_service(sock: socket.socket) -> tuple[str, int]:
    sock.sendall(b"coordinator?\n")
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise Fail("lost the launching process")
        line += chunk
    text = line.decode().strip()
    if text.startswith("ok "):
        _, host, port = text.split()
        return host, int(port)
    raise Fail(text[len("error "):])

"""hpcckpt relay: a node's relay for the agents of one computation (hpcckpt/relay/; started by the node's first
launch when the relay setting is on)."""
from __future__ import annotations

import logging
import os
import sys

from ..coordinator import protocol
from ..image import safefs
from ..relay.relay import Relay
from .common import Fail, Parser, run_main, settings_from, setup_logging
from .daemon import start_daemon

log = logging.getLogger("hpcckpt")

DESCRIPTION = """Serves the agents of this node as one peer of the coordinator at --coord-host:--coord-port: their
hellos, phase acknowledgements and written reports go up aggregated, each phase comes down once for all of them.
Exits when the coordinator is gone or no agent is left. Started by dmtcp_launch when relay is on."""


def parser(prog: str) -> Parser:
    p = Parser(prog, DESCRIPTION)
    p.add_argument("--coord-host", required=True, help="the coordinator's host")
    p.add_argument("--coord-port", required=True, type=int, help="the coordinator's port")
    p.add_argument("--port-file", help="write the relay's port there once it listens")
    p.add_argument("--daemon", action="store_true", help="run in the background (logs to <rundir>/relay-PORT.log)")
    p.add_argument("-q", "--quiet", action="count", default=None)
    return p


def main(argv: list[str] | None = None, prog: str = "hpcckpt relay") -> int:
    def body(argv):
        args = parser(prog).parse_args(argv)
        s = settings_from(args)
        setup_logging("relay", s.quiet, s.log_level)
        if args.daemon:
            return _daemonize(s, args)
        return _serve(s, args, -1)
    return run_main(prog, body, argv)


def _serve(s, args, ready_fd: int) -> int:
    try:
        relay = Relay(s, args.coord_host, args.coord_port)
        if ready_fd >= 0:
            # the log before the first line of it (publish logs where we listen)
            fd = safefs.open_append(os.path.join(protocol.rundir(), f"relay-{relay.port}.log"))
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        relay.publish(args.port_file)
    except (OSError, protocol.SecretError) as e:
        if ready_fd >= 0:
            os.write(ready_fd, f"error {e}\n".encode())
        raise Fail(f"relay for the coordinator {args.coord_host}:{args.coord_port}: {e}") from None
    if ready_fd >= 0:
        os.write(ready_fd, f"ok {relay.port}\n".encode())
        os.close(ready_fd)
    try:
        relay.serve_forever()
    finally:
        if args.port_file:
            _remove_port_file(args.port_file, relay.port)
        relay.close()
    return 0


def _remove_port_file(path: str, port: int) -> None:
    try:
        with open(path) as f:
            if f.read().split()[:1] != [str(port)]:
                return                      # (a newer relay's: "PORT PID")
        os.unlink(path)
    except (OSError, ValueError):
        pass


def _daemonize(s, args) -> int:
    port = start_daemon(lambda ready: _serve(s, args, ready), "the relay")
    print(port.split()[0], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

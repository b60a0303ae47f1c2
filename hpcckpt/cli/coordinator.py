"""hpcckpt coordinator / dmtcp_coordinator [OPTIONS] [PORT]"""
from __future__ import annotations

import logging
import os
import sys

from ..coordinator import protocol
from ..coordinator.server import Coordinator
from ..image import safefs
from . import dmtcpopts
from .common import Fail, Parser, run_main, settings_from, setup_logging
from .daemon import start_daemon

log = logging.getLogger("hpcckpt")

DESCRIPTION = """Coordinates checkpoints of one computation. Agents started by `hpcckpt launch` / `dmtcp_launch`
and `hpcckpt restart` join it; `hpcckpt command` / `dmtcp_command` controls it.

Listens on 127.0.0.1 only, unless the computation spans hosts: then also on the address of --coord-host (when
not a loopback name), on each --bind ADDR (HPCCKPT_COORD_BIND; 0.0.0.0 = every interface, DMTCP's way), on
the interface towards the other nodes inside a batch job over several nodes, and on the interface towards a host
where `ssh`/`srun` inside a launched job or a multi-host restart start an agent (they ask first). Every message
must carry the per-computation secret (file <rundir>/coord-PORT.secret, mode 0600), a fresh time (within
HPCCKPT_FRESHNESS s, default 300, of this host's clock) and an unused nonce; messages over HPCCKPT_MAX_MESSAGE
bytes (default 32 MiB) are dropped.

Console commands (stdin): l list, s status, c checkpoint, bc checkpoint and wait, kc checkpoint then kill,
i N interval, f force restart with missing peers, k kill, q kill and quit, ? help."""


def parser(prog: str) -> Parser:
    p = Parser(prog, DESCRIPTION)
    p.add_argument("port", nargs="?", help="port to listen on (same as --coord-port)")
    p.add_argument("-p", "--coord-port", "--port", dest="coord_port", metavar="PORT",
                   help="port to listen on (env DMTCP_COORD_PORT; default 7779; 0 = random)")
    p.add_argument("--coord-host", "--host", dest="coord_host", metavar="HOST",
                   help="the address agents and commands use for this coordinator (default 127.0.0.1); it also "
                        "listens there when that is not loopback")
    p.add_argument("--bind", action="append", metavar="ADDR",
                   help="also listen on ADDR (repeatable; 0.0.0.0: every interface; env HPCCKPT_COORD_BIND="
                        "ADDR[,ADDR]); for agents started on other hosts by hand (dmtcp_launch -h THISHOST)")
    p.add_argument("--port-file", metavar="FILE", help="write the port to FILE once listening")
    p.add_argument("--status-file", metavar="FILE", help="keep a JSON status of the computation in FILE")
    p.add_argument("-c", "--ckptdir", metavar="DIR", help="where the restart script and manifests go (env "
                                                    "DMTCP_CHECKPOINT_DIR; default: current directory)")
    p.add_argument("--daemon", action="store_true", help="run in the background (logs to <rundir>/coord-PORT.log)")
    p.add_argument("--exit-on-last", action="store_true", default=None,
                   help="exit when the last process of the computation has left")
    p.add_argument("--timeout", type=float, metavar="S", help="exit after S seconds without any peer (0 = never)")
    p.add_argument("--stale-timeout", type=float, metavar="S",
                   help="exit S seconds after the computation has gone (default 8 h)")
    p.add_argument("-i", "--interval", metavar="S", help="checkpoint every S seconds (env DMTCP_CHECKPOINT_INTERVAL)")
    p.add_argument("--keep", dest="keep_generations", metavar="N", help="complete checkpoints to keep (default 2)")
    p.add_argument("--config", metavar="YAML", help="settings file (env HPCCKPT_CONFIG)")
    p.add_argument("-q", "--quiet", action="count", default=None,
                   help="only warnings and errors; twice: only errors")
    dmtcpopts.add_coordinator_options(p)
    return p


def main(argv: list[str] | None = None, prog: str = "hpcckpt coordinator") -> int:
    def body(argv):
        args = parser(prog).parse_args(argv)
        if args.port is not None:
            if args.coord_port is not None and args.coord_port != args.port:
                raise Fail(f"port given twice ({args.port} and {args.coord_port})")
            args.coord_port = args.port
        s = settings_from(args, keep_generations=args.keep_generations)
        setup_logging("coordinator", s.quiet, s.log_level)
        dmtcpopts.prepare(s, engine=False)         # (no engine here: its imports would slow every start)
        dmtcpopts.make_ckptdir(s.ckptdir)
        if s.coord_logfile and not args.daemon:
            _log_to(s.coord_logfile)
        if args.daemon:
            return _daemonize(s, args.bind)
        return _serve(s, console=True, bind=args.bind)
    return run_main(prog, body, argv)


def _serve(s, console: bool, ready_fd: int = -1, bind: list[str] | None = None) -> int:
    coord = Coordinator(s, console=console)
    try:
        port = coord.bind(bind)
    except OSError as e:
        if ready_fd >= 0:
            os.write(ready_fd, f"error {e}\n".encode())
        raise Fail(str(e)) from None
    if ready_fd >= 0:
        log_path = s.coord_logfile or os.path.join(s.tmpdir or protocol.rundir(), f"coord-{port}.log")
        fd = safefs.open_append(log_path)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.write(ready_fd, f"ok {port}\n".encode())
        os.close(ready_fd)
    try:
        coord.serve_forever()
    finally:
        coord.close()
    return 0


def _log_to(path: str) -> None:
    """--coord-logfile / DMTCP_COORD_LOG_FILENAME: the log also goes to this file."""
    try:
        fd = safefs.open_append(path)
    except OSError as e:
        raise Fail(f"cannot open the coordinator log file {path}: {e.strerror or e}") from None
    h = logging.StreamHandler(os.fdopen(fd, "a", buffering=1))
    h.setFormatter(logging.getLogger().handlers[0].formatter)
    logging.getLogger().addHandler(h)


def _daemonize(s, bind: list[str] | None = None) -> int:
    try:                 # the daemon logs there: a run directory we cannot use fails here, in one line
        protocol.rundir()
    except protocol.SecretError as e:
        raise Fail(str(e)) from None
    port = start_daemon(lambda ready: _serve(s, console=False, ready_fd=ready, bind=bind), "coordinator",
                        reported=(OSError, protocol.SecretError))
    if not s.quiet:
        print(f"hpcckpt coordinator listening on port {port} (daemon)", file=sys.stderr)
    # gone at once: whoever started us (a restart's starter, dmtcp_launch) waits for this exit, and the
    # interpreter's teardown (modules, libzmq) cost ~20 ms on that path (issue 20: restart-to-running)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(0)

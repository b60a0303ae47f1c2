"""hpcckpt command / dmtcp_command [OPTIONS] COMMAND — control a running coordinator."""
from __future__ import annotations

import json
import sys

from .. import __version__
from ..coordinator.client import BLOCKING, CoordinatorLost, CoordinatorUnreachable, command, command_watched
from . import cmdquick, dmtcpjson, dmtcpopts
from .common import DMTCP_COMPAT, Fail, Parser, add_coord_options, run_main, settings_from

EXIT_FAILED = cmdquick.EXIT_FAILED
EXIT_UNREACHABLE = cmdquick.EXIT_UNREACHABLE

DESCRIPTION = """Sends one command to the coordinator. Exit status: 0 on success, 1 if the coordinator carried
out the command and it failed (e.g. a blocking checkpoint failed, or the coordinator died or stopped answering
while it ran), 2 if the coordinator cannot be reached or
refuses the command. Text status prints NUM_PEERS=n, RUNNING=yes|no, CKPT_INTERVAL=s; --json prints one JSON
object in DMTCP's schema (schema_version 1; command DMT_STATUS, DMT_BLOCKING_CKPT, ...; command_status
DMT_COORD_SUCCESS, DMT_COORD_NOT_RUNNING, DMT_COORD_NOT_FOUND, DMT_COORD_INVALID_COMMAND, and ours
DMT_COORD_CKPT_FAILED), with our own fields beside DMTCP's. Commands may be written as DMTCP accepts them:
s, -s, --status, bc, -bc, kc, xc, -i5, i 5."""


def parser(prog: str) -> Parser:
    p = Parser(prog, DESCRIPTION, fail_code=EXIT_UNREACHABLE)
    add_coord_options(p)
    p.add_argument("--json", action="store_true", help="print the coordinator's answer as one JSON object "
                                                       "(DMTCP's schema, with our fields beside)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="give up waiting after S seconds (default 10; for blocking checkpoints none, but they end "
                        "when the coordinator dies or is silent for HPCCKPT_PEER_TIMEOUT s)")
    c = p.add_mutually_exclusive_group()
    for flags, cmd, text in (
            (("-s", "--status"), "status", "status of the computation"),
            (("-l", "--list"), "list", "list the processes of the computation"),
            (("-c", "--checkpoint"), "checkpoint", "start a checkpoint and return at once"),
            (("-bc", "--bcheckpoint"), "bcheckpoint", "checkpoint; return when every image is safely on disk"),
            (("-kc", "--kcheckpoint", "-xc", "--xcheckpoint"), "kcheckpoint", "checkpoint, then kill the computation"),
            (("-k", "--kill"), "kill", "kill the computation"),
            (("-q", "--quit"), "quit", "kill the computation and stop the coordinator")):
        c.add_argument(*flags, dest="cmd", action="store_const", const=cmd, help=text)
    c.add_argument("-i", "--interval", dest="interval_value", metavar="N", type=int,
                   help="checkpoint every N seconds from now on (0 = off)")
    return p


class Progress:
    """One line on a terminal, rewritten in place while a blocking checkpoint runs."""

    def __init__(self, stream):
        self.stream = stream
        self.shown = False

    def show(self, status: dict) -> None:
        cp = status.get("checkpoint_progress")
        if not cp:
            return
        what = "stopped" if cp.get("frozen") else "running"
        waiting = status.get("waiting_for_ranks") or []
        line = (f"checkpoint {cp['generation']}: {cp.get('phase') or 'waiting'}, "
                f"{cp.get('bytes_written', 0) / 1e6:,.0f} MB written, "
                f"{cp.get('agents_durable', 0)}/{cp.get('agents', 0)} agents done, {cp.get('elapsed_s', 0):.0f} s, "
                f"processes {what}" + (f", waiting for {len(waiting)} rank(s)" if waiting else ""))
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def main(argv: list[str] | None = None, prog: str = "hpcckpt command") -> int:
    def body(argv):
        argv = dmtcpopts.command_argv(list(sys.argv[1:] if argv is None else argv))
        if "--json" in argv:
            early = _json_without_coordinator(argv)
            if early is not None:
                return early
        p = parser(prog)
        args = p.parse_args(argv)
        cmd = args.cmd
        extra = {}
        if args.interval_value is not None:
            if not 0 <= args.interval_value < 1 << 31:
                p.error(f"checkpoint interval {args.interval_value} is not 0..{(1 << 31) - 1} seconds")
            cmd = "interval"
            extra["value"] = args.interval_value
        if cmd is None and args.json:        # DMTCP: no command is its help, reported as such
            print(json.dumps(dmtcpjson.head("help", dmtcpjson.SUCCESS, "localhost", 7779)))
            return 0
        if cmd is None:
            p.error("no command given (e.g. -s, -l, -c, -bc, -k, -q, -i N)")
        s = settings_from(args)
        port = s.coord_port
        if s.port_file:
            # (only here: it brings the agent's imports)
            from ..agent.join import read_port_file
            port = read_port_file(s.port_file)
            if port is None:
                raise Fail(f"cannot read the coordinator port from {s.port_file}", EXIT_UNREACHABLE)
        blocking = cmd in BLOCKING
        timeout = args.timeout if args.timeout is not None else (None if blocking else 10.0)
        try:
            if blocking:
                # watched: a coordinator that dies or stops answering ends the wait (never a hang)
                progress = Progress(sys.stderr) if not args.json and sys.stderr.isatty() else None
                try:
                    r = command_watched(s.coord_host, port, cmd, progress.show if progress else None,
                                        timeout=timeout, silence=s.peer_timeout, **extra)
                finally:
                    if progress:
                        progress.clear()
            else:
                r = command(s.coord_host, port, cmd, timeout=timeout, **extra)
        except CoordinatorLost as e:
            raise Fail(f"checkpoint not completed: {e}; the computation's agents abandon an unfinished "
                       f"checkpoint and let the processes run on", EXIT_FAILED) from None
        except CoordinatorUnreachable as e:
            if args.json:       # DMTCP's way: the JSON on stdout, nothing on stderr, exit 2
                print(json.dumps(dmtcpjson.not_found(cmd, s.coord_host, port, str(e))))
                return EXIT_UNREACHABLE
            raise Fail(str(e), EXIT_UNREACHABLE) from None
        return cmdquick.finish(cmd, r, s.coord_host, port, args.json)
    return run_main(prog, body, argv, fail_code=EXIT_UNREACHABLE)


def _json_without_coordinator(argv: list[str]) -> int | None:
    """--json answers that need no coordinator, in DMTCP's schema: --help, --version, and a command word we do
    not know (DMT_COORD_INVALID_COMMAND, exit 2). None: go on."""
    import os
    host = os.environ.get("DMTCP_COORD_HOST") or os.environ.get("DMTCP_HOST") or "localhost"
    try:
        port = int(os.environ.get("DMTCP_COORD_PORT") or os.environ.get("DMTCP_PORT") or 7779)
    except ValueError:
        port = 0
    if "--version" in argv:
        print(json.dumps({**dmtcpjson.head("version", dmtcpjson.SUCCESS, host, port),
                          "version": f"hpcckpt {__version__}, compatible with {DMTCP_COMPAT} commands"}))
        return 0
    if "--help" in argv:
        print(json.dumps(dmtcpjson.head("help", dmtcpjson.SUCCESS, host, port)))
        return 0
    import contextlib
    import io
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parser("dmtcp_command").parse_args(argv)
    except SystemExit:
        print(json.dumps(dmtcpjson.head(None, dmtcpjson.INVALID, host, port)))
        return EXIT_UNREACHABLE
    return None


if __name__ == "__main__":
    sys.exit(main())

"""hpcckpt command / dmtcp_command [OPTIONS] COMMAND — control a running coordinator."""
from __future__ import annotations

import json
import sys

from ..agent.join import read_port_file
from ..coordinator.client import BLOCKING, CoordinatorLost, CoordinatorUnreachable, command, command_watched
from .common import Fail, Parser, add_coord_options, run_main, settings_from

EXIT_FAILED = 1
EXIT_UNREACHABLE = 2

DESCRIPTION = """Sends one command to the coordinator. Exit status: 0 on success, 1 if the coordinator carried
out the command and it failed (e.g. a blocking checkpoint failed, or the coordinator died or stopped answering
while it ran), 2 if the coordinator cannot be reached or
refuses the command. Text status prints NUM_PEERS=n, RUNNING=yes|no, CKPT_INTERVAL=s; --json prints one JSON
object."""


def parser(prog: str) -> Parser:
    p = Parser(prog, DESCRIPTION, fail_code=EXIT_UNREACHABLE)
    add_coord_options(p)
    p.add_argument("--json", action="store_true", help="print the coordinator's answer as one JSON object")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="give up waiting after S seconds (default 10; for blocking checkpoints none, but they end "
                        "when the coordinator dies or is silent for HPCCKPT_PEER_TIMEOUT s)")
    c = p.add_mutually_exclusive_group()
    for flags, cmd, text in (
            (("-s", "--status"), "status", "status of the computation"),
            (("-l", "--list"), "list", "list the processes of the computation"),
            (("-c", "--checkpoint"), "checkpoint", "start a checkpoint and return at once"),
            (("-bc", "--bcheckpoint"), "bcheckpoint", "checkpoint; return when every image is safely on disk"),
            (("-kc", "--kcheckpoint"), "kcheckpoint", "checkpoint, then kill the computation"),
            (("-k", "--kill"), "kill", "kill the computation"),
            (("-q", "--quit"), "quit", "kill the computation and stop the coordinator")):
        c.add_argument(*flags, dest="cmd", action="store_const", const=cmd, help=text)
    c.add_argument("-i", "--interval", dest="interval_value", metavar="N", type=int,
                   help="checkpoint every N seconds from now on (0 = off)")
    return p


def _print_text(cmd: str, r: dict) -> None:
    if cmd in ("status", "list"):
        print(f"Coordinator:\n  Host: {r.get('coordinator_host')}\n  Port: {r.get('coordinator_port')}")
        print(f"Status...\nNUM_PEERS={r.get('num_peers')}\nRUNNING={'yes' if r.get('running') else 'no'}")
        print(f"CKPT_INTERVAL={r.get('checkpoint_interval')}")
        if r.get("computation"):
            print(f"COMPUTATION={r['computation']}\nGENERATION={r.get('generation')}")
        last = r.get("last_checkpoint")
        if last:
            ratio = f", {last['ratio']:.2f} of the memory read" if last.get("ratio") else ""
            print(f"LAST_CHECKPOINT=generation {last['generation']}, {last.get('bytes_out', 0) / 1e6:.1f} MB in "
                  f"{last.get('duration_s', 0):.2f} s, processes frozen {last.get('frozen_s', 0):.3f} s{ratio}, "
                  f"{last.get('pages_skipped', 0)} untouched and {last.get('zero_pages', 0)} zero pages left out")
        if cmd == "list":
            for row in r.get("peers", []):
                rank = f", rank {row['rank']}" if row.get("rank") is not None else ""
                print(f"{row['peer']}, {row['program']}[{row['pid']}]@{row['host']}, {row['unique_id']}, "
                      f"{row['state']}{rank}")
    elif cmd in ("bcheckpoint", "kcheckpoint"):
        if r.get("ok"):
            ck = r.get("checkpoint") or {}
            print(f"checkpoint generation {r.get('generation')} complete: {ck.get('images', 0)} image(s), "
                  f"{ck.get('bytes_out', 0) / 1e6:.1f} MB in {ck.get('duration_s', 0):.2f} s")
        else:
            print(f"checkpoint failed: {r.get('error')}", file=sys.stderr)
    elif cmd == "checkpoint":
        print(f"checkpoint generation {r.get('generation')} started" if r.get("ok") else
              f"checkpoint not started: {r.get('error')}", file=sys.stdout if r.get("ok") else sys.stderr)
    elif cmd == "interval":
        print(f"CKPT_INTERVAL={r.get('checkpoint_interval')}")
    elif not r.get("ok"):
        print(f"{cmd} failed: {r.get('error')}", file=sys.stderr)


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
        p = parser(prog)
        args = p.parse_args(argv)
        cmd = args.cmd
        extra = {}
        if args.interval_value is not None:
            if not 0 <= args.interval_value < 1 << 31:
                p.error(f"checkpoint interval {args.interval_value} is not 0..{(1 << 31) - 1} seconds")
            cmd = "interval"
            extra["value"] = args.interval_value
        if cmd is None:
            p.error("no command given (e.g. -s, -l, -c, -bc, -k, -q, -i N)")
        s = settings_from(args)
        port = s.coord_port
        if s.port_file:
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
            raise Fail(str(e), EXIT_UNREACHABLE) from None
        r.setdefault("command", cmd)
        r["command_status"] = "ok" if r.get("ok") else "failed"
        if args.json:
            r.setdefault("coordinator_host", s.coord_host)
            r.setdefault("coordinator_port", port)
            print(json.dumps(r))
        else:
            _print_text(cmd, r)
        if not r.get("ok"):
            # refused outright (nothing to checkpoint, one in progress, bad value) vs. tried and failed
            return 1 if cmd in ("bcheckpoint", "kcheckpoint") and r.get("generation") else EXIT_UNREACHABLE
        return 0
    return run_main(prog, body, argv, fail_code=EXIT_UNREACHABLE)


if __name__ == "__main__":
    sys.exit(main())

"""dmtcp_command's quick path, and the printing of a coordinator's answer that both paths share.

Scripts and harnesses poll `dmtcp_command -s` in loops; a call used to cost ~95 ms, nearly all of it Python
importing things the request does not use (libzmq, argparse, the settings dataclass, logging). The common calls
- one of -s -l -c -k -q with at most -h HOST, -p PORT and --json, in an environment that sets nothing
else of ours - are recognised here from argv alone and sent at once over the plain-Python ZMTP connection
(coordinator/client.CommandConnection, authenticated exactly as always). Anything else (a config file, another
HPCCKPT_/DMTCP_ variable, any other option or spelling) returns None and takes the full path (cli/command.py),
which gives the same answer: tests/test_cmdquick.py compares the two."""
from __future__ import annotations

import json
import os
import sys

from ..coordinator.client import CoordinatorUnreachable, command
from . import dmtcpjson

EXIT_FAILED = 1
EXIT_UNREACHABLE = 2
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7779         # settings.Settings' defaults (checked by the test)

_COMMANDS = {w: cmd for cmd, words in (
    ("status", ("-s", "--status", "s", "status")), ("list", ("-l", "--list", "l", "list")),
    ("checkpoint", ("-c", "--checkpoint", "c", "checkpoint")), ("kill", ("-k", "--kill", "k", "kill")),
    ("quit", ("-q", "--quit", "q", "quit"))) for w in words}
_HOST_FLAGS = ("-h", "--coord-host", "--host")
_PORT_FLAGS = ("-p", "--coord-port", "--port")
# the only variables of ours the quick path reads (and knows to be harmless); any other HPCCKPT_*/DMTCP_* one
# may change a setting or be invalid, which only the full path (settings.load) knows
_KNOWN_ENV = {"DMTCP_COORD_HOST", "DMTCP_HOST", "DMTCP_COORD_PORT", "DMTCP_PORT", "HPCCKPT_RUNDIR",
              "HPCCKPT_SECRET_FILE", "HPCCKPT_SECRET", "HPCCKPT_KEY_FILE"}
_HOST_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:")


class Quick:
    """A request the quick path can send: the command word, where to, and how to print the answer."""
    __slots__ = ("cmd", "host", "port", "as_json")

    def __init__(self, cmd: str, host: str, port: int, as_json: bool):
        self.cmd, self.host, self.port, self.as_json = cmd, host, port, as_json


def _port(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() and 0 < int(text) <= 65535 else None


def parse(argv: list[str], environ: dict[str, str] | os._Environ[str]) -> Quick | None:
    """The request, when argv and the environment are among the simple cases; None: use the full path."""
    if any(k.startswith(("HPCCKPT_", "DMTCP_")) and k not in _KNOWN_ENV for k in environ):
        return None
    cmd = host = port_text = None
    as_json = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _COMMANDS and cmd is None:
            cmd = _COMMANDS[a]
        elif a == "--json" and not as_json:
            as_json = True
        elif a in _HOST_FLAGS and host is None and i + 1 < len(argv):
            host, i = argv[i + 1], i + 1
        elif a in _PORT_FLAGS and port_text is None and i + 1 < len(argv):
            port_text, i = argv[i + 1], i + 1
        elif a.startswith("-p") and a[2:].isdigit() and port_text is None:
            port_text = a[2:]
        else:
            return None
        i += 1
    if cmd is None:
        return None
    if host is None:
        host = environ.get("DMTCP_COORD_HOST") or environ.get("DMTCP_HOST") or DEFAULT_HOST
    if port_text is None:
        port_text = environ.get("DMTCP_COORD_PORT") or environ.get("DMTCP_PORT") or str(DEFAULT_PORT)
    port = _port(port_text)
    if port is None or not host or host.startswith("-") or not set(host) <= _HOST_CHARS:
        return None                 # let the full path say what is wrong with it
    return Quick(cmd, host, port, as_json)


def run(q: Quick, prog: str) -> int:
    """Send the request and print the answer as the full path does; the exit status."""
    try:
        try:
            r = command(q.host, q.port, q.cmd, timeout=10.0)
        except CoordinatorUnreachable as e:
            if q.as_json:       # DMTCP's way: the JSON on stdout, nothing on stderr, exit 2
                print(json.dumps(dmtcpjson.not_found(q.cmd, q.host, q.port, str(e))))
            else:
                print(f"{prog}: error: {e}", file=sys.stderr)
            return EXIT_UNREACHABLE
        return finish(q.cmd, r, q.host, q.port, q.as_json)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:     # our output went to a reader that stopped (`| head`): done, like any filter
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 0


def finish(cmd: str, r: dict, host: str, port: int, as_json: bool) -> int:
    """Print the coordinator's answer r to cmd (text or DMTCP's JSON) and return the exit status."""
    status = dmtcpjson.status_of(cmd, r)
    if as_json:
        print(json.dumps(dmtcpjson.convert(cmd, r, host, port)))
    else:
        print_text(cmd, r)
    if status != dmtcpjson.SUCCESS:
        # refused outright (nothing to checkpoint, one in progress, bad value) vs. tried and failed
        return EXIT_FAILED if status == dmtcpjson.CKPT_FAILED else EXIT_UNREACHABLE
    return 0


def print_text(cmd: str, r: dict) -> None:
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
        if any(g.get("local") for g in r.get("levels") or []):     # multi-level storage (docs/storage.md)
            print("LEVELS=" + ", ".join(f"{g['generation']}:" + "+".join(k for k in ("local", "partner", "shared")
                                                                         if g.get(k) in (True, "done"))
                                        for g in r["levels"]))
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

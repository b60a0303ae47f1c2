"""`pbs-emu`: start/stop the emulator's daemon for a state dir and change its settings.

    eval "$(tests/pbs_emulator/pbs-emu --dir /tmp/pbs start kill_delay=2 operators=alice)"
    qsub job.sh
    tests/pbs_emulator/pbs-emu --dir /tmp/pbs set kill_delay=5
    tests/pbs_emulator/pbs-emu --dir /tmp/pbs stop

The state dir defaults to $PBS_EMU_DIR, else /tmp/hpcckpt-pbs-emu."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from . import protocol as P

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_FILES = ("__init__.py", "api.py", "commands.py", "control.py", "protocol.py", "server.py")
COMMANDS = ("qsub", "qstat", "qdel", "qrerun")
DEFAULT_DIR = "/tmp/hpcckpt-pbs-emu"
LIST_KEYS = ("operators", "managers", "acl_roots")
NUM_KEYS = ("kill_delay", "mom_poll", "walltime_slack", "job_requeue_timeout")


def default_dir() -> str:
    return os.environ.get("PBS_EMU_DIR") or DEFAULT_DIR


def client_python() -> str:
    """An interpreter every user can run (the default python3 here lives under /root)."""
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def install(state_dir: str, python: str | None = None) -> None:
    """Copy the emulator into STATE/lib (world-readable) and write STATE/bin/{qsub,qstat,qdel,qrerun,pbs-emu}."""
    python = python or client_python()
    lib = os.path.join(state_dir, "lib", "pbs_emulator")
    os.makedirs(lib, exist_ok=True)
    for d in (state_dir, os.path.join(state_dir, "lib"), lib):
        os.chmod(d, 0o755)
    if not os.path.samefile(HERE, lib):                  # `pbs-emu` from STATE/bin runs the installed copy
        for f in PKG_FILES:
            shutil.copyfile(os.path.join(HERE, f), os.path.join(lib, f))
            os.chmod(os.path.join(lib, f), 0o644)
    bindir = os.path.join(state_dir, "bin")
    os.makedirs(bindir, exist_ok=True)
    os.chmod(bindir, 0o755)
    libdir = os.path.join(state_dir, "lib")
    for cmd in COMMANDS:
        text = (f"#!{python} -Es\n"
                "import sys\n"
                f"sys.path.insert(0, {libdir!r})\n"
                "from pbs_emulator.commands import main\n"
                f"sys.exit(main({cmd!r}, sys.argv[1:], {state_dir!r}))\n")
        _write_exec(os.path.join(bindir, cmd), text)
    _write_exec(os.path.join(bindir, "pbs-emu"),
                f"#!{python} -Es\nimport sys\nsys.path.insert(0, {libdir!r})\n"
                "from pbs_emulator.control import cli\n"
                f"sys.exit(cli(['--dir', {state_dir!r}] + sys.argv[1:]))\n")


def _write_exec(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


def ping(state_dir: str) -> dict | None:
    try:
        return P.request(state_dir, {"op": "ping"}, timeout=5)
    except (P.ConnectError, OSError, ValueError):
        return None


def parse_setting(key: str, value):
    """'operators=a,b' -> list, 'kill_delay=2' -> number, 'passwd={json}' -> dict; values from Python pass."""
    if not isinstance(value, str):
        return value
    if key in LIST_KEYS:
        return [v for v in value.split(",") if v]
    if key in NUM_KEYS + ("first_job_id",):
        return float(value) if "." in value else int(value)
    if key == "passwd":
        return json.loads(value)
    return value


def split_settings(pairs: list[str]) -> dict:
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"pbs-emu: expected KEY=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        if k.startswith("user."):           # user.NAME=HOME[:SHELL] -> passwd override for NAME
            home, _, shell = v.partition(":")
            entry = {"home": home}
            if shell:
                entry["shell"] = shell
            out.setdefault("passwd", {})[k[5:]] = entry
        else:
            out[k] = parse_setting(k, v)
    return out


def start(state_dir: str, settings: dict | None = None, python: str | None = None, timeout: float = 15) -> None:
    """Start the daemon for state_dir (root only), or just apply settings if it already runs."""
    state_dir = os.path.abspath(state_dir)
    settings = {k: parse_setting(k, v) for k, v in (settings or {}).items()}
    if ping(state_dir):
        install(state_dir, python)
        live = {k: v for k, v in settings.items() if k not in ("server_name", "first_job_id")}
        if live:
            set_config(state_dir, live)
        return
    if os.geteuid() != 0:
        raise SystemExit("pbs-emu: start needs root (the daemon starts jobs as their owners)")
    os.makedirs(state_dir, exist_ok=True)
    install(state_dir, python)
    cfg_path = os.path.join(state_dir, "config.json")
    cfg = {}
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
    cfg.update(settings)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)
    os.chmod(cfg_path, 0o600)
    lib = os.path.join(state_dir, "lib")
    out = open(os.path.join(state_dir, "server.out"), "ab")
    launcher = (f"import os, sys\nsys.path.insert(0, {lib!r})\n"
                "if os.fork():\n    os._exit(0)\n"          # detach: the daemon is nobody's child
                "from pbs_emulator.server import main\nmain()\n")
    subprocess.run([sys.executable, "-Es", "-c", launcher, state_dir], stdin=subprocess.DEVNULL, stdout=out,
                   stderr=out, start_new_session=True, close_fds=True, cwd="/", check=True)
    out.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(state_dir):
            return
        time.sleep(0.05)
    tail = ""
    try:
        with open(os.path.join(state_dir, "server.out")) as f:
            tail = f.read()[-2000:]
    except OSError:
        pass
    raise RuntimeError(f"pbs_emulator server did not start in {timeout}s:\n{tail}")


def stop(state_dir: str, timeout: float = 20) -> bool:
    """Stop the daemon (it kills its running jobs first). Returns True if one was running."""
    state_dir = os.path.abspath(state_dir)
    pid = None
    try:
        with open(os.path.join(state_dir, "server.pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        pass
    try:
        P.request(state_dir, {"op": "shutdown"}, timeout=5)
    except (P.ConnectError, OSError, ValueError):
        if pid is None:
            return False
    if pid is None:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)           # our own daemon, by its pid
    except ProcessLookupError:
        pass
    return True


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def set_config(state_dir: str, settings: dict) -> dict:
    reply = P.request(state_dir, {"op": "config", "set": {k: parse_setting(k, v) for k, v in settings.items()}})
    if reply["rc"]:
        raise RuntimeError(reply.get("err", "").strip())
    return reply["config"]


def get_config(state_dir: str) -> dict:
    return P.request(state_dir, {"op": "config"})["config"]


def env_lines(state_dir: str) -> str:
    return f"export PBS_EMU_DIR={state_dir}\nexport PATH={os.path.join(state_dir, 'bin')}:$PATH\n"


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pbs-emu", description="Control the local OpenPBS emulator.")
    ap.add_argument("--dir", default=None, help="state dir (default $PBS_EMU_DIR or %s)" % DEFAULT_DIR)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start the server (root); prints export lines for eval")
    s.add_argument("--server-name")
    s.add_argument("--first-job-id", type=int)
    s.add_argument("--python", help="interpreter for the client commands (default /usr/bin/python3)")
    s.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    sub.add_parser("stop", help="stop the server, killing its running jobs")
    sub.add_parser("status", help="exit 0 if the server answers")
    st = sub.add_parser("set", help="change settings of the running server (root)")
    st.add_argument("settings", nargs="+", metavar="KEY=VALUE")
    sub.add_parser("show", help="print the settings as JSON")
    sub.add_parser("env", help="print the export lines for eval")
    a = ap.parse_args(argv)
    state_dir = os.path.abspath(a.dir or default_dir())
    try:
        if a.cmd == "start":
            settings = split_settings(a.settings)
            if a.server_name:
                settings["server_name"] = a.server_name
            if a.first_job_id is not None:
                settings["first_job_id"] = a.first_job_id
            start(state_dir, settings, a.python)
            sys.stdout.write(env_lines(state_dir))
            print(f"pbs-emu: server {P.read_public_config(state_dir).get('server_name')} up in {state_dir}",
                  file=sys.stderr)
        elif a.cmd == "stop":
            print("pbs-emu: stopped" if stop(state_dir) else "pbs-emu: not running", file=sys.stderr)
        elif a.cmd == "status":
            info = ping(state_dir)
            if not info:
                print("pbs-emu: not running", file=sys.stderr)
                return 1
            print(f"pbs-emu: server {info['server']} running, pid {info['pid']}, state dir {state_dir}")
        elif a.cmd == "set":
            print(json.dumps(set_config(state_dir, split_settings(a.settings)), indent=1))
        elif a.cmd == "show":
            print(json.dumps(get_config(state_dir), indent=1))
        elif a.cmd == "env":
            sys.stdout.write(env_lines(state_dir))
    except P.ConnectError:
        print(f"pbs-emu: no server running in {state_dir}", file=sys.stderr)
        return 1
    except (RuntimeError, ValueError) as e:
        print(f"pbs-emu: {e}", file=sys.stderr)
        return 1
    return 0

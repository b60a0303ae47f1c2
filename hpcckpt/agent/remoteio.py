"""Processes a job starts on other hosts (through `ssh host cmd` or `srun cmd` inside the job) join the same
computation, like DMTCP's dmtcp_ssh/dmtcp_sshd pair.

Inside a launched job, `ssh` and `srun` are our shims (hpcckpt/shims/, first on the job's PATH; cli/shim.py).
A shim is a process of the job: it listens on a TCP port and runs the real ssh/srun - a process kept *outside*
the computation (tree.py leaves a shim's children out) - to start `hpcckpt launch --join --remote-io ...` on
the other host. That launcher joins the coordinator as another agent and connects four TCP connections back to
the shim before starting the command: standard input, output, error and a control connection that carries the
command's exit status. The command gets the first three as its fds 0-2. So the computation's processes on
both hosts talk only over TCP connections inside the computation, which checkpoints drain and restarts
reconnect (tcpdrain.py, tcpwire.py); the real ssh/srun is not needed again after a restart.

This module holds what both sides share: the job file (where a job's shims find the current coordinator, kept
up to date across restarts by the agent), the settings an agent on another host inherits, and the connection
handshake.

Settings (settings_env): the agent writes its effective Settings into the job file - every field with an
environment variable whose value differs from the default, as that variable's text - and whatever starts an agent on
another host (the shims, a restart's remote parts: cli/multihost.py) puts them in front of the remote command
(`env NAME=VALUE ... hpcckpt launch --join ...`). The remote command's own flags still win (flags > environment),
and a restart rewrites the job file, so a job's later ssh/srun pass on the restarting command's settings, not
the launch's. The job file is ours (safefs: a regular file of ours, mode 0600, in our run directory, read without
following symlinks): nobody else can plant settings in it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
import sys
from typing import Any

from ..image import safefs
from ..settings import Settings

ROLES = ("stdin", "stdout", "stderr", "control")
HEADER = struct.Struct("<16sBII")           # token, role, task index, number of tasks
# The command runs with fd 3 (the control connection) closed; its exit status goes back on fd 3.
WRAPPER = '"$@" 3>&-; rc=$?; printf "%d\\n" "$rc" >&3; exit "$rc"'
SHIM_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shims")


def wrap(argv: list[str]) -> list[str]:
    return ["/bin/sh", "-c", WRAPPER, "hpcckpt-remote", *argv]


def job_environment(job_file: str, env: dict | None = None) -> dict:
    """The environment a launched job runs with: our shims first on PATH, and where they find the job file."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = SHIM_DIR + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    env["HPCCKPT_JOB_FILE"] = job_file
    env["HPCCKPT_PYTHON"] = env.get("HPCCKPT_PYTHON") or sys.executable
    return env


# Settings that name this host or travel as flags of the remote command (--coord-host, --coord-port, --ckptdir):
# the coordinator's address and listening addresses, its log file. Every other field with an environment variable
# is what an agent uses, and goes to the agents on other hosts.
HOST_BOUND = frozenset({"coord_host", "coord_port", "bind", "ckptdir", "coord_logfile"})
_DEFAULTS = Settings()
_SEPARATOR = {"plugins": ",", "path_prefixes": ";"}        # how settings.py splits these lists again


def forwarded_fields() -> dict[str, str]:
    """{field: its environment variable} of the settings an agent on another host inherits."""
    return {f.name: f.metadata["env"][0] for f in dataclasses.fields(Settings)
            if f.metadata.get("env") and f.name not in HOST_BOUND}


def _text(name: str, value: Any) -> str | None:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return _SEPARATOR.get(name, ",").join(str(v) for v in value)
    return None if value is None else str(value)


def settings_env(s: Settings) -> dict[str, str]:
    """{environment variable: value} giving an agent on another host the settings of s that are not defaults
    (the first variable of each field: it wins over the field's other names in that host's environment)."""
    out = {}
    for name, var in forwarded_fields().items():
        v = getattr(s, name)
        text = _text(name, v)
        if v != getattr(_DEFAULTS, name) and text:      # ("" reads as unset: an empty list is the default)
            out[var] = text
    return out


def env_prefix(settings: dict[str, str]) -> list[str]:
    """`env NAME=VALUE ...` in front of a command run on another host (ssh does not pass our environment); only
    the variables of forwarded fields, and no value with a NUL (a job file edited by hand)."""
    known = set(forwarded_fields().values())
    pairs = [f"{k}={v}" for k, v in sorted(settings.items())
             if k in known and isinstance(v, str) and "\0" not in v]
    return ["env", *pairs] if pairs else []


def write_job_file(path: str, coord_host: str, coord_port: int, computation: str, ckptdir: str,
                   settings: Settings | None = None) -> None:
    """(Re)write the job file atomically; its directory is made and checked like any of ours (safefs)."""
    safefs.makedirs(os.path.dirname(os.path.abspath(path)))
    safefs.atomic_write(path, json.dumps({"coord_host": coord_host, "coord_port": coord_port,
                                          "computation": computation, "ckptdir": ckptdir,
                                          "settings": settings_env(settings) if settings else {}}).encode(),
                        mode=0o600)


def read_job_file(path: str) -> dict | None:
    """The job file, read only from a checked directory, never through a symlink, and only a file of ours that
    nobody else may write (it says which coordinator, checkpoint directory and settings a job's ssh/srun use)."""
    path = os.path.abspath(path)
    try:
        dfd = safefs.open_dir(os.path.dirname(path))
        try:
            fd = safefs.open_file(dfd, os.path.basename(path), os.path.dirname(path))
        finally:
            os.close(dfd)
        with os.fdopen(fd, "rb") as f:
            if os.fstat(f.fileno()).st_mode & 0o022:        # (we write it 0600)
                print(f"hpcckpt: job file {path} is writable by other users: ignored (chmod go-w it); the command "
                      f"runs outside the checkpointed computation", file=sys.stderr)
                return None
            job = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return job if isinstance(job, dict) else None


def job_file_of(pid: int) -> str | None:
    """HPCCKPT_JOB_FILE in a (restored) process's environment."""
    from .procs import environ_var
    return environ_var(pid, "HPCCKPT_JOB_FILE")


def connect_back(spec: str, timeout: float = 30.0) -> list[socket.socket]:
    """The remote side: the four connections to the shim named by spec (HOST:PORT:TOKEN)."""
    host, port, token = spec.rsplit(":", 2)
    task = int(os.environ.get("SLURM_PROCID", os.environ.get("PMI_RANK", "0")) or 0)
    ntasks = int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")) or 1)
    socks = []
    try:
        for role in range(len(ROLES)):
            sk = socket.create_connection((host, int(port)), timeout=timeout)
            sk.settimeout(None)
            sk.sendall(HEADER.pack(bytes.fromhex(token), role, task, ntasks))
            socks.append(sk)
    except OSError:
        for sk in socks:
            sk.close()
        raise
    return socks

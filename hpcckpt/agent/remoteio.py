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
up to date across restarts by the agent) and the connection handshake.
"""
from __future__ import annotations

import json
import os
import socket
import struct

from ..image import safefs

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
    env["HPCCKPT_PYTHON"] = env.get("HPCCKPT_PYTHON") or __import__("sys").executable
    return env


def write_job_file(path: str, coord_host: str, coord_port: int, computation: str, ckptdir: str) -> None:
    """(Re)write the job file atomically; its directory is made and checked like any of ours (safefs)."""
    safefs.makedirs(os.path.dirname(os.path.abspath(path)))
    safefs.atomic_write(path, json.dumps({"coord_host": coord_host, "coord_port": coord_port,
                                          "computation": computation, "ckptdir": ckptdir}).encode(), mode=0o600)


def read_job_file(path: str) -> dict | None:
    """The job file, read only from a checked directory and never through a symlink (it says which coordinator
    and checkpoint directory a job's ssh/srun use)."""
    try:
        return json.loads(safefs.read_file(path))
    except (OSError, ValueError):
        return None


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

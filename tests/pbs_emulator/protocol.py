"""Pieces shared by the emulator's server and its client commands: OpenPBS error numbers and texts, duration
parsing/formatting, the state-dir layout and the socket protocol (one JSON line each way over a unix socket;
the server identifies the caller with SO_PEERCRED, so the uid that ran the command is the job owner).

Standard library only: this module also runs under Debian's /usr/bin/python3 as an unprivileged user."""
from __future__ import annotations

import json
import os
import re
import socket

PBS_VERSION = "23.06.06"
QUEUE = "workq"

# OpenPBS error numbers (src/include/pbs_error.h) and the texts the server sends (src/lib/Liblog/pbs_messages.c).
# Commands exit with the error number truncated to 8 bits, as the real ones do (exit(pbs_errno)).
PBSE_UNKJOBID = 15001
PBSE_PERM = 15007
PBSE_INTERNAL = 15011
PBSE_BADATVAL = 15014
PBSE_BADSTATE = 15016
PBSE_UNKQUE = 15018
PBSE_BADUSER = 15023
PBSE_UNKRESC = 15035
PBSE_NORERUN = 15038
PBSE_BADDEPEND = 15054
PBSE_HISTJOBID = 15139
PBSE_HISTDEPEND = 15229

MESSAGES = {
    PBSE_UNKJOBID: "Unknown Job Id",
    PBSE_PERM: "Unauthorized Request ",          # sic: trailing blank, hence "Unauthorized Request  <jobid>"
    PBSE_INTERNAL: "PBS server internal error",
    PBSE_BADATVAL: "Illegal attribute or resource value",
    PBSE_BADSTATE: "Request invalid for state of job",
    PBSE_UNKQUE: "Unknown queue",
    PBSE_BADUSER: "Bad UID for job execution",
    PBSE_UNKRESC: "Unknown resource",
    PBSE_NORERUN: "job is not rerunnable",
    PBSE_BADDEPEND: "Invalid Job Dependency",
    PBSE_HISTJOBID: "Job has finished",
    PBSE_HISTDEPEND: "Finished job did not satisfy dependency",
}


def exit_code(pbse: int) -> int:
    """What a real command's exit(pbs_errno) leaves in $?: the low 8 bits (PBSE_PERM 15007 -> 159)."""
    return pbse & 0xFF


# Job exit codes set by MoM (src/include/job.h)
JOB_EXEC_FAIL1 = -1          # job could not start (no retry)
JOB_EXEC_KILL_WALLTIME = -29  # killed for exceeding its walltime

# ---------------------------------------------------------------------------------------------- durations

_DURATION = re.compile(r"^\s*(\d+)(?::(\d+))?(?::(\d+))?(?:\.(\d+))?\s*$")


def parse_duration(text: str) -> int | None:
    """PBS duration '[[hours:]minutes:]seconds[.milliseconds]' -> whole seconds, None if malformed."""
    m = _DURATION.match(text or "")
    if not m:
        return None
    parts = [int(p) for p in m.group(1, 2, 3) if p is not None]
    secs = 0
    for p in parts:
        secs = secs * 60 + p
    return secs


def fmt_duration(secs: float) -> str:
    """Seconds -> 'HH:MM:SS' as qstat shows resources (hours are not capped at 99)."""
    secs = max(0, int(secs))
    return "%02d:%02d:%02d" % (secs // 3600, (secs % 3600) // 60, secs % 60)


# ---------------------------------------------------------------------------------------------- state dir

def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, "server.sock")


def read_public_config(state_dir: str) -> dict:
    """The world-readable part of the configuration (server name, ...), written by the server at start."""
    try:
        with open(os.path.join(state_dir, "server.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------- socket protocol

class ConnectError(Exception):
    pass


def send_msg(sock: socket.socket, obj: dict) -> None:
    sock.sendall(json.dumps(obj).encode() + b"\n")


def recv_msg(sock: socket.socket, limit: int = 64 << 20) -> dict | None:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            raise ValueError("message too large")
    if not buf:
        return None
    return json.loads(buf.decode())


def request(state_dir: str, obj: dict, timeout: float | None = None) -> dict:
    """Send one request to the server of state_dir and return its reply (raises ConnectError)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(10)
        try:
            s.connect(socket_path(state_dir))
        except OSError as e:
            raise ConnectError(e.errno or 111) from e
        s.settimeout(timeout)
        send_msg(s, obj)
        reply = recv_msg(s)
        if reply is None:
            raise ConnectError(104)   # ECONNRESET: the server went away mid-request
        return reply
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------- job ids

def normalize_jobid(text: str, server: str) -> str | None:
    """'12', '12.server' or '12.server.domain' -> '12.server'; None if it is not a job id of this server.
    Like get_server() in the real commands, a bare sequence number gets the default server appended."""
    m = re.match(r"^(\d+)(?:\.(.+))?$", text.strip())
    if not m:
        return None
    seq, host = m.group(1), m.group(2)
    if host is None:
        return f"{seq}.{server}"
    short = host.split("@")[0]
    if short == server or short.split(".")[0] == server.split(".")[0]:
        return f"{seq}.{server}"
    return f"{seq}.{short}"      # another server's job: unknown here

"""How an agent finds its node's relay: one per coordinator and node, named by a port file in the run directory;
the first launch on the node starts it (`hpcckpt relay --daemon`), the others find it there."""
from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys

from ..coordinator import protocol
from ..coordinator.client import port_is_open
from ..image import store
from ..settings import Settings

log = logging.getLogger("hpcckpt.relay")
RELAY_HOST = "127.0.0.1"          # a relay serves the agents of its own node only


def port_file(coord_host: str, coord_port: int) -> str:
    return os.path.join(protocol.rundir(), f"relay-{store.safe_name(coord_host)}-{coord_port}.port")


def running_relay(coord_host: str, coord_port: int) -> tuple[str, int] | None:
    """The address of this node's relay for that coordinator, if one answers."""
    try:
        with open(port_file(coord_host, coord_port)) as f:
            port = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return (RELAY_HOST, port) if port_is_open(RELAY_HOST, port, timeout=0.5) else None


def ensure_relay(s: Settings, coord_host: str, coord_port: int) -> tuple[str, int] | None:
    """This node's relay (started if there is none yet); None if it cannot be had (said why: agents then join
    the coordinator directly)."""
    path = port_file(coord_host, coord_port)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # two launches on one node at once start one relay
        found = running_relay(coord_host, coord_port)
        if found is not None:
            return found
        env = dict(os.environ, HPCCKPT_PEER_TIMEOUT=str(s.peer_timeout), HPCCKPT_HEARTBEAT=str(s.heartbeat),
                   HPCCKPT_PHASE_TIMEOUT=str(s.phase_timeout))
        cmd = [sys.executable, "-m", "hpcckpt.cli.main", "relay", "--coord-host", coord_host, "--coord-port",
               str(coord_port), "--port-file", path, "--daemon"]
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            log.warning("cannot start this node's relay (%s); joining the coordinator directly",
                        (r.stderr.strip().splitlines() or ["no reason given"])[-1])
            return None
        found = running_relay(coord_host, coord_port)
        if found is None:
            log.warning("this node's relay started but does not answer; joining the coordinator directly")
        return found

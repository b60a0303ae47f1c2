"""Finding the coordinator to join, or starting one in the background (dmtcp_launch's default)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from ..coordinator import protocol
from ..coordinator.client import CoordinatorUnreachable, command, port_is_open
from ..hostnames import is_local
from ..image import store
from ..settings import Settings

log = logging.getLogger("hpcckpt.agent")

JOIN, NEW, ANY = "join", "new", "any"


def checkpoint_agents(readers: list) -> dict[str, str]:
    """Every agent (id -> host) of the checkpoint these images (ImageReaders) belong to: the coordinator's restart
    gate waits for each before any process runs. From the checkpoint's manifest, whose entries name their agent;
    images moved away from it name their own agent (and images of older versions every agent of theirs)."""
    agents: dict[str, str] = {}
    seen: set[str] = set()
    for r in readers:
        meta = r.meta
        agents.update(meta.get("agents") or {})
        if meta.get("agent_id"):
            agents.setdefault(str(meta["agent_id"]), str(meta.get("hostname") or "?"))
        where = os.path.dirname(os.path.dirname(os.path.abspath(r.path)))
        if where in seen:
            continue
        seen.add(where)
        m = store.manifest_of_image(r.path, int(meta.get("generation") or 0))
        if m is not None and m.computation == meta.get("computation"):
            agents.update({str(i.agent_id): i.host for i in m.images if i.agent_id})
    return agents


def read_port_file(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def start_coordinator(s: Settings, port: int) -> int:
    """Start `hpcckpt coordinator --daemon --exit-on-last` and return the port it listens on."""
    port_file = s.port_file or os.path.join(protocol.rundir(), f"coord-launch-{os.getpid()}.port")
    try:
        os.unlink(port_file)
    except FileNotFoundError:
        pass
    cmd = [sys.executable, "-m", "hpcckpt.cli.main", "coordinator", "--daemon", "--exit-on-last",
           "--coord-host", s.coord_host, "--coord-port", str(port), "--port-file", port_file,
           "--ckptdir", os.path.abspath(s.ckptdir), "--interval", str(s.interval),
           "--keep", str(s.keep_generations), "--timeout", "120"]   # gone if nobody ever joins
    if s.quiet:
        cmd.append("-q")
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        raise CoordinatorUnreachable((r.stderr.strip().splitlines() or ["coordinator failed to start"])[-1])
    got = read_port_file(port_file)
    if got is None:
        raise CoordinatorUnreachable("the coordinator started but did not report its port")
    if not s.port_file:
        os.unlink(port_file)
    log.info("started a coordinator on %s:%d", s.coord_host, got)
    return got


def find_or_start(s: Settings, policy: str = ANY) -> tuple[str, int]:
    """The address of the computation's coordinator, per DMTCP's join/new/any rules; starts one in the
    background if allowed and none answers. Leaves no ZeroMQ context behind (the caller may fork next)."""
    host = s.coord_host
    port = s.coord_port
    if s.port_file and port in (0, None) and policy != NEW:
        port = read_port_file(s.port_file) or 0
    answering = port != 0 and port_is_open(host, port)
    if policy == JOIN and not answering:
        raise CoordinatorUnreachable(f"no coordinator listening on {host}:{port} (--join-coordinator)")
    if policy == NEW and answering:
        raise CoordinatorUnreachable(f"a coordinator is already listening on {host}:{port} (--new-coordinator)")
    if answering:
        try:
            st = command(host, port, "status", timeout=5.0)
        except CoordinatorUnreachable as e:
            raise CoordinatorUnreachable(f"{e}; cannot join the coordinator on {host}:{port}") from None
        log.debug("joining coordinator %s:%d (%d peers)", host, port, st.get("num_peers", 0))
        if s.interval:
            command(host, port, "interval", value=s.interval)
        return host, port
    if not is_local(host):
        raise CoordinatorUnreachable(f"no coordinator listening on {host}:{port}, and one can only be started "
                                     f"automatically on this host")
    port = start_coordinator(s, port)
    for _ in range(50):
        if port_is_open(host, port):
            break
        time.sleep(0.05)
    return host, port

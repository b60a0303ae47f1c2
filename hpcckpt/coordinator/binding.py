"""Where the coordinator listens (docs/protocol.md, "Binding").

Loopback always, and nothing else unless the computation spans hosts:
  * --bind ADDR / the setting bind (HPCCKPT_COORD_BIND=ADDR[,ADDR...]; 0.0.0.0 or * = every interface, DMTCP's way);
  * the address of --coord-host when it is not a loopback name (agents elsewhere were told to use it);
  * inside a batch job over several nodes (Slurm, PBS, Grid Engine), the interface towards the other nodes;
  * at run time, the interface towards a host where our ssh/srun shim or a multi-host restart is about to start
    an agent: they ask the coordinator (an authenticated `listen` command) before starting it.
"""
from __future__ import annotations

import ipaddress
import logging
import socket

log = logging.getLogger("hpcckpt.coordinator")

LOOPBACK = "127.0.0.1"
ANY = "0.0.0.0"


class BindError(OSError):
    pass


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve(host: str) -> str:
    if host in ("*", ANY):
        return ANY
    try:
        return socket.gethostbyname(host)
    except OSError as e:
        raise BindError(f"cannot resolve coordinator address {host}: {e}") from None


def address_towards(host: str | None) -> str:
    """This host's address as seen from `host` (the interface our packets to it leave by)."""
    candidates = []
    if host:
        try:
            candidates.append(socket.gethostbyname(host))
        except OSError:
            pass
    for target in candidates:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((target, 9))
                ip = s.getsockname()[0]
                if not ip.startswith("127.") or target.startswith("127."):
                    return ip
        except OSError:
            continue
    from ..hostnames import local_ipv4s
    return local_ipv4s()[0]


def allocation_address() -> str | None:
    """The interface towards the other nodes when we run inside a batch job over several nodes, else None."""
    from ..sched.registry import detect
    try:
        sched = detect()
        if sched is None:
            return None
        nodes = list(dict.fromkeys(sched.node_list()))
        me = sched.this_node(nodes)
    except Exception as e:          # noqa: BLE001 - a scheduler command failing must not stop the coordinator
        log.warning("cannot list the nodes of this batch job (%s); listening on loopback only", e)
        return None
    others = [n for n in nodes if n != me]
    if not others:
        return None
    addr = address_towards(others[0])
    return None if is_loopback(addr) else addr


def plan(coord_host: str, explicit: list[str] | None) -> list[tuple[str, str, bool]]:
    """(address, why, required) to listen on, loopback first; `required` ones make the coordinator fail if they
    cannot be bound (the others only warn). explicit: --bind / Settings.bind (HPCCKPT_COORD_BIND)."""
    out: list[tuple[str, str, bool]] = [(LOOPBACK, "loopback", True)]
    for a in explicit or []:
        out.append((resolve(a), f"--bind {a}", True))
    if coord_host and not is_loopback(coord_host):
        try:
            out.append((resolve(coord_host), f"--coord-host {coord_host}", False))
        except BindError as e:
            log.warning("%s; agents on other hosts cannot reach this coordinator", e)
    addr = allocation_address()
    if addr:
        out.append((addr, "a batch job over several nodes", False))
    if any(a == ANY for a, _, _ in out):
        return [(ANY, "every interface (--bind 0.0.0.0)", True)]
    seen, uniq = set(), []
    for a, why, req in out:
        if a not in seen:
            seen.add(a)
            uniq.append((a, why, req))
    return uniq


def bindable(addr: str) -> str | None:
    """Why the coordinator must not listen on addr when asked at run time (None: it may)."""
    from ..hostnames import local_ipv4s
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return f"{addr!r} is not an IPv4 address"
    if ip.version != 4 or ip.is_unspecified or ip.is_multicast:
        return f"{addr} is not a unicast IPv4 address (every interface needs --bind 0.0.0.0 at start)"
    if not ip.is_loopback and addr not in local_ipv4s():
        return f"{addr} is not an address of this host"
    return None


def open_towards(port: int, address: str, host: str = LOOPBACK) -> None:
    """Ask the coordinator on this host to listen on address too (an agent is about to be started elsewhere
    that will connect there); raises CoordinatorUnreachable with the reason."""
    from .client import CoordinatorUnreachable, command
    if address == LOOPBACK:
        return
    r = command(host, port, "listen", timeout=10, address=address)
    if not r.get("ok"):
        raise CoordinatorUnreachable(f"the coordinator on port {port} cannot listen on {address}: "
                                     f"{r.get('error')}")

"""This host's names and addresses: which host names in a checkpoint, a host file or a coordinator address are
this host. One rule for the whole package (joining a coordinator, restarting across hosts, placing a restart
on an allocation's nodes)."""
from __future__ import annotations

import ipaddress
import socket


def local_ipv4s() -> list[str]:
    """This host's (network namespace's) IPv4 addresses, loopback last."""
    found: list[str] = []
    try:
        with open("/proc/net/fib_trie") as f:
            lines = f.read().splitlines()
    except OSError:
        return ["127.0.0.1"]
    for prev, line in zip(lines, lines[1:]):
        if "/32 host LOCAL" in line:
            ip = prev.strip().lstrip("|-+` ").strip()
            if ip not in found:
                found.append(ip)
    return sorted(found, key=lambda ip: ipaddress.ip_address(ip).is_loopback) or ["127.0.0.1"]


def is_local(host: str) -> bool:
    """Is `host` this host? Loopback and unspecified addresses ("" and 0.0.0.0 as a coordinator address mean
    here); this host's name, short name or fully qualified name, or a name sharing its short name; a name that
    resolves to one of this host's own non-loopback addresses. A name resolving to a loopback address is not
    taken as this host: a checkpoint's host names resolve through the restarting host's /etc/hosts, where a
    stale or Debian-style (127.0.1.1) entry says nothing about which host it names."""
    if host in ("", "localhost", "0.0.0.0", "::", "::1"):
        return True
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    names = {socket.gethostname(), socket.gethostname().split(".")[0]}
    try:
        names.add(socket.getfqdn())
    except OSError:
        pass
    if host in names or host.split(".")[0] in names:
        return True
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        return False
    return ip in local_ipv4s() and not ipaddress.ip_address(ip).is_loopback

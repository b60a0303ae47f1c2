"""Which node of a rerun's allocation takes over which host of the checkpoint.

A requeued job rarely gets the same nodes again. The checkpoint's images name the hosts they ran on; the new
allocation names its nodes (Scheduler.node_list). Hosts that are also in the new allocation stay where they
are; the others take, in order, the new nodes that no host of the checkpoint holds. The order of the old hosts
is the old allocation's (recorded in the checkpoint directory at the start of every run), so the batch host
stays first. Host names and node names are compared by their short names too (node001 = node001.cluster).
"""
from __future__ import annotations

import os

NODES_FILE = ".hpcckpt-nodes"          # in the checkpoint directory: the nodes of the latest run


class NodeError(RuntimeError):
    pass


def short(name: str) -> str:
    return name.split(".")[0]


def _find(name: str, among: list[str]) -> str | None:
    for n in among:
        if n == name or short(n) == short(name):
            return n
    return None


def ordered_hosts(table_hosts: list[str], old_allocation: list[str]) -> list[str]:
    """The checkpoint's hosts (each once) in the order of the allocation they ran in; hosts it does not name
    (a host reached outside the allocation, or no record) follow in the table's order."""
    hosts = list(dict.fromkeys(table_hosts))

    def rank(h: str) -> int:
        found = _find(h, old_allocation)
        return old_allocation.index(found) if found is not None else len(old_allocation)
    return sorted(hosts, key=rank)       # stable: unknown hosts keep their table order


def plan(old_hosts: list[str], new_nodes: list[str], gather: bool = False, local_host: str | None = None,
         here_node: str | None = None) -> dict[str, str]:
    """old host -> new node, for every old host. local_host: the old host that is this machine (its part stays
    here, on here_node, whatever the node's name: a node's name need not be its host name). Too few new nodes:
    NodeError, unless gather (the hosts left over then share the new nodes, in turn, each part in an agent of
    its own)."""
    if not new_nodes:
        raise NodeError("the new allocation has no nodes")
    mapping: dict[str, str] = {}
    free = list(new_nodes)
    if local_host in old_hosts and here_node in free:
        mapping[local_host] = local_host
        free.remove(here_node)
    for h in old_hosts:
        if h in mapping:
            continue
        n = _find(h, free)
        if n is not None:
            mapping[h] = n
            free.remove(n)
    movers = [h for h in old_hosts if h not in mapping]
    if len(movers) > len(free) and not gather:
        raise NodeError(f"the checkpoint ran on {len(old_hosts)} node(s) ({', '.join(old_hosts)}) but this run "
                        f"has {len(new_nodes)} ({', '.join(new_nodes)}); ask for {len(old_hosts)} nodes, or set "
                        f"'gather: true' to put several nodes' parts on one")
    for i, h in enumerate(movers):
        mapping[h] = free[i] if i < len(free) else new_nodes[(i - len(free)) % len(new_nodes)]
    return mapping


def read_allocation(ckptdir: str) -> list[str]:
    try:
        with open(os.path.join(ckptdir, NODES_FILE)) as f:
            return f.read().split()
    except OSError:
        return []


def write_allocation(ckptdir: str, nodes: list[str]) -> None:
    from ..image import store
    store.atomic_write(os.path.join(ckptdir, NODES_FILE), ("\n".join(nodes) + "\n").encode(), mode=0o600)


def write_hostfile(path: str, mapping: dict[str, str]) -> None:
    """The restart's --hostfile: one "OLD NEW" line per host of the checkpoint."""
    from ..image import store
    store.atomic_write(path, "".join(f"{old} {new}\n" for old, new in mapping.items()).encode(), mode=0o600)

"""The simulated peers of bench/scale.py that stand behind relays: relay_worker (the relay simulated: the
design measured before the relay existed) and real_relay_worker (the relay module's own code, hpcckpt/relay/),
and what every simulated agent answers (agent_ack). Run in worker processes by scale.py."""
from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def agent_ack(msg: dict) -> dict:
    """What an agent with no processes answers to a phase message."""
    reply = {"type": "ack", "phase": msg["phase"], "generation": msg["generation"], "ok": True, "error": None}
    if msg["phase"] == "suspend":
        reply["tcp_ends"] = []
    elif msg["phase"] == "checkpoint":
        reply.update(images=[], stats={"bytes_in": 0, "bytes_out": 0}, pending=False)
    elif msg["phase"] == "resume":
        reply["stats"] = {"frozen_s": 0.0}
    return reply


def aggregate(phase: dict, acks: list[dict]) -> dict:
    """A relay's one ack for its agents' acks of a phase: ok only if all are; the lists the coordinator keeps
    (TCP ends, images) concatenated; the stats summed, frozen_s the longest; the first error, naming its agent."""
    up = {"type": "ack", "phase": phase["phase"], "generation": phase["generation"],
          "ok": all(a.get("ok") for a in acks), "error": next((a.get("error") for a in acks if not a.get("ok")), None)}
    if phase["phase"] == "suspend":
        up["tcp_ends"] = [e for a in acks for e in a.get("tcp_ends") or []]
    elif phase["phase"] == "checkpoint":
        stats: dict = {}
        for a in acks:
            for k, v in (a.get("stats") or {}).items():
                stats[k] = stats.get(k, 0) + v
        up.update(images=[i for a in acks for i in a.get("images") or []], stats=stats,
                  pending=any(a.get("pending") for a in acks))
    elif phase["phase"] == "resume":
        up["stats"] = {"frozen_s": max((a.get("stats") or {}).get("frozen_s", 0.0) for a in acks)}
    return up


def relay_worker(port: int, rundir: str, first: int, count: int, per_relay: int, local: bool, ready, stop) -> None:
    """count relays in one process, each one peer of the coordinator standing for per_relay agents of its node.

    local=True: each relay has its per_relay agents as real connections (a ROUTER of its own on loopback, the
    agents DEALERs in this process, the same authenticated framing: the relay checks MAC and freshness as the
    coordinator does), forwards each phase to them (encoded once) and acks upward once all have answered.
    local=False: the agents' side is left out (the relay answers at once): what the coordinator alone costs in a
    tree, its part of the critical path on a cluster where each node's relay runs on that node."""
    os.environ["HPCCKPT_RUNDIR"] = rundir
    _raise_nofile()
    import zmq

    from hpcckpt.coordinator import protocol
    key = protocol.read_secret(port)
    ctx = zmq.Context()
    ctx.MAX_SOCKETS = count * (per_relay + 2) + 64
    poller = zmq.Poller()
    ups, downs, agents = [], [], []          # per relay: the coordinator side, its ROUTER, its agents' DEALERs
    fresh = protocol.Freshness()
    for i in range(count):
        n = first + i
        up = ctx.socket(zmq.DEALER)
        up.setsockopt(zmq.LINGER, 0)
        up.connect(f"tcp://127.0.0.1:{port}")
        ids = [f"a{n * per_relay + j:06d}" for j in range(per_relay)]
        up.send_multipart(protocol.encode(key, {
            "type": "hello", "role": "peer", "host": f"node{n}", "agent_pid": 100000 + n,
            "processes": [{"pid": 1000 + j, "unique_id": f"sim-{a}", "program": "sim"} for j, a in enumerate(ids)],
            "computation": "scale", "restart": False, "generation": None, "agent_id": f"relay{n:05d}",
            "agents": {}, "agent_ids": ids}))
        poller.register(up, zmq.POLLIN)
        ups.append(up)
        mine = []
        if local:
            down = ctx.socket(zmq.ROUTER)
            down.setsockopt(zmq.LINGER, 0)
            lport = down.bind_to_random_port("tcp://127.0.0.1")
            poller.register(down, zmq.POLLIN)
            downs.append(down)
            for a in ids:
                d = ctx.socket(zmq.DEALER)
                d.setsockopt(zmq.LINGER, 0)
                d.setsockopt(zmq.IDENTITY, a.encode())
                d.connect(f"tcp://127.0.0.1:{lport}")
                # (its relay can only send to it once it has heard from it: a ROUTER drops what it cannot route)
                d.send_multipart(protocol.encode(key, {"type": "hello", "role": "peer", "agent_id": a}))
                poller.register(d, zmq.POLLIN)
                mine.append(d)
        agents.append(mine)
    ids_of = [[f"a{(first + i) * per_relay + j:06d}".encode() for j in range(per_relay)] for i in range(count)]
    relay_of = {s: i for i, s in enumerate(ups)} | {s: i for i, s in enumerate(downs)}
    agent_socks = {d for mine in agents for d in mine}
    current: list[dict | None] = [None] * count        # the phase each relay awaits its agents' acks for
    acks: list[dict] = [{} for _ in range(count)]
    present: list[set[bytes]] = [set() for _ in range(count)]    # the agents each relay has heard from
    welcomed = 0
    told = False
    last_hb = time.monotonic()
    while not stop.is_set():
        for s in dict(poller.poll(100)):
            while True:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if s in agent_socks:                     # an agent: answer its relay's phase
                    msg = protocol.decode(key, frames)
                    if msg.get("type") == "phase" and msg["phase"] != "abort":
                        s.send_multipart(protocol.encode(key, agent_ack(msg)))
                    continue
                r = relay_of[s]
                if s is ups[r]:                          # the coordinator
                    msg = protocol.decode(key, frames)
                    t = msg.get("type")
                    if t == "welcome":
                        welcomed += 1
                    elif t == "phase" and local:
                        current[r], acks[r] = msg, {}
                        fwd = protocol.encode(key, {k: v for k, v in msg.items() if k not in ("nonce", "ts")})
                        for ident in ids_of[r]:
                            downs[r].send_multipart([ident, *fwd])
                    elif t == "phase" and msg["phase"] != "abort":
                        s.send_multipart(protocol.encode(key, agent_ack(msg)))
                    continue
                ident, msg = frames[0], protocol.decode(key, frames[1:], fresh)     # an agent's, checked
                if msg.get("type") == "hello":
                    present[r].add(ident)
                    continue
                cur = current[r]
                if msg.get("type") != "ack" or cur is None or msg.get("phase") != cur["phase"]:
                    continue
                acks[r][ident] = msg
                if len(acks[r]) == per_relay:
                    current[r] = None
                    if cur["phase"] != "abort":
                        ups[r].send_multipart(protocol.encode(key, aggregate(cur, list(acks[r].values()))))
        if welcomed == count and not told and (not local or all(len(p) == per_relay for p in present)):
            ready.put(count)
            told = True
        if time.monotonic() - last_hb > 2.0:
            for s in ups:
                s.send_multipart(protocol.encode(key, {"type": "heartbeat"}))
            for mine in agents:
                for d in mine:
                    d.send_multipart(protocol.encode(key, {"type": "heartbeat"}))
            last_hb = time.monotonic()
    for s in [*ups, *downs, *agent_socks]:
        s.close(0)
    ctx.term()


def real_relay_worker(port: int, rundir: str, first: int, count: int, per_relay: int, local: bool, ready,
                      stop) -> None:
    """count REAL relays (hpcckpt/relay/relay.py: the code `hpcckpt relay` runs, its handlers and aggregation) in
    one process, driven by one poll loop instead of one process each.

    local=True: each relay has per_relay simulated agents (DEALERs in this process, the real framing) that say
    hello to it and answer each phase as an agent without processes would. local=False: relays without agents
    (each phase is answered at once by the relay code, its round having no members): the coordinator's stage."""
    os.environ["HPCCKPT_RUNDIR"] = rundir
    _raise_nofile()
    import zmq

    from hpcckpt.coordinator import protocol
    from hpcckpt.relay.relay import Relay
    from hpcckpt.settings import Settings
    key = protocol.read_secret(port)
    ctx = zmq.Context()
    ctx.MAX_SOCKETS = count * (per_relay + 4) + 64
    poller = zmq.Poller()
    relays = []
    agents: list = []
    for i in range(count):
        n = first + i
        r = Relay(Settings(), "127.0.0.1", port, ctx=ctx)
        r.host = f"node{n}"
        r.idle_exit_s = float("inf")
        relays.append(r)
        poller.register(r.down, zmq.POLLIN)
        poller.register(r.up.sock, zmq.POLLIN)
        if not local:
            r.send_hello()
            continue
        for j in range(per_relay):
            a = f"a{n * per_relay + j:06d}"
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.setsockopt(zmq.IDENTITY, a.encode())
            d.connect(f"tcp://127.0.0.1:{r.port}")
            d.send_multipart(protocol.encode(key, protocol.Hello(f"node{n}", 100000 + j, [
                {"pid": 1000 + j, "unique_id": f"sim-{a}", "program": "sim"}], "scale", agent_id=a).to_dict()))
            poller.register(d, zmq.POLLIN)
            agents.append(d)
    by_sock = {r.down: r for r in relays} | {r.up.sock: r for r in relays}
    agent_socks = set(agents)
    welcomed = 0
    told = False
    last_hb = time.monotonic()
    while not stop.is_set():
        for s in dict(poller.poll(100)):
            if s in agent_socks:                     # an agent: answer its relay's phase
                while True:
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    msg = protocol.decode(key, frames)
                    if msg.get("type") == "welcome":
                        welcomed += 1
                    elif msg.get("type") == "phase" and msg["phase"] != "abort":
                        s.send_multipart(protocol.encode(key, agent_ack(msg)))
                continue
            r = by_sock[s]
            if s is r.down:
                r.drain_down()
            else:
                r.drain_up()
        now = time.monotonic()
        for r in relays:
            r.tick(now)
        if not told and all(r.welcome is not None for r in relays) and (not local or welcomed == len(agents)):
            ready.put(count)
            told = True
        if now - last_hb > 2.0:
            for d in agents:
                d.send_multipart(protocol.encode(key, {"type": "heartbeat"}))
            last_hb = now
    for d in agents:
        d.close(0)
    for r in relays:
        r.down.close(0)
        r.up.sock.close(0)
        r.up.monitor.close(0)
    ctx.term()

"""The per-node relay: one peer of the coordinator for every agent of its node (docs/design.md "Relays").

Upward it sends one hello for the node (every agent's id and processes, again when one joins), one ack per phase
and one `written` (tally.py), its own heartbeat, and passes `request`, `abandon`, `restored`, `kv_put`, `kv_get`
and `bye` through with the agent's id. Downward it receives a phase, a heartbeat or a `kill` once and sends it to
its agents encoded once, splits `committed` by agent id and builds each agent's `welcome`. Every message is
verified where it arrives (MAC, time, nonce: the relay keeps its own replay memory for its agents) and every one
it sends is signed anew with the computation's secret.

Liveness: an agent silent past peer_timeout is reported up (`bye` with its id; `abandon` if it was in a round,
which fails the round before its commit); a coordinator lost (silent, or its connection closed) ends the relay,
and its agents fall back to the coordinator directly (agent/liveness.py's fallback)."""
from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import time

import zmq

from ..coordinator import protocol
from ..coordinator.client import Connection
from ..coordinator.ratelog import RateLimitedLog
from ..image import safefs
from ..settings import Settings
from .tally import Agent, Tally, ends_needed, index_ends

log = logging.getLogger("hpcckpt.relay")
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
IDLE_EXIT_S = 10.0             # no agent this long (none came, or the last one left): the relay exits
PHASE_SHARE = 0.8              # of the coordinator's phase timeout: the relay's error names the slow agent first
PASSED_UP = ("request", "abandon", "restored", "kv_put", "kv_get")


class Relay:
    def __init__(self, s: Settings, coord_host: str, coord_port: int, bind_host: str = "127.0.0.1",
                 ctx: zmq.Context | None = None):
        """ctx: a ZeroMQ context to share (bench/scale.py runs many relays in one process)."""
        self.s = s
        self.relay_id = secrets.token_hex(6)
        self.up = Connection(coord_host, coord_port, ctx=ctx, routing_id=f"relay-{self.relay_id}".encode(),
                             peer_timeout=s.peer_timeout)
        self.key = self.up.key
        self.ctx = self.up.ctx
        self.down = self.ctx.socket(zmq.ROUTER)
        self.down.setsockopt(zmq.LINGER, 0)
        self.down.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        self.down.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.down.setsockopt(zmq.BACKLOG, 1024)
        self.port = self.down.bind_to_random_port(f"tcp://{bind_host}", min_port=20000, max_port=60000)
        self.bind_host = bind_host
        self.fresh = protocol.Freshness()
        self.rejects = RateLimitedLog(log, "rejected messages")     # (strangers on the node can send at will)
        self.host = os.uname().nodename
        self.agents: dict[bytes, Agent] = {}
        self.by_id: dict[str, bytes] = {}
        self.computation: str | None = None
        self.welcome: dict | None = None          # the coordinator's last welcome (what each agent's is built of)
        self.round: Tally | None = None
        self.kv_asks: dict[str, list[bytes]] = {}
        self.hello_due = False
        self.changed: dict[str, list[dict]] = {}  # agents whose processes changed since our last heartbeat
        self.last_up = 0.0
        self.last_heard = time.monotonic()
        self.down_since: float | None = None
        self.idle_since = time.monotonic()
        self.idle_exit_s = IDLE_EXIT_S
        self.next_scan = 0.0
        self.quit = False
        self.handlers = {"hello": self._on_hello, "heartbeat": self._on_heartbeat, "ack": self._on_ack,
                         "written": self._on_written, "bye": self._on_bye,
                         **{k: self._pass_up for k in PASSED_UP}}

    # ---------------------------------------------------------------------------------------- lifecycle --
    def publish(self, port_file: str | None) -> None:
        """Our agents find us by the port file (find.py); they need no copy of the secret: they sign with the
        computation's, read by the coordinator's port as direct agents do."""
        log.info("relay %s on %s:%d for the coordinator %s:%d", self.relay_id, self.bind_host, self.port,
                 self.up.host, self.up.port)
        if port_file:
            safefs.atomic_write(port_file, f"{self.port} {os.getpid()}\n".encode(), 0o600)

    def close(self) -> None:
        self.down.close(0)
        self.up.close()

    def serve_forever(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: setattr(self, "quit", True))
        poller = zmq.Poller()
        poller.register(self.down, zmq.POLLIN)
        poller.register(self.up.sock, zmq.POLLIN)
        while not self.quit:
            events = dict(poller.poll(timeout=250))
            if self.up.sock in events:
                self.drain_up()
            if self.down in events:
                self.drain_down()
            self.tick(time.monotonic())
        self.send_up({"type": "bye", "reason": "relay exits"})

    # ---------------------------------------------------------------------------------------- messaging --
    def send_up(self, msg: dict) -> None:
        self.up.send(msg)
        self.last_up = time.monotonic()

    def send_down(self, idents, msg: dict) -> None:
        """Encoded once for all of them (a phase's TCP ends can be big)."""
        frames = protocol.encode(self.key, msg)
        for ident in list(idents):
            try:
                self.down.send(ident, _MORE)
                self.down.send(frames[0], _MORE)
                self.down.send(frames[1], _MORE)
                self.down.send(frames[2], _LAST)
            except zmq.ZMQError as e:
                log.warning("could not send %s to %r: %s", msg.get("type"), ident, e)

    def drain_down(self) -> None:
        while True:
            try:
                frames = self.down.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.on_agent_frames(frames)
        if self.hello_due:
            self.send_hello()

    def drain_up(self) -> None:
        while True:
            try:
                msg = self.up.recv(0)
            except protocol.ProtocolError as e:
                log.warning("refused a message from the coordinator: %s", e)
                continue
            except Exception as e:          # (an unauthenticated refusal: CoordinatorUnreachable)
                log.error("%s", e)
                self.quit = True
                return
            if msg is None:
                return
            self.last_heard = time.monotonic()
            self.on_coordinator(msg)

    # ------------------------------------------------------------------------------------- from agents --
    def on_agent_frames(self, frames: list[bytes]) -> None:
        ident, rest = frames[0], frames[1:]
        if len(rest) != 3 or sum(map(len, rest)) > protocol.MAX_MESSAGE_BYTES:
            self.rejects.warning("rejected a message from connection %s: %d frame(s), %d bytes", ident.hex(),
                                 len(rest), sum(map(len, rest)))
            return
        try:
            msg = protocol.decode(self.key, rest, self.fresh)
        except protocol.Refused as e:
            self.send_down([ident], {"type": "reject", "reason": str(e), "re": e.nonce})
            return
        except protocol.ProtocolError as e:
            self.rejects.warning("rejected a message from connection %s: %s", ident.hex(), e)
            if rest[0] == protocol.PROTO_TAG:
                self.down.send_multipart([ident, protocol.PROTO_TAG, b"",
                                          json.dumps({"type": "reject", "reason": str(e)}).encode()])
            return
        a = self.agents.get(ident)
        if a is not None:
            a.last_seen = time.monotonic()
        handler = self.handlers.get(str(msg.get("type")))
        if handler is None:
            self.send_down([ident], {"type": "reject", "reason": f"a relay does not take {msg.get('type')!r} "
                                                                 f"messages (commands go to the coordinator)"})
            return
        if a is None and msg.get("type") != "hello":
            self.send_down([ident], {"type": "reject", "rejoin": True, "reason": "unknown agent (relay restarted?)"})
            return
        handler(ident, msg)

    def _on_hello(self, ident: bytes, msg: dict) -> None:
        if msg.get("restart"):
            self.send_down([ident], {"type": "reject", "reason": "a restarting agent joins the coordinator directly, "
                                                                 "not through a relay"})
            return
        comp = msg.get("computation")
        if comp and self.computation and comp != self.computation:
            self.send_down([ident], {"type": "reject", "reason": f"this relay serves computation {self.computation}"})
            return
        aid = str(msg.get("agent_id") or ident.hex())
        old = self.by_id.get(aid)
        if old is not None and old != ident:
            prev = self.agents.pop(old, None)
            if prev is not None and self.round is not None and old in self.round.members:
                self._left_round(prev, "reconnected during the checkpoint")
        a = self.agents.get(ident)
        if a is None or a.agent_id != aid:
            a = Agent(ident, aid, str(msg.get("host") or self.host), int(msg.get("agent_pid") or 0),
                      list(msg.get("processes") or []))
            self.agents[ident] = a
            self.by_id[aid] = ident
        else:
            a.processes = list(msg.get("processes") or a.processes)
        a.welcome_due = True
        self.computation = self.computation or comp
        self.hello_due = True
        self.idle_since = time.monotonic()

    def send_hello(self) -> None:
        self.hello_due = False
        members = [{"agent_id": a.agent_id, "agent_pid": a.agent_pid, "processes": a.processes}
                   for a in self.agents.values()]
        self.send_up(protocol.Hello(self.host, os.getpid(), [p for a in self.agents.values() for p in a.processes],
                                    self.computation, role="relay", members=members).to_dict())

    def _on_heartbeat(self, ident: bytes, msg: dict) -> None:
        a = self.agents[ident]
        if "processes" in msg and msg["processes"] != a.processes:
            a.processes = list(msg["processes"])
            self.changed[a.agent_id] = a.processes
        if "progress" in msg:
            a.progress = int((msg.get("progress") or {}).get("bytes", 0))
            if self.round is not None:
                self.round.last_progress = time.monotonic()

    def _on_ack(self, ident: bytes, msg: dict) -> None:
        if self.round is not None:
            self._up_if(self.round.ack(ident, msg))

    def _on_written(self, ident: bytes, msg: dict) -> None:
        if self.round is not None:
            self._up_if(self.round.written(ident, msg))

    def _pass_up(self, ident: bytes, msg: dict) -> None:
        a = self.agents[ident]
        out = {k: v for k, v in msg.items() if k not in ("nonce", "ts")}
        out["agent_id"] = a.agent_id
        if msg.get("type") == "kv_get":
            self.kv_asks.setdefault(str(msg.get("key")), []).append(ident)
        if msg.get("type") == "abandon" and self.round is not None and ident in self.round.members:
            # its processes run again: the coordinator fails the round if it is not committed yet; else the
            # round goes on without it here
            out["reason"] = f"{a.name()}: {msg.get('reason')}"
            self.send_up(out)
            r = self.round
            self._up_if(r.drop(ident))
            self._up_if(r.written_due())
            return
        self.send_up(out)

    def _on_bye(self, ident: bytes, msg: dict) -> None:
        a = self.agents.get(ident)
        if a is not None:
            self._forget(a, str(msg.get("reason") or "exited"))

    def _forget(self, a: Agent, why: str) -> None:
        """An agent gone (bye) or lost (silent): told upward; a round it took part in fails before its commit."""
        self.agents.pop(a.ident, None)
        if self.by_id.get(a.agent_id) == a.ident:
            del self.by_id[a.agent_id]
        if self.round is not None and a.ident in self.round.members:
            self._left_round(a, why)
        self.send_up({"type": "bye", "reason": why, "agent_id": a.agent_id})
        if not self.agents:
            self.idle_since = time.monotonic()

    def _left_round(self, a: Agent, why: str) -> None:
        r = self.round
        assert r is not None
        self.send_up(protocol.Abandon(r.generation, f"{a.name()} {why}", a.agent_id).to_dict())
        self._up_if(r.drop(a.ident))
        self._up_if(r.written_due())

    def _up_if(self, msg: dict | None) -> None:
        if msg is not None:
            self.send_up(msg)

    # -------------------------------------------------------------------------------- from the coordinator --
    def on_coordinator(self, msg: dict) -> None:
        kind = msg.get("type")
        body = {k: v for k, v in msg.items() if k not in ("nonce", "ts", "re")}
        if kind == "welcome":
            self._on_welcome(body)
        elif kind == "reject":
            if msg.get("rejoin"):
                if self.agents:            # the coordinator does not know us (restarted, or gave us up)
                    self.send_hello()
            else:
                log.error("coordinator refused: %s", msg.get("reason"))
                self.send_down([a.ident for a in self.agents.values() if a.welcome_due], body)
        elif kind == "heartbeat":
            self._on_coordinator_heartbeat(body)
        elif kind == "phase":
            self._on_phase(body)
        elif kind == "committed":
            self._on_committed(body)
        elif kind == "kill":
            self.send_down(self.agents, body)
        elif kind == "kv":
            self.send_down(self.kv_asks.pop(str(msg.get("key")), []), body)

    def _on_welcome(self, msg: dict) -> None:
        self.welcome = msg
        self.computation = msg.get("computation") or self.computation
        peer_ids = msg.pop("peer_ids", None) or {}
        due = []
        for a in self.agents.values():
            if a.agent_id in peer_ids:
                a.peer_id = int(peer_ids[a.agent_id])
            if a.welcome_due and a.peer_id is not None:
                a.welcome_due = False
                due.append(a)
        for a in due:
            self.send_down([a.ident], {**msg, "peer_id": a.peer_id, "round": None})

    def _on_coordinator_heartbeat(self, msg: dict) -> None:
        r = self.round
        if r is not None and msg.get("generation") != r.generation:
            self.round = None               # the coordinator no longer runs it (our agents abandon it on this)
        self.send_down(self.agents, msg)

    def _on_phase(self, msg: dict) -> None:
        phase, gen = msg.get("phase"), int(msg.get("generation") or 0)
        if phase == "suspend":
            members = {i: a for i, a in self.agents.items() if not a.welcome_due}
            self.round = Tally(gen, members)
        r = self.round
        if r is None or r.generation != gen:
            log.warning("phase %s of generation %s without its round here; ignored", phase, gen)
            return
        targets = list(r.members)
        if phase == "abort":
            self.round = None                # (agents do not acknowledge an abort)
        else:
            r.begin(str(phase))
        if phase == "drain" and msg.get("tcp_ends"):
            # each agent gets the other ends of its own connections only, not every end of the computation
            # (O(ends) to every agent was the drain's cost for an all-to-all job of thousands of ranks)
            index = index_ends(msg["tcp_ends"])
            for i in targets:
                self.send_down([i], {**msg, "tcp_ends": ends_needed(index, r.ends.get(i, []),
                                                                    r.members[i].agent_id)})
        else:
            self.send_down(targets, msg)
        if phase != "abort" and not targets:
            self._up_if(r.aggregate())       # (no agent of ours takes part: nothing to wait for)

    def _on_committed(self, msg: dict) -> None:
        """Each agent gets the retired images that are its own; an image of no agent of ours goes to all (they
        filter by host, as agents did before relays)."""
        self.round = None
        mine: dict[bytes, list[dict]] = {}
        anyone = []
        for e in msg.get("prune") or []:
            i = self.by_id.get(str(e.get("agent_id") or ""))
            if i is not None:
                mine.setdefault(i, []).append(e)
            else:
                anyone.append(e)
        for ident in self.agents:
            entries = mine.get(ident, []) + anyone
            if entries:
                self.send_down([ident], {**msg, "prune": entries})
        self.send_down([i for i in self.agents if not (mine.get(i) or anyone)], {**msg, "prune": []})

    # ------------------------------------------------------------------------------------------- timers --
    def tick(self, now: float) -> None:
        self.rejects.flush(now)
        for ev in self.up.link_events():
            self.down_since = (self.down_since or now) if ev == "down" else None
        hb = self.s.heartbeat_s()
        if self.down_since is not None and now - self.down_since > 3 * hb:
            log.error("lost the coordinator %s:%d (its connection closed); the relay exits, its agents fall back "
                      "to the coordinator", self.up.host, self.up.port)
            self.quit = True
        elif now - self.last_heard > self.s.peer_timeout:
            log.error("the coordinator %s:%d is silent for %.0f s; the relay exits", self.up.host, self.up.port,
                      now - self.last_heard)
            self.quit = True
        if self.hello_due:
            self.send_hello()
        if self.changed or now - self.last_up >= hb:
            msg: dict = {"type": "heartbeat"}
            if self.changed:
                msg["processes"] = [p for a in self.agents.values() for p in a.processes]
                msg["members"], self.changed = self.changed, {}
            if self.round is not None and any(a.progress for a in self.round.members.values()):
                msg["progress"] = {"bytes": sum(a.progress for a in self.round.members.values())}
            self.send_up(msg)
        if now < self.next_scan:
            return
        self.next_scan = now + 0.5
        for a in list(self.agents.values()):
            if now - a.last_seen > self.s.peer_timeout:
                log.error("%s silent for %.0f s; reported lost", a.name(), now - a.last_seen)
                self._forget(a, f"stopped responding (silent {now - a.last_seen:.0f} s)")
        r = self.round
        if r is not None and now - r.last_progress > PHASE_SHARE * self.s.phase_timeout:
            slow = r.slow()
            if slow:
                why = (f"relay on {self.host}: no progress for {now - r.last_progress:.0f} s in phase {r.phase}, "
                       f"waiting for {', '.join(a.name() for a in slow)}")
                log.error("%s", why)
                r.last_progress = now
                self.send_up(r.aggregate(why) if not r.acked else
                             {"type": "written", "generation": r.generation, "ok": False, "error": why})
                if r.acked:
                    r.written_sent = True
        if not self.agents and now - self.idle_since > self.idle_exit_s:
            log.info("no agents for %.0f s; the relay exits", now - self.idle_since)
            self.quit = True

"""The coordinator: one per computation, a ZeroMQ ROUTER that peers (agents) and commands talk to.

It keeps no state on disk besides what a checkpoint produces (manifests and the restart script), so it can
be killed and started again; a computation restarted from images adopts a new coordinator.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable

import zmq

from .. import __version__
from ..image import levels, store
from ..settings import Settings
from . import binding, protocol
from .base import Peer
from .commands import Commands
from .commit import Commits
from .gather import Restarts
from .liveness import Liveness
from .ranks import RankBook
from .ratelog import RateLimitedLog
from .relayed import Relayed
from .rounds import Rounds

log = logging.getLogger("hpcckpt.coordinator")
Handler = Callable[[bytes, dict], None]
# Raw int flags: pyzmq's send_multipart ORs IntFlag enums per frame, half the cost of a send with thousands of
# peers (bench/RESULTS-scale.md). ROUTER_MANDATORY is off: a send to a gone peer is dropped, not an error.
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
LISTEN_BACKLOG = 4096  # (the kernel caps it at net.core.somaxconn)
DRAIN_BATCH = 4096   # messages taken per wakeup before the timers run again (a whole barrier's acks at 4096 peers)
__all__ = ["Coordinator", "Peer", "new_computation_id"]


def new_computation_id() -> str:
    host = socket.gethostname().split(".")[0][:16]
    return f"{store.safe_name(host)}-{os.getpid()}-{int(time.time()):x}{secrets.token_hex(2)}"


class Coordinator(Restarts, Commands, Liveness, Rounds, Commits, Relayed):
    """The parts and the state they share: base.py."""

    def __init__(self, settings: Settings, console: bool = False):
        self.s = settings
        self.console = console
        self.ckptdir = os.path.abspath(settings.ckptdir)     # ours: agents write their images where we say
        self.peers = {}
        self.agent_index = {}                                 # agent id -> connection (liveness.py _add_peer)
        self.fresh = protocol.Freshness()                     # (a new one for each bind)
        self.lost_peers = {}
        self.next_peer_id = 1
        self.computation = None
        self.generation = 0
        self.round = None
        self.pending_hellos = []
        self.ranks = RankBook()                               # MPI ranks seen (ranks.py)
        self.waiting = None                                   # a checkpoint waiting for ranks to join
        self.gate = None                                      # a restart gathering its hosts
        self.kv = {}                                          # rendezvous data (restored TCP listeners, ...)
        self.kv_waiters = {}
        self.interval = settings.interval
        self.next_interval_ckpt: float | None = None
        self.last_checkpoint: dict | None = None
        self.last_failure: dict | None = None
        self.storage = {}                                     # generation -> its copies (storagestate.py)
        self.ever_had_peers = False
        self.idle_since = time.monotonic()
        self.started = time.monotonic()
        self.next_liveness_scan = 0.0
        self.quit = False
        self.port = 0
        self.key = b""
        self.bound = []
        self.ctx: zmq.Context = zmq.Context.instance()
        self.sock = None
        self.handlers = self.protocol_table()
        self.status_dirty = False

    def protocol_table(self) -> dict[str, Handler]:
        """Every message a peer (or a client) sends, and what handles it: the table of docs/protocol.md
        ("Peer messages", to the coordinator; tests/unit/coordinator/test_dispatch.py holds the two together)."""
        return {
            "hello": self._on_hello,            # here
            "heartbeat": self._on_heartbeat,
            "bye": self._on_bye,
            "ack": self._on_ack,                # rounds.py: the barrier
            "request": self._on_request,
            "written": self._on_written,
            "abandon": self._on_abandon,        # liveness.py
            "stored": self._on_stored,          # storagestate.py: partner copies, the drain
            "restored": self._on_restored,      # gather.py: restarts
            "kv_put": self._on_kv_put,
            "kv_get": self._on_kv_get,
            "command": self._on_command,        # commands.py: dmtcp_command
        }

    # ------------------------------------------------------------------------------------------ lifecycle --
    def bind(self, addresses: list[str] | None = None) -> int:
        # Loopback, plus what the computation needs to reach us from other hosts (binding.py); every message is
        # authenticated and fresh, and bounded in size (MAXMSGSIZE: a bigger frame drops its connection before
        # it is buffered; RCVHWM bounds what a connection may have queued).
        plan = binding.plan(self.s.coord_host, addresses if addresses is not None else self.s.bind)
        self.bound = []
        self.fresh = protocol.Freshness()
        self.rejects = RateLimitedLog(log, "rejected messages")
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.RCVHWM, 100)
        # thousands of agents connect at once when a job starts: ZeroMQ's listen backlog of 100 dropped the rest's
        # SYNs, which the kernel retries after 1 s, then 3 s (bench/scale.py: joining 256 agents took 1.1 s)
        self.sock.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
        first = plan[0][0]
        if self.s.coord_port == 0:
            self.port = self.sock.bind_to_random_port(f"tcp://{first}", min_port=20000, max_port=60000)
        else:
            try:
                self.sock.bind(f"tcp://{first}:{self.s.coord_port}")
            except zmq.ZMQError as e:
                raise OSError(f"cannot listen on {first}:{self.s.coord_port}: {e} "
                              f"(another coordinator running? use -p to choose a port)") from None
            self.port = self.s.coord_port
        self.bound.append(first)
        for addr, why, required in plan[1:]:
            err = self.listen_on(addr, why)
            if err and required:
                raise OSError(err)
            if err:
                log.warning("%s; agents on other hosts may not reach this coordinator", err)
        self.key = protocol.create_secret(self.port)
        if self.s.port_file:
            store.atomic_write(self.s.port_file, f"{self.port}\n".encode(), mode=0o644)
        log.info("coordinator %s listening on %s port %d (ckptdir %s, interval %s)", __version__,
                 ", ".join(self.bound), self.port, self.ckptdir, self.interval or "off")
        self._reset_interval()
        self._write_status()
        self._flush_status()
        return self.port

    @property
    def socket(self) -> zmq.Socket:
        assert self.sock is not None, "the coordinator is not bound"
        return self.sock

    def listen_on(self, addr: str, why: str) -> str | None:
        """Listen on addr too, on our port (an agent on another host will connect there); an error text or None."""
        if addr in self.bound or binding.ANY in self.bound:
            return None
        try:
            self.socket.bind(f"tcp://{addr}:{self.port}")
        except zmq.ZMQError as e:
            return f"cannot listen on {addr}:{self.port} ({why}): {e}"
        self.bound.append(addr)
        log.info("listening on %s:%d too (%s)", addr, self.port, why)
        return None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        if self.port:
            protocol.remove_secret(self.port)

    def serve_forever(self) -> None:
        # an agent reconnecting (after a pause, a network hiccup) keeps its routing id: the new connection takes
        # it over instead of being refused as a duplicate
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        stdin_open = self.console
        if stdin_open:
            poller.register(sys.stdin.fileno(), zmq.POLLIN)
            if sys.stdin.isatty():
                print("Type '?' for help.", flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        while not self.quit:
            events = dict(poller.poll(timeout=250))
            if self.sock in events:
                self.drain()
            if stdin_open and sys.stdin.fileno() in events:
                line = sys.stdin.readline()
                if not line:
                    poller.unregister(sys.stdin.fileno())
                    stdin_open = False
                else:
                    self._console(line.strip())
            self._tick()
            self._flush_status()
        self._shutdown()

    def drain(self, limit: int = DRAIN_BATCH) -> int:
        """Handle what is queued on the socket, up to limit messages, without polling between them (one wakeup
        takes a whole burst of acks); the status file is written once for the batch. Returns how many."""
        recv = self.socket.recv_multipart
        n = 0
        while n < limit:
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._on_frames(frames)
            n += 1
        self._flush_status()
        return n

    def _write_status(self) -> None:
        # marked, written once per batch of messages (_flush_status): per hello or per phase it was O(peers) of
        # JSON each time, O(peers^2) for thousands of peers joining
        self.status_dirty = True

    def _flush_status(self) -> None:
        if self.status_dirty:
            self.status_dirty = False
            Commands._write_status(self)

    def _on_signal(self, signum, frame) -> None:
        log.info("coordinator: signal %s, quitting", signal.Signals(signum).name)
        self.quit = True

    def _shutdown(self) -> None:
        self._flush_status()
        self.close()
        log.info("coordinator exits")

    # ---------------------------------------------------------------------------------------- messaging --
    def send(self, ident: bytes, msg: dict) -> None:
        try:
            self._send_frames(ident, protocol.encode(self.key, msg))
        except zmq.ZMQError as e:
            log.warning("could not send %s to %r: %s", msg.get("type"), ident, e)

    def _send_frames(self, ident: bytes, frames: list[bytes]) -> None:
        send = self.socket.send
        send(ident, _MORE)
        for f in frames[:-1]:
            send(f, _MORE)
        send(frames[-1], _LAST)

    def broadcast(self, msg: dict, idents=None) -> None:
        # encoded once for every peer: a phase message can carry O(peers) data (the agents, the TCP ends), and
        # encoding it per peer made a round O(peers^2) (bench/scale.py). Agents do not check freshness; one
        # nonce for one broadcast is what it is.
        frames = protocol.encode(self.key, msg)
        for ident in list(idents if idents is not None else self.peers):
            try:
                self._send_frames(ident, frames)
            except zmq.ZMQError as e:
                log.warning("could not send %s to %r: %s", msg.get("type"), ident, e)

    def _on_frames(self, frames: list[bytes]) -> None:
        ident, rest = frames[0], frames[1:]
        if len(rest) != 3 or sum(map(len, rest)) > protocol.MAX_MESSAGE_BYTES:
            # MAXMSGSIZE bounds each frame; this the whole message (a stranger's flood of frames)
            self.rejects.warning("rejected a message from connection %s: %d frame(s), %d bytes (not an hpcckpt "
                                 "protocol message, or over HPCCKPT_MAX_MESSAGE)", ident.hex(), len(rest),
                                 sum(map(len, rest)))
            return
        try:
            msg = protocol.decode(self.key, rest, self.fresh)
        except protocol.Refused as e:
            # authentic but stale, replayed or from an old hpcckpt: refused without any status
            self.rejects.warning("refused a message from connection %s: %s", ident.hex(), e)
            self.send(ident, {"type": "reject", "reason": str(e), "re": e.nonce})
            return
        except protocol.ProtocolError as e:
            self.rejects.warning("rejected a message from connection %s: %s", ident.hex(), e)
            if rest[0] == protocol.PROTO_TAG:      # unauthenticated: the reason only, so a user can see why
                self._send_frames(ident, [protocol.PROTO_TAG, b"", json.dumps(
                    {"type": "reject", "reason": str(e)}).encode()])
            return
        kind = msg["type"]
        peer = self.peers.get(ident)
        if peer:
            peer.last_seen = time.monotonic()
        handler = self.handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            self.rejects.warning("unknown message type %r from %s", kind, ident.hex())
            return
        handler(ident, msg)

    # ------------------------------------------------------------------------------------------- peers --
    def _on_hello(self, ident: bytes, msg: dict) -> None:
        if msg.get("role") == "relay":
            self._on_relay_hello(ident, msg)      # a node's relay, for all its agents (relayed.py)
            return
        if self._rejoin(ident, msg):
            return
        if self.round is not None:
            # joins once the checkpoint in progress is over (an agent retrying its hello waits once)
            self.pending_hellos = [(i, m) for i, m in self.pending_hellos if i != ident] + [(ident, msg)]
            return
        comp = msg.get("computation")
        if comp and self.computation and comp != self.computation and self.peers:
            self.send(ident, {"type": "reject", "reason": f"this coordinator runs computation {self.computation}; "
                                                          f"the process belongs to computation {comp}"})
            log.warning("rejected peer from computation %s (running %s)", comp, self.computation)
            return
        if not self.peers:
            self._adopt_computation(comp)
        restarted_gen = int(msg.get("generation") or 0)
        if msg.get("restart") and msg.get("agent_id"):
            why = self._gate_join(ident, msg, restarted_gen)
            if why:
                self.send(ident, {"type": "reject", "reason": why})
                log.warning("rejected restarted peer on %s: %s", msg.get("host"), why)
                return
        self.generation = max(self.generation, restarted_gen)
        peer = Peer(ident, self.next_peer_id, msg.get("host", "?"), int(msg.get("agent_pid", 0)),
                    list(msg.get("processes", [])), bool(msg.get("restart")), agent_id=str(msg.get("agent_id", "")))
        if self.gate is not None and ident in self.gate.joined:
            peer.state = "RESTORING"
        self.next_peer_id += 1
        self._add_peer(ident, peer)
        self.ranks.update(peer.processes, peer.restarted)
        self.ever_had_peers = True
        self._welcome(ident, peer)
        log.info("peer %d joined: host %s agent pid %d, %s (%s)", peer.peer_id, peer.host, peer.agent_pid,
                 ", ".join(f"{p.get('program')}[{p.get('pid')}]" for p in peer.processes),
                 "restarted" if peer.restarted else "new")
        self._write_status()

    def _adopt_computation(self, comp: str | None) -> None:
        """The first peer names the computation (or a new one is made)."""
        self.computation = comp or self.computation or new_computation_id()
        self.generation = max([self.generation] + store.complete_generations(self.ckptdir, self.computation)
                              + levels.local_generations(self.ckptdir, self.computation))   # never reused

    def _welcome(self, ident: bytes, peer: Peer) -> None:
        self.send(ident, protocol.Welcome(
            peer.peer_id, self.computation, self.interval, self.generation, self.ckptdir, self.s.heartbeat_s(),
            self.s.peer_timeout, self._complete_generations(),
            self.round.generation if self.round and ident in self.round.peers else None).to_dict())

    def _on_heartbeat(self, ident: bytes, msg: dict) -> None:
        peer = self.peers.get(ident)
        if peer is None:
            # a peer we gave up (or a coordinator restarted on this port): it says hello again
            self.send(ident, {"type": "reject", "rejoin": True, "reason": "unknown peer (coordinator restarted?)"})
            return
        if "processes" in msg:
            peer.processes = msg["processes"]
            self.ranks.update(peer.processes, peer.restarted)
        if "members" in msg:
            self._members_heard(peer, msg["members"])      # a relay's agents (relayed.py)
        if "progress" in msg:
            grew = int(msg["progress"].get("bytes", 0)) > int(peer.progress.get("bytes", 0))
            peer.progress = msg["progress"]
            if self.round and grew:
                # bytes written are progress; a heartbeat is only a sign of life (a write hung on a dead file
                # system must still time out)
                self.round.last_progress = time.monotonic()

    def _on_bye(self, ident: bytes, msg: dict) -> None:
        if msg.get("agent_id") and ident in self.peers and self.peers[ident].members:
            self._member_left(ident, str(msg["agent_id"]), msg.get("reason", "exited"))   # relayed.py
            return
        peer = self.peers.pop(ident, None)
        if peer is None:
            return
        log.info("peer %d (host %s) left: %s", peer.peer_id, peer.host, msg.get("reason", "exited"))
        self._peer_gone(ident, f"peer {peer.peer_id} on {peer.host} left ({msg.get('reason', 'exited')})")

    def _peer_gone(self, ident: bytes, why: str, lost: bool = False) -> None:
        """lost: silent, not gone for good (it may come back; --exit-on-last waits for --timeout then)."""
        if self.gate is not None and self.gate.leave(ident):
            self._check_gate()
        if self.round and ident in self.round.peers:
            self.round.peers.discard(ident)
            self.round.acks.pop(ident, None)
            if not self.round.committed:
                self._fail_round(why)
            else:
                self._check_round()
        if not self.peers:
            self.idle_since = time.monotonic()
            if self.s.exit_on_last and self.ever_had_peers and not lost:
                log.info("last peer left; exiting (--exit-on-last)")
                self.quit = True
        self._write_status()

    # -------------------------------------------------------------------------------------------- timers --
    def _tick(self) -> None:
        now = time.monotonic()
        self.rejects.flush(now)
        self._liveness_tick(now)
        self._storage_tick(now)
        self._check_gate()
        if self.waiting is not None:
            self._check_waiting(now)
        r = self.round
        if r is not None and not r.committed and now - r.last_progress > self.s.phase_timeout:
            # the slow ones: those that have not acknowledged the phase, or (processes already running again)
            # not yet reported their images durable
            slow = r.peers - set(r.durable) if r.complete() else r.peers - set(r.acks)
            what = "writing its images" if r.complete() else f"phase {r.phase}"
            missing = ", ".join(f"peer {self.peers[i].peer_id} on {self.peers[i].host}"
                                for i in sorted(slow, key=lambda i: self.peers[i].peer_id if i in self.peers else 0)
                                if i in self.peers)
            self._fail_round(f"timed out after {self.s.phase_timeout:.0f} s without progress in {what}, waiting "
                             f"for {missing or 'peers that left'}")
        if self.round is None and self.next_interval_ckpt is not None and now >= self.next_interval_ckpt:
            if self.peers:
                self.start_checkpoint()
            else:
                self._reset_interval()
        if self.s.timeout and not self.peers and now - self.idle_since > self.s.timeout:
            log.info("no peers for %.0f s; exiting (--timeout)", self.s.timeout)
            self.quit = True
        if self.s.stale_timeout and not self.peers and self.ever_had_peers and \
                now - self.idle_since > self.s.stale_timeout:
            log.info("computation gone for %.0f s; exiting (--stale-timeout)", self.s.stale_timeout)
            self.quit = True

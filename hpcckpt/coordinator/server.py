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
from dataclasses import dataclass, field

import zmq

from .. import __version__
from ..image import journal, levels, store
from ..settings import Settings
from . import binding, protocol
from .barrier import Round, State
from .commands import Commands
from .commit import Commits
from .gather import RestartGate, Restarts
from .liveness import Liveness
from .ranks import RankBook
from .ratelog import RateLimitedLog

log = logging.getLogger("hpcckpt.coordinator")


@dataclass
class Peer:
    ident: bytes
    peer_id: int
    host: str
    agent_pid: int
    processes: list[dict]
    ckptdir: str
    restarted: bool
    joined: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    state: str = "RUNNING"
    progress: dict = field(default_factory=dict)
    agent_id: str = ""


def new_computation_id() -> str:
    host = socket.gethostname().split(".")[0][:16]
    return f"{store.safe_name(host)}-{os.getpid()}-{int(time.time()):x}{secrets.token_hex(2)}"


class Coordinator(Restarts, Commands, Liveness, Commits):
    def __init__(self, settings: Settings, console: bool = False):
        self.s = settings
        self.console = console
        self.ckptdir = os.path.abspath(settings.ckptdir)
        self.peers: dict[bytes, Peer] = {}
        self.lost_peers: dict[str, Peer] = {}
        self.next_peer_id = 1
        self.computation: str | None = None
        self.generation = 0
        self.round: Round | None = None
        self.pending_hellos: list[tuple[bytes, dict]] = []
        self.ranks = RankBook()                               # MPI ranks seen (ranks.py)
        self.waiting: dict | None = None                      # a checkpoint waiting for ranks to join
        self.gate: RestartGate | None = None                  # a restart gathering its hosts
        self.kv: dict[str, object] = {}                       # rendezvous data (restored TCP listeners, ...)
        self.kv_waiters: dict[str, list[bytes]] = {}
        self.interval = settings.interval
        self.next_interval_ckpt: float | None = None
        self.last_checkpoint: dict | None = None
        self.last_failure: dict | None = None
        self.ever_had_peers = False
        self.idle_since = time.monotonic()
        self.started = time.monotonic()
        self.next_liveness_scan = 0.0
        self.quit = False
        self.port = 0
        self.key = b""
        self.ctx = zmq.Context.instance()
        self.sock: zmq.Socket | None = None

    # ------------------------------------------------------------------------------------------ lifecycle --
    def bind(self, addresses: list[str] | None = None) -> int:
        # Loopback, plus what the computation needs to reach us from other hosts (binding.py); every message is
        # authenticated and fresh, and bounded in size (MAXMSGSIZE: a bigger frame drops its connection before
        # it is buffered; RCVHWM bounds what a connection may have queued).
        plan = binding.plan(self.s.coord_host, addresses)
        self.bound: list[str] = []
        self.fresh = protocol.Freshness()
        self.rejects = RateLimitedLog(log, "rejected messages")
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.RCVHWM, 100)
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
        return self.port

    def listen_on(self, addr: str, why: str) -> str | None:
        """Listen on addr too, on our port (an agent on another host will connect there); an error text or None."""
        if addr in self.bound or binding.ANY in self.bound:
            return None
        try:
            self.sock.bind(f"tcp://{addr}:{self.port}")
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
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
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
                for _ in range(1000):
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_frames(frames)
            if stdin_open and sys.stdin.fileno() in events:
                line = sys.stdin.readline()
                if not line:
                    poller.unregister(sys.stdin.fileno())
                    stdin_open = False
                else:
                    self._console(line.strip())
            self._tick()
        self._shutdown()

    def _on_signal(self, signum, frame) -> None:
        log.info("coordinator: signal %s, quitting", signal.Signals(signum).name)
        self.quit = True

    def _shutdown(self) -> None:
        self.close()
        log.info("coordinator exits")

    # ---------------------------------------------------------------------------------------- messaging --
    def send(self, ident: bytes, msg: dict) -> None:
        try:
            self.sock.send_multipart([ident] + protocol.encode(self.key, msg), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning("could not send %s to %r: %s", msg.get("type"), ident, e)

    def broadcast(self, msg: dict, idents=None) -> None:
        # encoded once for every peer: a phase message can carry O(peers) data (the agents, the TCP ends), and
        # encoding it per peer made a round O(peers^2) (bench/scale.py). Agents do not check freshness; one
        # nonce for one broadcast is what it is.
        frames = protocol.encode(self.key, msg)
        for ident in list(idents if idents is not None else self.peers):
            try:
                self.sock.send_multipart([ident] + frames, zmq.NOBLOCK)
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
                self.sock.send_multipart([ident, protocol.PROTO_TAG, b"", json.dumps(
                    {"type": "reject", "reason": str(e)}).encode()], zmq.NOBLOCK)
            return
        kind = msg["type"]
        peer = self.peers.get(ident)
        if peer:
            peer.last_seen = time.monotonic()
        handler = getattr(self, f"_on_{kind}", None) if isinstance(kind, str) else None
        if handler is None:
            self.rejects.warning("unknown message type %r from %s", kind, ident.hex())
            return
        handler(ident, msg)

    # ------------------------------------------------------------------------------------------- peers --
    def _on_hello(self, ident: bytes, msg: dict) -> None:
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
            self.computation = comp or self.computation or new_computation_id()
            self.generation = max([self.generation] + store.complete_generations(self.ckptdir, self.computation)
                                  + levels.local_generations(self.ckptdir, self.computation))   # never reused
        restarted_gen = int(msg.get("generation") or 0)
        if msg.get("restart") and msg.get("agent_id"):
            why = self._gate_join(ident, msg, restarted_gen)
            if why:
                self.send(ident, {"type": "reject", "reason": why})
                log.warning("rejected restarted peer on %s: %s", msg.get("host"), why)
                return
        self.generation = max(self.generation, restarted_gen)
        peer = Peer(ident, self.next_peer_id, msg.get("host", "?"), int(msg.get("agent_pid", 0)),
                    list(msg.get("processes", [])), msg.get("ckptdir", self.ckptdir), bool(msg.get("restart")),
                    agent_id=str(msg.get("agent_id", "")))
        if self.gate is not None and ident in self.gate.joined:
            peer.state = "RESTORING"
        self.next_peer_id += 1
        self.peers[ident] = peer
        self.ranks.update(peer.processes, peer.restarted)
        self.ever_had_peers = True
        self._welcome(ident, peer)
        log.info("peer %d joined: host %s agent pid %d, %s (%s)", peer.peer_id, peer.host, peer.agent_pid,
                 ", ".join(f"{p.get('program')}[{p.get('pid')}]" for p in peer.processes),
                 "restarted" if peer.restarted else "new")
        self._write_status()

    def _welcome(self, ident: bytes, peer: Peer) -> None:
        self.send(ident, {"type": "welcome", "peer_id": peer.peer_id, "computation": self.computation,
                          "interval": self.interval, "generation": self.generation, "ckptdir": self.ckptdir,
                          "heartbeat": self.s.heartbeat_s(), "peer_timeout": self.s.peer_timeout,
                          "complete": self._complete_generations(), "protocol": protocol.PROTOCOL_VERSION,
                          "round": self.round.generation if self.round and ident in self.round.peers else None})

    def _on_heartbeat(self, ident: bytes, msg: dict) -> None:
        peer = self.peers.get(ident)
        if peer is None:
            # a peer we gave up (or a coordinator restarted on this port): it says hello again
            self.send(ident, {"type": "reject", "rejoin": True, "reason": "unknown peer (coordinator restarted?)"})
            return
        if "processes" in msg:
            peer.processes = msg["processes"]
            self.ranks.update(peer.processes, peer.restarted)
        if "progress" in msg:
            grew = int(msg["progress"].get("bytes", 0)) > int(peer.progress.get("bytes", 0))
            peer.progress = msg["progress"]
            if self.round and grew:
                # bytes written are progress; a heartbeat is only a sign of life (a write hung on a dead file
                # system must still time out)
                self.round.last_progress = time.monotonic()

    def _on_bye(self, ident: bytes, msg: dict) -> None:
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

    def _on_ack(self, ident: bytes, msg: dict) -> None:
        r = self.round
        peer = self.peers.get(ident)
        if r is None or peer is None or msg.get("generation") != r.generation or msg.get("phase") != r.phase:
            log.debug("stale ack %s from %r", msg, ident)
            return
        r.ack(ident, msg)
        if r.phase == "suspend" and msg.get("tcp_ends"):
            r.endpoints.extend([peer.agent_id] + list(e) for e in msg["tcp_ends"])
        if r.phase == "resume":
            r.frozen_s = max(r.frozen_s, (msg.get("stats") or {}).get("frozen_s", 0.0))
            if self.last_checkpoint and self.last_checkpoint.get("generation") == r.generation:
                self.last_checkpoint["frozen_s"] = r.frozen_s
        peer.state = {"suspend": "SUSPENDED", "drain": "DRAINED", "checkpoint": "CHECKPOINTED",
                      "refill": "REFILLED", "resume": "RUNNING"}.get(r.phase, peer.state)
        if not msg.get("ok", False):
            log.error("peer %d failed %s: %s", peer.peer_id, r.acks_text(), msg.get("error"))
        else:
            log.debug("%s peer=%d", r.acks_text(), peer.peer_id)
        self._check_round()

    def _on_request(self, ident: bytes, msg: dict) -> None:
        """A peer asks for a checkpoint (its agent got the checkpoint signal, or the program asked)."""
        if msg.get("cmd") == "checkpoint" and self.round is None and self.peers:
            log.info("checkpoint requested by peer %s", self.peers[ident].peer_id if ident in self.peers else "?")
            self.start_checkpoint()

    # --------------------------------------------------------------------------------------- checkpoint --
    def start_checkpoint(self, kill_after: bool = False, waiter: tuple | None = None) -> str | None:
        """Begin a checkpoint round; returns an error text if one cannot start now."""
        if self.round is not None:
            return f"a checkpoint (generation {self.round.generation}) is already in progress"
        if self.gate is not None:
            return "a restart is in progress (waiting for its hosts)"
        if not self.peers and not (waiter is not None and self._rejoin_grace()):
            return "no processes are connected to this coordinator"
        missing = self.ranks.missing()
        if missing or not self.peers:  # not before every MPI rank is ours (ranks.py); _tick starts it later
            if self.waiting is None:
                self.waiting = {"since": time.monotonic(), "kill_after": kill_after, "waiters": []}
                if missing:
                    log.info("checkpoint waits up to %.0f s for MPI %s to join", self.s.rank_wait,
                             "; ".join(missing))
                else:
                    log.info("checkpoint waits for the agents of the computation to connect (coordinator just "
                             "started)")
            self.waiting["kill_after"] |= kill_after
            if waiter is not None:
                self.waiting["waiters"].append(waiter)
            return None
        waiters = ([] if self.waiting is None else self.waiting["waiters"]) + ([waiter] if waiter else [])
        kill_after |= bool(self.waiting and self.waiting["kill_after"]) or self.s.exit_after_ckpt   # DMTCP's option
        self.waiting = None
        self.generation += 1
        self.round = Round(self.generation, kill_after, set(self.peers))
        self.round.waiters.extend(waiters)
        log.info("checkpoint generation %d of computation %s: %d peer(s)", self.generation, self.computation,
                 len(self.peers))
        self._broadcast_phase()
        return None

    def _broadcast_phase(self) -> None:
        r = self.round
        phase = r.begin_phase()
        log.info("%s", r.acks_text())
        msg = {"type": "phase", "phase": phase, "generation": r.generation, "computation": self.computation,
               "forked_ok": not r.kill_after}
        if phase == "drain":          # every agent's TCP ends: which connections stay inside the computation
            msg["tcp_ends"] = r.endpoints
        if phase == "checkpoint":     # recorded in every image: a restart knows which hosts must come back
            msg["agents"] = {self.peers[i].agent_id: self.peers[i].host for i in r.peers
                             if i in self.peers and self.peers[i].agent_id}
        self.broadcast(msg, r.peers)
        self._write_status()

    def _check_round(self) -> None:
        r = self.round
        if r is None or not r.complete():
            return
        failures = r.failed_acks()
        if failures and not r.committed:
            self._fail_round("; ".join(failures))
            return
        if failures:
            log.error("after the commit, %s failed: %s", r.phase, "; ".join(failures))
        state = r.advance()
        if state == State.CHECKPOINTED:
            self._try_commit()
            if self.round is None:
                return
            if r.kill_after and not r.committed:
                return                # kill only once every image is durable (see _on_written)
        if r.phase == "kill" or (state == State.RUNNING and r.phase == "resume"):
            r.resumed = True
            if r.committed:
                self._finish_round(ok=True)
            else:
                log.info("processes run again; waiting for %d peer(s) to finish writing", len(r.peers) -
                         len(r.durable))
            return
        self._broadcast_phase()

    def _on_written(self, ident: bytes, msg: dict) -> None:
        """A peer's images of a forked checkpoint are durable (or failed to be written)."""
        r = self.round
        if r is None or msg.get("generation") != r.generation or ident not in r.peers:
            return
        r.last_progress = time.monotonic()
        if not msg.get("ok"):
            self._fail_round(msg.get("error") or "writing images failed")
            return
        r.durable[ident] = msg
        self._try_commit()

    def _try_commit(self) -> None:
        r = self.round
        if r is None or r.committed or r.state not in (State.CHECKPOINTED, State.REFILLED, State.RUNNING) \
                or not r.all_durable():
            return
        try:
            self._commit(r)
        except OSError as e:
            self._fail_round(f"could not write the checkpoint manifest/restart script in {self.ckptdir}: {e}")
            return
        if r.kill_after and r.state == State.CHECKPOINTED:
            self._broadcast_phase()      # now the kill
        elif r.resumed:
            self._finish_round(ok=True)

    def _check_waiting(self, now: float) -> None:
        w = self.waiting
        if not self.peers:
            if not self._rejoin_grace():       # (every agent left while the checkpoint waited)
                self.waiting = None
                self._refuse_waiters(w, "no processes are connected to this coordinator", failure=False)
        elif not self.ranks.missing():
            self.start_checkpoint()
        elif now - w["since"] > self.s.rank_wait:
            self.waiting = None
            why = (f"MPI {'; '.join(self.ranks.missing())} never joined the computation within "
                   f"{self.s.rank_wait:.0f} s: started on a host or by a launcher that hpcckpt does not wrap? "
                   f"A checkpoint without them could not be restarted")
            log.error("checkpoint not taken: %s", why)
            self._refuse_waiters(w, why)

    def _refuse_waiters(self, w: dict, why: str, failure: bool = True) -> None:
        if failure:
            self.last_failure = {"generation": None, "time": time.time(), "phase": "start", "error": why}
        for waiter in w["waiters"]:
            self.answer(waiter, {**self.status(), "type": "reply", "command": "checkpoint", "ok": False,
                                 "error": why})
        self._reset_interval()

    def _fail_round(self, why: str) -> None:
        r = self.round
        log.error("checkpoint generation %d failed in phase %s: %s; the previous checkpoint is kept", r.generation,
                  r.phase, why)
        r.error = why
        self.broadcast({"type": "phase", "phase": "abort", "generation": r.generation,
                        "computation": self.computation, "reason": why}, r.peers)
        self.last_failure = {"generation": r.generation, "time": time.time(), "phase": r.phase, "error": why}
        self._finish_round(ok=False)

    def _finish_round(self, ok: bool) -> None:
        r = self.round
        self.round = None
        journal.record(self.ckptdir, "checkpoint", computation=self.computation, generation=r.generation, ok=ok,
                       phase=None if ok else r.phase, error=None if ok else r.error,
                       duration_s=round(time.time() - r.started, 3))
        if ok:
            # retention, once the new generation is complete: each agent deletes its own images, we the manifests
            prune = self._prune_images()
            self.broadcast({"type": "committed", "generation": r.generation, "prune": prune})
            for gen in self._prune_list():
                store.remove_manifest(self.ckptdir, self.computation, gen)
        for w in r.waiters:
            reply = {"type": "reply", "command": "checkpoint", "ok": ok, "generation": r.generation}
            if ok:
                reply["checkpoint"] = self.last_checkpoint
            else:
                reply["error"] = r.error
            self.answer(w, {**self.status(), **reply})
        for p in self.peers.values():
            p.state = "RUNNING"
            p.progress = {}
        self._reset_interval()
        hellos, self.pending_hellos = self.pending_hellos, []
        for ident, msg in hellos:
            self._on_hello(ident, msg)
        self._write_status()

    def _reset_interval(self) -> None:
        self.next_interval_ckpt = time.monotonic() + self.interval if self.interval > 0 else None

    # -------------------------------------------------------------------------------------------- timers --
    def _tick(self) -> None:
        now = time.monotonic()
        self.rejects.flush(now)
        self._liveness_tick(now)
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

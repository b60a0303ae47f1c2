"""Partner copies: each agent sends its images of a committed generation to one other agent of the computation,
on another host, which keeps them on its local level (<local_dir>/partner/ckpt_<c>/gen<N>/), so losing one node
loses no generation even before the drain reached the shared directory (docs/storage.md).

Transport: a direct TCP connection from agent to agent, not the coordinator's ZeroMQ socket: images are large
and the coordinator is one process for thousands of agents, so relaying them through it would make it the
bottleneck the local level exists to avoid (and its protocol is a fixed table of small messages). Each agent
with `partner: true` listens on an ephemeral port and announces its addresses in its checkpoint stats (over the
coordinator's authenticated connection); the coordinator pairs the agents and tells each, in the `committed`
message, where to send (coordinator/storagestate.py). Nothing goes through the checkpoint directory: partner
copies work between nodes that share no filesystem.

Both ends prove they hold the user's key (image/auth.py) before any byte of an image moves: nonces from both
sides, an HMAC each way, and a session key that authenticates every file header. The receiver writes to a
temporary name, then checks the image itself (metadata MAC and every chunk's keyed tag) before renaming it: a
copy is either complete and authentic or absent. The partner is the next agent (by id) on another host, a ring,
so every node holds one other node's images.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import queue
import re
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from ..faults import fault
from ..image import auth, journal, levels, safefs, store
from ..image.format import ImageError, ImageReader
from .drain import Pacer

log = logging.getLogger("hpcckpt.partner")

_NAME = re.compile(r"^ckpt_[A-Za-z0-9._+-]+\.dmtcp$")
_MAX_FRAME = 1 << 16
CONNECT_S = 3.0
HANDSHAKE_S = 10.0
MAX_CONNECTIONS = 16      # partner connections served at once (each node has one sender: a ring)


class PartnerError(Exception):
    """A partner copy that could not be made; one line naming the partner or the image."""


class NoPartner(PartnerError):
    """Every agent of the computation is on this host: no other node to keep a copy."""


def _key(purpose: str) -> bytes:
    return auth.subkey(auth.key_for(create=True), purpose)


def _mac(key: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        h.update(struct.pack("!I", len(p)) + p)
    return h.digest()


def _send(sock: socket.socket, data: bytes) -> None:
    sock.sendall(struct.pack("!I", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(min(n - len(buf), 1 << 20))
        if not got:
            raise PartnerError("connection closed by the other side")
        buf += got
    return bytes(buf)


def _recv(sock: socket.socket) -> bytes:
    (n,) = struct.unpack("!I", _recv_exact(sock, 4))
    if n > _MAX_FRAME:
        raise PartnerError(f"frame of {n} bytes refused")
    return _recv_exact(sock, n)


def handshake(sock: socket.socket, computation: str, server: bool, key: bytes | None = None) -> bytes:
    """Mutual proof of the user's key; returns the session key. PartnerError if the other side has no key."""
    k = key or _key("partner connection")
    comp = computation.encode()
    if server:
        ns = secrets.token_bytes(16)
        _send(sock, ns)
        nc = _recv(sock)
        if not hmac.compare_digest(_recv(sock), _mac(k, b"client", ns, nc, comp)):
            raise PartnerError("a connection without the user's key (or of another computation) refused")
        _send(sock, _mac(k, b"server", nc, ns, comp))
    else:
        ns = _recv(sock)
        nc = secrets.token_bytes(16)
        _send(sock, nc)
        _send(sock, _mac(k, b"client", ns, nc, comp))
        if not hmac.compare_digest(_recv(sock), _mac(k, b"server", nc, ns, comp)):
            raise PartnerError("the partner did not prove the user's key; not sending images to it")
    return _mac(k, b"session", ns, nc, comp)


def local_addresses() -> list[str]:
    """This host's IPv4 addresses, loopback last (a partner on the same host is never chosen, but tests use it)."""
    out = []
    for addrs in psutil.net_if_addrs().values():
        out += [a.address for a in addrs if a.family == socket.AF_INET]
    return sorted(set(out), key=lambda a: (a.startswith("127."), a))


def partner_of(agent_id: str, agents: dict[str, str]) -> str | None:
    return levels.partner_of(agent_id, agents)      # (the coordinator pairs the agents: image/levels.py)


# ------------------------------------------------------------------------------------------------- server --
class PartnerServer:
    """Receives other agents' images into this node's local level (<local_dir>/partner/ckpt_<c>/gen<N>/)."""

    def __init__(self, root: str, computation: str):
        self.root = root
        self.computation = computation
        self.key = _key("partner connection")
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.received: dict[int, list[str]] = {}     # generation -> hosts whose copies all arrived (their bye)
        self.cond = threading.Condition()
        self.sock = socket.create_server(("0.0.0.0", 0), backlog=16)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, name="partner-server", daemon=True)
        self.thread.start()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            if not self.slots.acquire(blocking=False):
                # (anyone may connect before the handshake: a flood must not pile up threads and memory)
                log.warning("partner connection from %s refused: %d already open", peer[0], MAX_CONNECTIONS)
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, peer), name="partner-recv", daemon=True).start()

    def _serve(self, conn: socket.socket, peer) -> None:
        try:
            self._serve_one(conn, peer)
        finally:
            self.slots.release()

    def _serve_one(self, conn: socket.socket, peer) -> None:
        with conn:
            try:
                conn.settimeout(HANDSHAKE_S)        # (a stranger holding a slot without a word: not for long)
                session = handshake(conn, self.computation, server=True, key=self.key)
                conn.settimeout(60)
                got: dict | None = None
                while True:
                    head = _recv(conn)
                    if head == b"bye":
                        if got is not None:
                            self._finished(int(got["generation"]), str(got.get("host")))
                        return
                    if not hmac.compare_digest(_recv(conn), _mac(session, head)):
                        raise PartnerError("a file header that does not verify")
                    h = json.loads(head)
                    try:
                        path = self._receive(conn, h)
                        got = h
                        _send(conn, b"ok")
                        log.info("partner copy of %s (generation %d) from %s kept at %s", h["name"],
                                 h["generation"], h.get("host"), path)
                    except (PartnerError, ImageError, OSError) as e:
                        _send(conn, f"error: {e}".encode()[:_MAX_FRAME])
                        raise
            except (PartnerError, OSError, ValueError, KeyError) as e:
                log.warning("partner connection from %s: %s", peer[0], e)

    def _receive(self, conn: socket.socket, h: dict) -> str:
        return receive_image(conn, self.root, self.computation, h)

    def _finished(self, generation: int, host: str) -> None:
        with self.cond:
            self.received.setdefault(generation, []).append(host)
            self.cond.notify_all()

    def wait_received(self, generation: int, senders: int, timeout: float) -> list[str]:
        """(a kcheckpoint's agent before it exits) Until `senders` agents sent all their images of the generation
        here, at most timeout seconds; returns the hosts whose copies arrived."""
        give_up = time.monotonic() + timeout
        with self.cond:
            while len(self.received.get(generation, [])) < senders and time.monotonic() < give_up:
                self.cond.wait(max(0.01, give_up - time.monotonic()))
            return list(self.received.get(generation, []))


def receive_image(conn: socket.socket, root: str, computation: str, h: dict) -> str:
    """Receive the image a (verified) header h announces into the partner tree under root: a temporary name,
    fsync, the image's own verification (metadata MAC, every chunk's tag), then its name. Returns its path."""
    name, gen, size = h["name"], int(h["generation"]), int(h["size"])
    if not _NAME.match(name) or h.get("computation") != computation or size < 0:
        raise PartnerError(f"refused file {name!r} of {h.get('computation')!r}")
    d = store.generation_dir(levels.partner_root(root), computation, gen)
    dfd = safefs.open_dirs(root, [levels.PARTNER_DIR, f"ckpt_{computation}", f"gen{gen:06d}"], create=True)
    tmp = safefs.temp_name(name)
    try:
        out = safefs.create_file(dfd, tmp)
        try:
            left = size
            while left:
                chunk = conn.recv(min(left, 1 << 20))
                if not chunk:
                    raise PartnerError(f"{name}: connection closed after {size - left} of {size} bytes")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
                left -= len(chunk)
            os.fsync(out)
        finally:
            os.close(out)
        with ImageReader(os.path.join(d, tmp)) as r:
            if (r.meta.get("computation"), r.meta.get("generation")) != (computation, gen):
                raise PartnerError(f"{name}: holds computation {r.meta.get('computation')} generation "
                                   f"{r.meta.get('generation')}, not what its header says")
            r.verify()
        safefs.replace(dfd, tmp, name)
        return os.path.join(d, name)
    except BaseException:
        safefs.unlink(dfd, tmp)
        raise
    finally:
        os.close(dfd)


def send_image(sock: socket.socket, session: bytes, path: str, head: dict, pacer: Pacer | None = None) -> int:
    """Send the header (authenticated with the session key) and the bytes of the image at path; returns its size."""
    size = os.path.getsize(path)
    raw = json.dumps({**head, "name": os.path.basename(path), "size": size}).encode()
    _send(sock, raw)
    _send(sock, _mac(session, raw))
    with open(path, "rb", buffering=0) as f:
        sent = 0
        while sent < size:
            t0 = time.monotonic()
            buf = f.read(min(1 << 20, size - sent))
            if not buf:
                raise PartnerError(f"{path} shrank while being sent")
            sock.sendall(buf)
            sent += len(buf)
            if pacer is not None:
                pacer.pace(len(buf), time.monotonic() - t0)
    return size


def recv_header(sock: socket.socket, session: bytes) -> dict:
    head = _recv(sock)
    if not hmac.compare_digest(_recv(sock), _mac(session, head)):
        raise PartnerError("a file header that does not verify")
    h = json.loads(head)
    if not isinstance(h, dict):
        raise PartnerError("a malformed file header")
    return h


def connect(addr: dict) -> socket.socket:
    """A connection to the first of addr's addresses that answers (addr: {host, addresses, port})."""
    errors = []
    for a in addr.get("addresses") or []:
        try:
            return socket.create_connection((a, int(addr["port"])), timeout=CONNECT_S)
        except OSError as e:
            errors.append(f"{a}: {e.strerror or e}")
    raise PartnerError(f"partner {addr.get('host')} port {addr.get('port')} unreachable ({'; '.join(errors)})")


# ------------------------------------------------------------------------------------------------- sender --
@dataclass
class PartnerJob:
    computation: str
    generation: int
    paths: list[str]
    partner: dict | None = None        # {agent_id, host, addresses, port}: from the coordinator's committed message


Report = Callable[..., None]


class PartnerSender:
    """A thread sending each committed generation's images of this agent to its partner, one at a time; each
    outcome goes to report(generation, level="partner", ok, error, bytes, seconds, partner) (agent/storage.py
    passes it on to the coordinator)."""

    def __init__(self, ckptdir: str, agent_id: str, host: str, pacer: Pacer, report: Report | None = None):
        self.ckptdir, self.agent_id, self.host, self.pacer = ckptdir, agent_id, host, pacer
        self.report = report or (lambda *a, **k: None)
        self.jobs: queue.Queue[PartnerJob] = queue.Queue()
        self.state: dict[int, str] = {}
        self.told = False
        self.thread = threading.Thread(target=self._run, name="partner-send", daemon=True)
        self.thread.start()

    def submit(self, job: PartnerJob) -> None:
        self.state[job.generation] = "queued"
        self.jobs.put(job)

    def idle(self) -> bool:
        return self.jobs.empty() and all(not v.startswith(("queued", "sending")) for v in self.state.values())

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            self.state[job.generation] = "sending"
            try:
                where = self.send(job)
                self.state[job.generation] = f"sent to {where}"
            except NoPartner as e:        # (a one-host computation: said once)
                self.state[job.generation] = f"none: {e}"
                if not self.told:
                    log.warning("partner copies: %s; images are kept on this node and drained only", e)
                    self.told = True
            except Exception as e:        # the job goes on; the drain still reaches the shared level
                self.state[job.generation] = f"failed: {e}"
                log.error("partner copy of checkpoint generation %d failed: %s", job.generation, e)
                journal.record(self.ckptdir, "partner", computation=job.computation, generation=job.generation,
                               host=self.host, ok=False, error=str(e))
                self.report(job.generation, "partner", False, error=str(e))

    def send(self, job: PartnerJob) -> str:
        addr = job.partner
        if not addr:
            raise NoPartner("no agent of the computation on another host to be the partner")
        fault("partner.before_send")
        t0 = time.monotonic()
        sock = self._connect(addr)
        nbytes = 0
        with sock:
            session = handshake(sock, job.computation, server=False)
            for p in job.paths:
                nbytes += self._send_file(sock, session, job, p)
            _send(sock, b"bye")
        took = time.monotonic() - t0
        log.info("checkpoint generation %d: %d image(s), %.1f MB copied to partner %s (%s) in %.2f s",
                 job.generation, len(job.paths), nbytes / 1e6, addr.get("host"), addr.get("agent_id"), took)
        journal.record(self.ckptdir, "partner", computation=job.computation, generation=job.generation,
                       host=self.host, partner=addr.get("host"), ok=True, bytes=nbytes)
        self.report(job.generation, "partner", True, bytes=nbytes, seconds=round(took, 3),
                    partner=str(addr.get("host")))
        return str(addr.get("host"))

    def _connect(self, addr: dict) -> socket.socket:
        return connect(addr)

    def _send_file(self, sock: socket.socket, session: bytes, job: PartnerJob, path: str) -> int:
        size = send_image(sock, session, path, {"computation": job.computation, "generation": job.generation,
                                                "host": self.host}, self.pacer)
        reply = _recv(sock)
        if reply != b"ok":
            raise PartnerError(f"partner refused {os.path.basename(path)}: {reply.decode(errors='replace')}")
        return size

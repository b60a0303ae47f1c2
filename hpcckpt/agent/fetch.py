"""A restart on a host that has no copy of an image fetches it from the surviving host that keeps it as a partner
copy (docs/storage.md, "Restart"): a batch rerun on new nodes, or a lost node's part moved to a spare node, when the
drain had not reached the shared level yet.

Over the computation's own connections, no ssh: every part of a restart (one per host, started by the restart's
launcher) comes here before it restores, with its coordinator known. Through the coordinator's key-value store
(the restart rendezvous, agent/rendezvous.py) each part says, for each of its images, whether it has a copy
(`copy-state/<image>`: have or need); a part whose host keeps partner copies of the generation listens (the
partner connection's authentication: both ends prove the user's key) and says where (`copy-at/<image>`); a part
that needs an image connects there and receives it into its own partner tree, verified before it is named
(partner.receive_image), then says so (`copy-fetched/<image>`). A keeper serves until every image it keeps is
either not needed or fetched (bounded by restart_timeout). All of it is done, and its threads and sockets are
closed, before the restart enters its namespaces (a process with threads cannot create them)."""
from __future__ import annotations

import hmac
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable

from ..coordinator.client import Connection
from ..image import levels, store
from ..image.format import ImageReader
from . import partner
from .rendezvous import Rendezvous

log = logging.getLogger("hpcckpt.fetch")

_REQUEST = re.compile(r"^gen(\d{6,})/([^/]+)$")
_chosen: dict[tuple[str, ...], list[levels.Choice]] = {}     # needs_fetch's choices, for choose

WAIT_S = 60.0          # at most this long for another host's word (the restart gate's own timeout is longer)


class FetchError(Exception):
    """An image no host of the restart has a valid copy of; one line naming it."""


def choose(paths: list[str], s, coordinator: Callable[[], tuple[str, int]], first: bool = False) -> list[str]:
    """The restart's choice of copies (levels.choose); with partner copies on, images with no valid copy on this
    host are fetched from the host that keeps their partner copy, and this host's partner copies are served.
    first: this is the restart command (not a part it started with --join) and it started no other host's part
    (none is in this restart, or it needs nothing from them: needs_fetch): nobody to fetch from, said at once
    instead of waiting."""
    choices = _chosen.pop(tuple(paths), None) or levels.choose(paths, s)
    root = levels.local_root(s)
    one = levels.parse(paths[0]) if paths else None
    if not s.partner or root is None or one is None:
        return [c.path for c in choices]
    comp, gen = one.computation, one.generation
    held = _held(root, comp, gen)
    need = _missing(choices)
    if not held and not need:
        return [c.path for c in choices]
    host, port = coordinator()
    wait = min(WAIT_S, float(s.restart_timeout))
    if held:                   # (first: the server process is forked while this one has no thread or socket)
        _serve_detached(root, comp, gen, held, (host, port), wait)
    if not choices:
        return []
    if need and first:
        log.error("image %s: no valid copy on this host, and no other host of this restart to fetch a partner copy "
                  "from: restart from the shared level (--from CKPTDIR), or on the host that keeps its partner copy",
                  os.path.basename(need[0].given))
        need = []
    conn = Connection(host, port)
    got = {}
    try:
        rv = Rendezvous(conn, comp, gen, wait)
        needed = {os.path.basename(c.given) for c in need}
        for c in choices:        # (what the keepers wait for: a part that has its copy lets them go at once)
            name = os.path.basename(c.given)
            rv.put(f"copy-state/{name}", "need" if name in needed else "have")
        for c in need:
            name = os.path.basename(c.given)
            addr = rv.get(f"copy-at/{name}", wait)
            if not isinstance(addr, dict):
                log.error("image %s: no valid copy on this host, and no host of the restart keeps a partner copy "
                          "(waited %.0f s); restart from the shared level: --from CKPTDIR", name, wait)
                continue
            try:
                got[c.given] = fetch(addr, root, comp, gen, name)
            except (partner.PartnerError, FetchError, OSError, ValueError) as e:
                log.error("image %s: fetching the partner copy kept on %s failed: %s", name, addr.get("host"), e)
            rv.put(f"copy-fetched/{name}", socket.gethostname())     # (or gave up: the keeper need not wait)
    finally:
        conn.close()
    return [got.get(c.given, c.path) for c in choices]


def _missing(choices: list[levels.Choice]) -> list[levels.Choice]:
    """The images with no valid copy on this host (levels.choose fell back to the path as given, which does not
    verify here)."""
    return [c for c in choices if c.level == "given" and levels.valid_copy(c.path, levels.parse(c.given)) is not None]


def needs_fetch(paths: list[str], s) -> bool:
    """(the restart command, before it starts the other hosts' parts) Would this host fetch an image from a
    partner copy kept on another host? Then those parts start first: they serve the copies they keep."""
    if not s.partner or levels.local_root(s) is None or not paths or levels.parse(paths[0]) is None:
        return False
    choices = _chosen[tuple(paths)] = levels.choose(paths, s)      # (choose uses it: each choice logged once)
    return bool(_missing(choices))


def _serve_detached(root: str, comp: str, gen: int, held: list[str], coordinator: tuple[str, int],
                    wait: float) -> None:
    """Serve this host's partner copies from a detached process (double fork: not a child of the restart, so
    neither part of the job nor waited for), for at most `wait` seconds: the restart goes on restoring at once,
    and a process that must next create namespaces may have no thread. Its stdio goes to /dev/null (a pipe
    kept open would hold up whoever reads the restart's output)."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    code = 0
    try:
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 65536)        # (the restart's pipes and locks are not ours to hold)
        _serve(root, comp, gen, held, coordinator, wait)
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _serve(root: str, comp: str, gen: int, held: list[str], coordinator: tuple[str, int], wait: float) -> None:
    server = CopyServer(root, comp, gen, held)
    conn = Connection(*coordinator)
    try:
        rv = Rendezvous(conn, comp, gen, wait)
        for name in held:
            rv.put(f"copy-at/{name}", {"host": socket.gethostname(), "addresses": partner.local_addresses(),
                                       "port": server.port})
        _serve_until_fetched(rv, server, held, wait)
    finally:
        server.close()
        conn.close()


def _held(root: str, comp: str, gen: int) -> list[str]:
    d = store.generation_dir(levels.partner_root(root), comp, gen)
    try:
        return sorted(n for n in os.listdir(d) if n.endswith(".dmtcp") and partner._NAME.match(n))
    except OSError:
        return []


def _serve_until_fetched(rv: Rendezvous, server: CopyServer, held: list[str], wait: float) -> None:
    """Until, for each kept image, the part restoring it said it has its own copy, or fetched ours; `wait`
    seconds at most (a part that never says: one not in this restart)."""
    give_up = time.monotonic() + wait
    state_key, fetched_key = rv.prefix + "copy-state/", rv.prefix + "copy-fetched/"
    for name in held:
        rv.conn.send({"type": "kv_get", "key": state_key + name, "wait": True})
    left = set(held)
    while left and time.monotonic() < give_up:
        msg = rv.conn.recv(give_up - time.monotonic())
        if msg is None:
            break
        key = str(msg.get("key") or "")
        if msg.get("type") != "kv":
            continue
        if key.startswith(state_key) and msg.get("value") == "need":
            rv.conn.send({"type": "kv_get", "key": fetched_key + key[len(state_key):], "wait": True})
        elif key.startswith((state_key, fetched_key)):
            left.discard(key.rsplit("/", 1)[-1])
    if left:
        log.info("partner copies kept here that no part of this restart asked about: %s", ", ".join(sorted(left)))


def fetch(addr: dict, root: str, comp: str, gen: int, name: str) -> str:
    """Receive one image from the host at addr into this host's partner tree (verified), and the images of older
    generations it builds on (incremental: its `base`, and theirs) that are not there already; returns its path.
    They come from the same host: the agents are paired the same way every generation."""
    path = _fetch_one(addr, root, comp, gen, name)
    p = path
    for _ in range(64):        # (the restore's own limit on a chain: image/incremental.py)
        base = _base_of(p)
        if base is None:
            break
        bpath = os.path.normpath(os.path.join(os.path.dirname(p), base))
        b = levels.parse(bpath)
        if b is None or b.computation != comp or b.generation >= gen:
            raise FetchError(f"image {name}: names a base {base!r} that is not an older image of {comp}")
        if levels.valid_copy(bpath, b) is not None:
            try:
                _fetch_one(addr, root, comp, b.generation, b.name)
            except (partner.PartnerError, FetchError, OSError, ValueError) as e:
                raise FetchError(f"image {name} of generation {gen} is incremental and builds on {b.name} of "
                                 f"generation {b.generation}, which could not be fetched from {addr.get('host')} "
                                 f"either ({e}): restart an older generation whole on the shared level "
                                 f"(--from CKPTDIR)") from None
        p = bpath
    return path


def _base_of(path: str) -> str | None:
    with ImageReader(path) as r:
        base = r.meta.get("base")
    return str(base) if base else None


def _fetch_one(addr: dict, root: str, comp: str, gen: int, name: str) -> str:
    """One image of generation gen from the host at addr (the restarted generation's, or a base of an older one:
    asked for as gen<G>/<name>)."""
    t0 = time.monotonic()
    with partner.connect(addr) as sock:
        sock.settimeout(60)
        session = partner.handshake(sock, comp, server=False)
        req = f"gen{gen:06d}/{name}".encode()
        partner._send(sock, req)
        partner._send(sock, partner._mac(session, b"fetch", req))
        h = partner.recv_header(sock, session)
        if (h.get("name"), h.get("generation")) != (name, gen):
            raise FetchError(f"image {name}: host {addr.get('host')} sent {h.get('name')} of generation "
                             f"{h.get('generation')}")
        path = partner.receive_image(sock, root, comp, h)
    log.warning("image %s: no copy on this host; fetched the partner copy kept on %s (%.1f MB in %.2f s) to %s",
                name, addr.get("host"), os.path.getsize(path) / 1e6, time.monotonic() - t0, path)
    return path


class CopyServer:
    """(restart) Serves this host's partner copies of one generation to the restarting hosts that lack them."""

    def __init__(self, root: str, comp: str, gen: int, names: list[str]):
        self.root, self.comp, self.gen, self.names = root, comp, gen, set(names)
        self.sock = socket.create_server(("0.0.0.0", 0), backlog=16)
        self.port = self.sock.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, name="copy-server", daemon=True)
        self.thread.start()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
        for t in self.threads:
            t.join(5)

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            if len([t for t in self.threads if t.is_alive()]) >= partner.MAX_CONNECTIONS:
                conn.close()
                continue
            t = threading.Thread(target=self._serve, args=(conn, peer), name="copy-send", daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, peer) -> None:
        with conn:
            try:
                conn.settimeout(partner.HANDSHAKE_S)
                session = partner.handshake(conn, self.comp, server=True)
                conn.settimeout(60)
                req = partner._recv(conn)
                if not hmac.compare_digest(partner._recv(conn), partner._mac(session, b"fetch", req)):
                    raise partner.PartnerError("a request that does not verify")
                gen, n = self._asked(req.decode(errors="replace"))
                path = os.path.join(store.generation_dir(levels.partner_root(self.root), self.comp, gen), n)
                size = partner.send_image(conn, session, path, {"computation": self.comp, "generation": gen,
                                                                "host": socket.gethostname()})
                log.info("partner copy %s (%.1f MB) sent to %s for its restart", n, size / 1e6, peer[0])
            except (partner.PartnerError, OSError, ValueError) as e:
                log.warning("copy request from %s: %s", peer[0], e)

    def _asked(self, req: str) -> tuple[int, str]:
        """gen<G>/<name>: an image of the restarted generation this host keeps, or of an older one kept here
        that an incremental image builds on."""
        m = _REQUEST.match(req)
        if not m:
            raise partner.PartnerError(f"a request {req[:80]!r} refused")
        gen, n = int(m[1]), m[2]
        if (gen == self.gen and n not in self.names) or gen > self.gen or not partner._NAME.match(n) or \
                not os.path.isfile(os.path.join(store.generation_dir(levels.partner_root(self.root), self.comp, gen),
                                                n)):
            raise partner.PartnerError(f"asked for {n!r} of generation {gen}, which this host does not keep")
        return gen, n

"""The coordinator protocol's wire: framing, authentication and the per-computation secret (docs/protocol.md).
Kept apart from the message records (protocol.py) so that a one-shot command (cli/cmdquick.py) imports only
this: the records' dataclasses and enums cost ~10 ms at every dmtcp_command.

Every message is three ZeroMQ frames (the ROUTER side sees the sender's identity frame first):

    [b"HPCCKPT/1", HMAC-SHA256(secret, body), body]

body is a UTF-8 JSON object with at least {"type": ...}, plus "nonce" (random) and "ts" (the sender's
wall clock) that encode() adds to every message: the coordinator (decode with a Freshness) refuses a message
whose ts is more than the freshness window away from its own clock, or whose nonce it has seen within the
window, so a captured message cannot be replayed. Replies to a request carry "re": the request's nonce, and a
client takes only the reply to its own request (answers()). A message whose tag, MAC or JSON is wrong is
dropped (logged, rate-limited); the secret itself never crosses the wire.

The secret is 32 random bytes in a file readable only by its owner:
    $HPCCKPT_SECRET_FILE, else <rundir>/coord-<port>.secret
where rundir is $HPCCKPT_RUNDIR, else /tmp/hpcckpt-<uid> (created 0700 and checked to be ours).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import time

PROTO_TAG = b"HPCCKPT/1"
PROTOCOL_VERSION = 2                 # 2: every body carries nonce and ts (freshness), replies "re"
STATUS_SCHEMA_VERSION = 1

# The largest message the coordinator takes (ZMQ_MAXMSGSIZE on its socket: a bigger frame drops the connection
# before it is buffered). The biggest legitimate ones (measured, 1000 processes) are an agent's suspend ack
# listing its TCP ends (a node of 128 MPI ranks all-to-all with 999 others: 4.9 MB), `written` with its images
# (290 KB for 1000 processes) and `hello` (160 KB); 32 MiB leaves ample room. Agents and commands read the
# same variable and say so when a message of theirs would exceed it.
MAX_MESSAGE_BYTES = int(os.environ.get("HPCCKPT_MAX_MESSAGE") or 32 << 20)
# How far a message's ts may be from the coordinator's clock: the hosts of a computation must keep their clocks
# this close (NTP; Slurm's MUNGE credentials already need the same, their default TTL is 300 s).
FRESHNESS_S = float(os.environ.get("HPCCKPT_FRESHNESS") or 300.0)
MAX_NONCES = 1_000_000               # nonces remembered within the window: ~1000 agents' heartbeats, 300 times over
# ... and at least this many per connected agent (Coordinator._add_peer raises the bound): an agent's heartbeats
# alone fill window / heartbeat (150 by default), so a fixed million refused every message past ~6600 agents
NONCES_PER_AGENT_HEARTBEATS = 3


class ProtocolError(Exception):
    pass


class Refused(ProtocolError):
    """An authenticated message that is stale, from the future, replayed or without nonce: the sender holds the
    secret (or replays what one sent), so it gets an authenticated refusal naming its nonce."""

    def __init__(self, reason: str, nonce: str | None):
        super().__init__(reason)
        self.nonce = nonce


class SecretError(Exception):
    """The secret for a coordinator is missing or unsafe; the message says what to do."""


def rundir() -> str:
    d = os.environ.get("HPCCKPT_RUNDIR") or f"/tmp/hpcckpt-{os.getuid()}"
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
    except OSError as e:
        raise SecretError(f"cannot create run directory {d}: {e.strerror}") from None
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise SecretError(f"run directory {d} is not a directory owned by you; set HPCCKPT_RUNDIR")
    if st.st_mode & 0o077:
        os.chmod(d, 0o700)
    return d


def secret_path(port: int) -> str:
    return os.environ.get("HPCCKPT_SECRET_FILE") or os.path.join(rundir(), f"coord-{port}.secret")


def create_secret(port: int) -> bytes:
    """A fresh secret for a coordinator on port, written 0600 (replacing a stale one atomically)."""
    from ..image import safefs
    key = secrets.token_bytes(32)
    safefs.atomic_write(secret_path(port), key.hex().encode() + b"\n", 0o600)
    return key


def read_secret(port: int) -> bytes:
    env = os.environ.get("HPCCKPT_SECRET")
    if env:
        return bytes.fromhex(env.strip())
    path = secret_path(port)
    try:
        st = os.stat(path)
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        raise SecretError(f"no secret for the coordinator on port {port} ({path} is missing): is the "
                          f"coordinator yours and on this host? Otherwise set HPCCKPT_SECRET_FILE") from None
    except PermissionError:
        raise SecretError(f"cannot read the coordinator secret {path}: permission denied") from None
    if st.st_mode & 0o077:
        raise SecretError(f"coordinator secret {path} is readable by others; chmod 600 it")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise SecretError(f"coordinator secret {path} is not valid") from None


def remove_secret(port: int) -> None:
    try:
        os.unlink(secret_path(port))
    except FileNotFoundError:
        pass


def new_nonce() -> str:
    return secrets.token_hex(12)


def encode(key: bytes, msg: dict, nonce: str | None = None) -> list[bytes]:
    """The frames of msg, stamped with a fresh nonce (or the one given) and the time."""
    body = json.dumps({**msg, "nonce": nonce or new_nonce(), "ts": round(time.time(), 3)},
                      separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE_BYTES:
        import logging  # (here: a dmtcp_command need not import logging, ~5 ms)
        log = logging.getLogger("hpcckpt.coordinator")
        log.error("a %s message of %d bytes exceeds the coordinator's limit of %d bytes and will be dropped; "
                  "raise HPCCKPT_MAX_MESSAGE (for the coordinator and every agent)", msg.get("type"), len(body),
                  MAX_MESSAGE_BYTES)
    return [PROTO_TAG, hmac.new(key, body, hashlib.sha256).digest(), body]


def encode_request(key: bytes, msg: dict) -> tuple[list[bytes], str]:
    """The frames of a request and its nonce, which the reply names (answers())."""
    nonce = new_nonce()
    return encode(key, msg, nonce), nonce


def answers(reply: dict, nonce: str) -> bool:
    """Is reply the coordinator's answer to the request with this nonce?"""
    return isinstance(reply.get("re"), str) and hmac.compare_digest(reply["re"], nonce)


def decode(key: bytes, frames: list[bytes], fresh: Freshness | None = None) -> dict:
    """Check and parse [tag, mac, body]; raises ProtocolError with the reason (Refused when the message is
    authentic but not fresh: checked when a Freshness is given, as the coordinator does)."""
    if len(frames) != 3 or frames[0] != PROTO_TAG:
        raise ProtocolError("not an hpcckpt protocol message (bad framing or protocol version)")
    tag, mac, body = frames
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        raise ProtocolError("bad or missing secret (message authentication failed)")
    try:
        msg = json.loads(body)
    except ValueError:
        raise ProtocolError("message body is not JSON") from None
    if not isinstance(msg, dict) or "type" not in msg:
        raise ProtocolError("message has no type")
    nonce, ts = msg.get("nonce"), msg.get("ts")
    if not isinstance(nonce, str) or not 8 <= len(nonce) <= 64 or isinstance(ts, bool) or \
            not isinstance(ts, (int, float)):
        raise Refused(f"message has no nonce and time (hpcckpt older than protocol {PROTOCOL_VERSION}?)",
                      nonce if isinstance(nonce, str) else None)
    if fresh is not None:
        fresh.check(nonce, float(ts))
    return msg


class Freshness:
    """The receiver's memory of the nonces it took within the freshness window: a message is fresh when its time
    is within the window of ours and its nonce is new. Memory stays bounded: a nonce is forgotten once its
    message would be refused as stale anyway, and only authenticated messages are remembered.

    Forgetting costs O(1) per message: nonces are also filed by the second their message turns stale, and each
    check drops the seconds that have passed (rebuilding the whole map every few seconds stalled the coordinator
    ~50 ms with 4096 agents' heartbeats remembered: the length of a barrier)."""

    def __init__(self, window: float | None = None, max_nonces: int = MAX_NONCES):
        self.window = FRESHNESS_S if window is None else window
        self.max_nonces = max_nonces
        self.seen: set[str] = set()           # the nonces remembered (a set: ~170 bytes a nonce, not ~200)
        self.expiring: dict[int, list[str]] = {}   # whole second after which they are stale -> those nonces
        self.purged = 0                       # every second before this one has been forgotten

    def _forget(self, now: float) -> None:
        second = int(now)
        if second <= self.purged:
            return
        if second - self.purged > len(self.expiring):      # (a long quiet time: look at what is there)
            due = sorted(s for s in self.expiring if s < second)
        else:
            due = [s for s in range(self.purged, second) if s in self.expiring]
        for s in due:
            for nonce in self.expiring.pop(s):
                self.seen.discard(nonce)
        self.purged = second

    def check(self, nonce: str, ts: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        age = now - ts
        if age > self.window:
            raise Refused(f"stale message: sent {age:.0f} s ago by the sender's clock (a replay, or clocks of "
                          f"the computation's hosts more than {self.window:.0f} s apart: HPCCKPT_FRESHNESS)", nonce)
        if -age > self.window:
            raise Refused(f"message dated {-age:.0f} s in the future (clocks of the computation's hosts more "
                          f"than {self.window:.0f} s apart? HPCCKPT_FRESHNESS)", nonce)
        self._forget(now)
        if nonce in self.seen:
            raise Refused("replayed message (its nonce was already used)", nonce)
        if len(self.seen) >= self.max_nonces:
            raise Refused(f"more than {self.max_nonces} messages within {self.window:.0f} s", nonce)
        stale_at = ts + self.window
        self.seen.add(nonce)
        # filed under the second after stale_at: forgotten only once now > stale_at, when the age check refuses it
        self.expiring.setdefault(int(stale_at) + 1, []).append(nonce)

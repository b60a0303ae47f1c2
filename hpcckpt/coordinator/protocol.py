"""The coordinator protocol: framing, authentication and the per-computation secret (docs/protocol.md).

Every message is three ZeroMQ frames (the ROUTER side sees the sender's identity frame first):

    [b"HPCCKPT/1", HMAC-SHA256(secret, body), body]

body is a UTF-8 JSON object with at least {"type": ...}. A message whose tag, MAC or JSON is wrong is
dropped with a log line naming the reason; the secret itself never crosses the wire.

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

PROTO_TAG = b"HPCCKPT/1"
PROTOCOL_VERSION = 1
STATUS_SCHEMA_VERSION = 1


class ProtocolError(Exception):
    pass


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


def encode(key: bytes, msg: dict) -> list[bytes]:
    body = json.dumps(msg, separators=(",", ":")).encode()
    return [PROTO_TAG, hmac.new(key, body, hashlib.sha256).digest(), body]


def decode(key: bytes, frames: list[bytes]) -> dict:
    """Check and parse [tag, mac, body]; raises ProtocolError with the reason."""
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
    return msg

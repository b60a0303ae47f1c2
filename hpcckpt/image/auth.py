"""Authentication of images and manifests: a per-user secret key, HMAC-SHA256 over metadata, keyed chunk tags.

The key is 32 random bytes in ~/.hpcckpt/key (mode 0600, in a 0700 directory owned by the user), or in the
file $HPCCKPT_KEY_FILE names. It is created on first use. A user's nodes share it through the (shared) home
directory; a user without a usable home sets HPCCKPT_KEY_FILE. A key file is used only if it is a regular file
owned by the user whose key it is, readable by nobody else: a key another user could read or plant would let
them forge images that this user's restart then trusts.

From the key, three subkeys are derived (so a tag made for one use can never pass for another): one for image
metadata (HMAC-SHA256), one for chunk data (keyed BLAKE3 when the blake3 module is there, else HMAC-SHA256;
16-byte tags, the algorithm named in the metadata), one for manifests (HMAC-SHA256). Every image records the
uid that signed it; only that user (with its own key) or root (reading that user's key) can verify it.
See docs/image-format.md and docs/reliability/auth.md.
"""
from __future__ import annotations

import hashlib
import hmac
import importlib
import os
import pwd
import stat
import threading
from typing import Any

_blake3: Any
try:
    _blake3 = importlib.import_module("blake3")
except ImportError:      # pragma: no cover - blake3 is a dependency; HMAC-SHA256 tags are 4x slower, as secure
    _blake3 = None

KEY_ENV = "HPCCKPT_KEY_FILE"
TRUST_ENV = "HPCCKPT_TRUST_UNSIGNED"     # set by restart --trust-unsigned: images without a valid MAC accepted
KEY_SIZE = 32
TAG_SIZE = 16
CHUNK_BLAKE3 = "blake3-128"
CHUNK_HMAC = "hmac-sha256-128"
CHUNK_ALGO = CHUNK_BLAKE3 if _blake3 is not None else CHUNK_HMAC


class AuthError(Exception):
    """A key cannot be had, or an image or manifest is not authentic; the message is one line for the user."""


def trust_unsigned() -> bool:
    return os.environ.get(TRUST_ENV, "") not in ("", "0")


def _home_of(uid: int) -> str:
    if uid == os.geteuid() and os.environ.get("HOME"):
        return os.environ["HOME"]
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        raise AuthError(f"uid {uid} has no passwd entry, so no home for its hpcckpt key; set {KEY_ENV}") from None


def key_path(uid: int | None = None) -> str:
    """$HPCCKPT_KEY_FILE for our own key (for root looking for another user's key: only if that user owns it),
    else ~/.hpcckpt/key."""
    uid = os.geteuid() if uid is None else uid
    env = os.environ.get(KEY_ENV)
    if env and uid != os.geteuid():
        try:
            if os.lstat(env).st_uid != uid:
                env = None
        except OSError:
            env = None
    return env or os.path.join(_home_of(uid), ".hpcckpt", "key")


def _read_key(path: str, uid: int) -> bytes | None:
    """The key in path if it is a proper key file of uid; None if there is none."""
    try:
        # (non-blocking: a FIFO planted as a key must not hang root's restart; regular files ignore the flag)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise AuthError(f"hpcckpt key {path}: {e.strerror}; set {KEY_ENV} to a key file of your own") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
            raise AuthError(f"hpcckpt key {path} is not a file owned by uid {uid} and private to it (mode 0600); "
                            f"remove it (a new one is made) or fix its owner and mode")
        key = os.read(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_SIZE:
        raise AuthError(f"hpcckpt key {path} is not {KEY_SIZE} bytes long; remove it (a new one is made)")
    return key


def _make_key(path: str, uid: int) -> bytes:
    d = os.path.dirname(path) or "."
    if not os.environ.get(KEY_ENV):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise AuthError(f"cannot create {d} for the hpcckpt key ({e.strerror}); set {KEY_ENV} to a file "
                            f"path of your own (shared by your nodes)") from None
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
            raise AuthError(f"{d} is not a directory owned by uid {uid} and writable only by it; fix it or set "
                            f"{KEY_ENV}")
    # written under a temporary name and linked into place: a process racing us (two agents' first checkpoint)
    # sees either no key or a whole one, and the first link wins
    key = os.urandom(KEY_SIZE)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise AuthError(f"cannot create the hpcckpt key {path} ({e.strerror}); set {KEY_ENV} to a file path "
                        f"of your own (shared by your nodes)") from None
    try:
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError:
        return _read_key(path, uid) or _make_key(path, uid)     # another process made it first
    except OSError as e:
        raise AuthError(f"cannot create the hpcckpt key {path} ({e.strerror}); set {KEY_ENV} to a file path "
                        f"of your own (shared by your nodes)") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return key


_cache: dict[tuple[str, int], bytes] = {}
_read_as_root: dict[int, bytes] = {}


def key_for(uid: int | None = None, create: bool = False) -> bytes:
    """The key of uid (default: ours). Another user's key can only be read by root. create: make ours if
    missing (writers); readers never create one (an image signed by a key that does not exist is not ours)."""
    me = os.geteuid()
    uid = me if uid is None else uid
    if uid != me and uid in _read_as_root:
        return _read_as_root[uid]        # read before root's restart became the images' user (engine/identity.py)
    if uid != me and me != 0:
        raise AuthError(f"signed by uid {uid}, not by you (uid {me}): only that user or root can verify it")
    path = key_path(uid)
    if (path, uid) in _cache:
        return _cache[(path, uid)]
    key = _read_key(path, uid)
    if key is None:
        if not create or uid != me:
            raise AuthError(f"no hpcckpt key of uid {uid} at {path} to verify it with (set {KEY_ENV} to the "
                            f"key of the user who checkpointed it)")
        key = _make_key(path, uid)
    _cache[(path, uid)] = key
    if me == 0:
        _read_as_root[uid] = key
    return key


def subkey(key: bytes, purpose: str) -> bytes:
    return hmac.new(key, b"hpcckpt v2 " + purpose.encode(), hashlib.sha256).digest()


def meta_mac(key: bytes, header: bytes, meta: bytes) -> bytes:
    """HMAC-SHA256 of the image header's fixed fields and the metadata (which holds every chunk's tag)."""
    h = hmac.new(subkey(key, "image metadata"), header, hashlib.sha256)
    h.update(meta)
    return h.digest()


class ChunkTagger:
    """Keyed tags of chunk data (thread-safe: no shared mutable state). The GIL is released while hashing."""

    def __init__(self, key: bytes, algo: str = CHUNK_ALGO):
        if algo == CHUNK_BLAKE3 and _blake3 is None:
            raise AuthError("image chunks are tagged with BLAKE3 but the blake3 module is missing (pip install blake3)")
        if algo not in (CHUNK_BLAKE3, CHUNK_HMAC):
            raise AuthError(f"unknown chunk tag algorithm {algo!r}")
        self.algo = algo
        self.key = subkey(key, "image chunks")

    def tag(self, data) -> str:
        if self.algo == CHUNK_BLAKE3:
            return _blake3.blake3(data, key=self.key).digest(TAG_SIZE).hex()
        return hmac.new(self.key, data, hashlib.sha256).digest()[:TAG_SIZE].hex()

    def ok(self, data, tag: str) -> bool:
        return hmac.compare_digest(self.tag(data), tag or "")


def manifest_mac(key: bytes, body: bytes) -> str:
    return hmac.new(subkey(key, "manifest"), body, hashlib.sha256).hexdigest()

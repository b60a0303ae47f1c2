"""The checkpoint directory: where images and generation manifests live, and which generation is good.

    <ckptdir>/ckpt_<computation>/gen<NNNNNN>/ckpt_<program>_<unique-id>.dmtcp    one image per process
    <ckptdir>/ckpt_<computation>/gen<NNNNNN>.json                               manifest: generation complete
    <ckptdir>/dmtcp_restart_script_<computation>.sh                             restarts the newest complete one
    <ckptdir>/dmtcp_restart_script.sh -> dmtcp_restart_script_<computation>.sh

Every directory and file here is made and opened through safefs.py (the directory rule: ours or root's, not
writable by others unless sticky; no symlinks followed below the checkpoint directory). Images are written as
*.dmtcp.tmp and renamed when durable. A generation is complete only once the
coordinator has written its manifest (atomically, after every image of every peer was reported durable);
an interrupted or failed checkpoint never gets a manifest, and older generations are deleted only after a
newer one is complete, so the last good checkpoint is never lost.
"""
from __future__ import annotations

import json
import logging
import os
import re
import stat
from dataclasses import asdict, dataclass, field

from . import auth, safefs
from .manifest_check import ManifestError, parse_manifest

log = logging.getLogger("hpcckpt.store")

IMAGE_SUFFIX = ".dmtcp"
_GEN_DIR = re.compile(r"^gen(\d{6,})$")
_GEN_MANIFEST = re.compile(r"^gen(\d{6,})\.json$")


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", s)[:64] or "program"


def computation_dir(ckptdir: str, computation: str) -> str:
    return os.path.join(os.path.abspath(ckptdir), f"ckpt_{computation}")


def generation_dir(ckptdir: str, computation: str, gen: int) -> str:
    return os.path.join(computation_dir(ckptdir, computation), f"gen{gen:06d}")


def image_name(program: str, unique_id: str) -> str:
    return f"ckpt_{safe_name(program)}_{unique_id}{IMAGE_SUFFIX}"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace the file at path atomically (random O_EXCL|O_NOFOLLOW temporary name, fsync, rename); its
    directory must pass safefs's directory rule."""
    safefs.atomic_write(path, data, mode)


def open_computation_dir(ckptdir: str, computation: str, create: bool = False) -> int:
    """A checked descriptor of <ckptdir>/ckpt_<computation> (created 0700 if asked): refuses (UnsafePath) one
    pre-created by another user, writable by others, or a symlink."""
    return safefs.open_dirs(ckptdir, [f"ckpt_{computation}"], create=create)


def make_generation_dir(ckptdir: str, computation: str, gen: int) -> str:
    """Create (or check) the directory a generation's images go to; returns its path."""
    os.close(safefs.open_dirs(ckptdir, [f"ckpt_{computation}", f"gen{gen:06d}"], create=True))
    return generation_dir(ckptdir, computation, gen)


@dataclass
class ImageEntry:
    host: str
    path: str
    program: str
    unique_id: str
    pid: int
    size: int = 0
    needs: list = field(default_factory=list)     # generations a restore of this image reads (incremental)
    rank: int | None = None                        # the MPI rank (or srun task) the process was, if one
    agent_id: str = ""                             # the agent that wrote it (a restart waits for every agent)


@dataclass
class Manifest:
    """A complete generation. On disk it carries the uid that wrote it and an HMAC-SHA256 (image/auth.py) of
    everything else: a manifest is only read back if it verifies with that user's key."""
    computation: str
    generation: int
    created: float
    images: list[ImageEntry] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def to_json(self) -> bytes:
        d = dict(asdict(self), signer_uid=os.geteuid())
        d["mac"] = auth.manifest_mac(auth.key_for(create=True), _canonical(d))
        return json.dumps(d, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, name: str = "manifest", trust: bool | None = None) -> Manifest:
        """Parse and authenticate (ManifestError if it does not verify, unless trusted: auth.trust_unsigned())."""
        try:
            d = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ManifestError(f"{name}: not a checkpoint manifest (not UTF-8 JSON)") from None
        if not isinstance(d, dict):
            raise ManifestError(f"{name}: not a checkpoint manifest (not a JSON object)")
        mac = d.pop("mac", None)
        signer = d.pop("signer_uid", None)
        trust = auth.trust_unsigned() if trust is None else trust
        if not trust:
            _verify_manifest(name, d, signer, mac)
        try:
            return parse_manifest(cls, ImageEntry, json.dumps(d).encode())
        except ManifestError as e:
            raise ManifestError(f"{name}: {e}") from None


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def _verify_manifest(name: str, d: dict, signer, mac) -> None:
    how = "restart with --trust-unsigned only if you know where it came from"
    if not isinstance(mac, str) or not isinstance(signer, int):
        raise ManifestError(f"{name}: unsigned manifest (no MAC); {how}")
    try:
        want = auth.manifest_mac(auth.key_for(signer), _canonical(dict(d, signer_uid=signer)))
    except auth.AuthError as e:
        raise ManifestError(f"{name}: not authentic ({e}); {how}") from None
    if not auth.hmac.compare_digest(want, mac):
        raise ManifestError(f"{name}: not authentic (its MAC does not match: it was altered, or signed with "
                            f"another key); {how}")


def manifest_name(gen: int) -> str:
    return f"gen{gen:06d}.json"


def write_manifest(ckptdir: str, m: Manifest) -> str:
    fd = open_computation_dir(ckptdir, m.computation, create=True)
    try:
        safefs.write_at(fd, manifest_name(m.generation), m.to_json())
    finally:
        os.close(fd)
    return os.path.join(computation_dir(ckptdir, m.computation), manifest_name(m.generation))


def complete_generations(ckptdir: str, computation: str) -> list[int]:
    """Generations with a manifest; none in a directory that fails the directory rule (another user's), whose
    manifests are never read (writing a manifest there fails with the reason)."""
    try:
        fd = open_computation_dir(ckptdir, computation)
    except FileNotFoundError:
        return []
    except safefs.UnsafePath as e:
        log.warning("%s", e)
        return []
    try:
        names = os.listdir(fd)
    finally:
        os.close(fd)
    return sorted(int(m[1]) for n in names if (m := _GEN_MANIFEST.match(n)))


def read_manifest(ckptdir: str, computation: str, gen: int) -> Manifest:
    fd = open_computation_dir(ckptdir, computation)
    try:
        path = os.path.join(computation_dir(ckptdir, computation), manifest_name(gen))
        return Manifest.from_json(safefs.read_at(fd, manifest_name(gen), computation_dir(ckptdir, computation)), path)
    finally:
        os.close(fd)


def manifest_of_image(path: str, generation: int) -> Manifest | None:
    """The manifest of the checkpoint an image (still where it was written) belongs to; None if not found."""
    cdir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    try:
        path = os.path.join(cdir, manifest_name(generation))
        return Manifest.from_json(safefs.read_file(path), path)
    except (OSError, ValueError, TypeError):
        return None


def latest_manifest(ckptdir: str, computation: str) -> Manifest | None:
    gens = complete_generations(ckptdir, computation)
    return read_manifest(ckptdir, computation, gens[-1]) if gens else None


def computations_in(ckptdir: str, foreign: list[str] | None = None) -> list[str]:
    """The computations with a directory of ours in ckptdir. Directories of other users, writable by others, or
    symlinks are left out (their manifests could name anything) and added to `foreign` if given."""
    try:
        names = os.listdir(ckptdir)
    except FileNotFoundError:
        return []
    out = []
    for n in sorted(names):
        if not n.startswith("ckpt_"):
            continue
        try:
            st = os.lstat(os.path.join(ckptdir, n))
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode) and safefs.trusted_owner(st.st_uid) and not st.st_mode & 0o022:
            out.append(n[len("ckpt_"):])
        elif stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            log.debug("ignoring %s: not a directory of yours (uid %d)", os.path.join(ckptdir, n), st.st_uid)
            if foreign is not None:
                foreign.append(os.path.join(ckptdir, n))
    return out


def generations_to_prune(complete: list[int], keep: int, needs: dict[int, set[int]] | None = None) -> list[int]:
    """Complete generations beyond the newest `keep`, except those a kept generation still needs (incremental
    images build on earlier ones). Incomplete generations are removed by their writers."""
    if keep <= 0 or len(complete) <= keep:
        return []
    kept = sorted(complete)[-keep:]
    required = set(kept)
    for g in kept:
        required |= (needs or {}).get(g, set())
    return [g for g in sorted(complete) if g not in required]


def remove_manifest(ckptdir: str, computation: str, gen: int) -> None:
    try:
        fd = open_computation_dir(ckptdir, computation)
    except FileNotFoundError:
        return
    try:
        safefs.unlink(fd, manifest_name(gen))
    finally:
        os.close(fd)


def remove_generation_images(ckptdir: str, computation: str, gen: int, paths: list[str]) -> None:
    """Delete the given images of a generation (and their .tmp files); drop the generation directory once
    empty. Only named files are removed: other agents may share the directory."""
    for p in paths:
        for q in (p, p + ".tmp"):
            try:
                os.unlink(q)
            except FileNotFoundError:
                pass
    for d in {os.path.dirname(p) for p in paths} | {generation_dir(ckptdir, computation, gen)}:
        try:
            os.rmdir(d)
        except OSError:
            pass

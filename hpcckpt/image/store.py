"""The checkpoint directory: where images and generation manifests live, and which generation is good.

    <ckptdir>/ckpt_<computation>/gen<NNNNNN>/ckpt_<program>_<unique-id>.dmtcp    one image per process
    <ckptdir>/ckpt_<computation>/gen<NNNNNN>.json                               manifest: generation complete
    <ckptdir>/dmtcp_restart_script_<computation>.sh                             restarts the newest complete one
    <ckptdir>/dmtcp_restart_script.sh -> dmtcp_restart_script_<computation>.sh

Images are written as *.dmtcp.tmp and renamed when durable. A generation is complete only once the
coordinator has written its manifest (atomically, after every image of every peer was reported durable);
an interrupted or failed checkpoint never gets a manifest, and older generations are deleted only after a
newer one is complete, so the last good checkpoint is never lost.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

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
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


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


@dataclass
class Manifest:
    computation: str
    generation: int
    created: float
    images: list[ImageEntry] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        """Parse a manifest; ManifestError (a ValueError) saying what is wrong if it is not one."""
        from .manifest_check import parse_manifest
        return parse_manifest(cls, ImageEntry, data)


class ManifestError(ValueError):
    """A generation manifest that is not JSON of a manifest's shape; the message says what is wrong."""


def write_manifest(ckptdir: str, m: Manifest) -> str:
    d = computation_dir(ckptdir, m.computation)
    os.makedirs(d, mode=0o700, exist_ok=True)
    path = os.path.join(d, f"gen{m.generation:06d}.json")
    atomic_write(path, m.to_json())
    return path


def complete_generations(ckptdir: str, computation: str) -> list[int]:
    d = computation_dir(ckptdir, computation)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    return sorted(int(m[1]) for n in names if (m := _GEN_MANIFEST.match(n)))


def read_manifest(ckptdir: str, computation: str, gen: int) -> Manifest:
    path = os.path.join(computation_dir(ckptdir, computation), f"gen{gen:06d}.json")
    from .manifest_check import read_regular
    try:
        return Manifest.from_json(read_regular(path))
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None


def manifest_of_image(path: str, generation: int) -> Manifest | None:
    """The manifest of the checkpoint an image (still where it was written) belongs to; None if not found."""
    gdir = os.path.dirname(os.path.abspath(path))
    from .manifest_check import read_regular
    try:
        return Manifest.from_json(read_regular(os.path.join(os.path.dirname(gdir), f"gen{generation:06d}.json")))
    except (OSError, ValueError):
        return None


def latest_manifest(ckptdir: str, computation: str) -> Manifest | None:
    gens = complete_generations(ckptdir, computation)
    return read_manifest(ckptdir, computation, gens[-1]) if gens else None


def computations_in(ckptdir: str) -> list[str]:
    try:
        names = os.listdir(ckptdir)
    except FileNotFoundError:
        return []
    return sorted(n[len("ckpt_"):] for n in names
                  if n.startswith("ckpt_") and os.path.isdir(os.path.join(ckptdir, n)))


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
        os.unlink(os.path.join(computation_dir(ckptdir, computation), f"gen{gen:06d}.json"))
    except FileNotFoundError:
        pass


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

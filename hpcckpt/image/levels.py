"""Multi-level storage: where each copy of an image lives, which manifests say a generation is complete on which
level, and which copy a restart reads (docs/storage.md).

    memory --(dump, fsync)--> local   <local_dir>/ckpt_<c>/gen<N>/<image>            the node's own copy
                          \\-> partner <partner's local_dir>/partner/ckpt_<c>/gen<N>/<image>   (agent/partner.py)
           local --(drain, verified)--> shared  <ckptdir>/ckpt_<c>/gen<N>/<image>       (agent/drain.py)

Two manifests per generation, both in the shared checkpoint directory (small files; images never go there
before the drain): gen<N>.local.json, written by the coordinator when every image is durable on its node
(the program has resumed), and gen<N>.json, written once every image has been copied to the shared level and
verified there. Only gen<N>.json makes a generation *complete* for `restart --from`, retention and a batch
rerun on new nodes: a drain that dies leaves the previous shared generation the restart point. Both are the
same signed Manifest (image/store.py); the shared one names the shared paths.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import time
from dataclasses import dataclass, replace

from . import journal, safefs, store

log = logging.getLogger("hpcckpt.levels")

LEVELS = ("local", "partner", "shared")        # fastest first: the order a restart tries them in
PARTNER_DIR = "partner"
_LOCAL_MANIFEST = re.compile(r"^gen(\d{6,})\.local\.json$")
_IMAGE_PATH = re.compile(r"/ckpt_([A-Za-z0-9._+-]+)/gen(\d{6,})/([^/]+\.dmtcp)$")


def local_root(s) -> str | None:
    """The node-local level of these settings on this host ("{host}" replaced), None if there is none (also when
    it is the checkpoint directory itself: one level)."""
    if not s.local_dir:
        return None
    root = os.path.abspath(s.local_dir.replace("{host}", socket.gethostname()))
    return None if os.path.realpath(root) == os.path.realpath(s.ckptdir) else root


def image_root(s) -> str:
    """Where this node writes its images: the local level if there is one, else the shared directory."""
    return local_root(s) or os.path.abspath(s.ckptdir)


@dataclass(frozen=True)
class ImageName:
    """What a copy's path says about the image: computation, generation and file name (same on every level)."""
    computation: str
    generation: int
    name: str


def parse(path: str) -> ImageName | None:
    m = _IMAGE_PATH.search(os.path.abspath(path))
    return ImageName(m[1], int(m[2]), m[3]) if m else None


def partner_root(root: str) -> str:
    """The tree of the partner's images on this node: the same layout as ours, beside it (an incremental image
    names its base relative to its own directory, so the layout must be the same on every level)."""
    return os.path.join(root, PARTNER_DIR)


def copy_path(root: str, n: ImageName, level: str) -> str:
    root = partner_root(root) if level == "partner" else root
    return os.path.join(store.generation_dir(root, n.computation, n.generation), n.name)


def shared_path(ckptdir: str, path: str) -> str:
    n = parse(path)
    if n is None:
        raise ValueError(f"{path}: not an image path of a checkpoint directory (ckpt_<c>/gen<N>/<name>.dmtcp)")
    return copy_path(ckptdir, n, "shared")


# --------------------------------------------------------------------------------------------- manifests --
def local_manifest_name(gen: int) -> str:
    return f"gen{gen:06d}.local.json"


def on_local_level(ckptdir: str, m: store.Manifest) -> bool:
    """Were the manifest's images written outside the shared directory (on the nodes' local level)?"""
    where = os.path.realpath(store.computation_dir(ckptdir, m.computation))
    return any(os.path.commonpath([where, os.path.realpath(i.path)]) != where for i in m.images)


def as_shared(ckptdir: str, m: store.Manifest) -> store.Manifest:
    """The same generation with every image named at its shared path."""
    return replace(m, images=[replace(i, path=shared_path(ckptdir, i.path)) for i in m.images])


def commit(ckptdir: str, m: store.Manifest, agents: list[dict], keep: int) -> str:
    """The coordinator's commit of a complete generation (coordinator/commit.py); agents: each agent's stats.
    Images in the shared directory: its manifest, as always. Images on the local level: the local manifest, and
    the shared one too if every agent copied its images there already (drain: sync). Returns the levels."""
    if not on_local_level(ckptdir, m):
        store.write_manifest(ckptdir, m)
        return "shared"
    synced = bool(agents) and all(st.get("drained") for st in agents)
    if agents and all(st.get("drain") == "off" for st in agents):
        m = replace(m, stats=dict(m.stats, drain="off"))      # (nothing to wait for: wait_drained)
    fd = store.open_computation_dir(ckptdir, m.computation, create=True)
    try:
        safefs.write_at(fd, local_manifest_name(m.generation), m.to_json())
        for gen in local_generations(ckptdir, m.computation)[:-keep]:      # (older ones: history only)
            safefs.unlink(fd, local_manifest_name(gen))
    finally:
        os.close(fd)
    levels = "local"
    if synced:
        store.write_manifest(ckptdir, as_shared(ckptdir, m))
        levels = "local+shared"
    journal.record(ckptdir, "level", computation=m.computation, generation=m.generation, level=levels)
    return levels


def local_generations(ckptdir: str, computation: str) -> list[int]:
    try:
        names = os.listdir(store.computation_dir(ckptdir, computation))
    except OSError:
        return []
    return sorted(int(mt[1]) for n in names if (mt := _LOCAL_MANIFEST.match(n)))


def read_local_manifest(ckptdir: str, computation: str, gen: int) -> store.Manifest:
    cdir = store.computation_dir(ckptdir, computation)
    fd = store.open_computation_dir(ckptdir, computation)
    try:
        return store.Manifest.from_json(safefs.read_at(fd, local_manifest_name(gen), cdir),
                                        os.path.join(cdir, local_manifest_name(gen)))
    finally:
        os.close(fd)


def finish_shared(ckptdir: str, computation: str, gen: int) -> bool:
    """Write the shared manifest of a generation if every image of its local manifest has arrived in the shared
    directory (each drain renames its copy into place only once verified). Every agent calls this after its own
    drain: the last one writes it (two at once write the same bytes, atomically). True once it exists."""
    if gen in store.complete_generations(ckptdir, computation):
        return True
    m = as_shared(ckptdir, read_local_manifest(ckptdir, computation, gen))
    missing = [i.path for i in m.images if not _has_size(i.path, i.size)]
    if missing:
        log.debug("generation %d: %d image(s) not yet on the shared level (%s)", gen, len(missing), missing[0])
        return False
    store.write_manifest(ckptdir, m)
    journal.record(ckptdir, "level", computation=computation, generation=gen, level="shared")
    log.info("checkpoint generation %d is complete on the shared level (%d image(s) verified in %s)", gen,
             len(m.images), store.generation_dir(ckptdir, computation, gen))
    return True


def _has_size(path: str, size: int) -> bool:
    try:
        return os.stat(path).st_size == size
    except OSError:
        return False


def levels_of(ckptdir: str, computation: str | None, limit: int = 8) -> list[dict]:
    """Per recent generation, on which levels it is complete, from the manifests: [{"generation", "local",
    "shared"}] (the coordinator adds what its agents reported: coordinator/storagestate.py)."""
    if not computation:
        return []
    local = set(local_generations(ckptdir, computation))
    shared = set(store.complete_generations(ckptdir, computation))
    return [{"generation": g, "local": g in local, "shared": g in shared}
            for g in sorted(local | shared)[-limit:]]


def describe(row: dict) -> str:
    """One generation's levels in words, for the job log and `dmtcp_command -s`: "local+partner+shared", with the
    copies still running or failed in brackets ("local [partner running, drain failed: ...]")."""
    have = [k for k in ("local", "partner", "shared") if row.get(k) is True or row.get(k) == "done"]
    busy = [f"{k} {v}" for k in ("partner", "drain") if (v := row.get(k)) and v not in ("done", "none", "off")]
    return "+".join(have) + (f" [{', '.join(busy)}]" if busy else "")


def log_changes(rows: list[dict], seen: dict[int, str]) -> None:
    """(the batch driver's job log) A line for each generation whose levels changed since the last call."""
    for row in rows:
        text = describe(row)
        if seen.get(row["generation"]) != text:
            seen[row["generation"]] = text
            log.info("checkpoint generation %d: levels %s%s", row["generation"], text,
                     f" (never complete: {row['error']})" if row.get("error") else
                     "" if row.get("complete", True) else " (not yet complete: its partner copies are running)")


def partner_of(agent_id: str, agents: dict[str, str]) -> str | None:
    """The next agent (by id, a ring) on another host than ours; None if every agent is on our host. The
    coordinator pairs the agents of a generation with this (coordinator/storagestate.py)."""
    ids = sorted(agents)
    if agent_id not in ids:
        return None
    i = ids.index(agent_id)
    for other in ids[i + 1:] + ids[:i]:
        if agents[other] != agents[agent_id]:
            return other
    return None


def wait_drained(ckptdir: str, timeout: float, computation: str | None = None) -> bool:
    """Wait until the newest generation complete on the local level is complete on the shared level too (or a
    newer one is); True if it is (or there is no local level), False at the timeout. The batch driver calls this
    before a requeue: the next run may land on other nodes, which only the shared copy reaches."""
    comps = [computation] if computation else store.computations_in(ckptdir)
    give_up = time.monotonic() + timeout
    while True:
        behind = []
        for c in comps:
            local = local_generations(ckptdir, c)
            shared = store.complete_generations(ckptdir, c)
            if local and (not shared or shared[-1] < local[-1]) and not _drain_off(ckptdir, c, local[-1]):
                behind.append((c, local[-1]))
        if not behind:
            return True
        if time.monotonic() >= give_up:
            c, g = behind[0]
            log.warning("generation %d of %s is not yet on the shared level after %.0f s (drain still running "
                        "or lost)", g, c, timeout)
            return False
        time.sleep(0.2)


def _drain_off(ckptdir: str, computation: str, gen: int) -> bool:
    try:
        return read_local_manifest(ckptdir, computation, gen).stats.get("drain") == "off"
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------- selection --
@dataclass
class Choice:
    """The copy of one image a restart reads, and from which level."""
    given: str
    path: str
    level: str


def candidates(path: str, s) -> list[tuple[str, str]]:
    """(level, path) of every copy of an image this host could read, fastest first; the given path last if it
    is none of them (images given by hand, a moved directory)."""
    n = parse(path)
    out: list[tuple[str, str]] = []
    if n is not None:
        root = local_root(s)
        if root:
            out += [("local", copy_path(root, n, "local")), ("partner", copy_path(root, n, "partner"))]
        out.append(("shared", copy_path(os.path.abspath(s.ckptdir), n, "shared")))
    given = os.path.abspath(path)
    if given not in (p for _, p in out):
        out.append(("given", given))
    return out


def valid_copy(path: str, want: ImageName | None) -> str | None:
    """None if the copy at path is usable (authentic metadata of the same image, all its data there), else why
    not. Chunk checksums are checked as the restore reads them."""
    # (imported here: the coordinator imports this module and reads no image)
    from .format import ImageError, ImageReader
    from .validate import check_image
    try:
        with ImageReader(path) as r:
            check_image(path, r.meta, r.size)
            if want is not None and (r.meta.get("computation"), r.meta.get("generation")) != \
                    (want.computation, want.generation):
                return f"belongs to {r.meta.get('computation')} generation {r.meta.get('generation')}"
    except FileNotFoundError:
        return "absent"
    except (ImageError, OSError, ValueError) as e:
        return str(e).splitlines()[0]
    return None


def choose(paths: list[str], s) -> list[Choice]:
    """Per image, the fastest valid copy on this host (local, then partner, then shared); each choice logged,
    with the copies passed over and why. Without a local level an image that is where it was named is read
    from there, as always; a path with no valid copy stays as given (opening it fails with its own reason)."""
    out = []
    for p in paths:
        if local_root(s) is None and os.path.exists(p):
            out.append(Choice(p, p, "given"))
            continue
        want = parse(p)
        why: list[str] = []
        for level, cand in candidates(p, s):
            bad = valid_copy(cand, want)
            if bad is None:
                out.append(Choice(p, cand, level))
                if why:
                    log.warning("image %s: %s; using the %s copy %s", os.path.basename(p), "; ".join(why), level,
                                cand)
                elif level != "given":
                    log.info("image %s: using the %s copy %s", os.path.basename(p), level, cand)
                break
            if bad != "absent":
                why.append(f"the {level} copy {cand} is not usable ({bad})")
        else:
            out.append(Choice(p, p, "given"))
    first = parse(paths[0]) if paths else None
    if first is not None and local_root(s) is not None:
        note_newer_local(os.path.abspath(s.ckptdir), first.computation, first.generation, script=True)
    return out


def annotate(ckptdir: str, computation: str, rows: dict[int, dict], events: list[dict] | None = None) -> None:
    """(hpcckpt status) Add each generation's levels to its row; a generation complete on the local level only
    gets a row of its own (state "local": `restart --from` does not use it, the restart script may); the
    coordinator's `level` events say whether its partner copies made it complete, or why not."""
    local = local_generations(ckptdir, computation)
    if not local:
        return
    said: dict[int, dict] = {}
    for e in events or []:
        if e.get("event") == "level" and e.get("computation") == computation and isinstance(e.get("generation"), int):
            said[e["generation"]] = e
    for g in local:
        row = rows.get(g)
        if row is not None and row.get("state") == "complete":
            row["levels"] = "local+shared"
            continue
        try:
            m = read_local_manifest(ckptdir, computation, g)
        except (OSError, ValueError) as e:
            rows[g] = {"generation": g, "state": "damaged", "error": f"local manifest unreadable: {e}"}
            continue
        rows[g] = {"generation": g, "state": "local", "time": m.created, "images": len(m.images),
                   "stored_bytes": sum(i.size for i in m.images), "memory_bytes": m.stats.get("bytes_in"),
                   "duration_s": m.stats.get("duration_s"), "frozen_s": m.stats.get("frozen_s"),
                   "hosts": sorted({i.host for i in m.images}), "processes": len(m.images),
                   "levels": _local_levels(said.get(g))}
    for row in rows.values():
        if row.get("state") == "complete" and "levels" not in row:
            row["levels"] = "shared"


def _local_levels(event: dict | None) -> str:
    if event and event.get("error"):
        return f"local only, never complete: {event['error']}"
    if event and event.get("level") == "local+partner":
        return "local+partner: complete; drain running, failed or off"
    return "local only: drain running, failed or off"


def with_drain(ckptdir: str, generation: int, duration_s: float | None) -> float | None:
    """A checkpoint's duration counting its drain to the shared level (the slowest node's, from the journal): what
    the batch driver's deadline lead must leave room for, since a requeue waits for the shared copy."""
    drains = [e.get("seconds") or 0.0 for e in journal.read(ckptdir)
              if e.get("event") == "drain" and e.get("generation") == generation and e.get("ok")]
    if duration_s is None or not drains:
        return duration_s
    return duration_s + max(drains)


_noted: set[tuple[str, int]] = set()       # (said once per restart: --from says it first, in its own words)


def note_newer_local(ckptdir: str, computation: str, generation: int, script: bool = False) -> None:
    """(restart --from, and a restart script's restart: choose) Say so when a newer generation is on the nodes'
    local level only, and why it is not the one restarted."""
    if (computation, generation) in _noted:
        return
    _noted.add((computation, generation))
    newer = [g for g in local_generations(ckptdir, computation) if g > generation]
    if newer and script:          # (the restart script names the newest generation that was complete)
        why = [e.get("error") for e in journal.read(ckptdir) if e.get("event") == "level" and
               e.get("generation") == newer[-1] and e.get("error")]
        log.warning("generation %d of %s is newer but was never complete (%s); restarting generation %d, the newest "
                    "complete one", newer[-1], computation, why[-1] if why else "its partner copies were not made",
                    generation)
    elif newer:
        log.warning("generation %d of %s is newer but complete only on the nodes' local level (its drain did not "
                    "finish); restarting generation %d from %s. On the same nodes, the restart script restarts "
                    "generation %d from their local copies", newer[-1], computation, generation, ckptdir, newer[-1])

"""The drain: copies a node's images from the local level to the shared checkpoint directory (docs/storage.md).

With `drain: async` a thread of the agent copies each generation once the coordinator says it is complete on
the local level (the program runs on meanwhile); with `drain: sync` each image is copied as soon as it is
written, before the agent reports it durable. Every copy is written under a temporary name, fsynced, then read
back and verified (the metadata's MAC and every chunk's keyed tag: image/format.py) and only then renamed to
its final name; after its own images, each agent tries to write the generation's shared manifest
(image/levels.finish_shared), which succeeds for the one whose images arrived last. A drain that fails or dies
leaves no shared manifest: the previous shared generation stays the restart point.

The drain is paced (settings.drain_rate): at most N bytes/s, or busy at most N % of the time, so the program
keeps most of the node's I/O bandwidth.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from ..faults import fault
from ..image import journal, levels, safefs, store
from ..image.format import ImageError, ImageReader
from ..settings import parse_rate

log = logging.getLogger("hpcckpt.drain")

BLOCK = 1 << 20


class DrainError(Exception):
    """A copy that could not be made or did not verify; one line naming the image."""


class Pacer:
    """Sleeps after each block so the drain stays under a byte rate and/or a share of the time."""

    def __init__(self, rate: float = 0.0, share: float = 0.0, sleep=time.sleep):
        self.rate, self.share, self.sleep = rate, share, sleep
        self.slept = 0.0

    def pace(self, nbytes: int, busy_s: float) -> None:
        wait = 0.0
        if self.rate:
            wait = max(wait, nbytes / self.rate - busy_s)
        if self.share:
            wait = max(wait, busy_s * (1 / self.share - 1))
        if wait > 0:
            self.slept += wait
            self.sleep(wait)


def copy_verified(src: str, dst_dir: str, pacer: Pacer, fault_point: str = "drain.after_block") -> int:
    """Copy the image src into the (checked) directory dst_dir under the same name, durable and verified before
    it gets its final name; returns the bytes copied. DrainError if it cannot be made or does not verify."""
    name = os.path.basename(src)
    dfd = safefs.open_dir(dst_dir)
    tmp = safefs.temp_name(name)
    try:
        with ImageReader(src) as orig:
            want = (orig.meta.get("computation"), orig.meta.get("generation"), orig.meta.get("unique_id"))
        out = safefs.create_file(dfd, tmp)
        n = 0
        try:
            with open(src, "rb", buffering=0) as f:
                while True:
                    t0 = time.monotonic()
                    buf = f.read(BLOCK)
                    if not buf:
                        break
                    view = memoryview(buf)
                    while view:
                        view = view[os.write(out, view):]
                    n += len(buf)
                    fault(fault_point)
                    pacer.pace(len(buf), time.monotonic() - t0)
            os.fsync(out)
        finally:
            os.close(out)
        with ImageReader(os.path.join(dst_dir, tmp)) as copy:
            got = (copy.meta.get("computation"), copy.meta.get("generation"), copy.meta.get("unique_id"))
            if got != want:
                raise DrainError(f"copy of {src} in {dst_dir} holds another image ({got}); not used")
            copy.verify()
        safefs.replace(dfd, tmp, name)
        return n
    except (ImageError, OSError) as e:
        safefs.unlink(dfd, tmp)
        raise DrainError(f"copying image {src} to {dst_dir} failed: {e}") from None
    except BaseException:
        safefs.unlink(dfd, tmp)
        raise
    finally:
        os.close(dfd)


@dataclass
class DrainJob:
    computation: str
    generation: int
    paths: list[str] = field(default_factory=list)      # this node's images of the generation, on its local level
    needs: set[int] = field(default_factory=set)       # generations their restore reads (incremental images)


class Drain:
    """One per agent with a local level: a thread copying generations to the shared directory, one at a time,
    oldest first; and the local level's retention (keep_local). A generation still waiting when a newer one
    arrives is skipped unless the newer one needs it (incremental): only the newest shared generation matters
    for a rerun, and a drain slower than the checkpoint interval must not fall ever further behind."""

    def __init__(self, s, ckptdir: str, host: str, report=None):
        self.s = s
        # report(generation, level="shared", ok, error=, bytes=, seconds=): each outcome, for the coordinator
        self.report = report or (lambda *a, **k: None)
        self.ckptdir = ckptdir
        self.host = host
        self.pacer = Pacer(*parse_rate(s.drain_rate))
        self.jobs: list[DrainJob] = []
        self.state: dict[int, str] = {}          # generation -> "queued", "draining", "drained", "failed: ..."
        self.local: dict[int, list[str]] = {}     # generation -> this node's local images (retention)
        self.needs: dict[int, set[int]] = {}      # generation -> generations it needs (incremental)
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.thread: threading.Thread | None = None

    # -- async --
    def submit(self, job: DrainJob) -> None:
        with self.lock:
            self.local[job.generation] = list(job.paths)
            self.needs[job.generation] = set(job.needs)
            if self.s.drain != "async":
                self._prune_local(job.computation)
                return
            self.state[job.generation] = "queued"
            self.jobs.append(job)
            self.cv.notify()
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="drain", daemon=True)
            self.thread.start()

    def _next(self) -> DrainJob:
        with self.cv:
            while True:
                while not self.jobs:
                    self.cv.wait()
                job = self.jobs.pop(0)
                later = [j for j in self.jobs if j.computation == job.computation]
                if not later or any(job.generation in j.needs for j in later):
                    return job
                self.state[job.generation] = f"skipped: generation {later[-1].generation} is newer"
                log.info("drain: generation %d skipped, generation %d is newer", job.generation,
                         later[-1].generation)
                self.report(job.generation, "shared", False, error=self.state[job.generation])

    def _run(self) -> None:
        while True:
            job = self._next()
            try:
                self.drain(job)
            except Exception as e:          # the program goes on; the previous shared generation stays
                with self.lock:
                    self.state[job.generation] = f"failed: {e}"
                log.error("drain of checkpoint generation %d failed: %s; the shared level keeps generation %s",
                          job.generation, e, _newest(store.complete_generations(self.ckptdir, job.computation)))
                journal.record(self.ckptdir, "drain", computation=job.computation, generation=job.generation,
                               host=self.host, ok=False, error=str(e))
                self.report(job.generation, "shared", False, error=f"{self.host}: {e}")

    def drain(self, job: DrainJob) -> None:
        with self.lock:
            self.state[job.generation] = "draining"
        fault("drain.start")
        t0 = time.monotonic()
        nbytes = 0
        if job.paths:
            dst = store.make_generation_dir(self.ckptdir, job.computation, job.generation)
            for p in job.paths:
                nbytes += copy_verified(p, dst, self.pacer)
        fault("drain.before_manifest")
        took = time.monotonic() - t0
        log.info("checkpoint generation %d: %d image(s), %.1f MB drained to %s in %.2f s", job.generation,
                 len(job.paths), nbytes / 1e6, self.ckptdir, took)
        journal.record(self.ckptdir, "drain", computation=job.computation, generation=job.generation,
                       host=self.host, ok=True, bytes=nbytes, seconds=round(took, 3))
        levels.finish_shared(self.ckptdir, job.computation, job.generation)
        self.report(job.generation, "shared", True, bytes=nbytes, seconds=round(took, 3))
        with self.lock:
            self.state[job.generation] = "drained"      # (after the shared manifest: wait_idle means it is there)
            self._prune_local(job.computation)

    # -- sync --
    def copy_now(self, computation: str, generation: int, path: str) -> int:
        """(writer thread, drain: sync) Copy one image to the shared level now, verified."""
        dst = store.make_generation_dir(self.ckptdir, computation, generation)
        return copy_verified(path, dst, self.pacer)

    # -- retention of the local level --
    def _prune_local(self, computation: str) -> None:
        """Keep this node's newest keep_local generations (and those their incremental images build on); older
        ones go once they are on the shared level (at once with drain: off: the local level is all there is).
        The partner's images of the same generations go with them."""
        gens = sorted(self.local)
        kept = gens[-self.s.keep_local:]
        required = set(kept).union(*(self.needs.get(g, set()) for g in kept))
        shared = set(store.complete_generations(self.ckptdir, computation)) if self.s.drain != "off" else None
        for g in gens:
            if g in required or (shared is not None and g not in shared and
                                 not self.state.get(g, "").startswith(("failed", "skipped"))):
                continue
            paths = self.local.pop(g)
            self.needs.pop(g, None)
            root = levels.image_root(self.s)
            store.remove_generation_images(root, computation, g, paths)
            pdir = store.generation_dir(levels.partner_root(root), computation, g)
            store.remove_generation_images(levels.partner_root(root), computation, g,
                                           [os.path.join(pdir, n) for n in _listdir(pdir)])
            log.debug("generation %d removed from the local level", g)

    def wait_idle(self, timeout: float) -> bool:
        """(tests, shutdown) Until every queued generation is drained or failed."""
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            with self.lock:
                if all(v == "drained" or v.startswith(("failed", "skipped")) for v in self.state.values()):
                    return True
            time.sleep(0.05)
        return False


def _newest(gens: list[int]) -> str:
    return str(gens[-1]) if gens else "none"


def _listdir(d: str) -> list[str]:
    try:
        return os.listdir(d)
    except OSError:
        return []


"""The agent's image writes: of a forked checkpoint in the background - the job runs again while a writer thread
writes every image from its copy-on-write snapshot; the main loop learns through the wake-up pipe that they are
done (or failed) and tells the coordinator - and of a frozen one while the job is stopped. The writer threads
never touch ptrace or the coordinator's socket.

Every image of a generation goes through the same steps: written under its .tmp name (several images at once,
their chunks by the agent's one chunk pool), then all made durable together (format.commit_images: fsync each,
then rename each), then the directory fsync'ed, and only then recorded as written (entries, the storage levels'
hook, the images the next incremental generation builds on). A failure anywhere before leaves no image of the
generation recorded, and the caller removes them all."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict

from ..engine import dump as engine_dump
from ..engine import pathvirt
from ..engine.forker import kill_snapshot
from ..image import store
from ..image.format import chunk_pool, commit_images
from ..image.records import ImageMeta
from .base import AgentBase
from .ckptstate import BackgroundWrite, CheckpointState, PendingImage

log = logging.getLogger("hpcckpt.agent")


class BackgroundWrites(AgentBase):
    """Mixed into Agent (agent.py): uses its settings, state and send()."""
    _chunks: ThreadPoolExecutor | None = None      # the agent's chunk writers, made at its first checkpoint

    def _write_images(self, c: CheckpointState, todo: list[PendingImage], report: bool = False) -> None:
        """Write the images, several at once, make them durable together, then record them (see the module's
        docstring). report: we are the main loop (a frozen checkpoint): send the coordinator heartbeats with
        the bytes written meanwhile."""
        if not todo:
            return
        if self._chunks is None:
            self._chunks = chunk_pool(bool(self.s.compress))
        # up to `writers` images at once (not one a core: the chunk pool bounds the CPU they use, and a small
        # image is mostly waits - opening, its chunks, its metadata - that other images fill)
        workers = max(1, min(len(todo), self.s.writers))
        metas: dict[str, ImageMeta] = {}
        with ThreadPoolExecutor(workers, thread_name_prefix="image-writer") as pool:
            futures = {pool.submit(self._write, c, p): p for p in todo}
            left = set(futures)
            while left:
                done, left = wait(left, timeout=1.0, return_when=FIRST_EXCEPTION)
                for f in done:
                    error = f.exception()
                    if error is not None:
                        for g in left:
                            g.cancel()
                        raise error
                    metas[futures[f].path] = f.result()
                if report and left and time.monotonic() - self.last_sent >= 1.0:
                    self.send({"type": "heartbeat", "progress": {"bytes": sum(c.done.values())}})
        commit_images([p.path for p in todo])
        store.fsync_dir(os.path.dirname(todo[0].path))
        for p in todo:
            self._record(c, p, metas[p.path])

    def _write(self, c: CheckpointState, p: PendingImage) -> ImageMeta:
        """(image writer thread) One image, complete under its .tmp name, not yet durable."""
        base = None
        if self.s.incremental and p.unique_id in self.prev_images:
            path, needs = self.prev_images[p.unique_id]
            if len(needs) < self.s.full_every and os.path.exists(path):
                base = path
        return engine_dump.write_image(p.cap, p.path, computation=self.comp, generation=c.generation,
                                       unique_id=p.unique_id, compress=self.s.compress,
                                       level=self.s.compress_level,
                                       progress=lambda done: self._progress(p.path, done),
                                       incremental=bool(self.s.incremental), base=base,
                                       agent={"agent_id": self.agent_id, "agents": c.agents,
                                              **pathvirt.record()},     # (DMTCP_PATH_PREFIX)
                                       pool=self._chunks, durable=False, direct=self.s.direct_io)

    def _record(self, c: CheckpointState, p: PendingImage, meta: ImageMeta) -> None:
        """An image is durable under its final name: what the coordinator, the storage levels and the next
        incremental generation learn of it."""
        size = os.path.getsize(p.path)
        self._storage_written(c, p.path)         # drain: sync copies it to the shared level now
        with self.write_lock:
            self.pending_prev.setdefault(c.generation, {})[p.unique_id] = (p.path, list(meta.needs))
            c.stats["bytes_in"] = c.stats.get("bytes_in", 0) + meta.stats["bytes_in"]
            c.stats["bytes_out"] = c.stats.get("bytes_out", 0) + size
            for key in ("pages_dumped", "pages_skipped", "zero_pages"):
                c.stats[key] = c.stats.get(key, 0) + meta.stats.get(key, 0)
            c.stats["write_s"] = max(c.stats.get("write_s", 0.0), meta.stats.get("total_s", 0.0))
            c.entries.append(asdict(store.ImageEntry(self.host, p.path, p.program, p.unique_id, p.cap.fp.pid,
                                                     size, list(meta.needs), p.rank)))

    def _start_writes(self, c: CheckpointState) -> None:
        snaps = [p.cap.snapshot_pid for p in c.pending]
        bw = BackgroundWrite(c, threading.Thread(target=self._write_all, name="image-writer", daemon=True), snaps)
        self.writing = bw
        bw.thread.start()

    def _write_all(self) -> None:
        """(writer thread) Write every pending image from its snapshot; never touches ptrace or the socket."""
        bw = self.writing
        assert bw is not None
        c = bw.state
        try:
            self._write_images(c, c.pending)
        except BaseException as e:
            bw.error = f"{self.host}: {e}"
        finally:
            bw.finished = True
            os.write(self.wake_w, b"w")

    def _writes_done(self) -> None:
        bw = self.writing
        if bw is None or not bw.finished:  # (the wake-up of a cancelled writer that finished late)
            return
        bw.thread.join()                  # it has written its wake-up byte as its very last act
        self.writing = None
        self._reap_snapshots(bw.snapshots)
        c = bw.state
        if bw.error:
            log.error("writing checkpoint generation %d failed: %s", c.generation, bw.error)
            store.remove_generation_images(self.imgdir, self.comp, c.generation, c.images)
            self.send({"type": "written", "generation": c.generation, "ok": False, "error": bw.error})
            return
        log.info("checkpoint generation %d written (%.1f MB)", c.generation, c.stats.get("bytes_out", 0) / 1e6)
        self.send({"type": "written", "generation": c.generation, "ok": True, "images": c.entries,
                   "stats": c.stats})

    def _reap_snapshots(self, pids: list[int]) -> None:
        for pid in pids:
            kill_snapshot(pid)              # one under a job process is a zombie for a while (engine/forker.py)

    def _cancel_writes(self, why: str) -> None:
        bw = self.writing
        if bw is None:
            return
        for pid in bw.snapshots:
            try:
                os.kill(pid, signal.SIGKILL)        # the writer thread fails on its next read
            except ProcessLookupError:
                pass
        bw.thread.join(5)              # (a writer hung on a dead file system is left behind: a daemon thread)
        self.writing = None
        self._reap_snapshots(bw.snapshots)
        store.remove_generation_images(self.imgdir, self.comp, bw.state.generation, bw.state.images)
        log.warning("checkpoint generation %d abandoned: %s", bw.state.generation, why)

    def _progress(self, path: str, done: int) -> None:
        """(image writer thread) Bytes of an image written so far; the main loop reports the sum (after resume
        from writing.done, while frozen from ckpt.done: _write_images)."""
        if self.writing is not None:
            self.writing.done[path] = done
        elif self.ckpt is not None:
            self.ckpt.done[path] = done


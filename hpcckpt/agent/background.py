"""The agent's background image writes of a forked checkpoint: the job runs again while a writer thread writes
every image from its copy-on-write snapshot; the main loop learns through the wake-up pipe that they are done
(or failed) and tells the coordinator. The writer threads never touch ptrace or the coordinator's socket."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..engine.forker import kill_snapshot
from ..image import store
from .base import AgentBase
from .ckptstate import BackgroundWrite, CheckpointState

log = logging.getLogger("hpcckpt.agent")


class BackgroundWrites(AgentBase):
    """Mixed into Agent (agent.py): uses its settings, state and send()."""

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
            # one image per core at a time: an MPI node's ranks are written side by side
            workers = max(1, min(len(c.pending), os.cpu_count() or 1, self.s.writers))
            with ThreadPoolExecutor(workers, thread_name_prefix="image-writer") as pool:
                for f in [pool.submit(self._write, c, p) for p in c.pending]:
                    f.result()
            store.fsync_dir(store.generation_dir(self.imgdir, self.comp, c.generation))
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
        if self.writing is not None:
            self.writing.done[path] = done           # (writer thread) the main loop reports the sum
            return
        if self.ckpt is not None:
            self.ckpt.done[path] = done
            done = sum(self.ckpt.done.values())
        if time.monotonic() - self.last_sent >= 1.0:
            self.send({"type": "heartbeat", "progress": {"bytes": done}})


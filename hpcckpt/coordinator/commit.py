"""The coordinator's commit of a generation and its retention: the manifest (after the restart script: complete
or absent) from every peer's durable images, and which older generations may go once a newer one is complete."""
from __future__ import annotations

import logging
import time
from typing import Any

from ..faults import fault
from ..image import levels, store
from .barrier import Round
from .script import install_restart_script
from .storagestate import StorageState

log = logging.getLogger("hpcckpt.coordinator")


class Commits(StorageState):
    """Mixed into Coordinator (server.py)."""

    def _commit(self, r: Round) -> None:
        images = []
        stats: dict[str, Any] = {"bytes_in": 0, "bytes_out": 0, "frozen_s": 0.0}
        for ident, res in r.durable.items():
            peer = self.peers.get(ident)
            for img in res.get("images", []):
                # each entry names its agent: a restart's gate knows every agent (host) to wait for from the
                # manifest (an older agent's entries get it from its hello)
                images.append(store.ImageEntry(**{**img, "agent_id": img.get("agent_id") or
                                                  (peer.agent_id if peer else "")}))
            st = res.get("stats", {})
            stats["bytes_in"] += st.get("bytes_in", 0)
            stats["bytes_out"] += st.get("bytes_out", 0)
            stats["frozen_s"] = max(stats["frozen_s"], st.get("frozen_s", 0.0), r.frozen_s)
            for key in ("pages_dumped", "pages_skipped", "zero_pages"):
                stats[key] = stats.get(key, 0) + st.get(key, 0)
            for key in ("capture_s", "write_s"):          # the slowest agent's
                stats[key] = max(stats.get(key, 0.0), st.get(key, 0.0))
        stats["duration_s"] = round(time.time() - r.started, 3)
        stats["ratio"] = round(stats["bytes_out"] / stats["bytes_in"], 4) if stats["bytes_in"] else None
        stats["phase_s"] = dict(r.phase_times)
        manifest = store.Manifest(self.computation or "", r.generation, time.time(), images, stats)
        # with partner copies the generation is complete (restart script, last_checkpoint) only once they are
        # made: until then a node lost would lose it (storagestate.py)
        plan = self._plan_levels(r.generation, r.durable, r.kill_after)
        # complete or absent: the script first (put back as it was if the manifest fails), the manifest last
        installed = None if not plan.complete else \
            install_restart_script(self.ckptdir, manifest, self.s.coord_host, self.port, self.interval)
        try:
            fault("coordinator.before_commit")
            # (multi-level: the local manifest, and the shared one only if every agent drained: image/levels.py)
            lv = levels.commit(self.ckptdir, manifest, [res.get("stats") or {} for res in r.durable.values()],
                               self.s.keep_generations)
        except BaseException:
            if installed is not None:
                installed.undo()
            self.storage.pop(r.generation, None)
            raise
        script = None
        if installed is not None:
            installed.done()
            script = installed.path
        r.committed = True
        record = {"generation": r.generation, "time": manifest.created, "images": len(images),
                  "restart_script": script, **stats, "levels": lv}
        if plan.complete:
            self.last_checkpoint = record
        else:
            plan.manifest, plan.record = manifest, record
        where = "" if lv == "shared" else f" on levels {lv}"
        log.info("checkpoint generation %d complete%s: %d image(s), %.1f MB in %.2f s (processes stopped %.3f s); "
                 "%s", r.generation, where, len(images), stats["bytes_out"] / 1e6, stats["duration_s"],
                 stats["frozen_s"], f"restart script {script}" if script else
                 "the restart script follows once the partner copies are made")

    def _prune_images(self) -> list[dict]:
        """Images of generations beyond the retention limit: [{"generation", "host", "path"}]."""
        out: list[dict] = []
        for gen in self._prune_list():
            try:
                m = store.read_manifest(self.ckptdir, self.computation or "", gen)
            except (OSError, ValueError) as e:
                log.warning("cannot read manifest of generation %d: %s", gen, e)
                continue
            out.extend({"generation": gen, "host": i.host, "path": i.path, "agent_id": i.agent_id} for i in m.images)
        return out

    def _prune_list(self) -> list[int]:
        complete = store.complete_generations(self.ckptdir, self.computation or "")
        needs = {}
        for g in complete[-self.s.keep_generations:]:
            try:
                m = store.read_manifest(self.ckptdir, self.computation or "", g)
            except (OSError, ValueError):
                continue
            needs[g] = {n for i in m.images for n in (i.needs or [g])}
        return store.generations_to_prune(complete, self.s.keep_generations, needs)

"""The agent's side of a checkpoint round in application-level mode. The coordinator runs its usual round
(suspend, drain, checkpoint, refill, resume; kill for kcheckpoint); nothing is frozen: at `checkpoint` the
program is asked for its restart files, they are recorded in an archive (archive.py) reported as this agent's
image, and the coordinator commits the generation as it commits images."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from typing import Any

from ..coordinator import protocol
from ..engine import pathvirt
from ..image import runlock, store
from . import archive, config
from .trigger import AppLevelError, ask, wait_stable

log = logging.getLogger("hpcckpt.applevel")

_written: dict[int, list[str]] = {}      # generation -> archives written and not yet committed or aborted


def _ack(agent: Any, msg: dict, ok: bool, error: str | None = None, **extra) -> None:
    agent.send(protocol.Ack(msg["phase"], msg["generation"], ok, error, **extra).to_dict())


def on_phase(agent: Any, msg: dict) -> None:
    """Agent._on_phase for engine: signal. Every phase is acknowledged; a failure fails the round (one line)."""
    phase, gen = msg["phase"], msg["generation"]
    agent.max_generation = max(agent.max_generation, gen)
    log.debug("phase=%s gen=%d (application-level)", phase, gen)
    try:
        if phase == "suspend":
            committed(gen - 1)
            agent.plugin_event("presuspend", gen)
            if agent.aware is not None:      # the program API: delayed_checkpoints() blocks end, hooks run
                agent.aware.before_freeze(gen, agent.s.aware_delay_max, agent.s.aware_hook_max)
            _ack(agent, msg, True, tcp_ends=[])
        elif phase in ("drain", "refill"):
            _ack(agent, msg, True)
        elif phase == "checkpoint":
            images, stats = record(agent, gen)
            _ack(agent, msg, True, images=images, stats=stats, pending=False)
        elif phase == "resume":
            _ack(agent, msg, True, stats={"frozen_s": 0.0})
            if agent.aware is not None:
                agent.aware.resumed(gen)
            agent.plugin_event("resume", gen)
        elif phase == "kill":
            _written.pop(gen, None)
            _ack(agent, msg, True)
            agent._kill_job("checkpointed and killed (kcheckpoint)")
        elif phase == "abort":
            discard(agent, gen, msg.get("reason", ""))
        else:
            _ack(agent, msg, False, f"unknown phase {phase}")
    except Exception as e:
        log.error("phase %s of generation %d failed: %s", phase, gen, e)
        log.debug("details", exc_info=True)
        discard(agent, gen, str(e), quiet=True)
        _ack(agent, msg, False, f"{agent.host}: {e}")


def committed(gen: int) -> None:
    for g in [g for g in _written if g <= gen]:
        _written.pop(g, None)


def discard(agent: Any, gen: int, reason: str, quiet: bool = False) -> None:
    if agent.aware is not None:
        agent.aware.round_over(gen, False, reason)
    paths = _written.pop(gen, [])
    if agent.computation:           # (and the generation's directory, once empty)
        store.remove_generation_images(agent.ckptdir, agent.computation, gen, paths)
    if not quiet:
        log.warning("checkpoint generation %d aborted (%s); the previous one is kept", gen, reason)


def record(agent: Any, gen: int) -> tuple[list[dict], dict]:
    """Ask the program, wait for its files, archive them in this generation's directory."""
    s = agent.s
    config.check(s)
    t0 = time.monotonic()
    try:
        gdir = store.make_generation_dir(agent.ckptdir, agent.computation, gen)
        runlock.hold(agent.ckptdir, agent.computation)
    except OSError as e:
        raise AppLevelError(f"cannot use checkpoint directory {agent.ckptdir}: {e.strerror or e}") from None
    agent.plugin_event("precheckpoint", gen)
    cwd = os.getcwd()
    pids = [p.pid for p in agent.job() if not p.zombie]
    last = [0.0]

    def tick() -> None:          # the round may take minutes: stay alive for the coordinator meanwhile
        if time.monotonic() - last[0] >= agent.heartbeat_s:
            last[0] = time.monotonic()
            agent.send({"type": "heartbeat"})

    since = time.time_ns() - 20_000_000          # (file times come from the kernel's coarse clock)
    ask(s, pids, agent.root.pid, cwd, gen, tick)
    files = wait_stable(s, config.globs(s), cwd, since, tick, lambda: agent.root.exit_status is None)
    t1 = time.monotonic()
    uid = agent.unique_id(agent.root.pid)
    path = os.path.join(gdir, f"ckpt_{store.safe_name(agent.root.program)}_{uid}{config.SUFFIX}")
    header = archive.Header(agent.computation, gen, uid, agent.root.program, agent.host, cwd, s.app_restart,
                            config.globs(s), settings={"app_signal": s.app_signal, "app_command": s.app_command,
                                                       "app_settle": s.app_settle, "app_timeout": s.app_timeout},
                            path_prefix=pathvirt.record().get("path_prefix", ""))
    _written.setdefault(gen, []).append(path)
    size = archive.write(path, header, files)
    store.fsync_dir(gdir)
    entry = store.ImageEntry(agent.host, path, agent.root.program, uid, agent.root.pid, size, [])
    nbytes = sum(f.size for f in files)
    log.info("generation %d: recorded %d restart file(s), %.1f MB, in %.2f s", gen, len(files), nbytes / 1e6,
             time.monotonic() - t0)
    return [asdict(entry)], {"bytes_in": nbytes, "bytes_out": size, "capture_s": round(t1 - t0, 6),
                             "write_s": round(time.monotonic() - t1, 6), "applevel_files": len(files)}

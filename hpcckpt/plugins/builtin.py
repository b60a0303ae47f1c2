"""Plugins shipped with hpcckpt (docs/plugins.md):

    hpcckpt.plugins.builtin:RunBeforeCheckpoint   HPCCKPT_PRECKPT_CMD runs (sh -c) before every checkpoint; a
                                                  failure fails that checkpoint (the last good one is kept)
    hpcckpt.plugins.builtin:ModifyEnv             DMTCP's dmtcp_env.txt: at restart the restored processes'
                                                  environment gets the file's changes (HPCCKPT_ENV_FILE, else
                                                  dmtcp_env.txt in the restart's directory or the ckptdir)
    hpcckpt.plugins.builtin:PathRemap             migration: HPCCKPT_PATH_PREFIXES="/old=/new;/a=/b" rewrites the
                                                  paths of files, mappings and working directories at restart
"""
from __future__ import annotations

import logging
import os
import subprocess

from ..engine import environ as env_mod
from . import Event, Plugin

log = logging.getLogger(__name__)


class RunBeforeCheckpoint(Plugin):
    name = "run-before-checkpoint"

    def __init__(self, command: str | None = None, timeout: float = 300.0):
        self.command = command or os.environ.get("HPCCKPT_PRECKPT_CMD", "")
        self.timeout = timeout

    def presuspend(self, ev: Event) -> None:
        if not self.command:
            return
        e = dict(os.environ, HPCCKPT_GENERATION=str(ev.generation), HPCCKPT_COMPUTATION=ev.computation,
                 HPCCKPT_CKPTDIR=ev.ckptdir)
        r = subprocess.run(["/bin/sh", "-c", self.command], env=e, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=self.timeout)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
            raise RuntimeError(f"{self.command!r} exited with {r.returncode} {tail[0]}".strip())
        log.info("before checkpoint %d: %r done", ev.generation, self.command)


class ModifyEnv(Plugin):
    name = "modify-env"

    def __init__(self, path: str | None = None):
        self.path = path or os.environ.get("HPCCKPT_ENV_FILE")

    def _file(self, ev: Event) -> str | None:
        for p in ([self.path] if self.path else [os.path.join(os.getcwd(), "dmtcp_env.txt"),
                                                   os.path.join(ev.ckptdir, "dmtcp_env.txt")]):
            if p and os.path.isfile(p):
                return p
        if self.path:
            raise FileNotFoundError(f"environment file {self.path} not found")
        return None

    def restart(self, ev: Event) -> None:
        path = self._file(ev)
        if path is None:
            return
        with open(path) as f:
            changes = env_mod.parse_env_file(f.read())
        if not changes:
            return
        for pid in ev.pids:
            try:
                env_mod.set_environment(pid, changes)
            except env_mod.EnvError as e:
                log.warning("%s; its environment is left as it was", e)


def _prefixes(text: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, (x.strip() for x in text.replace(";", "\n").splitlines())):
        old, eq, new = item.partition("=")
        if not eq or not old.startswith("/") or not new.startswith("/"):
            raise ValueError(f"path prefix mapping {item!r} is not /old=/new")
        out.append((old.rstrip("/") or "/", new.rstrip("/") or "/"))
    return out


def remap_path(path, prefixes: list[tuple[str, str]]):
    if not isinstance(path, str):
        return path
    for old, new in prefixes:
        if path == old or path.startswith(old + "/"):
            return new + path[len(old):]
    return path


def remap_meta(meta: dict, prefixes: list[tuple[str, str]]) -> int:
    """Rewrite every file path of an image's metadata (fds, mappings, cwd, file objects); returns how many."""
    n = 0

    def walk(node):
        nonlocal n
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("path", "cwd", "exe") and isinstance(v, str):
                    nv = remap_path(v, prefixes)
                    if nv != v:
                        node[k] = nv
                        n += 1
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(meta.get("process", {}))
    return n


class PathRemap(Plugin):
    name = "path-remap"

    def __init__(self, prefixes: str | None = None):
        self.prefixes = _prefixes(prefixes if prefixes is not None else os.environ.get("HPCCKPT_PATH_PREFIXES", ""))

    def pre_restore(self, ev: Event) -> None:
        if not self.prefixes:
            return
        n = sum(remap_meta(m, self.prefixes) for m in ev.images)
        log.info("paths remapped for the restart (%s): %d", ", ".join(f"{o} -> {w}" for o, w in self.prefixes), n)

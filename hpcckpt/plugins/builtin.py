"""Plugins shipped with hpcckpt (docs/plugins.md):

    hpcckpt.plugins.builtin:RunBeforeCheckpoint   HPCCKPT_PRECKPT_CMD runs (sh -c) before every checkpoint; a
                                                  failure fails that checkpoint (the last good one is kept)
    hpcckpt.plugins.builtin:ModifyEnv             DMTCP's dmtcp_env.txt: at restart the restored processes'
                                                  environment gets the file's changes (HPCCKPT_ENV_FILE, else
                                                  dmtcp_env.txt in the restart's directory or the ckptdir)
    hpcckpt.plugins.builtin:PathRemap             migration: HPCCKPT_PATH_PREFIXES="/old=/new;/a=/b" rewrites the
                                                  paths of files, mappings and working directories at restart
                                                  (the same as --pathvirt; engine/pathvirt.py)
"""
from __future__ import annotations

import logging
import os
import subprocess

from ..engine import environ as env_mod
from ..engine import pathvirt
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
        self.path = path or os.environ.get("HPCCKPT_ENV_FILE") or os.environ.get("DMTCP_ENV_FILE")

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
            changes = env_mod.parse_env_file(f.read(), where=path)
        if not changes:
            return
        for pid in ev.pids:
            try:
                env_mod.set_environment(pid, changes)
            except env_mod.EnvError as e:
                log.warning("%s; its environment is left as it was", e)


class PathRemap(Plugin):
    """The plugin form of --pathvirt (engine/pathvirt.py): HPCCKPT_PATH_PREFIXES="/old=/new;/a:/b" rewrites the
    paths of open files, mappings, the working directory and the executable before the restore."""
    name = "path-remap"

    def __init__(self, prefixes: str | None = None):
        from ..settings import _list_of_prefixes
        text = prefixes if prefixes is not None else os.environ.get("HPCCKPT_PATH_PREFIXES", "")
        self.prefixes = _list_of_prefixes(text) if text else []

    def pre_restore(self, ev: Event) -> None:
        if not self.prefixes:
            return
        n = sum(pathvirt.remap_meta(m, self.prefixes) for m in ev.images)
        log.info("paths remapped for the restart (%s): %d", ", ".join(self.prefixes), n)

"""Restart in application-level mode: authenticate the archive, put the program's restart files back where the
globs found them, and run its restart command under an agent of the same computation (so later checkpoints,
interval and batch requeues work as before)."""
from __future__ import annotations

import logging
import os
import shlex

from ..engine import pathvirt
from ..image import runlock, safefs
from ..settings import Settings
from . import archive, config
from .trigger import scan

log = logging.getLogger("hpcckpt.applevel")

# recorded at checkpoint, used at restart unless the restart's own environment sets them
CARRIED = {"app_signal": "HPCCKPT_APP_SIGNAL", "app_command": "HPCCKPT_APP_COMMAND",
            "app_settle": "HPCCKPT_APP_SETTLE", "app_timeout": "HPCCKPT_APP_TIMEOUT"}


class RestartError(Exception):
    """One line for the user (the restart command turns it into its failure)."""


def is_archives(paths: list[str]) -> bool:
    return bool(paths) and all(p.endswith(config.SUFFIX) for p in paths)


def prepare(s: Settings, paths: list[str], force: bool = False,
            expect: tuple[str, int] | None = None,
            given: set[str] | None = None) -> tuple[Settings, list[str], str]:
    """Check the archive, claim the computation, restore its files. Returns (settings for the continued run,
    the restart command, the computation). given: settings the restart's flags set (they beat the archive's)."""
    if len(paths) != 1:
        raise RestartError(f"an application-level checkpoint has one archive per agent; {len(paths)} given "
                           f"(restart one host's program at a time)")
    try:
        r = archive.Reader(paths[0])
    except archive.ArchiveError as e:
        raise RestartError(str(e)) from None
    try:
        h = r.header
        if expect is not None and (h.computation, h.generation) != expect:
            raise RestartError(f"{paths[0]} belongs to computation {h.computation} generation {h.generation}, "
                               f"not to the checkpoint that names it; restart refused")
        for d, c in runlock.targets(paths, h.computation, s.ckptdir):
            try:
                runlock.claim(d, c, force)
            except (runlock.Busy, safefs.UnsafePath) as e:
                raise RestartError(str(e)) from None
            except PermissionError as e:
                log.debug("not locking %s/ckpt_%s: %s", d, c, e)
        try:                  # --path-prefix / DMTCP_PATH_MAPPING, and DMTCP_PATH_PREFIX against the recorded list
            pairs = pathvirt._pairs(pathvirt.prefixes_for({"path_prefix": h.path_prefix},
                                                          s.path_prefixes if s.pathvirt else []))
        except pathvirt.PrefixError as e:
            raise RestartError(str(e)) from None
        cwd = pathvirt.remap(h.cwd, pairs)
        target = {f["path"]: pathvirt.remap(f["path"], pairs) for f in h.files}
        _set_aside_newer(h, cwd, set(target.values()))
        try:
            rows = r.extract(target)
        except OSError as e:
            raise RestartError(f"cannot put back the restart files of {paths[0]}: {e}") from None
        except archive.ArchiveError as e:
            raise RestartError(str(e)) from None
        for tmp, final, _ in rows:
            os.replace(tmp, final)
        log.info("generation %d: put back %d restart file(s): %s", h.generation, len(rows),
                 ", ".join(final for _, final, _ in rows))
    finally:
        r.close()
    command = s.app_restart or h.restart
    if not command:
        raise RestartError(f"{paths[0]} records no restart command: give it with HPCCKPT_APP_RESTART (or "
                           f"app_restart in the YAML)")
    carried = {k: v for k, v in h.settings.items()
               if k in CARRIED and CARRIED[k] not in os.environ and k not in (given or set())}
    s = s.replace(engine="signal", app_files=s.app_files or " ".join(h.patterns), app_restart=command, **carried)
    config.check(s)
    try:
        os.chdir(cwd)
    except OSError as e:
        raise RestartError(f"cannot enter the program's working directory {cwd}: {e.strerror}") from None
    os.environ["HPCCKPT_RESTART_GENERATION"] = str(h.generation)      # the program may ask
    return s, shlex.split(command), h.computation


def _set_aside_newer(h: archive.Header, cwd: str, keep: set[str]) -> None:
    """Restart files the program wrote after the checkpoint (matching its globs, not recorded) would be taken
    for newer state by many restart commands: renamed NAME.after-genN, never deleted."""
    for path in scan(h.patterns, cwd):
        if path not in keep:
            aside = f"{path}.after-gen{h.generation}"
            os.replace(path, aside)
            log.warning("%s was written after checkpoint generation %d: set aside as %s", path, h.generation,
                        aside)


"""The restart script the coordinator writes at every complete checkpoint (dmtcp_restart_script.sh).

It is plain, editable bash: the images are grouped by host, so moving a computation to other machines is
a matter of editing the host names (or passing --hostfile later). Options given to the script override the
coordinator address it was written with, like DMTCP's.
"""
from __future__ import annotations

import logging
import os
import secrets
import shlex
import shutil
import sys
import time
from dataclasses import dataclass

from .. import installprefix
from ..faults import fault
from ..image import safefs
from ..image.store import Manifest

log = logging.getLogger("hpcckpt.coordinator")

SCRIPT_NAME = "dmtcp_restart_script.sh"


def hpcckpt_executable() -> str:
    """Absolute path of the hpcckpt command that runs now (the venv's console script when installed)."""
    cand = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "hpcckpt")
    if os.access(cand, os.X_OK):
        return installprefix.command("hpcckpt", cand)      # (DMTCP_PREFIX_PATH: installed elsewhere)
    return installprefix.command("hpcckpt", shutil.which("hpcckpt") or "hpcckpt")


def render(manifest: Manifest, coord_host: str, coord_port: int, ckptdir: str, interval: int) -> str:
    table = "\n".join(f"{img.host} {img.path}" for img in manifest.images)
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(manifest.created))
    return f"""#!/usr/bin/env bash
# Restart script written by hpcckpt (dmtcp_restart_script.sh).
# Computation {manifest.computation}, checkpoint generation {manifest.generation}, taken {when}.
# Usage: bash {SCRIPT_NAME} [--coord-host H|-h H] [--coord-port P|-p P] [--interval S|-i S] [--ckptdir D]
#        [--hostfile F] [--launcher ssh|srun|pbs|sge] [other hpcckpt restart options]
# Each host of the table below restarts its own images (this one directly, the others over ssh, or srun
# inside a Slurm allocation). To migrate, edit the host names, or pass --hostfile (one new host per line).
set -euo pipefail

coord_host=${{DMTCP_COORD_HOST:-${{DMTCP_HOST:-{shlex.quote(coord_host)}}}}}
coord_port=${{DMTCP_COORD_PORT:-${{DMTCP_PORT:-{coord_port}}}}}
ckptdir=${{DMTCP_CHECKPOINT_DIR:-{shlex.quote(ckptdir)}}}
interval=${{DMTCP_CHECKPOINT_INTERVAL:-{interval}}}
hpcckpt=${{HPCCKPT_BIN:-{shlex.quote(hpcckpt_executable())}}}
[ -x "$hpcckpt" ] || hpcckpt=$(command -v hpcckpt) || {{
  echo "restart script: hpcckpt not found; set HPCCKPT_BIN" >&2; exit 99; }}

extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--coord-host|--host) coord_host=$2; shift 2 ;;
    -p|--coord-port|--port) coord_port=$2; shift 2 ;;
    -i|--interval) interval=$2; shift 2 ;;
    --ckptdir) ckptdir=$2; shift 2 ;;
    --help) sed -n '2,8p' "$0"; exit 0 ;;
    *) extra+=("$1"); shift ;;
  esac
done

# host image (one line per process image); hpcckpt restart reads this table from the script itself
: <<'HPCCKPT_IMAGES'
{table}
HPCCKPT_IMAGES

exec "$hpcckpt" restart --coord-host "$coord_host" --coord-port "$coord_port" --interval "$interval" \\
  --ckptdir "$ckptdir" --table "$0" "${{extra[@]}}"
"""


def script_name(computation: str) -> str:
    return f"dmtcp_restart_script_{computation}.sh"


@dataclass
class InstalledScript:
    """A restart script put in place before its generation's manifest, which done() keeps and undo() takes
    back (the previous script and link return), so that a generation whose manifest could not be written
    leaves no script pointing at it."""
    dirfd: int
    path: str
    name: str
    backup: str | None            # hard link to the previous script, None if there was none
    old_link: str | None          # what dmtcp_restart_script.sh pointed at before, None if missing

    def done(self) -> None:
        if self.backup:
            safefs.unlink(self.dirfd, self.backup)
        os.close(self.dirfd)

    def undo(self) -> None:
        try:
            if self.backup:
                safefs.replace(self.dirfd, self.backup, self.name)
            else:
                safefs.unlink(self.dirfd, self.name)
            if self.old_link is not None:
                safefs.symlink_at(self.dirfd, self.old_link, SCRIPT_NAME)
            elif _link_target(self.dirfd) == self.name:
                safefs.unlink(self.dirfd, SCRIPT_NAME)
        except OSError as e:
            log.error("could not put the previous restart script back in place (%s): %s", self.path, e)
        finally:
            os.close(self.dirfd)


def _link_target(dirfd: int) -> str | None:
    try:
        return os.readlink(SCRIPT_NAME, dir_fd=dirfd)
    except OSError:
        return None


def install_restart_script(ckptdir: str, manifest: Manifest, coord_host: str, coord_port: int,
                           interval: int) -> InstalledScript:
    """Write the per-computation script (random O_EXCL name, fsync, rename: never through a file or link another
    user planted in a shared directory) and point dmtcp_restart_script.sh at it. On failure nothing changed."""
    dirfd = safefs.open_dir(ckptdir, create=True)
    ckptdir = os.path.abspath(ckptdir)
    name = script_name(manifest.computation)
    text = render(manifest, coord_host, coord_port, ckptdir, interval).encode()
    done = False
    backup = None
    try:
        tmp = safefs.write_temp(dirfd, name, text, mode=0o700)
        try:
            backup = f".{name}.{secrets.token_hex(8)}.bak"
            try:
                os.link(name, backup, src_dir_fd=dirfd, dst_dir_fd=dirfd, follow_symlinks=False)
            except OSError:        # no previous script (or one we may not link: then it is not put back)
                backup = None
            safefs.replace(dirfd, tmp, name)
        except BaseException:
            safefs.unlink(dirfd, tmp)
            if backup:
                safefs.unlink(dirfd, backup)
            raise
        installed = InstalledScript(dirfd, os.path.join(ckptdir, name), name, backup, _link_target(dirfd))
        try:
            fault("coordinator.script")
            safefs.symlink_at(dirfd, name, SCRIPT_NAME)
        except BaseException:
            installed.undo()
            done = True          # (undo closed the directory)
            raise
        done = True
        return installed
    finally:
        if not done:
            os.close(dirfd)


def write_restart_script(ckptdir: str, manifest: Manifest, coord_host: str, coord_port: int,
                         interval: int) -> str:
    """Write the per-computation script atomically and point dmtcp_restart_script.sh at it."""
    installed = install_restart_script(ckptdir, manifest, coord_host, coord_port, interval)
    installed.done()
    return installed.path

"""The restart script the coordinator writes at every complete checkpoint (dmtcp_restart_script.sh).

It is plain, editable bash: the images are grouped by host, so moving a computation to other machines is
a matter of editing the host names (or passing --hostfile later). Options given to the script override the
coordinator address it was written with, like DMTCP's.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
import time

from ..image.store import Manifest, atomic_write

SCRIPT_NAME = "dmtcp_restart_script.sh"


def hpcckpt_executable() -> str:
    """Absolute path of the hpcckpt command that runs now (the venv's console script when installed)."""
    cand = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "hpcckpt")
    if os.access(cand, os.X_OK):
        return cand
    return shutil.which("hpcckpt") or "hpcckpt"


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
[ -x "$hpcckpt" ] || hpcckpt=$(command -v hpcckpt) || {{ echo "restart script: hpcckpt not found; set HPCCKPT_BIN" >&2; exit 99; }}

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


def write_restart_script(ckptdir: str, manifest: Manifest, coord_host: str, coord_port: int,
                         interval: int) -> str:
    """Write the per-computation script atomically and point dmtcp_restart_script.sh at it."""
    ckptdir = os.path.abspath(ckptdir)
    os.makedirs(ckptdir, exist_ok=True)
    name = f"dmtcp_restart_script_{manifest.computation}.sh"
    path = os.path.join(ckptdir, name)
    atomic_write(path, render(manifest, coord_host, coord_port, ckptdir, interval).encode(), mode=0o700)
    link = os.path.join(ckptdir, SCRIPT_NAME)
    tmp = f"{link}.{os.getpid()}.tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(name, tmp)
    os.rename(tmp, link)
    return path

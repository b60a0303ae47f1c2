"""Restarting a computation whose images are on several hosts: the restart script's table (host, image),
optionally mapped to other hosts by --hostfile (migration), is split by host; this host restarts its own
images, every other host is asked to restart its own - over ssh, or inside a batch job the scheduler's way
(srun, pbs_tmrsh, qrsh -inherit: remote_command in sched/) - joining the same coordinator (which then waits for
all of them before any process runs: coordinator/gather.py).

--hostfile: one host per line maps the checkpoint's hosts, in the order they first appear in the table, to
these; a line "OLD NEW" maps OLD to NEW. Lines starting with # are ignored.
"""
from __future__ import annotations

import logging
import os
import subprocess
import threading

from .. import installprefix
from ..agent import remoteio
from ..hostnames import is_local
from ..settings import Settings, SettingsError, read_config_text
from .common import Fail

log = logging.getLogger("hpcckpt")


def read_table(path: str) -> list[tuple[str, str]]:
    """(host, image) rows of a restart script's image table (or of a plain "host image" file)."""
    try:
        text = read_config_text(path, "image table")
    except SettingsError as e:
        raise Fail(str(e)) from None
    if "<<'HPCCKPT_IMAGES'" in text:
        text = text.split("<<'HPCCKPT_IMAGES'\n", 1)[1].split("\nHPCCKPT_IMAGES", 1)[0]
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.lstrip().startswith("#"):
            rows.append((parts[0], parts[1]))
    if not rows:
        raise Fail(f"no images listed in {path}")
    return rows


def apply_hostfile(rows: list[tuple[str, str]], path: str) -> list[tuple[str, str, str]]:
    """(new host, image, host at the checkpoint) rows."""
    try:
        text = read_config_text(path, "host file")
    except SettingsError as e:
        raise Fail(str(e)) from None
    lines = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    old_hosts = list(dict.fromkeys(h for h, _ in rows))
    mapping: dict[str, str] = {}
    if lines and all(len(ln) == 2 for ln in lines):
        mapping = {a: b for a, b in lines}
    elif lines and all(len(ln) == 1 for ln in lines):
        if len(lines) < len(old_hosts):
            raise Fail(f"host file {path} names {len(lines)} host(s); the checkpoint ran on {len(old_hosts)} "
                       f"({', '.join(old_hosts)})")
        mapping = {old: ln[0] for old, ln in zip(old_hosts, lines)}
    else:
        raise Fail(f"host file {path}: give one host per line, or 'OLD NEW' per line")
    return [(mapping.get(h, h), img, h) for h, img in rows]


def address_towards(host: str) -> str:
    from ..coordinator.binding import address_towards as towards
    return towards(host)


def start_remote(host: str, images: list[str], coord_port: int, secret: bytes, ckptdir: str, launcher: str | None,
                 extra: list[str], settings: Settings | None = None) -> subprocess.Popen:
    """`hpcckpt restart --join` of host's images, run on host; the coordinator's secret goes on its stdin.
    launcher: "ssh", "srun", "pbs", "sge" (sched/base.py LAUNCHERS), or None for the scheduler whose job this
    is (ssh outside a job). settings: the restarting command's, which the restart there inherits (its
    --incremental, --no-forked-checkpoint, storage levels, ...: agent/remoteio.py settings_env)."""
    local = is_local(host)
    coord_host = "127.0.0.1" if local else address_towards(host)
    if not local:         # the coordinator (on this host) listens on loopback: have it listen towards host too
        from ..coordinator.binding import open_towards
        from ..coordinator.client import CoordinatorUnreachable
        try:
            open_towards(coord_port, coord_host)
        except CoordinatorUnreachable as e:      # the restart there then fails to join: the gate says so
            log.warning("the restart on %s may not reach the coordinator: %s", host, e)
    cmd = [installprefix.remote_python(), "-m", "hpcckpt.cli.main", "restart", "--join", "--coord-host", coord_host,
           "--coord-port", str(coord_port), "--ckptdir", ckptdir, "--secret-stdin", *extra, *images]
    if os.environ.get("HPCCKPT_KEY_FILE"):       # the same key file there (image/auth.py); ssh does not pass it
        cmd = ["env", f"HPCCKPT_KEY_FILE={os.environ['HPCCKPT_KEY_FILE']}", *cmd]
    cmd = [*remoteio.env_prefix(remoteio.settings_env(settings) if settings else {}), *cmd]
    if local:
        # another agent's share, restarted on this host: its processes keep our standard input, as they would
        # under one restart (a pipe or terminal they read from must not turn into EOF); the secret goes
        # through a pipe of its own
        r, w = os.pipe()
        cmd[cmd.index("--secret-stdin")] = f"--secret-fd={r}"
        log.info("restarting %d image(s) on %s", len(images), host)
        try:
            p = subprocess.Popen(cmd, pass_fds=(r,))
        finally:
            os.close(r)
        with os.fdopen(w, "wb") as f:
            try:
                f.write(secret.hex().encode() + b"\n")
            except BrokenPipeError:
                pass
        return p
    from ..sched.registry import remote_launcher
    way = remote_launcher(launcher)
    if not way.remote_stdin:
        # pbs_tmrsh hands the task no standard input: the secret goes through a file of the (shared)
        # checkpoint directory, made the remote command's standard input there
        cmd = ["/bin/sh", "-c", 'exec "$@" <"$0"', secret_file(ckptdir, coord_port, secret), *cmd]
    full = way.remote_command(host, cmd)
    log.info("restarting %d image(s) on %s", len(images), host)
    p = subprocess.Popen(full, stdin=subprocess.PIPE)
    stdin = p.stdin
    if stdin is None:                          # (never: stdin=PIPE)
        raise Fail(f"cannot hand the coordinator's secret to the restart on {host}")
    try:
        stdin.write(secret.hex().encode() + b"\n")
        stdin.close()
    except BrokenPipeError:
        pass
    return p


def secret_file(ckptdir: str, coord_port: int, secret: bytes) -> str:
    """The coordinator's secret in a file only we can read, under the checkpoint directory (which every host
    of the computation shares)."""
    from ..image import store
    d = os.path.join(ckptdir, ".run")
    os.makedirs(d, mode=0o700, exist_ok=True)
    path = os.path.join(d, f"restart-{coord_port}.secret")
    store.atomic_write(path, secret.hex().encode() + b"\n", mode=0o600)
    return path


def agent_of(image: str, fallback: str) -> str:
    """The agent an image was written by (images of one agent restart together, in one agent); fallback when
    the image cannot be read here (on another host's disk) or predates agent ids."""
    from ..image.format import ImageError, ImageReader
    try:
        r = ImageReader(image)
    except (ImageError, OSError):
        return fallback
    try:
        return str(r.meta.get("agent_id") or fallback)
    finally:
        r.close()


def group(rows: list[tuple[str, str, str]]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(images this process restarts, [(host, images)] for the other restarts): one restart per agent of the
    checkpoint (its processes had PIDs of their own namespace), on the host its host maps to; several may land
    on one host (a computation gathered on fewer hosts, or several agents on one node)."""
    parts: dict[str, tuple[str, list[str]]] = {}
    for new, img, old in rows:
        parts.setdefault(agent_of(img, "host:" + old), (new, []))[1].append(img)
    local: list[str] = []
    others: list[tuple[str, list[str]]] = []
    for new, imgs in parts.values():
        if not local and is_local(new):
            local = imgs
        else:
            others.append((new, imgs))
    return local, others


def wait_remote(procs: list[tuple[str, subprocess.Popen]], timeout: float | None = None) -> int:
    """Wait for every other restart; the first non-zero exit status (named in the log), else 0."""
    code = 0
    for host, p in procs:
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        if rc != 0 and code == 0:
            log.info("the part of the computation on %s exited with status %d", host, rc)
            code = rc
    return code


def stop_remote(procs: list[tuple[str, subprocess.Popen]]) -> None:
    for _, p in procs:
        if p.poll() is None:
            p.terminate()
    for _, p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


class Watcher:
    """Watches the other hosts' restarts while this host restores: one that fails (ssh cannot reach its host,
    its images are unreadable there, ...) abandons the whole restart at once, rather than leave the others
    waiting at the coordinator's gate until its timeout."""

    def __init__(self, procs: list[tuple[str, subprocess.Popen]], coord: tuple[str, int]):
        self.procs = procs
        self.coord = coord
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="remote-restarts", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from ..coordinator.client import CoordinatorUnreachable, command
        reason = ""
        while not self.done.wait(0.3):
            if not reason:
                for host, p in self.procs:
                    rc = p.poll()
                    if rc not in (None, 0):
                        reason = f"the restart on {host} failed (exit status {rc}; its messages are above)"
                        break
            if reason:
                try:
                    if command(*self.coord, "abandon", timeout=5, reason=reason).get("ok"):
                        return
                except CoordinatorUnreachable:
                    return

    def stop(self) -> None:
        self.done.set()
        self.thread.join(2)

"""hpcckpt dump PID... --ckptdir DIR [--kill | --leave-running] [--tree] [--force] — checkpoint processes that were
NOT started under dmtcp_launch (the run started without a checkpointer whose wall time ends in an hour).

The processes are seized with ptrace (as root, or as their owner where /proc/sys/kernel/yama/ptrace_scope allows
it), frozen together and written as generation 1 of a new computation in DIR - the same images, manifest and
restart script as any checkpoint - then let go (default) or killed. `hpcckpt restart --from DIR` (or the restart
script) carries them on under an agent, so later checkpoints, intervals and batch requeues work from then on.

What the first process had as its standard input, output and error (the user's terminal, a pipe from the shell,
a file) is treated like a launcher's: after the restart they are the restarting command's (docs/design.md).
Anything else that cannot be saved (a socket to a process outside, a device) is listed one line per object
before anything is frozen, and the dump is refused; with --force such descriptors come back as /dev/null.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from ..agent.procs import new_agent_id, new_unique_id, program_of
from ..coordinator.script import write_restart_script
from ..engine import dump as engine_dump
from ..engine import tree
from ..engine.errors import FreezeError, ProcessGone, UnsupportedFd
from ..engine.fds.fdtable import FdTable
from ..engine.procattrs import children_of
from ..image import journal, safefs, store
from .common import Fail, Parser, run_main, settings_from, setup_logging

log = logging.getLogger("hpcckpt.dump")


def parser(prog: str) -> Parser:
    p = Parser(prog, __doc__.split("\n\n")[1])
    p.add_argument("pids", nargs="+", metavar="PID", help="processes to checkpoint (the first is the computation's "
                                                          "root: the restart ends when it ends)")
    p.add_argument("--ckptdir", metavar="DIR", help="where the checkpoint goes (created if missing; env "
                                                    "DMTCP_CHECKPOINT_DIR; default: the current directory)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--kill", action="store_true", help="kill the processes once the checkpoint is complete")
    what.add_argument("--leave-running", action="store_true", help="let them run on afterwards (the default)")
    p.add_argument("--tree", action="store_true", help="also every descendant of the processes given")
    p.add_argument("--force", action="store_true", help="dump although some descriptors cannot be saved: they "
                                                        "come back as /dev/null after a restart")
    p.add_argument("--gzip", dest="compress", action="store_const", const=True, help="compress the images (zstd)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    p.add_argument("--config", metavar="YAML", help="settings file (env HPCCKPT_CONFIG)")
    return p


def _descendants(pids: list[int]) -> list[int]:
    out, todo = list(pids), list(pids)
    while todo:
        for c in children_of(todo.pop()):
            if c not in out:
                out.append(c)
                todo.append(c)
    return out


def _check_targets(pids: list[int]) -> None:
    me = {os.getpid()}
    p = os.getppid()
    while p > 1:                                # never ourselves or an ancestor (the shell that runs us)
        me.add(p)
        info = tree.read_proc(p)
        p = info.ppid if info else 0
    for pid in pids:
        info = tree.read_proc(pid)
        if info is None:
            raise Fail(f"no process {pid}", code=2)
        if info.zombie:
            raise Fail(f"process {pid} ({info.comm}) has exited (a zombie): nothing to checkpoint", code=2)
        if pid in me or pid == 1:
            raise Fail(f"process {pid} ({info.comm}) is this command, runs it, or is init; cannot checkpoint it",
                       code=2)
        try:
            os.readlink(f"/proc/{pid}/exe")
        except FileNotFoundError:
            raise Fail(f"process {pid} ({info.comm}) is a kernel thread; nothing to checkpoint", code=2) from None
        except PermissionError:
            pass                                      # another user's: said below
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            raise Fail(f"no process {pid}", code=2) from None
        if os.geteuid() != 0 and uid != os.geteuid():
            raise Fail(f"process {pid} ({info.comm}) belongs to uid {uid}; only its owner or root can "
                       f"checkpoint it", code=2)
    if os.geteuid() != 0:
        try:
            with open("/proc/sys/kernel/yama/ptrace_scope") as f:
                scope = int(f.read())
        except (OSError, ValueError):
            scope = 0
        if scope >= 1:
            raise Fail(f"/proc/sys/kernel/yama/ptrace_scope is {scope}: only root (or a process's ancestors) may "
                       f"attach to it here; run this as root, or start the program under dmtcp_launch next time")


def _problems(pids: list[int], stdio_pid: int) -> list[str]:
    """Every descriptor that cannot be saved, one line each (a dry run of the descriptor scan, which otherwise
    stops at the first); nothing is frozen or changed."""
    t = FdTable(pids, stdio_pid=stdio_pid, force=True)
    quiet = logging.getLogger("hpcckpt.engine.fds.fdtable")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        t.scan()
    except (UnsupportedFd, OSError, RuntimeError) as e:
        return [str(e)]
    finally:
        quiet.setLevel(level)
    return t.problems


@dataclass
class Dumped:
    script: str              # the restart script
    computation: str
    pids: list[int]          # every process dumped (the first given is the root)


def dump(pids: list[int], ckptdir: str, *, tree_too: bool, force: bool, kill: bool, compress: bool,
         stop: bool = False, stdio_pid: int | None = None) -> Dumped:
    """Checkpoint the processes into a new computation in ckptdir. Afterwards they run on, are killed (kill), or
    are left stopped (stop: SIGSTOP, untraced; hpcckpt adopt keeps the originals so until their restored copy
    ends). stdio_pid: whose standard input, output and error count as the launcher's (default the root's own:
    they become the restarting command's); for adopt, its own, so the job's output files are reopened by path."""
    _check_targets(pids)
    root = pids[0]
    stdio_pid = root if stdio_pid is None else stdio_pid
    allp = _descendants(pids) if tree_too else list(dict.fromkeys(pids))
    problems = _problems(allp, stdio_pid)
    if problems and not force:
        for line in problems:
            print(f"cannot attach: {line}", flush=True)
        raise Fail(f"{len(problems)} descriptor(s) cannot be checkpointed (listed above); nothing was frozen. "
                   f"--force dumps anyway and gives them back as /dev/null after a restart")
    try:
        engine_dump.check_supported(allp) if not force else None
    except (UnsupportedFd, OSError, RuntimeError) as e:
        raise Fail(str(e)) from None
    host = store.safe_name(socket.gethostname().split(".")[0])[:16]
    comp = f"{host}-{root}-{int(time.time()):x}{os.urandom(2).hex()}"
    gen = 1
    try:
        safefs.makedirs(ckptdir)
        gdir = store.make_generation_dir(ckptdir, comp, gen)
    except OSError as e:
        raise Fail(f"cannot use checkpoint directory {ckptdir}: {e}") from None
    agent_id = new_agent_id()

    def listing():
        current = _descendants(pids) if tree_too else allp
        return [i for i in (tree.read_proc(p) for p in current) if i is not None]
    t0 = time.monotonic()
    try:
        frozen = tree.freeze_all(listing)
    except (FreezeError, ProcessGone, OSError) as e:
        raise Fail(f"cannot freeze the processes: {e}") from None
    images: list[store.ImageEntry] = []
    stats: dict[str, Any] = {"bytes_in": 0, "bytes_out": 0}
    try:
        fps = [frozen[p] for p in sorted(frozen)]
        infos = {p: tree.read_proc(p) for p in frozen}
        members = set(frozen)
        fdt = FdTable(list(frozen), stdio_pid=stdio_pid, force=force)
        fdt.scan()
        for fp in fps:
            info = infos.get(fp.pid)
            # a group or session led by a process outside (the user's shell) is not recreated: 0 = outside
            pgid = info.pgid if info and info.pgid in members else 0
            sid = info.sid if info and info.sid in members else 0
            zombies = [{"pid": z.pid, "pgid": z.pgid, "sid": z.sid, "status": z.exit_code}
                       for z in (tree.read_proc(c) for c in children_of(fp.pid)) if z is not None and z.zombie]
            place = engine_dump.Placement(fdt.records.get(fp.pid, []), fdt.objects_of(fp.pid), fdt.blobs_of(fp.pid),
                                          pgid=pgid, sid=sid, root=(fp.pid == root), zombies=zombies)
            program = program_of(fp.pid)
            uid = new_unique_id(fp.pid)
            path = os.path.join(gdir, store.image_name(program, uid))
            cap = engine_dump.capture(fp, place, False)
            meta = engine_dump.write_image(cap, path, computation=comp, generation=gen, unique_id=uid,
                                           compress=compress,
                                           agent={"agent_id": agent_id, "agents": {agent_id: socket.gethostname()}})
            size = os.path.getsize(path)
            stats["bytes_in"] += meta.stats["bytes_in"]
            stats["bytes_out"] += size
            images.append(store.ImageEntry(socket.gethostname(), path, program, uid, fp.pid, size, [gen]))
            log.info("pid %d (%s): %.1f MB", fp.pid, program, size / 1e6)
        store.fsync_dir(gdir)
        frozen_s = round(time.monotonic() - t0, 3)
        stats.update(duration_s=frozen_s, frozen_s=frozen_s,
                     ratio=round(stats["bytes_out"] / stats["bytes_in"], 4) if stats["bytes_in"] else None,
                     attached=True)
        manifest = store.Manifest(comp, gen, time.time(), images, stats)
        script = write_restart_script(ckptdir, manifest, "127.0.0.1", 0, 0)
        store.write_manifest(ckptdir, manifest)
        journal.record(ckptdir, "checkpoint", computation=comp, generation=gen, ok=True, duration_s=frozen_s,
                       attached=sorted(frozen))
    except BaseException:
        for fp in frozen.values():
            fp.resume()
        store.remove_generation_images(ckptdir, comp, gen, [i.path for i in images])
        raise
    if kill or stop:
        for fp in frozen.values():
            try:
                os.kill(fp.pid, signal.SIGKILL if kill else signal.SIGSTOP)
            except ProcessLookupError:
                pass
    for fp in frozen.values():
        fp.resume()                      # (killed ones die as soon as they are let go)
    log.info("checkpoint of %d process(es) written to %s in %.2f s (%s); restart with: hpcckpt restart --from %s",
             len(frozen), store.computation_dir(ckptdir, comp), stats["duration_s"],
             "killed" if kill else "left stopped" if stop else "left running", ckptdir)
    return Dumped(script, comp, sorted(frozen))


def main(argv: list[str] | None = None, prog: str = "hpcckpt dump") -> int:
    def body(argv):
        args = parser(prog).parse_args(argv)
        try:
            pids = [int(p) for p in args.pids]
        except ValueError:
            raise Fail(f"a PID is a number: {' '.join(args.pids)}", code=2) from None
        if any(p <= 0 for p in pids):
            raise Fail("a PID is a positive number", code=2)
        s = settings_from(args)
        setup_logging("dump", s.quiet, s.log_level)
        ckptdir = os.path.abspath(args.ckptdir or s.ckptdir)
        try:
            dump(pids, ckptdir, tree_too=args.tree, force=args.force, kill=args.kill, compress=s.compress)
        except (UnsupportedFd, FreezeError) as e:
            raise Fail(str(e)) from None
        return 0
    return run_main(prog, body, argv)

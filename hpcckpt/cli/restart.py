"""hpcckpt restart / dmtcp_restart [OPTIONS] IMAGE..."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from ..agent.join import ANY, JOIN, NEW, find_or_start
from ..coordinator import protocol
from ..coordinator.client import CoordinatorUnreachable
from ..sched.registry import LAUNCHERS
from . import dmtcpopts, levelopts, multihost
from .common import Fail, Parser, add_coord_options, run_main, settings_from, setup_logging
from .restartcoord import EarlyCoordinator

log = logging.getLogger("hpcckpt")

DESCRIPTION = """Restarts processes from their checkpoint images and stays in the foreground until the
computation's first process ends, exiting with its exit code. The restarted processes write to this command's
standard output and error and read its standard input. All images must belong to one computation and one
checkpoint generation. Instead of images, --from DIR restarts the newest complete checkpoint found in DIR."""


def parser(prog: str) -> Parser:
    p = Parser(prog, DESCRIPTION)
    add_coord_options(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-j", "--join-coordinator", "--join", dest="policy", action="store_const", const=JOIN)
    g.add_argument("--new-coordinator", "--new", dest="policy", action="store_const", const=NEW)
    g.add_argument("--any-coordinator", dest="policy", action="store_const", const=ANY)
    p.add_argument("-i", "--interval", metavar="S", help="checkpoint every S seconds after the restart")
    p.add_argument("-c", "--ckptdir", metavar="DIR", help="where later checkpoints go (default: current directory; "
                                                          "created if missing)")
    z = p.add_mutually_exclusive_group()
    z.add_argument("--gzip", dest="compress", action="store_const", const=True)
    z.add_argument("--no-gzip", dest="compress", action="store_const", const=False)
    p.add_argument("--from", dest="from_dir", metavar="DIR", help="restart the newest complete checkpoint in DIR")
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification of page data")
    p.add_argument("--trust-unsigned", action="store_true",
                   help="accept images and manifests without a valid MAC (made by an older hpcckpt, or imported "
                        "from a user or site whose key you do not have): only if you know where they came from")
    f = p.add_mutually_exclusive_group()
    f.add_argument("--forked-checkpoint", dest="forked", action="store_const", const=True)
    f.add_argument("--no-forked-checkpoint", dest="forked", action="store_const", const=False)
    p.add_argument("--incremental", action="store_const", const=True, default=None,
                   help="store only pages changed since the previous checkpoint (env HPCCKPT_INCREMENTAL=1)")
    p.add_argument("--no-pid-namespace", dest="pid_namespace", action="store_const", const=False,
                   help="restart without a PID namespace of our own (processes get new PIDs)")
    p.add_argument("-q", "--quiet", action="count", default=None)
    dmtcpopts.add_restart_options(p)
    levelopts.add_options(p)                  # where this host's local and partner copies are (--local-dir)
    p.add_argument("--table", metavar="FILE", help="restart the images FILE lists as 'HOST IMAGE' lines (the restart "
                                                  "script passes itself): each host restarts its own")
    p.add_argument("--hostfile", metavar="FILE",
                   help="with --table or --from: move the computation to these hosts (one per line, in the order "
                        "of the checkpoint's hosts; or 'OLD NEW' lines)")
    p.add_argument("--launcher", choices=LAUNCHERS, help="how other hosts are reached (default: inside a batch job the "
                                                        "scheduler's way - srun, pbs_tmrsh, qrsh -inherit - else ssh)")
    p.add_argument("--force", action="store_true", help="restart even if the computation still runs with this "
                   "checkpoint directory (two live copies then share its output files and checkpoints)")
    p.add_argument("--secret-stdin", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--secret-fd", type=int, help=argparse.SUPPRESS)   # a part restarted on this host (multihost.py)
    p.add_argument("images", nargs="*", help="checkpoint images (ckpt_*.dmtcp)")
    return p



def main(argv: list[str] | None = None, prog: str = "hpcckpt restart") -> int:
    def body(argv):
        args = parser(prog).parse_args(argv)
        s = settings_from(args)
        setup_logging("restart", s.quiet, s.log_level)
        dmtcpopts.note_layerless(args)
        dmtcpopts.prepare(s, engine=False)      # (the engine's part after the starter is forked, below)
        dmtcpopts.make_ckptdir(s.ckptdir)
        if args.restartdir and not args.from_dir:
            args.from_dir = args.restartdir
        if args.secret_stdin or args.secret_fd is not None:
            from .launch import store_secret
            store_secret(s.coord_port, sys.stdin.readline().strip() if args.secret_stdin else
                         _read_secret_fd(args.secret_fd))
        if args.hostfile and not (args.table or args.from_dir):
            raise Fail("--hostfile needs the restart script's table (--table) or --from")
        if not (args.table or args.from_dir or args.images):
            raise Fail("no checkpoint image given; usage: " + prog + " [OPTIONS] IMAGE...")

        def find():
            try:
                return find_or_start(s, args.policy or ANY)
            except CoordinatorUnreachable as e:
                raise Fail(str(e)) from None
        # the coordinator is found or started from here on, while this restart imports its engine, reads its
        # images and restores (cli/restartcoord.py)
        early = EarlyCoordinator(find, s.coord_host, s.coord_port, s.port_file)
        early.begin()
        from ..agent import fetch
        from ..engine import identity, pathvirt
        from ..image import auth
        from . import applevel_restart, strictcheck
        from . import restartwork as work
        from .jobrun import run_job
        dmtcpopts.configure_engine(s)
        if args.trust_unsigned:
            os.environ[auth.TRUST_ENV] = "1"       # every image and manifest read from here on (image/auth.py)
        remote: list[tuple[str, list[str]]] = []
        if args.table:
            table = multihost.read_table(args.table)
            rows = multihost.apply_hostfile(table, args.hostfile) if args.hostfile else \
                [(h, img, h) for h, img in table]
            paths, remote = multihost.group(rows)
        elif args.from_dir:
            found, manifest = work.images_from_dir(args.from_dir)
            paths, remote = multihost.group(multihost.apply_hostfile(found, args.hostfile) if args.hostfile else
                                            [(h, img, h) for h, img in found])
        else:
            here = socket.gethostname()     # images given by hand restart here (one agent per agent of theirs)
            if args.policy != JOIN:             # (a --join part gets one agent's share on purpose)
                given = work.open_images(args.images)
                try:
                    work.check_complete(args.images, given)
                finally:
                    for r in given:
                        r.close()
            paths, remote = multihost.group([(here, img, here) for img in args.images])
        if applevel_restart.is_archives(paths):      # application-level mode: the program's own files
            return applevel_restart.run(s, prog, args, paths, remote, (manifest.computation, manifest.generation)
                                        if args.from_dir else None, early.ask)
        # the fastest valid copy of each (image/levels.py), or one fetched from a surviving partner (agent/fetch.py)
        # (fetch may ask for the coordinator first: its answer is the one the next ask() gets, as early.ask's first)
        asked: list[tuple[str, int]] = []
        others: list = []

        def ask() -> tuple[str, int]:
            return asked.pop() if asked else early.ask()

        def start_others() -> tuple[str, int]:
            host_port = ask()
            secret = protocol.read_secret(host_port[1])
            for host, imgs in remote:
                others.append((host, multihost.start_remote(host, imgs, host_port[1], secret, s.ckptdir,
                                                             args.launcher, (["-q"] if s.quiet else []) +
                                                             (["--trust-unsigned"] if args.trust_unsigned
                                                              else []), s)))
            return host_port
        early_port = None
        if args.policy != JOIN and remote and fetch.needs_fetch(paths, s):
            # (an image with no copy here: the other hosts' parts first, which serve the partner copies they keep)
            log.info("an image of this host must be fetched from another host's partner copy: starting the other "
                     "hosts' parts first")
            early_port = start_others()
        try:
            paths = fetch.choose(paths, s, lambda: early_port or asked.append(early.ask()) or asked[-1],
                                 first=args.policy != JOIN and not others)
            readers = work.open_images(paths) if paths else []
            strictcheck.check_images(readers, s.no_strict_checking)
            try:                # DMTCP's pathvirt (--path-prefix, DMTCP_PATH_PREFIX): files found where they moved
                for r in readers:
                    pathvirt.remap_meta(r.meta, pathvirt.prefixes_for(r.meta, s.path_prefixes if s.pathvirt else []))
            except pathvirt.PrefixError as e:
                raise Fail(str(e)) from None
            try:
                if args.from_dir:
                    work.check_from(args.from_dir, manifest, readers)
                owner = identity.become_owner(readers)     # root: the processes' user from here on (engine/identity.py)
            except identity.IdentityError as e:
                raise Fail(str(e)) from None
            if owner:       # the coordinator the starter found or started as root is not theirs: again, as them
                multihost.stop_remote(others)      # (started early for a fetch: they join the new one below)
                others.clear()
                early.abandon()
                early.begin()
                asked.clear()
            if not os.path.isdir(s.ckptdir) or not os.access(s.ckptdir, os.W_OK | os.X_OK):
                if owner:
                    raise Fail(f"checkpoint directory {s.ckptdir} is not a directory uid {owner.uid} can write (the "
                               f"images' owner, whom this restart runs as); give --ckptdir")
                raise Fail(f"checkpoint directory {s.ckptdir} is not a writable directory")
            if owner:
                log.info("restarting as uid %d gid %d groups %s: the checkpointed processes' credentials", owner.uid,
                         owner.gid, owner.groups)
            if s.incremental is None and any(r.meta.get("stats", {}).get("incremental") for r in readers):
                s = s.replace(incremental=True)      # a computation checkpointed incrementally goes on that way
            if args.policy != JOIN:      # (the parts a restart starts on other hosts join it: it claimed for them)
                work.claim_computation(s, paths + [i for _, imgs in remote for i in imgs], readers, args.force)
        except BaseException:
            multihost.stop_remote(others)
            raise
        try:
            if remote:        # the coordinator first: every host joins it
                host_port = early_port if others and early_port else start_others()
            if not readers:
                return multihost.wait_remote(others)
            watcher = multihost.Watcher(others, host_port) if others else None
            try:
                # (the agent's first request gets what the starter found; with other hosts it is known already)
                coordinator = ask if not others else lambda: host_port
                code = run_job(s, prog, coordinator, lambda in_ns, get, not_job: work.agent(
                    s, get, readers, in_ns, not args.no_verify, not_job))
            finally:
                if watcher:
                    watcher.stop()
            if others:
                rc = multihost.wait_remote(others, timeout=120)
                code = code or rc
            return code
        except BaseException:
            multihost.stop_remote(others)
            raise
        finally:
            for r in readers:
                r.close()
    return run_main(prog, body, argv)



def _read_secret_fd(fd: int) -> str:
    """The secret from the pipe the restart that started us left at fd (our standard input stays the one the
    user gave that restart: the restored processes read from it)."""
    try:
        with os.fdopen(fd, "r", closefd=True) as f:
            return f.readline().strip()
    except OSError as e:
        raise Fail(f"--secret-fd {fd}: {e.strerror}") from None



if __name__ == "__main__":
    sys.exit(main())

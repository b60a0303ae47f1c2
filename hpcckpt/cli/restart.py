"""hpcckpt restart / dmtcp_restart [OPTIONS] IMAGE..."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys

from .. import plugins
from ..agent import remoteio
from ..agent.agent import Agent
from ..agent.aware_server import AwareServer
from ..agent.aware_server import name_of as aware_name_of
from ..agent.join import ANY, JOIN, NEW, find_or_start
from ..agent.procs import JobProcess
from ..agent.rendezvous import Rendezvous
from ..coordinator import protocol
from ..coordinator.client import Connection, CoordinatorUnreachable
from ..coordinator.gather import RESTART_TIMEOUT_S
from ..coordinator.protocol import SecretError
from ..engine import awarefd, identity, pathvirt
from ..engine.restore import RestoredProcess, RestoreError, RestoreOptions, release_all, restore_computation
from ..faults import fault
from ..image import auth, runlock, safefs, store
from ..image.format import ImageError, ImageReader
from ..image.validate import check_image
from ..sched.base import LAUNCHERS
from . import dmtcpopts, jobrun, multihost, restartpause, strictcheck
from .common import Fail, Parser, add_coord_options, run_main, settings_from, setup_logging
from .jobrun import run_job
from .launch import store_secret
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


def images_from_dir(d: str) -> tuple[list[tuple[str, str]], store.Manifest]:
    """(host, image) of the newest complete checkpoint in d, and its (authenticated) manifest."""
    if not os.path.isdir(d):
        raise Fail(f"--from {d}: not a directory (give the checkpoint directory)")
    try:
        foreign: list[str] = []
        comps = [c for c in store.computations_in(d, foreign) if store.complete_generations(d, c)]
        if not comps and foreign:
            raise Fail(f"no complete checkpoint of yours in {d}: {foreign[0]} is another user's or a symlink "
                       f"(not trusted)")
        if not comps:
            raise Fail(f"no complete checkpoint in {d}")
        if len(comps) > 1:
            raise Fail(f"{d} holds checkpoints of several computations ({', '.join(comps)}); give the images")
        m = store.latest_manifest(d, comps[0])
        if m is None:
            raise Fail(f"no complete checkpoint in {d}")
    except store.ManifestError as e:
        raise Fail(str(e)) from None
    except (OSError, ValueError, TypeError) as e:
        raise Fail(f"cannot read the checkpoints in {d}: {e}") from None
    return [(i.host, path) for i, path in _manifest_images(d, m)], m


def _moved(path: str, d: str, m: store.Manifest) -> str:
    """An image where the manifest says, else where it is now if the checkpoint directory was moved or copied
    (migration): <d>/ckpt_<computation>/gen<N>/<name>."""
    if os.path.exists(path):
        return path
    here = os.path.join(store.generation_dir(d, m.computation, m.generation), os.path.basename(path))
    return here if os.path.exists(here) else path


def _manifest_images(d: str, m: store.Manifest) -> list:
    """(entry, path) of a manifest's images, refused unless it names some and all lie in its computation's
    directory (each image's own metadata is checked against the manifest once opened: _check_from)."""
    where = os.path.realpath(store.computation_dir(d, m.computation))
    if not m.images:
        raise Fail(f"checkpoint generation {m.generation} of {m.computation} in {d} lists no images; nothing "
                   f"to restart")
    out = []
    for i in m.images:
        path = _moved(i.path, d, m)
        if os.path.commonpath([where, os.path.realpath(path)]) != where:
            raise Fail(f"checkpoint generation {m.generation} of {m.computation} names image {i.path} outside "
                       f"{where}; restart refused")
        out.append((i, path))
    return out


def _check_from(d: str, m: store.Manifest, readers: list[ImageReader]) -> None:
    """Each image restarted from --from DIR says (in its authenticated metadata) it belongs to the computation
    and generation of the manifest that named it."""
    for r in readers:
        if (r.meta.get("computation"), r.meta.get("generation")) != (m.computation, m.generation):
            raise Fail(f"{r.path} belongs to computation {r.meta.get('computation')} generation "
                       f"{r.meta.get('generation')}, not to the checkpoint in {d} that names it; restart refused")


def claim_computation(s, image_paths: list[str], readers: list[ImageReader], force: bool) -> None:
    """Refuse (one line) to restart a computation that still runs, or that another restart is starting, with
    the checkpoint directories involved; else hold their locks for our life (image/runlock.py)."""
    comp = readers[0].meta.get("computation") if readers else None
    for d, c in runlock.targets(image_paths, comp, s.ckptdir):
        try:
            runlock.claim(d, c, force)
        except runlock.Busy as e:
            raise Fail(str(e)) from None
        except safefs.UnsafePath as e:
            raise Fail(str(e)) from None
        except OSError as e:
            if d != os.path.abspath(s.ckptdir) and isinstance(e, (PermissionError, FileNotFoundError)) or \
                    e.errno == errno.EROFS:      # a read-only copy of images: nothing runs from there
                log.debug("not locking %s/ckpt_%s: %s", d, c, e)
                continue
            raise Fail(f"cannot lock computation {c} in {d}: {e}") from None


def check_complete(paths: list[str], readers: list[ImageReader]) -> None:
    """Every image the checkpoint wrote on each host we restart: a process left out would leave the others'
    pipes, sockets and MPI peers dangling (they would fail later, obscurely). Images moved away from their
    checkpoint's manifest are taken as given."""
    m = store.manifest_of_image(paths[0], int(readers[0].meta.get("generation") or 0))
    if m is None or m.computation != readers[0].meta.get("computation"):
        return
    given = {r.meta.get("unique_id") for r in readers}
    hosts = {i.host for i in m.images if i.unique_id in given}
    missing = [i for i in m.images if i.host in hosts and i.unique_id not in given]
    if missing:
        def name(i):
            rank = f", MPI rank {i.rank}" if i.rank is not None else ""
            return f"{i.program} (pid {i.pid} on {i.host}{rank}: {os.path.basename(i.path)})"
        raise Fail(f"{len(missing)} image(s) of checkpoint generation {m.generation} not given: "
                   f"{'; '.join(map(name, missing[:4]))}{' ...' if len(missing) > 4 else ''}; restart needs "
                   f"every image of a host (the restart script lists them all)")


def open_images(paths: list[str]) -> list[ImageReader]:
    readers = []
    try:
        for p in paths:
            readers.append(ImageReader(p))
            check_image(p, readers[-1].meta, readers[-1].size)   # edited metadata: one line, before any coordinator
        comps = {r.meta.get("computation") for r in readers}
        if len(comps) > 1:
            raise Fail(f"the images belong to different computations ({', '.join(sorted(map(str, comps)))}); "
                       f"restart one computation at a time")
        gens = {r.meta.get("generation") for r in readers}
        if len(gens) > 1:
            raise Fail(f"the images come from different checkpoints (generations {sorted(gens, key=str)})")
    except ImageError as e:
        for r in readers:
            r.close()
        raise Fail(str(e)) from None
    except Fail:
        for r in readers:
            r.close()
        raise
    return readers


def main(argv: list[str] | None = None, prog: str = "hpcckpt restart") -> int:
    def body(argv):
        args = parser(prog).parse_args(argv)
        s = settings_from(args)
        incremental_given = args.incremental is not None or bool(os.environ.get("HPCCKPT_INCREMENTAL"))
        setup_logging("restart", s.quiet, s.log_level)
        if args.trust_unsigned:
            os.environ[auth.TRUST_ENV] = "1"       # every image and manifest read from here on (image/auth.py)
        dmtcpopts.note_layerless(args)
        dmtcpopts.prepare(s)
        dmtcpopts.make_ckptdir(s.ckptdir)
        if args.restartdir and not args.from_dir:
            args.from_dir = args.restartdir
        if args.secret_stdin:
            store_secret(s.coord_port, sys.stdin.readline().strip())
        elif args.secret_fd is not None:
            store_secret(s.coord_port, _read_secret_fd(args.secret_fd))
        remote: list[tuple[str, list[str]]] = []
        if args.table:
            table = multihost.read_table(args.table)
            rows = multihost.apply_hostfile(table, args.hostfile) if args.hostfile else \
                [(h, img, h) for h, img in table]
            paths, remote = multihost.group(rows)
        elif args.from_dir:
            found, manifest = images_from_dir(args.from_dir)
            paths, remote = multihost.group(multihost.apply_hostfile(found, args.hostfile) if args.hostfile else
                                            [(h, img, h) for h, img in found])
        elif args.hostfile:
            raise Fail("--hostfile needs the restart script's table (--table) or --from")
        elif args.images:
            here = socket.gethostname()     # images given by hand restart here (one agent per agent of theirs)
            if args.policy != JOIN:             # (a --join part gets one agent's share on purpose)
                given = open_images(args.images)
                try:
                    check_complete(args.images, given)
                finally:
                    for r in given:
                        r.close()
            paths, remote = multihost.group([(here, img, here) for img in args.images])
        else:
            raise Fail("no checkpoint image given; usage: " + prog + " [OPTIONS] IMAGE...")
        readers = open_images(paths) if paths else []
        strictcheck.check_images(readers, s.no_strict_checking)
        if s.pathvirt and s.path_prefixes:       # DMTCP's pathvirt: files found where they moved
            for r in readers:
                pathvirt.remap_meta(r.meta, s.path_prefixes)
        try:
            if args.from_dir:
                _check_from(args.from_dir, manifest, readers)
            owner = identity.become_owner(readers)     # root: the processes' user from here on (engine/identity.py)
        except identity.IdentityError as e:
            raise Fail(str(e)) from None
        if not os.path.isdir(s.ckptdir) or not os.access(s.ckptdir, os.W_OK | os.X_OK):
            if owner:
                raise Fail(f"checkpoint directory {s.ckptdir} is not a directory uid {owner.uid} can write (the "
                           f"images' owner, whom this restart runs as); give --ckptdir")
            raise Fail(f"checkpoint directory {s.ckptdir} is not a writable directory")
        if owner:
            log.info("restarting as uid %d gid %d groups %s: the checkpointed processes' credentials", owner.uid,
                     owner.gid, owner.groups)
        if not incremental_given and any(r.meta.get("stats", {}).get("incremental") for r in readers):
            s = s.replace(incremental=True)      # a computation checkpointed incrementally goes on that way
        if args.policy != JOIN:      # (the parts a restart starts on other hosts join it: it claimed for them)
            claim_computation(s, paths + [i for _, imgs in remote for i in imgs], readers, args.force)

        def find():
            try:
                return find_or_start(s, args.policy or ANY)
            except CoordinatorUnreachable as e:
                raise Fail(str(e)) from None
        others: list = []
        try:
            if remote:        # the coordinator first: every host joins it
                host_port = find()
                find = lambda: host_port       # noqa: E731
                secret = protocol.read_secret(host_port[1])
                for host, imgs in remote:
                    others.append((host, multihost.start_remote(host, imgs, host_port[1], secret, s.ckptdir,
                                                                 args.launcher, (["-q"] if s.quiet else []) +
                                                                 (["--trust-unsigned"] if args.trust_unsigned
                                                                  else []))))
            if not readers:
                return multihost.wait_remote(others)
            watcher = multihost.Watcher(others, host_port) if others else None
            try:
                # the coordinator is found or started at once, while the agent restores (cli/restartcoord.py);
                # with other hosts it is there already
                early = EarlyCoordinator(find, s.coord_host, s.coord_port, s.port_file) if not others else None
                code = run_job(s, prog, early.ask if early else find,
                               lambda in_ns, get, not_job: _agent(s, get, readers, in_ns, not args.no_verify,
                                                                  not_job),
                               service_hooks=early.hooks if early else None)
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


def _agent(s, get_coordinator, readers: list[ImageReader], in_namespace: bool, verify: bool,
           not_job: set[int]) -> int:
    """Join the coordinator's restart gate, restore every process (stopped; connections to other hosts made
    again through the coordinator), report, and let the processes run only when every host of the
    checkpoint has restored its own: a restart never leaves part of a computation running."""
    meta = readers[0].meta
    metas = sorted((r.meta for r in readers), key=lambda m: (not m["process"]["root"], m["process"]["pid"]))
    agents: dict = {}
    for r in readers:
        agents.update(r.meta.get("agents") or {})
    ids = sorted({str(r.meta["agent_id"]) for r in readers if r.meta.get("agent_id")})
    # connections to other hosts are made during the restore, through the coordinator: join it first then;
    # else restore first and join after (the coordinator is being started meanwhile: cli/jobrun.py's early)
    spans_hosts = any(o.get("remote_end") for r in readers for o in r.meta["process"].get("objects", []))
    restored: list[RestoredProcess] = []
    conn: Connection | None = None
    agent: Agent | None = None
    api = AwareServer(lambda: set(), lambda: None, lambda: {})
    try:
        host_plugins = plugins.PluginHost.load(plugins.specs_from(s))
        if host_plugins:      # before anything is restored: e.g. paths remapped for a migration
            host_plugins.call("pre_restore", plugins.Event(
                "pre_restore", int(meta["generation"]), meta["computation"], socket.gethostname(),
                ids[0] if ids else "", [], s.ckptdir, images=[r.meta for r in readers]))
    except plugins.PluginError as e:
        raise Fail(str(e)) from None
    # restored program-API connections lead to us (engine/awarefd.py; its SERVER is declared None there)
    awarefd.SERVER = api  # type: ignore[assignment]

    def join():        # -> (Connection, Agent)
        nonlocal conn, agent
        try:
            host, port = get_coordinator()
            conn = c = Connection(host, port)
            # the root (the process the computation was launched as) first: its exit ends the job
            procs = [JobProcess(m["process"]["pid"], m["unique_id"], m["program"]) for m in metas]
            agent = a = Agent(s, c, procs, computation=meta["computation"], restarted_generation=meta["generation"],
                          pid_namespace=in_namespace, not_job=not_job, agent_id=ids[0] if ids else None,
                          agents=agents)
            a.restart_ids = ids
            a.link.find = get_coordinator      # a fallback when the coordinator is gone for good
            a.on_root_exit = jobrun.root_exited   # children that outlive it go on
            a.hello()
            return c, a
        except (CoordinatorUnreachable, SecretError) as e:
            raise Fail(str(e)) from None

    try:
        rv = None
        if spans_hosts:
            conn, agent = join()
            rv = Rendezvous(conn, meta["computation"], meta["generation"])
        fault("restart.before_restore")
        try:
            restored = restore_computation(readers, RestoreOptions(verify_checksums=verify, same_pids=in_namespace,
                                                                   rendezvous=rv))
        except (RestoreError, ImageError) as e:
            if agent is not None:
                agent.send({"type": "restored", "error": str(e)})
            raise Fail(str(e)) from None
        if s.restart_pause:
            restartpause.pause(restored, s.restart_pause)     # --debug-restart-pause: a debugger's turn first
        if agent is None or conn is None:
            conn, agent = join()
        elif rv is not None:
            agent.stash.extend(rv.stash)
        go, why = agent.restore_done(None, RESTART_TIMEOUT_S + 30)
        if not go:
            raise Fail(f"restart abandoned: {why}")
        ordered = sorted(restored, key=lambda rp: (not rp.meta.process.root, rp.meta.process.pid))
        agent.adopt([JobProcess(rp.pid, rp.meta.unique_id, rp.meta.program) for rp in ordered])
        agent.job_file = remoteio.job_file_of(ordered[0].pid)    # the restored job's ssh/srun look there
        agent.publish_job_file()
        agent.serve_api(api)
        name = aware_name_of(ordered[0].pid)
        if name:
            api.listen(name)            # where the restored processes' hpcckpt.aware connects for new calls
        # the images we restarted from are the bases of the next incremental checkpoint
        paths = {r.meta["unique_id"]: r.path for r in readers}
        agent.prev_images = {rp.meta.unique_id: (paths[rp.meta.unique_id], list(rp.meta.needs) or [rp.meta.generation])
                             for rp in restored}
        agent.plugins = host_plugins        # the same instances that saw pre_restore
        try:
            agent.plugin_event("restart", int(meta["generation"]), pids=[rp.pid for rp in ordered])
        except plugins.PluginError as e:
            raise Fail(f"restart abandoned: {e}") from None
        release_all([rp for rp in restored if not rp.released])
        api.restarted(int(meta["generation"]))       # waiting hpcckpt.aware.checkpoint() calls: "restarted"
        log.info("restored %d process(es) in %.3f s: %s", len(restored), restored[0].stats.get("total_s", 0),
                 ", ".join(f"{rp.meta.program}[{rp.meta.process.pid}->{rp.pid}]" for rp in restored))
    except BaseException:
        for rp in restored:
            if not rp.released:
                rp.kill()
        if conn is not None:
            if agent is not None:
                agent.send({"type": "bye", "reason": "restart failed"})
            conn.close()
        raise
    try:
        return agent.run()
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())

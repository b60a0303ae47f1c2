"""The restart's work once its coordinator is on the way (cli/restart.py): reading and checking the images,
claiming the computation, and the agent that restores the processes and lets them run. Kept apart from
cli/restart.py so that the restart can start finding its coordinator (cli/restartcoord.py) before importing
all this (the engine, libzmq, numpy: a few hundred ms)."""
from __future__ import annotations

import errno
import logging
import os
import socket

from .. import plugins
from ..agent import remoteio
from ..agent.agent import Agent
from ..agent.aware_server import AwareServer
from ..agent.aware_server import name_of as aware_name_of
from ..agent.join import checkpoint_agents
from ..agent.procs import JobProcess
from ..agent.rendezvous import Rendezvous
from ..coordinator.client import Connection, CoordinatorUnreachable
from ..coordinator.protocol import SecretError
from ..engine.fds import awarefd
from ..engine.restore import RestoredProcess, RestoreError, RestoreOptions, release_all, restore_computation
from ..faults import fault
from ..image import levels, runlock, safefs, store
from ..image.format import ImageError, ImageReader
from ..image.validate import check_image
from . import jobrun, restartpause
from .common import Fail

log = logging.getLogger("hpcckpt")


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
        levels.note_newer_local(d, comps[0], m.generation)       # a newer one only on the nodes' local level
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


def check_from(d: str, m: store.Manifest, readers: list[ImageReader]) -> None:
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



def agent(s, get_coordinator, readers: list[ImageReader], in_namespace: bool, verify: bool,
           not_job: set[int]) -> int:
    """Join the coordinator's restart gate, restore every process (stopped; connections to other hosts made
    again through the coordinator), report, and let the processes run only when every host of the
    checkpoint has restored its own: a restart never leaves part of a computation running."""
    meta = readers[0].meta
    metas = sorted((r.meta for r in readers), key=lambda m: (not m["process"]["root"], m["process"]["pid"]))
    agents = checkpoint_agents(readers)      # every agent (host) of the checkpoint, from its manifest
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
    # restored program-API connections lead to us (engine/fds/awarefd.py)
    awarefd.SERVER = api

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
            rv = Rendezvous(conn, meta["computation"], meta["generation"], s.restart_timeout)
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
        go, why = agent.restore_done(None, s.restart_timeout + 30)
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



"""Restoring a computation (one or many processes) from its images.

    named shared memory files put back (shmfiles.py)
    -> SysV shm segments recreated in the agent (sysvshm.py; in an IPC namespace of their own with same_pids)
    -> objects (files, pipes, ...) created once in the agent  -> helpers forked as the process tree (helpers.py)
    -> each helper turned into its image's process by injected system calls (transform.py), left stopped
    -> RestoredComputation.release() lets every process run at once.

Any failure kills every helper and removes the segments created: a half-restored computation is never left
running. Fault point `restore.before_release` (HPCCKPT_FAULT) fails a restore once everything is in place.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field

from ..faults import fault
from ..image import validate
from ..image.blobs import read_blob
from ..image.format import ImageError, ImageReader
from ..image.records import ImageMeta
from . import identity, memory, ptrace
from .errors import IdentityError, ProcessGone, RestoreError, ShmFileError, SysvError, UnsupportedFd
from .fds import files, procfiles
from .fds.fdtable import ObjectFactory
from .helpers import Spawner, close_plans, image_ids, make_plans, park_pid_cursor
from .shm import shmfiles, sysvshm
from .transform import check_specials, transform

log = logging.getLogger(__name__)

__all__ = ["RestoreError", "RestoreOptions", "RestoredProcess", "release_all", "restore_computation",
           "restore_process"]


@dataclass
class RestoreOptions:
    verify_checksums: bool = True
    check_layout: bool = True
    # True inside a PID namespace of our own: every process and thread gets its original PID/TID back.
    # False: new PIDs; glibc's cached thread IDs are fixed up where they can be found.
    same_pids: bool = False
    # SysV segments in an IPC namespace of their own (their original shmids guaranteed); None: with same_pids
    ipc_namespace: bool | None = None
    # The coordinator's key-value store (agent.rendezvous.Rendezvous) when the computation spans hosts: restored
    # TCP connections between hosts find their other end through it.
    rendezvous: object = None


@dataclass
class RestoredProcess:
    """A restored process, still stopped under ptrace until release() lets it run."""
    pid: int
    meta: ImageMeta
    stats: dict = field(default_factory=dict)
    tids: list[int] = field(default_factory=list)
    released: bool = False
    segments: sysvshm.Segments | None = None      # removed if the computation is killed before it runs

    def release(self, cut_back_files: bool = True) -> None:
        if cut_back_files:
            files.cut_back(self.meta.process.fds)
        for tid in self.tids:
            ptrace.detach(tid)
        self.released = True

    def kill(self) -> None:
        kill_helper(self.pid, self.tids)
        if self.segments is not None:
            self.segments.abort()


def release_all(restored: list[RestoredProcess]) -> None:
    """Let a restored computation run: every file is cut back first, then every process is released (a
    process released early would otherwise write into a file another one's release cuts back)."""
    for rp in restored:
        files.cut_back(rp.meta.process.fds)
    for rp in restored:
        rp.release(cut_back_files=False)


def kill_helper(pid: int, tids: list[int]) -> None:
    """Kill a (possibly traced, multi-threaded) helper and reap what we can: other threads first, or waiting
    for the leader can hang."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for tid in [t for t in tids if t != pid] + [pid]:
        while True:
            try:
                st = ptrace.wait(tid)
            except ChildProcessError:
                break
            if st.gone:
                break


def _load(readers: list[ImageReader], parsed: list[ImageMeta]) -> list[tuple[ImageMeta, ImageReader]]:
    """The images' typed metadata: as validation parsed it (parsed, in the readers' order), else parsed here."""
    metas = []
    for i, r in enumerate(readers):
        try:
            metas.append((parsed[i] if len(parsed) == len(readers) else ImageMeta.from_dict(r.meta), r))
        except (KeyError, TypeError, ValueError) as e:
            raise ImageError(f"{r.path}: unreadable image metadata ({e})") from None
    pids = [m.process.pid for m, _ in metas]
    if len(set(pids)) != len(pids):
        raise RestoreError("two images of the same process given")
    return metas


def _blob_reader(metas: list[tuple[ImageMeta, ImageReader]]):
    where = {}
    for meta, reader in metas:
        for oid, rows in meta.process.blobs.items():
            where[oid] = (reader, rows)

    def read(oid: str) -> bytes:
        reader, spec = where[oid]
        return read_blob(reader, spec)
    return read


def restore_computation(readers: list[ImageReader], opts: RestoreOptions | None = None) -> list[RestoredProcess]:
    """Recreate every process of the images as descendants of the caller, stopped; release() each to run."""
    parsed = validate.check_images(readers)     # the whole metadata, before anything is created
    opts = opts or RestoreOptions()
    t0 = time.monotonic()
    metas = _load(readers, parsed)
    try:
        identity.check_processes(metas)      # never a process restored as another user (engine/identity.py)
    except IdentityError as e:
        raise RestoreError(str(e)) from None
    objects = {o["id"]: o for meta, _ in metas for o in meta.process.objects}
    read_blob = _blob_reader(metas)
    try:
        # named shared memory files as they were (before the mappings' backing files are checked)
        shmfiles.restore([o for o in objects.values() if o.get("kind") == "shmfile"], read_blob)
    except ShmFileError as e:
        raise RestoreError(str(e)) from None
    for meta, _ in metas:
        memory.check_backing_files(meta.process.regions)
        check_specials(meta.process.regions)
    if opts.same_pids:
        # before anything of ours starts a thread or a child: all of them get PIDs above the images' (helpers.py)
        park_pid_cursor(image_ids(metas), image_ids(metas))
    base = max([r.fd for meta, _ in metas for r in meta.process.fds] + [2]) + 1
    base = max(base, 10)
    factory = ObjectFactory(objects, read_blob, base)
    own_ipc = opts.same_pids if opts.ipc_namespace is None else opts.ipc_namespace
    segments = sysvshm.Segments([o for o in objects.values() if o.get("kind") in sysvshm.KINDS], factory.read_blob,
                                own_ipc)
    plans = {}
    spawner = None
    restored: list[RestoredProcess] = []
    try:
        try:
            segments.create()           # before any helper exists: they are forked into its IPC namespace
            factory.rendezvous = opts.rendezvous
            factory.prepare()             # objects made together (e.g. TCP connections between hosts)
            plans = make_plans(metas, factory, base)
        except (UnsupportedFd, SysvError, OSError) as e:
            raise RestoreError(str(e)) from None
        for plan in plans.values():
            plan.sysv = segments.ids
        spawner = Spawner(plans, opts.same_pids, base)
        try:
            mapping = spawner.spawn()
        finally:
            factory.close()          # helpers hold their own copies now
            close_plans(plans)
        for old in sorted(plans):
            plan = plans[old]
            new = mapping[old]
            rp = RestoredProcess(new, plan.meta, tids=[new])
            restored.append(rp)
            try:
                rp.stats = transform(new, plan.meta, plan.reader, plan, opts, rp.tids)
            except (OSError, ProcessGone, RuntimeError) as e:
                if isinstance(e, (RestoreError, ImageError)):
                    raise
                raise RestoreError(f"restoring pid {old} from {plan.reader.path} failed: {e}") from e
        try:
            procfiles.reopen(restored)      # /proc/PID descriptors: of the restored PIDs, once all exist
        except OSError as e:
            raise RestoreError(str(e)) from None
        segments.finish()
        try:
            fault("restore.before_release")
        except OSError as e:
            raise RestoreError(str(e)) from None
    except BaseException:
        segments.abort()
        for rp in restored:
            rp.kill()
        for plan in plans.values():
            if plan.new_pid and plan.new_pid not in {rp.pid for rp in restored}:
                try:
                    os.kill(plan.new_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        _reap_children()
        raise
    finally:
        if spawner is not None:
            spawner.close()
    total = round(time.monotonic() - t0, 6)
    for rp in restored:
        rp.stats["total_s"] = total
        rp.segments = segments if segments.ids or segments.ipc.created else None
    return restored


def _reap_children() -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG | 0x40000000)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)


def restore_process(reader: ImageReader, opts: RestoreOptions | None = None) -> RestoredProcess:
    """Restore a single-process image (see restore_computation)."""
    return restore_computation([reader], opts)[0]


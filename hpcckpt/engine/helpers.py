"""Restore helpers: the processes that become the computation's processes again.

The agent opens or creates every object the images name (files, pipes, ...) once, then forks one helper per
root process; each helper forks helpers for its own children in PID order (so parents, process groups and
sessions come back as they were), a dead child that was not reaped yet becomes a zombie again, and only then
does each helper put its descriptors in place, enter the image's cwd and umask, map its reserved area, report
"ok OLD NEW" to the agent and block. Inside our own PID namespace every helper is created at its image's PID
with clone3(set_tid) (pidfork.py), and everything else of ours gets PIDs above the images' (park_pid_cursor):
the restore never races its own threads or children for a PID/TID.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import signal
import time
from dataclasses import dataclass, field

from ..image.format import ImageReader
from ..image.records import ImageMeta, RegionRecord
from .errors import RestoreError
from .fds.eventfds import register_epoll_items
from .fds.fdtable import ObjectFactory
from .fds.locks import posix_for
from .fds.terminals.ttys import plan_session, session_terminal
from .linux import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_PRIVATE,
    PAGE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    TASK_SIZE,
    mmap,
    set_next_pid,
)
from .maps import read_maps
from .pidfork import fork_at
from .transform import RESERVE_PAGES, SCRATCH_OFF, SCRATCH_SIZE, TRAMPOLINE_CODE


@dataclass
class ProcPlan:
    """Everything one helper needs, decided in the agent before any fork."""
    meta: ImageMeta
    reader: ImageReader
    fds: list[tuple[int, int, bool]] = field(default_factory=list)   # (target fd, agent fd, cloexec)
    close: list[int] = field(default_factory=list)                   # of 0-2, those the image does not have
    map_fds: dict[str, int] = field(default_factory=dict)            # mapped file path -> agent fd
    exe_fd: int = -1
    reserve_candidates: list[int] = field(default_factory=list)
    children: list[int] = field(default_factory=list)                # live children (image PIDs)
    new_pid: int = 0
    sync_fds: tuple[int, ...] = ()
    epoll_regs: list[tuple[int, int, int, int]] = field(default_factory=list)  # (epfd, tfd, events, data)
    posix_locks: list = field(default_factory=list)                  # (fd, lock, path): taken by the process
    sysv: dict[int, tuple[int, int]] = field(default_factory=dict)   # image shmid -> (shmid now, size)
    tty: tuple[int, int, bool] = (-1, -1, False)                     # ttys.plan_session

    @property
    def pid(self) -> int:
        return self.meta.process.pid

    def helper_fds(self) -> list[int]:
        """Descriptors only the helper used, closed by injection once the process is rebuilt."""
        return sorted(set(self.map_fds.values()) | ({self.exe_fd} if self.exe_fd >= 0 else set())
                      | set(self.sync_fds))


def _intervals(ranges):
    out = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def choose_reserve(regions: list[RegionRecord], count: int = 4) -> list[int]:
    """Candidate addresses for the reserved area: gaps in both the image's and our own address space."""
    size = RESERVE_PAGES * PAGE
    guard = 16 * PAGE
    used = [(r.start, r.end) for r in regions] + [(m.start, m.end) for m in read_maps("self", with_flags=False)]
    used = _intervals([(max(0, s - guard), min(TASK_SIZE, e + guard)) for s, e in used if s < TASK_SIZE])
    gaps = []
    prev = 0x10000000
    for s, e in used + [[TASK_SIZE, TASK_SIZE]]:
        if s - prev >= size:
            gaps.append((prev, s))
        prev = max(prev, e)
    cands = [g[1] - size for g in reversed(gaps)]
    if not cands:
        raise RestoreError("no free address range for the restore trampoline")
    return [c & ~(PAGE - 1) for c in cands[:count]]


def dup_high(fd: int, base: int) -> int:
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base)
    os.close(fd)
    return new


def make_plans(metas: list[tuple[ImageMeta, ImageReader]], factory: ObjectFactory, base: int) -> dict[int, ProcPlan]:
    """One plan per live process; object fds come from the factory (created once, shared)."""
    plans: dict[int, ProcPlan] = {}
    mapped: dict[tuple[str, bool], int] = {}
    exes: dict[str, int] = {}
    pids = {m.process.pid for m, _ in metas}
    for meta, reader in metas:
        proc = meta.process
        plan = ProcPlan(meta, reader, reserve_candidates=choose_reserve(proc.regions))
        have = {r.fd for r in proc.fds}
        plan.close = [fd for fd in (0, 1, 2) if fd not in have]
        for rec in proc.fds:
            plan.fds.append((rec.fd, factory.fd_for(rec.ofd), rec.cloexec))
        for oid in {rec.ofd for rec in proc.fds}:
            if factory.objects.get(oid, {}).get("kind") == "epoll":
                epfd = min(r.fd for r in proc.fds if r.ofd == oid)
                plan.epoll_regs += [(epfd, i["tfd"], i["events"], i["data"]) for i in factory.state(oid).items
                                    if i["pid"] == proc.pid]
        for r in proc.regions:
            if r.backing == "shared-anon":
                plan.map_fds[f"shm:{r.shm}"] = factory.shm_fd(r.shm, r.offset + (r.end - r.start))
                continue
            if r.backing != "file":
                continue
            rw = any(x.path == r.path and x.perms[3] == "s" and x.perms[1] == "w" for x in proc.regions)
            if (r.path, rw) not in mapped:
                try:
                    fd = os.open(r.path, (os.O_RDWR if rw else os.O_RDONLY) | os.O_CLOEXEC)
                except OSError as e:
                    raise RestoreError(f"cannot open mapped file {r.path}: {e.strerror}") from None
                mapped[(r.path, rw)] = dup_high(fd, base)
            plan.map_fds[r.path] = mapped[(r.path, rw)]
        plan.posix_locks = posix_for(proc, factory.objects)
        plan.tty = plan_session(factory, proc)
        exe = proc.exe.removesuffix(" (deleted)")
        if exe not in exes:
            try:
                exes[exe] = dup_high(os.open(exe, os.O_RDONLY | os.O_CLOEXEC), base)
            except OSError:
                exes[exe] = -1
        plan.exe_fd = exes[exe]
        plans[proc.pid] = plan
    for plan in plans.values():
        parent = plan.meta.process.ppid
        if parent in plans:
            plans[parent].children.append(plan.pid)
    for plan in plans.values():
        plan.children.sort()
    del pids
    return plans


def close_plans(plans: dict[int, ProcPlan]) -> None:
    seen = set()
    for plan in plans.values():
        for key, fd in list(plan.map_fds.items()) + [("exe", plan.exe_fd)]:
            if key.startswith("shm:"):
                continue                      # the factory's (closed with it)
            if fd >= 0 and fd not in seen:  # noqa: SIM102
                seen.add(fd)
                try:
                    os.close(fd)
                except OSError:
                    pass


def _holder(pid: int) -> str:
    """Who holds a PID/TID of our namespace, for an error message."""
    try:
        with open(f"/proc/{pid}/status") as f:
            st = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return "a process that is gone by now"
    owner = f"thread {pid} of pid {st.get('Tgid')}" if st.get("Tgid") != str(pid) else f"pid {pid}"
    mine = " (the restarting agent's own)" if st.get("Tgid") == "1" else ""
    return f"{owner} ({st.get('Name', '?')}){mine}"


def _fork_at(pid: int, sibling: bool = False) -> int:
    try:
        return fork_at(pid, sibling)
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise RestoreError(f"PID {pid} is already taken in this PID namespace by {_holder(pid)}; cannot "
                               f"restore it with its own PID") from None
        raise RestoreError(f"cannot create process {pid} with its own PID: {e.strerror}") from None


def image_ids(metas) -> set[int]:
    """Every PID and TID the images need back: processes, their threads, their unreaped zombies."""
    ids = set()
    for meta, _ in metas:
        proc = meta.process
        ids.add(proc.pid)
        ids.update(t.tid for t in proc.threads)
        ids.update(z["pid"] for z in proc.zombies)
    return ids


def park_pid_cursor(ids: set[int], free: set[int]) -> None:
    """Move our PID namespace's allocation cursor (ns_last_pid) past every PID/TID the images need, and check
    none of them is taken. From then on whatever of ours allocates a PID while the restore runs - the threads
    that write memory into restored processes, the short-lived terminal helper, ZeroMQ's threads, later the
    image writers - gets one above them, however the scheduler runs it: the restore never races its own
    threads or children for a PID/TID (processes and threads come back with clone3 set_tid, which does not
    move the cursor).
    Allocation is cyclic up to pid_max: an image whose PIDs reach the top gets the cursor at its largest gap.
    free: those of ids that must not exist yet."""
    for pid in sorted(free):
        if os.path.exists(f"/proc/{pid}"):
            raise RestoreError(f"PID {pid} is already taken in this PID namespace by {_holder(pid)}; "
                               f"cannot restore it with its own PID")
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            pid_max = int(f.read())
    except (OSError, ValueError):
        pid_max = 1 << 22
    top = max(ids)
    start = top
    if top + 100000 >= pid_max:          # near the wrap: the widest gap between the image's ids
        edges = [300] + sorted(i for i in ids if i >= 300) + [pid_max]
        start = max(zip(edges, edges[1:]), key=lambda g: g[1] - g[0])[0]
    set_next_pid(start + 1)


class Spawner:
    """Forks the helper tree (in the agent) and collects the helpers' reports."""

    def __init__(self, plans: dict[int, ProcPlan], same_pids: bool, base: int):
        self.plans = plans
        self.same_pids = same_pids
        self.hold_r, self.hold_w = os.pipe2(os.O_CLOEXEC)
        self.info_r, self.info_w = os.pipe2(os.O_CLOEXEC)
        self.hold_r, self.info_w = dup_high(self.hold_r, base), dup_high(self.info_w, base)
        for p in plans.values():
            p.sync_fds = (self.hold_r, self.info_w)
        self.forked: list[int] = []          # agent-level children (roots)

    def spawn(self, timeout: float = 60.0) -> dict[int, int]:
        """Fork every helper; returns {image pid: new pid} once all of them are waiting."""
        roots = sorted(p for p, plan in self.plans.items() if plan.meta.process.ppid not in self.plans)
        if self.same_pids:
            self._spawn_at_own_pids(roots, timeout)
        else:
            for root in roots:
                r, w = os.pipe2(os.O_CLOEXEC)
                pid = os.fork()
                if pid == 0:
                    os.close(r)
                    _helper_main(self, root, w)
                os.close(w)
                self.forked.append(pid)
                _wait_subtree(r, timeout)
        os.close(self.info_w)
        self.info_w = -1
        mapping = self._collect(timeout)
        if self.same_pids:
            wrong = {old: new for old, new in mapping.items() if old != new}
            if wrong:
                raise RestoreError("restored processes did not get their own PIDs back (image PID -> PID now: " +
                                   ", ".join(f"{o} -> {n}" for o, n in sorted(wrong.items())) + ")")
        return mapping

    def _spawn_at_own_pids(self, roots: list[int], timeout: float) -> None:
        """Every helper is created with clone3(set_tid) at its image's PID (pidfork.py), by single-threaded
        processes only: a spawner forked from us (we may run ZeroMQ's threads) creates the root helpers as our
        children (CLONE_PARENT), and each helper its own children. The namespace's PID cursor is never moved
        back among the images' PIDs (park_pid_cursor), so nothing of ours can race a helper for its PID."""
        spawner = os.fork()
        if spawner == 0:
            code, root = 0, 0
            try:
                for root in roots:
                    r, w = os.pipe2(os.O_CLOEXEC)
                    pid = _fork_at(root, sibling=True)
                    if pid == 0:
                        os.close(r)
                        _helper_main(self, root, w)
                    os.close(w)
                    _wait_subtree(r, timeout)
            except BaseException as e:
                code = 1
                try:
                    _report(self, f"err {root} {e}")
                except OSError:
                    pass
            os._exit(code)
        while True:
            try:
                os.waitpid(spawner, 0)
                return
            except InterruptedError:
                continue
            except ChildProcessError:
                return

    def _collect(self, timeout: float) -> dict[int, int]:
        mapping: dict[int, int] = {}
        buf = b""
        deadline = time.monotonic() + timeout
        while len(mapping) < len(self.plans):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.info_r], [], [], left)[0]:
                raise RestoreError("restore helpers did not get ready in time")
            chunk = os.read(self.info_r, 65536)
            if not chunk:
                missing = sorted(set(self.plans) - set(mapping))
                raise RestoreError(f"restore helpers for {missing} died before they were ready")
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                kind, old, rest = line.decode().split(" ", 2)
                if kind == "err":
                    raise RestoreError(f"restoring pid {old}: {rest}")
                mapping[int(old)] = int(rest)
        for old_pid, new_pid in mapping.items():
            self.plans[old_pid].new_pid = new_pid
        return mapping

    def close(self) -> None:
        for fd in (self.hold_r, self.hold_w, self.info_r, self.info_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _wait_subtree(r: int, timeout: float) -> None:
    """Wait until a child helper has forked its whole subtree (it closes its end of the pipe)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            os.close(r)
            raise RestoreError("a restore helper did not finish forking its children in time")
        if not os.read(r, 4096):
            os.close(r)
            return


def _report(sp: Spawner, text: str) -> None:
    os.write(sp.info_w, (text.replace("\n", " ") + "\n").encode())


def _helper_main(sp: Spawner, old: int, subtree_w: int) -> None:
    """Runs in a forked helper whose PID is the image's (or a new one). Never returns."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        plan = sp.plans[old]
        proc = plan.meta.process
        _session_and_group(proc, old, plan.tty)
        for child in sorted(plan.children + [z["pid"] for z in proc.zombies]):
            zombie = next((z for z in proc.zombies if z["pid"] == child), None)
            r, w = os.pipe2(os.O_CLOEXEC)
            pid = _fork_at(child) if sp.same_pids else os.fork()
            if pid == 0:
                os.close(r)
                if zombie is not None:
                    _become_zombie(zombie, w)
                _helper_main(sp, child, w)
            os.close(w)
            _wait_subtree(r, 60)
        os.close(subtree_w)                  # our whole subtree exists: the parent may fork the next one
        _setup_self(sp, plan)
        _report(sp, f"ok {old} {os.getpid()}")
        while True:
            if not os.read(sp.hold_r, 1):     # blocks until the agent takes over (or goes away)
                os._exit(1)
    except BaseException as e:
        try:
            _report(sp, f"err {old} {type(e).__name__}: {e}")
        finally:
            os._exit(127)


def _session_and_group(proc, old: int, tty: tuple[int, int, bool] = (-1, -1, False)) -> None:
    # PIDs are the image's inside our namespace; group/session ids of 0 lie outside it (the launcher's)
    if proc.sid == old:
        os.setsid()
    elif proc.pgid == old:
        os.setpgid(0, 0)
    elif proc.pgid and proc.pgid != os.getpgid(0):
        try:
            os.setpgid(0, proc.pgid)
        except OSError:
            pass                             # the group's leader is gone; stay in the parent's group
    # before any child is forked: they inherit the session's controlling terminal
    session_terminal(*tty)


def _become_zombie(z: dict, w: int) -> None:
    """A child that had exited but was not reaped: exit again the same way (the parent does not wait)."""
    try:
        if z.get("sid") == z["pid"]:
            os.setsid()
        elif z.get("pgid") == z["pid"]:
            os.setpgid(0, 0)
    except OSError:
        pass
    os.close(w)
    status = z.get("status", 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 0)


def _setup_self(sp: Spawner, plan: ProcPlan) -> None:
    proc = plan.meta.process
    for target, src, cloexec in plan.fds:
        os.dup2(src, target, inheritable=not cloexec)
    for fd in plan.close:
        try:
            os.close(fd)
        except OSError:
            pass
    keep = {t for t, _, _ in plan.fds} | set(plan.helper_fds())
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    register_epoll_items(plan.epoll_regs)
    os.chdir(proc.cwd)
    os.umask(proc.umask)
    size = RESERVE_PAGES * PAGE
    for addr in plan.reserve_candidates:
        try:
            mmap(addr, size, 0, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE)
            break
        except OSError:
            continue
    else:
        raise RestoreError("no free address for the restore trampoline")
    mmap(addr, PAGE, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    ctypes.memmove(addr, TRAMPOLINE_CODE, len(TRAMPOLINE_CODE))
    mmap(addr + SCRATCH_OFF, SCRATCH_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)

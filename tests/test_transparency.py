"""Transparency (issue 16): what a program can tell about being checkpointed.

- Blocking calls: a checkpoint stops every thread the way a stop signal does, and on Linux some calls
  (epoll_wait, semop, sigtimedwait, SO_RCVTIMEO sockets...) then fail with EINTR even without a handler. The
  engine re-issues them: the program sees no EINTR, neither in the running job nor after a restart.
- MAP_NORESERVE reservations (Go, Java, sanitizers) come back as reservations, with their PROT_NONE guards.
- A descriptor open on /proc/PID/... of a job process is reopened for the restored process.
Each with a small C program, through two or more checkpoint/restart rounds, compared with a plain run.
"""
from __future__ import annotations

import random
import sys
import subprocess
import time
from pathlib import Path

import pytest

from conftest import checkpoint_and_kill, compile_c, line_count, restart_in_background, run, wait_for


@pytest.fixture
def sem_key():
    """A SysV semaphore key for one test; the set is removed afterwards (a killed job leaves it behind)."""
    key = random.randrange(0x10000000, 0x7FFFFF00)
    yield key
    for k in (key, key + 1):
        subprocess.run(["ipcrm", "-S", hex(k)], capture_output=True)


class _Plain:
    """The program run without us, alongside the checkpointed one (both mostly sleep): the reference output."""

    def __init__(self, prog: Path, out: Path, *args):
        self.out = out
        self.proc = subprocess.Popen([str(prog), str(out), *map(str, args)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def text(self) -> str:
        rc = self.proc.wait(120)
        assert rc == 0, (rc, self.out.read_text()[-500:] if self.out.exists() else "")
        return self.out.read_text()


def _rounds(launch, env, tmp_path: Path, out: Path, cmd: list, rounds: int, extra=(), live_checkpoints: int = 2,
            min_lines: int = 3, times: list | None = None) -> subprocess.CompletedProcess:
    """launch, then `rounds` times: checkpoint (after `live_checkpoints` - 1 checkpoints the running job goes on
    from) -> kill -> restart; the last restart runs to the end. Returns the last restart's result; times gets
    how long each blocking checkpoint took."""
    job = launch(*cmd, extra=extra)
    script = tmp_path / "dmtcp_restart_script.sh"
    for rnd in range(rounds):
        n = line_count(out)
        wait_for(lambda: line_count(out) >= n + min_lines, 60, f"progress in round {rnd + 1}")
        for _ in range(live_checkpoints - 1):       # the job goes on after these: EINTR would show at once
            t0 = time.monotonic()
            r = job.command("-bc")
            if times is not None:
                times.append(time.monotonic() - t0)
            assert r.returncode == 0, (r.stdout, r.stderr, out.read_text()[-300:])
            time.sleep(0.15)
        checkpoint_and_kill(job)
        assert "Interrupted" not in out.read_text()
        if rnd < rounds - 1:
            job = restart_in_background(script, env, tmp_path)
    return run(["bash", str(script), "--coord-port", "0"], env, tmp_path, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["forked", "frozen", "incremental"])
def test_blocking_calls_never_see_eintr(mode, launch, env, tmp_path, build_dir, sem_key):
    """Twelve threads, each blocked in another call (semop, epoll_wait, poll, select, read on a pipe, futex
    wait, nanosleep, clock_nanosleep, accept, recv with SO_RCVTIMEO, waitpid, sigtimedwait), checkpointed while
    running on and before each kill, through two restarts: no call ever fails with EINTR, output as a plain
    run's. Forked and frozen checkpoints, and incremental ones (write tracking arms a userfaultfd by
    injection)."""
    prog = compile_c(build_dir, "blockers", "-pthread")
    ticks = 45
    plain = _Plain(prog, tmp_path / "plain.txt", ticks, sem_key + 1)
    extra = {"forked": (), "frozen": ("--no-forked-checkpoint",), "incremental": ("--incremental",)}[mode]
    out = tmp_path / "out.txt"
    r = _rounds(launch, env, tmp_path, out, [prog, out, ticks, sem_key], rounds=2, extra=extra)
    assert r.returncode == 0, (r.stderr[-1000:], out.read_text()[-300:])
    assert out.read_text() == plain.text()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_noreserve_reservations_and_blocked_threads_three_rounds(mode, launch, env, tmp_path, build_dir, sem_key):
    """Black-box check of issue 16: a 2 TiB MAP_NORESERVE mapping with a few pages used, a 64 GiB PROT_NONE
    reservation with a read-write arena and a guard page inside, a thread in epoll_wait and one in semop:
    three checkpoint/restart rounds, no EINTR, no ENOMEM, the flags and protections as they were (the program
    checks its own smaps), output identical to a plain run; the reservation does not make the dump slow. With
    --incremental: the reservations are neither write-tracked nor hashed page by page (gigabytes of page tables
    and hashes), their few pages are stored in every generation."""
    prog = compile_c(build_dir, "noreserve", "-pthread")
    steps = 150
    plain = _Plain(prog, tmp_path / "plain.txt", steps, sem_key + 1)
    out = tmp_path / "out.txt"
    times: list[float] = []
    r = _rounds(launch, env, tmp_path, out, [prog, out, steps, sem_key], rounds=3, times=times,
                extra=("--incremental",) if mode == "incremental" else ())
    assert r.returncode == 0, (r.stderr[-1000:], out.read_text()[-300:])
    assert out.read_text() == plain.text()
    # reading the reservation's 512 Mi pagemap entries took seconds; PAGEMAP_SCAN visits only its few pages
    assert max(times) < 2.5, times
    assert sum(p.stat().st_size for p in tmp_path.glob("ckpt_*/gen*/*.dmtcp")) < 20 << 20


@pytest.mark.slow
@pytest.mark.parametrize("namespace", [True, False], ids=["own-pids", "new-pids"])
def test_proc_descriptors_follow_the_restored_process(namespace, launch, env, tmp_path, build_dir):
    """Descriptors open on /proc/self/maps (read on from the saved offset), /proc/self/status, /proc/<own
    pid>/stat, /proc/thread-self/comm of a second thread, /proc/<child>/comm of another job process and the
    /proc/self directory: after two restarts each is the restored process's (or thread's) file - also without
    our PID namespace, where every PID and TID changes."""
    prog = compile_c(build_dir, "procfd", "-pthread")
    steps = 300
    plain = _Plain(prog, tmp_path / "plain.txt", steps)
    out = tmp_path / "out.txt"
    extra = () if namespace else ("--no-pid-namespace",)
    r = _rounds(launch, env, tmp_path, out, [prog, out, steps], rounds=2, extra=extra, min_lines=10)
    assert r.returncode == 0, (r.stderr[-1000:], out.read_text()[-300:])
    assert [x for x in out.read_text().splitlines() if "BAD" in x][:3] == []
    assert out.read_text() == plain.text()


def test_abandoned_checkpoint_leaves_no_eintr(launch, env, tmp_path, build_dir, sem_key):
    """A checkpoint that fails right after the freeze (before anything is injected, fault point
    freeze.after_claim) resumes the threads untouched: the calls the freeze interrupted are restarted by the
    kernel itself, the program never sees EINTR."""
    prog = compile_c(build_dir, "blockers", "-pthread")
    ticks = 30
    plain = _Plain(prog, tmp_path / "plain.txt", ticks, sem_key + 1)
    out = tmp_path / "out.txt"
    env["HPCCKPT_FAULT"] = "freeze.after_claim:error=EIO"
    job = launch(prog, out, ticks, sem_key)
    wait_for(lambda: line_count(out) >= 3, 30, "progress")
    for _ in range(3):
        assert job.command("-bc").returncode != 0          # abandoned
        time.sleep(0.2)
    assert job.wait(60) == 0, out.read_text()[-300:]
    assert out.read_text() == plain.text()


def test_page_scan_matches_pagemap(tmp_path):
    """The PAGEMAP_SCAN walk (used for every dump) finds exactly the pages reading pagemap entries finds:
    anonymous private and shared memory, a private file mapping (all pages, and only the private copies), with
    more runs than one ioctl's vector holds (a resumed walk reports pages again; they are counted once). Only
    mappings made here are compared: other threads of the test process change theirs meanwhile."""
    import ctypes
    import mmap
    import os
    from hpcckpt.engine import maps as M
    shared = mmap.mmap(-1, 64 << 20)
    for i in range(0, 64 << 20, 3 * 4096):
        shared[i] = 1
    private = mmap.mmap(-1, 256 << 20, flags=mmap.MAP_PRIVATE)
    for i in random.Random(1).sample(range(0, 256 << 20, 4096), 20000):
        private[i] = 1
    data = tmp_path / "data"
    data.write_bytes(bytes(range(256)) * (16 << 12))            # 16 MiB
    with open(data, "r+b") as f:
        filemap = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
    for i in range(0, 16 << 20, 5 * 4096):
        filemap[i]                                               # read: a page-cache page
        if i % (15 * 4096) == 0:
            filemap[i] = 7                                       # written: a private copy
    mine = [(ctypes.addressof(ctypes.c_char.from_buffer(m)), len(m) // 4096, shared_) for m, shared_ in
            ((shared, True), (private, False), (filemap, False))]
    pm = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        for start, npages, is_shared in mine:
            for anon in (False, True):
                got = M.populated_runs(pm, start, npages, anon)
                assert got == M._pagemap_runs(pm, start, npages, anon), (hex(start), anon)
                assert got or (anon and is_shared)               # shared memory has no private copies
        assert M._scan_ok
    finally:
        os.close(pm)
        for m in (shared, private, filemap):
            m.close()


def test_proc_descriptor_of_an_outside_process_is_refused(launch, env, tmp_path):
    """A descriptor on /proc/<pid>/... of a process outside the computation (here PID 1 of the job's namespace:
    our agent) is refused at checkpoint with a message naming the process, fd and path: after a restart that
    PID would be another process. The job runs on untouched."""
    out = tmp_path / "out.txt"
    code = ("import os, sys, time\nf = open('/proc/1/status')\nfor i in range(400):\n"
            "    f.seek(0); f.read()\n    print(i, flush=True)\n    time.sleep(0.02)\n")
    job = launch(sys.executable, "-c", code, stdout=out)
    wait_for(lambda: line_count(out) >= 3, 30, "progress")
    r = job.command("-bc")
    assert r.returncode != 0
    err = r.stdout + r.stderr + "".join(p.read_text() for p in tmp_path.glob("launch.*.err"))
    assert "/proc/1/status belongs to a process outside the computation" in err, err[-2000:]
    n = line_count(out)
    wait_for(lambda: line_count(out) >= n + 3, 30, "progress after the refused checkpoint")


@pytest.mark.slow
def test_semaphore_set_comes_back(launch, env, tmp_path, build_dir, sem_key):
    """The job's SysV semaphore set is saved (values, key, semid, mode): removed after the job is killed (as on
    another host), the restart recreates it with the same semid and values; the thread blocked in semop goes
    on and the output equals a plain run's."""
    prog = compile_c(build_dir, "blockers", "-pthread")
    ticks = 30
    plain = _Plain(prog, tmp_path / "plain.txt", ticks, sem_key + 1)
    out = tmp_path / "out.txt"
    job = launch(prog, out, ticks, sem_key)
    wait_for(lambda: line_count(out) >= 3, 30, "progress")
    semid = next(int(line.split()[1]) for line in Path("/proc/sysvipc/sem").read_text().splitlines()[1:]
                 if int(line.split()[0]) & 0xFFFFFFFF == sem_key)
    checkpoint_and_kill(job)
    subprocess.run(["ipcrm", "-S", hex(sem_key)], check=True)
    r = run(["bash", str(tmp_path / "dmtcp_restart_script.sh"), "--coord-port", "0"], env, tmp_path, timeout=120)
    assert r.returncode == 0, (r.stderr[-1000:], out.read_text()[-300:])
    assert out.read_text() == plain.text()
    assert "comes back as" not in r.stderr and semid >= 0

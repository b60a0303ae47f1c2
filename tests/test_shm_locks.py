"""SysV shared memory segments and file locks across checkpoint/restart, with real programs.

SysV: two processes keep sharing their segments after a restart (each sees the other's writes), contents are
exact, shmctl(IPC_STAT) and /proc/PID/maps show real attachments with the original shmids, a segment marked
IPC_RMID stays marked, one nobody has attached comes back too; a failed restart leaves no segment behind.
Locks: flock, POSIX record and OFD locks are held again after a restart (an outside process cannot take
them), the job's own lock/unlock sequence goes on, and a lock taken meanwhile by an outsider fails the restart
with a one-line error naming the file.
"""
from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import checkpoint_and_kill, compile_c, line_count, restart_in_background, run, wait_for
import test_unprivileged

sandbox = test_unprivileged.sandbox        # fixture: a world-readable copy of hpcckpt for uid 65534

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------ SysV --

def _host_segments(keys) -> list[str]:
    """Rows of this (the test's) IPC namespace's /proc/sysvipc/shm with one of the keys."""
    rows = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return [r for r in rows if int(r.split()[0]) & 0xFFFFFFFF in keys]


@pytest.fixture
def sysv_key():
    """A key no other test uses; segments, semaphore sets and queues with it (and key+1) are removed afterwards
    (a killed job leaves them; a leftover set once looked like a later unprivileged job's, its pid reused)."""
    key = random.randrange(0x10000000, 0x7FFFFF00) & ~1
    yield key
    for row in _host_segments({key, key + 1}):
        subprocess.run(["ipcrm", "-m", row.split()[1]], capture_output=True)
    for k in (key, key + 1):
        subprocess.run(["ipcrm", "-S", hex(k)], capture_output=True)
        subprocess.run(["ipcrm", "-Q", hex(k)], capture_output=True)


def _sysv_ok(out: Path, rounds: int) -> None:
    lines = out.read_text().splitlines()
    assert lines[-1] == "done", lines[-3:]
    assert [int(x.split()[1]) for x in lines[:-1]] == list(range(1, rounds + 1))
    bad = [x for x in lines if "BAD" in x]
    assert not bad, bad[:5]


def test_sysv_shared_after_two_restarts(launch, env, tmp_path, build_dir, sysv_key):
    """Own namespaces: parent and child keep sharing three segments (one marked IPC_RMID, one not attached)
    through two checkpoint/restart rounds, with the original shmids, keys, modes, nattch and contents."""
    prog = compile_c(build_dir, "sysv")
    out = tmp_path / "out.txt"
    rounds = 400
    job = launch(prog, out, hex(sysv_key), rounds)
    wait_for(lambda: line_count(out) >= 60, 30, "progress")
    checkpoint_and_kill(job)
    script = tmp_path / "dmtcp_restart_script.sh"
    job2 = restart_in_background(script, env, tmp_path)
    n = line_count(out)
    wait_for(lambda: line_count(out) >= n + 60, 60, "progress after the first restart")
    checkpoint_and_kill(job2)
    r = run(["bash", str(script), "--coord-port", "0"], env, tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    _sysv_ok(out, rounds)


def test_sysv_without_namespaces_same_shmids(launch, env, tmp_path, build_dir, sysv_key):
    """Without our own namespaces the segments come back in the current IPC namespace: the killed original's
    leftovers (same key, unattached) are replaced, shm_next_id gives the original shmids back, and the
    program's own checks pass; when it ends its segments are gone."""
    prog = compile_c(build_dir, "sysv")
    out = tmp_path / "out.txt"
    rounds = 250
    extra = ("--no-pid-namespace",)
    job = launch(prog, out, hex(sysv_key), rounds, extra=extra)
    wait_for(lambda: line_count(out) >= 60, 30, "progress")
    before = {int(r.split()[1]) for r in _host_segments({sysv_key, sysv_key + 1})}
    assert len(before) == 2
    checkpoint_and_kill(job)
    r = run(["bash", str(tmp_path / "dmtcp_restart_script.sh"), "--coord-port", "0", *extra], env, tmp_path,
            timeout=120)
    assert r.returncode == 0, r.stderr
    _sysv_ok(out, rounds)
    assert _host_segments({sysv_key, sysv_key + 1}) == []      # removed by the program itself at the end


def test_sysv_failed_restart_leaves_no_segment(launch, env, tmp_path, build_dir, sysv_key):
    """A restart failing at the last moment removes every segment it created (here in the current IPC
    namespace, where nothing else would clean them up)."""
    prog = compile_c(build_dir, "sysv")
    out = tmp_path / "out.txt"
    extra = ("--no-pid-namespace",)
    job = launch(prog, out, hex(sysv_key), 100000, extra=extra)
    wait_for(lambda: line_count(out) >= 30, 30, "progress")
    checkpoint_and_kill(job)
    bad_env = dict(env, HPCCKPT_FAULT="restore.before_release:error=EIO")
    r = run(["bash", str(tmp_path / "dmtcp_restart_script.sh"), "--coord-port", "0", *extra], bad_env, tmp_path,
            timeout=120)
    assert r.returncode != 0
    assert "injected fault" in r.stderr and "Traceback" not in r.stderr
    assert _host_segments({sysv_key, sysv_key + 1}) == []
    n = line_count(out)
    time.sleep(0.5)
    assert line_count(out) == n                                # nothing half-restored runs on


# ----------------------------------------------------------------------------------------------- locks --

F_OFD_SETLK = 37
_FLOCK = struct.Struct("hhqqi4x")


def _try(fd: int, cmd: int, write: bool, start: int, length: int) -> bool:
    """Take a record lock (and drop it again); False if someone else holds a conflicting one."""
    try:
        fcntl.fcntl(fd, cmd, _FLOCK.pack(fcntl.F_WRLCK if write else fcntl.F_RDLCK, os.SEEK_SET, start, length, 0))
    except OSError as e:
        assert e.errno in (errno.EAGAIN, errno.EACCES), e
        return False
    fcntl.fcntl(fd, cmd, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, start, length, 0))
    return True


def _try_flock(path: Path, mode: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _assert_job_holds_its_locks(d: Path) -> None:
    """From outside the job (this process, its own descriptions): the job's locks are really held."""
    assert not _try_flock(d / "a.lock", fcntl.LOCK_EX)
    assert not _try_flock(d / "a.lock", fcntl.LOCK_SH)
    assert not _try_flock(d, fcntl.LOCK_EX)              # the directory: shared lock held
    assert _try_flock(d, fcntl.LOCK_SH)
    fd = os.open(d / "data", os.O_RDWR)
    try:
        assert not _try(fd, fcntl.F_SETLK, True, 0, 100)          # POSIX write lock 0-99
        assert not _try(fd, fcntl.F_SETLK, False, 50, 10)
        assert not _try(fd, fcntl.F_SETLK, True, 200, 100)        # POSIX read lock 200-999 ...
        assert _try(fd, fcntl.F_SETLK, False, 250, 10)            # ... shared with readers
        assert _try(fd, fcntl.F_SETLK, True, 100, 100)            # nothing held on 100-199
        assert not _try(fd, F_OFD_SETLK, True, 1000, 100)         # OFD write lock 1000-1099
        assert not _try(fd, F_OFD_SETLK, False, 1099, 1)
        assert _try(fd, F_OFD_SETLK, True, 1100, 100)
    finally:
        os.close(fd)
    fd = os.open(d / "c.lock", os.O_RDWR)
    try:
        assert not _try(fd, fcntl.F_SETLK, True, 0, 10)           # the child's own POSIX lock
        assert _try(fd, fcntl.F_SETLK, True, 10, 10)
    finally:
        os.close(fd)


def _locks_ok(out: Path, rounds: int) -> None:
    lines = out.read_text().splitlines()
    assert lines[-1] == "done", lines[-3:]
    assert [int(x.split()[1]) for x in lines[:-1]] == list(range(1, rounds + 1))
    bad = [x for x in lines if "BAD" in x]
    assert not bad, bad[:5]


@pytest.fixture(scope="session")
def locks_prog(build_dir):
    return compile_c(build_dir, "locks")


def test_locks_held_after_restart(launch, env, tmp_path, locks_prog):
    """flock (on a file and a directory), POSIX read/write ranges of two processes and an OFD lock are held
    by the restored processes themselves: outsiders are refused, the job's own F_GETLK names the right owner,
    and its lock/unlock sequence goes on; twice (the restored job is checkpointed again)."""
    d = tmp_path / "locks"
    d.mkdir()
    out = tmp_path / "out.txt"
    rounds = 600
    job = launch(locks_prog, out, d, rounds)
    wait_for(lambda: line_count(out) >= 30, 30, "progress")
    _assert_job_holds_its_locks(d)
    checkpoint_and_kill(job)
    assert _try_flock(d / "a.lock", fcntl.LOCK_EX)       # the killed job's locks are gone
    script = tmp_path / "dmtcp_restart_script.sh"
    job2 = restart_in_background(script, env, tmp_path)
    n = line_count(out)
    wait_for(lambda: line_count(out) >= n + 30, 60, "progress after the restart")
    _assert_job_holds_its_locks(d)
    checkpoint_and_kill(job2)
    job3 = restart_in_background(script, env, tmp_path)
    n = line_count(out)
    wait_for(lambda: line_count(out) >= n + 30, 60, "progress after the second restart")
    _assert_job_holds_its_locks(d)
    assert job3.wait(120) == 0
    _locks_ok(out, rounds)


@pytest.mark.parametrize("conflict", ["flock", "posix", "ofd"])
def test_lock_taken_by_an_outsider_fails_the_restart(conflict, launch, env, tmp_path, locks_prog):
    """A lock of the job that someone outside holds at restart time: the restart fails with one line naming
    the file, nothing of the job runs; once the outsider lets go, the restart works."""
    d = tmp_path / "locks"
    d.mkdir()
    out = tmp_path / "out.txt"
    job = launch(locks_prog, out, d, 300)
    wait_for(lambda: line_count(out) >= 20, 30, "progress")
    checkpoint_and_kill(job)
    path = d / ("a.lock" if conflict == "flock" else "data")
    fd = os.open(path, os.O_RDWR)
    if conflict == "flock":
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    elif conflict == "posix":
        fcntl.fcntl(fd, fcntl.F_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 50, 10, 0))
    else:
        fcntl.fcntl(fd, F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 1010, 1, 0))
    script = tmp_path / "dmtcp_restart_script.sh"
    try:
        n = line_count(out)
        r = run(["bash", str(script), "--coord-port", "0"], env, tmp_path, timeout=120)
        assert r.returncode != 0
        errors = [x for x in r.stderr.splitlines() if "error" in x]
        assert len(errors) == 1 and str(path) in errors[0] and "outside the job" in errors[0], r.stderr
        assert "Traceback" not in r.stderr
        time.sleep(0.3)
        assert line_count(out) == n
    finally:
        os.close(fd)
    r = run(["bash", str(script), "--coord-port", "0"], env, tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    _locks_ok(out, 300)


def test_sysv_as_unprivileged_user(sandbox,  build_dir, sysv_key):
    """As an ordinary user the restarted job gets an IPC namespace of its own in its user namespace, where
    shm_next_id is writable: the program finds its segments under their original shmids."""
    from test_unprivileged import _cycle, _run
    prog = compile_c(build_dir, "sysv")
    local = sandbox / "bin" / "sysv"
    shutil.copy(prog, local)
    work = sandbox / "work"
    for f in work.glob("ckpt_*"):
        shutil.rmtree(f)
    out = work / "sysv.txt"
    _cycle(sandbox, [str(local), str(out), hex(sysv_key), "200"], out, 40)
    r = _run(["bash", str(work / "dmtcp_restart_script.sh"), "--coord-port", "0"], sandbox, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "new ids" not in r.stderr and "IPC namespace of its own" in r.stderr
    _sysv_ok(out, 200)

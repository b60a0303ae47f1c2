"""Which SysV semaphore sets and message queues a checkpoint takes as the job's (engine/shm/sysvipc.py _member).
A set last used by another user's process whose pid one of the job's processes has since been given is not the
job's: taking it made a checkpoint fail on a set the job cannot read (seen in the suite: "cannot read SysV
semaphore set ...: Permission denied" for an unprivileged job, the set a leftover of a root job)."""
from __future__ import annotations

import os

from hpcckpt.engine.shm.sysvipc import _member, _start_times

T = 1_800_000_000
ME = os.geteuid()


def test_a_pid_of_ours_counts_only_if_that_process_ran_at_the_last_operation():
    assert _member([(4242, T)], {4242: T - 30}, uid=ME, ctime=T - 60, since=T - 30, blocked=False)
    # the pid was reused: our process started after another's last semop, then that one exited
    assert not _member([(4242, T)], {4242: T + 30}, uid=0, ctime=T - 60, since=T + 30, blocked=False)


def test_a_set_no_one_used_is_ours_if_we_made_it_after_the_job_started():
    assert _member([(0, 0)], {}, uid=ME, ctime=T + 5, since=T, blocked=False)
    assert not _member([(0, 0)], {}, uid=ME, ctime=T - 100, since=T, blocked=False)
    assert not _member([(0, 0)], {}, uid=ME + 1, ctime=T + 5, since=T, blocked=False)


def test_a_set_a_job_thread_is_blocked_on_is_ours_whatever_its_pids():
    assert _member([(999999, T)], {}, uid=0, ctime=T, since=T, blocked=True)


def test_start_times_of_live_processes_only():
    starts = _start_times([os.getpid(), 2 ** 22 + 12345])
    assert list(starts) == [os.getpid()]
    assert abs(starts[os.getpid()] - __import__("time").time()) < 24 * 3600

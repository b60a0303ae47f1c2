"""A checkpoint after which the computation stops writes its images frozen (issue 20, MPI floor): `-kc` and the
batch driver's request (`bcheckpoint` with "frozen": true) have the agents write while the processes are stopped,
as `--no-forked-checkpoint` does, for that round only; a plain `-bc` stays forked. The evidence is the agents' own
count of snapshot forks (their checkpoint stats), which the coordinator journals with the round."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import line_count, run, wait_for

from hpcckpt.image import journal


def checkpoints(ckptdir: Path) -> list[dict]:
    lines = Path(journal.path_in(str(ckptdir))).read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == "checkpoint"]


def frozen_bcheckpoint(job) -> dict:
    """The request the batch driver sends (sched/computation.py), through the same client call."""
    code = ("import json, sys; from hpcckpt.coordinator.client import command; "
            "print(json.dumps(command('127.0.0.1', int(sys.argv[1]), 'bcheckpoint', timeout=60, frozen=True)))")
    r = run([sys.executable, "-c", code, str(job.port)], job.env, job.workdir, check=True)
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def test_kc_and_the_driver_s_request_write_frozen_and_bc_stays_forked(launch, counter, tmp_path):
    out = tmp_path / "counter.out"
    job = launch(counter, out, 16, 100000, 5000)
    wait_for(lambda: line_count(out) > 5, 20, "the counter's first steps")

    job.command("-bc", check=True)
    forked = checkpoints(tmp_path)[-1]
    assert forked["ok"] and forked["written"] == "forked" and forked["snapshots"] == 1, forked

    reply = frozen_bcheckpoint(job)
    assert reply["ok"] and reply["written"] == "frozen" and reply["snapshots"] == 0, reply
    frozen = checkpoints(tmp_path)[-1]
    assert frozen["ok"] and frozen["written"] == "frozen" and frozen["snapshots"] == 0, frozen
    # frozen for the write only: the program runs on after it
    after = line_count(out)
    wait_for(lambda: line_count(out) > after + 5, 20, "the counter's steps after a frozen checkpoint")
    assert job.proc.poll() is None

    r = job.command("-kc")
    assert r.returncode == 0, r.stderr
    job.wait(30)
    killed = checkpoints(tmp_path)[-1]
    assert killed["ok"] and killed["written"] == "frozen" and killed["snapshots"] == 0, killed
    assert [e["generation"] for e in checkpoints(tmp_path)] == [1, 2, 3]
    err = (tmp_path / "launch.0.err").read_text()
    assert err.count("writing frozen: the computation stops after this checkpoint") == 2, err[-3000:]


def test_a_frozen_field_that_is_not_a_boolean_is_refused(launch, counter, tmp_path):
    out = tmp_path / "counter.out"
    job = launch(counter, out, 1, 100000, 5000)
    code = ("import json, sys; from hpcckpt.coordinator.client import command; "
            "print(json.dumps(command('127.0.0.1', int(sys.argv[1]), 'bcheckpoint', timeout=30, frozen='yes')))")
    r = subprocess.run([sys.executable, "-c", code, str(job.port)], env=job.env, cwd=job.workdir,
                       capture_output=True, text=True, timeout=60)
    assert "bad frozen 'yes': true or false" in r.stdout + r.stderr, (r.stdout, r.stderr)

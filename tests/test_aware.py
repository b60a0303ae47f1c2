"""The program API (hpcckpt.aware, docs/aware.md) with real programs: a Python program and a C program ask for a
checkpoint themselves and get "checkpointed"; killed and restarted with `dmtcp_restart --from`, the same call
returns "restarted" (after the program's restart hook ran); hooks run at pre_checkpoint and resume; a
checkpoint asked for from outside waits for a delayed_checkpoints() block; outside hpcckpt the API says so."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PROGRAMS, REPO, run, wait_for

pytestmark = pytest.mark.slow


def _lines(p: Path) -> list[str]:
    try:
        return p.read_text().splitlines()
    except FileNotFoundError:
        return []


def _restart_from(env, tmp_path: Path) -> subprocess.CompletedProcess:
    return run(["dmtcp_restart", "-p", "0", "--ckptdir", str(tmp_path), "--from", str(tmp_path)], env, tmp_path,
               timeout=120)


def test_python_program_checkpoints_itself_and_learns_it_was_restarted(launch, env, tmp_path):
    out = tmp_path / "out.txt"
    prog = [sys.executable, str(PROGRAMS / "awareprog.py"), str(out), "40", "10", "60"]
    plain = subprocess.run([*prog[:2], str(tmp_path / "plain.txt"), *prog[3:]], env={**env, "PYTHONPATH": str(REPO)},
                           timeout=60)
    assert plain.returncode == 0 and _lines(tmp_path / "plain.txt") == ["enabled False", "checkpoint -> NotEnabled"]

    job = launch(*prog)
    wait_for(lambda: "checkpoint -> checkpointed" in _lines(out), 60, "the program's own checkpoint")
    wait_for(lambda: "hook resume" in _lines(out), 10, "the resume hook")
    got = _lines(out)
    assert got[:2] == ["enabled True", "status computation True restarted False"]
    assert got.index("hook pre_checkpoint") < got.index("checkpoint -> checkpointed")
    job.command("-k", check=True)
    job.wait(30)

    r = _restart_from(env, tmp_path)
    assert r.returncode == 0, r.stderr
    got = _lines(out)
    # the file was cut back to its size at the checkpoint: what followed the checkpoint in the killed run is gone
    assert "checkpoint -> checkpointed" not in got and "hook resume" not in got
    i = got.index("checkpoint -> restarted")
    assert got[i - 1] == "hook restart"                      # the hook ran before the call returned
    assert got[-1] == "done" and [ln for ln in got if ln.startswith("step")] == [f"step {n}" for n in range(40)]


def test_a_checkpoint_waits_for_delayed_checkpoints(launch, env, tmp_path):
    out = tmp_path / "out.txt"
    job = launch(sys.executable, PROGRAMS / "awareprog.py", out, "30", "2", "0")
    wait_for(lambda: any(ln.startswith("critical enter") for ln in _lines(out)), 60, "the critical section")
    r = job.command("-bc")
    done = time.time()
    assert r.returncode == 0, r.stderr
    leave = next(float(ln.split()[2]) for ln in _lines(out) if ln.startswith("critical leave"))
    assert done >= leave, "the checkpoint froze the process inside delayed_checkpoints()"
    assert job.wait(60) == 0


def test_c_program_api(launch, env, tmp_path, build_dir):
    libdir = tmp_path / "lib"
    subprocess.run([sys.executable, "-m", "hpcckpt.aware.build", str(libdir)], check=True, env=env,
                   capture_output=True)
    exe = build_dir / "awarec"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(PROGRAMS / "awarec.c"), f"-I{libdir}", f"-L{libdir}",
                    "-lhpcckpt_aware", f"-Wl,-rpath,{libdir}"], check=True)
    subprocess.run([str(exe), str(tmp_path / "plain.txt"), "20", "5", "60"], check=True, timeout=30)
    assert _lines(tmp_path / "plain.txt") == ["enabled 0", "checkpoint -> 0"]

    out = tmp_path / "out.txt"
    job = launch(exe, out, "30", "5", "60")
    wait_for(lambda: "checkpoint -> checkpointed" in _lines(out), 60, "the C program's own checkpoint")
    job.command("-k", check=True)
    job.wait(30)
    r = _restart_from(env, tmp_path)
    assert r.returncode == 0, r.stderr
    got = _lines(out)
    assert "checkpoint -> restarted" in got and "checkpoint -> checkpointed" not in got
    assert got[-1] == "done" and not any("failed" in ln for ln in got)


@pytest.mark.mpi
def test_mpi_ranks_checkpoint_collectively(launch, env, tmp_path):
    """Every rank calls aware.mpi.checkpoint(comm): one checkpoint of the whole job; all ranks hear
    "checkpointed", and after a restart from it all hear "restarted"."""
    from conftest import BIN
    if not (BIN / "mpiexec").exists():
        pytest.skip("needs the PyPI mpich wheel")
    pytest.importorskip("mpi4py")
    prefix = tmp_path / "out"
    job = launch(BIN / "mpiexec", "-n", "2", sys.executable, PROGRAMS / "awarempi.py", prefix, "30", "8", "60")
    ranks = [Path(f"{prefix}.{r}") for r in range(2)]
    wait_for(lambda: all("checkpoint -> checkpointed" in _lines(p) for p in ranks), 90, "both ranks' checkpoint")
    assert len(list(tmp_path.glob("ckpt_*/gen*.json"))) == 1
    job.command("-k", check=True)
    job.wait(30)
    r = _restart_from(env, tmp_path)
    assert r.returncode == 0, r.stderr
    for p in ranks:
        got = _lines(p)
        assert "checkpoint -> restarted" in got and "checkpoint -> checkpointed" not in got, got
        assert got[-1] == "done" and sum(ln.startswith("step") for ln in got) == 30

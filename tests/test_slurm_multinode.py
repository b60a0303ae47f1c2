"""Slurm over several real nodes (issue 7): each slurmd runs inside a simulated host of tests/hosts.py (its own
network namespace and host name), slurmctld in the root namespace (slurm/local-cluster.sh up --hosts). A
two-node job, a TCP server on the batch node and its client started on the other node with srun, checkpoints
before its wall time and requeues; the client's node is drained meanwhile, so the rerun gets another pair of
nodes: the driver maps the checkpoint's nodes to the new ones and the client's part restarts on the new node.

Also, without any cluster: the node mapping (sched/nodes.py) and how each scheduler starts a command on
another node of the job (remote_command)."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, run, wait_for

PINGPONG = REPO / "tests" / "programs" / "pingpong.py"
LOCAL_CLUSTER = REPO / "slurm" / "local-cluster.sh"
N = 200          # the client's lines: ~10 s of work, more than one run (the deadline comes ~10 s into each)


# ------------------------------------------------------------------------------------------ no cluster --

def test_node_mapping_keeps_the_nodes_it_can_and_moves_the_rest_in_order():
    from hpcckpt.sched import nodes
    old = nodes.ordered_hosts(["b", "a", "b", "c"], ["a", "b", "c"])
    assert old == ["a", "b", "c"]
    assert nodes.plan(old, ["a", "d", "c"]) == {"a": "a", "b": "d", "c": "c"}
    assert nodes.plan(old, ["e", "d", "f"]) == {"a": "e", "b": "d", "c": "f"}
    # short names match full ones; this machine's host stays here whatever its node is called
    assert nodes.plan(["n1.cluster", "n2"], ["n2.cluster", "n9"]) == {"n1.cluster": "n9", "n2": "n2.cluster"}
    assert nodes.plan(["vm"], ["n1"], local_host="vm", here_node="n1") == {"vm": "vm"}
    assert nodes.plan(["a", "b"], ["x", "y"], local_host="b", here_node="y") == {"a": "x", "b": "b"}
    # hosts outside the recorded allocation come last, in the table's order
    assert nodes.ordered_hosts(["z", "b", "y"], ["b"]) == ["b", "z", "y"]
    with pytest.raises(nodes.NodeError, match=r"ran on 3 node\(s\).*this run has 2.*gather: true"):
        nodes.plan(old, ["a", "x"])
    assert nodes.plan(old, ["a", "x"], gather=True) == {"a": "a", "b": "x", "c": "a"}


def test_a_rerun_on_too_few_nodes_stops_with_one_clear_line(tmp_path, monkeypatch):
    import logging
    from types import SimpleNamespace

    from hpcckpt.sched.base import Requeued, Scheduler
    from hpcckpt.sched.config import JobConfig
    from hpcckpt.sched.driver import JobDriver

    class OneNode(Scheduler):
        detect = classmethod(lambda cls, env: True)
        job_id = lambda self: "9"                    # noqa: E731
        run_count = lambda self: 1                   # noqa: E731
        end_time = lambda self: None                 # noqa: E731
        requeue = lambda self: Requeued(None)        # noqa: E731
        submit = lambda self, *a: "9"                # noqa: E731
        node_list = lambda self: ["n1"]              # noqa: E731
    monkeypatch.setenv("HPCCKPT_RUNDIR", str(tmp_path / "run"))      # the driver sets it for its children
    driver = JobDriver(OneNode({}), JobConfig(ckptdir=str(tmp_path)), ["true"])
    checkpoint = SimpleNamespace(images=[SimpleNamespace(host="a"), SimpleNamespace(host="b")], generation=1,
                                 created=0.0, computation="c")
    monkeypatch.setattr(driver, "_latest", lambda: checkpoint)
    before = list(logging.getLogger("hpcckpt").handlers)
    try:
        assert driver.run() == 99
    finally:
        for h in set(logging.getLogger("hpcckpt").handlers) - set(before):
            logging.getLogger("hpcckpt").removeHandler(h)
            h.close()
    errors = [ln for ln in (tmp_path / "hpcckpt-job.log").read_text().splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "cannot restart on this allocation: the checkpoint ran on 2 node(s) (a, b) but " \
        "this run has 1 (n1)" in errors[0], errors
    assert not (tmp_path / ".run" / "coord.port").exists()          # nothing was started


def test_each_scheduler_starts_a_command_on_another_node_its_own_way(tmp_path):
    from hpcckpt.sched.registry import remote_launcher
    argv = ["/opt/py/bin/python", "-m", "hpcckpt.cli.main", "restart", "--join", "/ck/a b.dmtcp"]
    slurm = remote_launcher(None, {"SLURM_JOB_ID": "7"})
    assert slurm.remote_command("n2", argv) == ["srun", "--overlap", "-N", "1", "-n", "1", "-w", "n2", "--input",
                                                "0", *argv]
    pbs = remote_launcher(None, {"PBS_JOBID": "3.srv", "PBS_EXEC": "/opt/pbs"})
    assert pbs.remote_command("n2", argv) == ["/opt/pbs/bin/pbs_tmrsh", "n2", *argv] and not pbs.remote_stdin
    sge = remote_launcher(None, {"JOB_ID": "5", "SGE_ROOT": "/sge"})
    assert sge.remote_command("n2", argv) == ["qrsh", "-inherit", "n2", *argv] and sge.remote_stdin
    ssh = remote_launcher(None, {})
    assert ssh.remote_command("n2", argv) == ["ssh", "n2", "/opt/py/bin/python -m hpcckpt.cli.main restart --join "
                                                           "'/ck/a b.dmtcp'"]
    assert remote_launcher("srun", {}).name == "slurm"
    # the nodes of the allocation, in its order, each once
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n3\nn3\nn1\nn2\n")
    assert remote_launcher("pbs", {"PBS_NODEFILE": str(nodefile)}).node_list() == ["n3", "n1", "n2"]
    nodefile.write_text("n3 2 all.q@n3 UNDEFINED\nn1 1 all.q@n1 UNDEFINED\n")
    assert remote_launcher("sge", {"PE_HOSTFILE": str(nodefile)}).node_list() == ["n3", "n1"]


def test_a_launcher_without_standard_input_gets_the_secret_from_a_file(tmp_path, monkeypatch):
    """pbs_tmrsh does not forward standard input: the secret goes through a 0600 file in the checkpoint
    directory, made the remote command's standard input."""
    from hpcckpt.cli import multihost
    out = tmp_path / "got"
    fake_tmrsh = tmp_path / "pbs_tmrsh"
    fake_tmrsh.write_text('#!/bin/sh\nshift\nexec "$@" </dev/null\n')          # runs the command here, no stdin
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/bin/sh\ncat >{out}\n')                       # the "restart": keeps its stdin
    for f in (fake_tmrsh, fake_python):
        f.chmod(0o755)
    monkeypatch.setenv("HPCCKPT_PBS_TMRSH", str(fake_tmrsh))
    monkeypatch.setattr(multihost, "is_local", lambda host: False)
    monkeypatch.setattr(multihost, "address_towards", lambda host: "10.0.0.1")
    monkeypatch.setattr(sys, "executable", str(fake_python))
    p = multihost.start_remote("n2", ["img"], 4242, b"\x01\x02", str(tmp_path), "pbs", [])
    assert p.wait(10) == 0
    assert out.read_text() == "0102\n"
    assert (tmp_path / ".run" / "restart-4242.secret").stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------------------------------------------- the cluster --

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """Three simulated hosts, a slurmd in each, slurmctld and munged here; yields (hosts, SLURM_CONF env)."""
    if os.geteuid() != 0:
        pytest.skip("the simulated hosts and the local Slurm cluster need root")
    from hosts import Hosts
    # munged wants every directory on its socket's path searchable by all: not under pytest's 0700 tmp dirs
    state = Path(tempfile.mkdtemp(prefix="hpcckpt-slurm-mn."))
    state.chmod(0o755)
    env = {**os.environ, "HPCCKPT_SLURM_DIR": str(state), "HPCCKPT_SLURM_CTLD_PORT": str(_free_port())}
    with Hosts(n=3, subnet=None, ssh=False) as hs:
        try:
            hosts_file = state / "hosts"
            hosts_file.write_text("".join(f"{h.name} {h.ip} {' '.join(h.nsenter('/'))}\n" for h in hs))
            r = subprocess.run([str(LOCAL_CLUSTER), "up", "--hosts", str(hosts_file), "--ctld-addr", hs.root_ip],
                               env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr
            yield hs, {"SLURM_CONF": re.search(r"SLURM_CONF=(\S+)", r.stdout).group(1)}
        finally:
            subprocess.run([str(LOCAL_CLUSTER), "down"], env=env, capture_output=True, timeout=120)
            shutil.rmtree(state, ignore_errors=True)


def _show(job: str, env: dict) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\S+?)=(\S*)", out))


def _hostnames(nodelist: str, env: dict) -> list[str]:
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


def _drain_and_finish(job: str, peer: str, e: dict, d: Path, timeout: float) -> tuple[dict, str]:
    """Drain `peer` (its job goes on until the requeue, then no job lands there), wait for the job to end,
    resume the node; the job's final info and log, checked to be a completed requeued job."""
    subprocess.run(["scontrol", "update", f"nodename={peer}", "state=drain", "reason=hpcckpt-test"], env=e,
                   check=True)
    try:
        wait_for(lambda: _show(job, e).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
                 timeout, f"job {job} to end", interval=0.5)
    finally:
        subprocess.run(["scontrol", "update", f"nodename={peer}", "state=resume"], env=e)
    info = _show(job, e)
    log = (d / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, log
    assert "script done 0" in log, log
    return info, log


def _answers(path: Path) -> list[tuple[int, str]]:
    text = path.read_text() if path.exists() else ""
    return [(int(m[1]), m[2]) for m in re.finditer(r"^ok (\d+) (\S+)$", text, re.M)]


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.multihost
def test_two_node_job_is_requeued_and_restarted_on_the_new_allocation_s_nodes(cluster, env, tmp_path):
    hs, slurm = cluster
    e = dict(env, **slurm)
    e.pop("HPCCKPT_RUNDIR", None)
    d = tmp_path
    client = d / "client.out"
    (d / "job.sh").write_text(f"""#!/bin/bash
#SBATCH -J hpcckpt-2nodes
#SBATCH -o {d}/slurm-%j.out
echo "run ${{SLURM_RESTART_COUNT:-0}} starts on $(hostname)"
{sys.executable} {PINGPONG} server {d}/server.port &
srun -N 1 -n 1 --relative=1 {sys.executable} {PINGPONG} client $(hostname) {d}/server.port {N} > {client}
rc=$?
wait
echo "script done $rc"
""")
    (d / "job.sh").chmod(0o755)
    (d / "job.yaml").write_text("lead: 50\nmin_lead: 10\n")         # --time=1: checkpoint ~10 s into each run
    r = run(["hpcckpt", "sbatch", "--config", str(d / "job.yaml"), "-N", "2", "--time=1", str(d / "job.sh")], e, d)
    assert r.returncode == 0, r.stderr
    job = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)

    # Run 0: the batch script on one node, the client on the other one.
    wait_for(lambda: len(_answers(client)) >= 10, 60, "the client's first answers", interval=0.2)
    info = _show(job, e)
    first = _hostnames(info["NodeList"], e)
    batch, peer = info["BatchHost"], _answers(client)[0][1]
    assert len(first) == 2 and set(first) == {batch, peer}, (first, batch, peer)
    spare = next(h.name for h in hs if h.name not in first)
    # The client's node leaves: the rerun gets the spare node.
    info, log = _drain_and_finish(job, peer, e, d, 150)
    assert "wall-time deadline" in log, log
    assert sorted(_hostnames(info["NodeList"], e)) == sorted([batch, spare]), log
    assert f"{peer} -> {spare}" in log, log
    # Every answer exactly once, in order; the client ran on the drained node, then on the new one.
    answers = _answers(client)
    assert [i for i, _ in answers] == list(range(1, N + 1)), client.read_text()[-500:]
    assert client.read_text().rstrip().endswith("done")
    hosts_seen = [h for _, h in answers]
    moved = hosts_seen.index(spare)
    assert 10 <= moved < N and set(hosts_seen[:moved]) == {peer} and set(hosts_seen[moved:]) == {spare}


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.multihost
@pytest.mark.mpi
def test_two_node_mpi_job_is_requeued_and_restarted(cluster, env, tmp_path, build_dir):
    """`mpiexec -n 2 -ppn 1` (the mpich wheel's Hydra, which starts its proxies with srun, i.e. our shim) in a
    two-node allocation: checkpointed before the wall time, requeued, restarted with rank 1 on the new
    allocation's other node (its old one drained); output equals a plain run's."""
    from conftest import BIN, build_mpiring
    if not (BIN / "mpicc").exists():
        pytest.skip("needs the PyPI wheels mpich and mpi4py in this venv")
    hs, slurm = cluster
    e = dict(env, **slurm)
    e.pop("HPCCKPT_RUNDIR", None)
    d = tmp_path
    exe = build_mpiring(build_dir)
    steps = 700
    subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(exe), str(d / "plain.txt"), str(steps), "0"], env=env,
                   cwd=d, check=True, timeout=60)
    (d / "job.sh").write_text(f"""#!/bin/bash
#SBATCH -J hpcckpt-mpi2
#SBATCH -o {d}/slurm-%j.out
echo "run ${{SLURM_RESTART_COUNT:-0}} starts on $(hostname)"
{BIN}/mpiexec -n 2 -ppn 1 {exe} {d}/out.txt {steps} 20
echo "script done $?"
""")
    (d / "job.sh").chmod(0o755)
    (d / "job.yaml").write_text("lead: 50\nmin_lead: 10\n")
    r = run(["hpcckpt", "sbatch", "--config", str(d / "job.yaml"), "-N", "2", "--time=1", str(d / "job.sh")], e, d)
    assert r.returncode == 0, r.stderr
    job = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)
    wait_for(lambda: (d / "out.txt.hosts").exists() and (d / "out.txt.hosts").read_text().count("\n") == 2, 60,
             "both ranks started", interval=0.2)
    ranks_on = [ln.split()[2] for ln in (d / "out.txt.hosts").read_text().splitlines()]
    assert len(set(ranks_on)) == 2 and set(ranks_on) <= set(hs.names), ranks_on
    batch = _show(job, e)["BatchHost"]
    peer = next(h for h in ranks_on if h != batch)
    spare = next(h.name for h in hs if h.name not in ranks_on)
    # rank 1's node leaves: the rerun gets the spare node, where rank 1 (and its Hydra proxy) restart
    info, log = _drain_and_finish(job, peer, e, d, 180)
    assert f"{peer} -> {spare}" in log, log
    assert sorted(_hostnames(info["NodeList"], e)) == sorted([batch, spare]), log
    assert (d / "out.txt").read_text() == (d / "plain.txt").read_text()

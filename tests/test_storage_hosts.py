"""Multi-level storage across simulated hosts (tests/hosts.py; docs/storage.md): each host has its own local
directory, the checkpoint directory is shared. A host lost after its images were written locally (and copied to
its partner) but before the drain reached the shared directory: the computation restarts, on the surviving
host, from the partner's copy."""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from conftest import run, wait_for
from hosts import Hosts
from test_multihost import assert_finished_on, restart_script, start

from hpcckpt.image import levels, store

pytestmark = [pytest.mark.slow, pytest.mark.multihost,
              pytest.mark.skipif(os.geteuid() != 0, reason="the multi-host harness needs root")]

hosts2 = Hosts.fixture(n=2, scope="module", subnet=None)


@pytest.fixture
def env(env, hosts2, tmp_path):
    env = hosts2.ssh_env(env)
    env["HPCCKPT_LOCAL_DIR"] = str(tmp_path / "local-{host}")
    env["HPCCKPT_PARTNER"] = "1"
    env["HPCCKPT_DRAIN_RATE"] = "16K"       # the drain to the shared level is far from done when the host goes
    return env


def partner_copies(local: Path, comp: str, gen: int) -> list[Path]:
    return sorted(Path(store.generation_dir(levels.partner_root(str(local)), comp, gen)).glob("*.dmtcp"))


def test_a_host_lost_before_the_drain_restarts_from_its_partner_s_copy(hosts2, env, tmp_path, launch):
    h1 = hosts2[0]
    here = socket.gethostname()
    job, out = start(launch, hosts2, env, tmp_path, h1.name)
    r = job.command("-bc", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["last_checkpoint"]["levels"] == "local"
    (comp,) = store.computations_in(str(tmp_path))
    mine, theirs = tmp_path / f"local-{here}", tmp_path / f"local-{h1.name}"
    # each host keeps the other's images (over a direct connection between the agents, not the shared directory)
    wait_for(lambda: partner_copies(mine, comp, 1) and partner_copies(theirs, comp, 1), 30, "the partner copies")
    assert store.complete_generations(str(tmp_path), comp) == []          # the drain has not reached it
    # host h1 is lost, with its disk: the computation ends with it
    job.command("-k")
    job.wait(30)
    shutil.rmtree(theirs)
    # the restart script names h1's images where h1 wrote them; moved to this host, they come from the partner
    r = restart_script(tmp_path, env, {h1.name: here})
    assert "using the partner copy" in r.stderr, r.stderr[-3000:]
    assert_finished_on(r, here)


def test_a_drain_killed_on_one_host_leaves_the_previous_shared_generation_for_a_rerun(hosts2, env, tmp_path,
                                                                                      launch):
    """Generation 1 drains on both hosts; generation 2's drain hangs on this host (a fault point; the other
    host's copy arrives) and dies with the computation: the shared level keeps generation 1, which a rerun on
    new nodes (no local copies) restarts, saying why not generation 2."""
    # (the fault reaches this host's agent only: the shims do not pass HPCCKPT_FAULT to the other host)
    env.update(HPCCKPT_DRAIN_RATE="0", HPCCKPT_PARTNER="0", HPCCKPT_FAULT="drain.start:sleep=120@2")
    h1, here = hosts2[0], socket.gethostname()
    job, out = start(launch, hosts2, env, tmp_path, h1.name)
    assert job.command("-bc").returncode == 0
    (comp,) = store.computations_in(str(tmp_path))
    wait_for(lambda: store.complete_generations(str(tmp_path), comp) == [1], 30, "generation 1 on the shared level")
    assert job.command("-bc").returncode == 0
    gen2 = Path(store.generation_dir(str(tmp_path), comp, 2))
    m2 = levels.read_local_manifest(str(tmp_path), comp, 2)
    theirs = [Path(i.path).name for i in m2.images if i.host == h1.name]
    wait_for(lambda: all((gen2 / n).exists() for n in theirs), 30, "the other host's drain of generation 2")
    assert store.complete_generations(str(tmp_path), comp) == [1]       # this host's part never arrived
    job.command("-k")
    job.wait(30)                                                         # (the hung drain dies with its agent)
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text(f"{h1.name} {here}\n")
    rerun = {k: v for k, v in env.items() if k not in ("HPCCKPT_LOCAL_DIR", "HPCCKPT_FAULT")}
    r = run(["dmtcp_restart", "-p", "0", "--ckptdir", str(tmp_path), "--from", str(tmp_path), "--hostfile",
             str(hostfile)], rerun, tmp_path, timeout=120)
    assert "restarting generation 1 from" in r.stderr, r.stderr[-3000:]
    assert_finished_on(r, here)

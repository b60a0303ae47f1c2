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
from conftest import wait_for
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

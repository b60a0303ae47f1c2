"""Multi-level storage across simulated hosts (tests/hosts.py; docs/storage.md): each host has its own local
directory, the checkpoint directory is shared. A host lost after its images were written locally (and copied to
its partner) but before the drain reached the shared directory: the computation restarts, on the surviving
host, from the partner's copy."""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
from conftest import run, wait_for
from hosts import Hosts
from test_multihost import assert_finished_on, job_cmd, ok_lines, restart_script, start

from hpcckpt.image import levels, store

pytestmark = [pytest.mark.slow, pytest.mark.multihost,
              pytest.mark.skipif(os.geteuid() != 0, reason="the multi-host harness needs root")]

# (mount: each host has its own /dev/shm, where one test puts a checkpoint directory the hosts do not share)
hosts2 = Hosts.fixture(n=2, scope="module", subnet=None, mount=True)


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
    # the blocking checkpoint returns once the generation is complete: each host keeps the other's images (over a
    # direct connection between the agents, to the address the coordinator passed: no shared directory)
    assert json.loads(r.stdout)["last_checkpoint"]["levels"] == "local+partner", r.stdout
    (comp,) = store.computations_in(str(tmp_path))
    mine, theirs = tmp_path / f"local-{here}", tmp_path / f"local-{h1.name}"
    assert partner_copies(mine, comp, 1) and partner_copies(theirs, comp, 1)
    assert not (tmp_path / f"ckpt_{comp}" / "partners").exists()
    (row,) = json.loads(job.command("-s", "--json").stdout)["levels"]
    assert row == {"generation": 1, "local": True, "partner": "done", "shared": False, "drain": "running",
                   "complete": True}, row
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


def test_a_host_lost_before_its_partner_copy_restarts_the_newest_generation_complete(hosts2, env, tmp_path, launch):
    """Generation 2 is durable on both hosts' local level (the program ran on at once) but this host's partner
    copy hangs (a fault point): generation 2 is never reported complete - the restart script, last_checkpoint and
    -s stay at generation 1. This host is lost with its disk: the restart script brings the computation back on
    the other host from generation 1 (this host's part from its partner copy there), saying why not 2."""
    env["HPCCKPT_FAULT"] = "partner.before_send:sleep=120@2"      # (this host's agent only: see above)
    h1, here = hosts2[0], socket.gethostname()
    job, out = start(launch, hosts2, env, tmp_path, h1.name)
    assert json.loads(job.command("-bc", "--json").stdout)["last_checkpoint"]["levels"] == "local+partner"
    (comp,) = store.computations_in(str(tmp_path))
    mine, theirs = tmp_path / f"local-{here}", tmp_path / f"local-{h1.name}"
    assert job.command("-c").returncode == 0
    # h1's copy of generation 2 arrives here; ours never leaves
    wait_for(lambda: partner_copies(mine, comp, 2), 30, "the other host's partner copy of generation 2")
    st = json.loads(job.command("-s", "--json").stdout)
    assert st["last_checkpoint"]["generation"] == 1, st["last_checkpoint"]
    row = st["levels"][-1]
    assert (row["generation"], row["local"], row["partner"], row["complete"]) == (2, True, "running", False), row
    assert "LEVELS=1:local+partner, 2:local" in job.command("-s").stdout
    assert "checkpoint generation 1," in (tmp_path / "dmtcp_restart_script.sh").read_text()
    assert not partner_copies(theirs, comp, 2)
    job.command("-k")
    job.wait(30)
    r = run(["hpcckpt", "status", str(tmp_path)], env, tmp_path)
    assert "local+partner: complete" in r.stdout and "local only" in r.stdout, r.stdout
    shutil.rmtree(mine)                                   # this host is lost, with its disk
    r = restart_script(tmp_path, env, {here: h1.name})
    assert "using the partner copy" in r.stderr, r.stderr[-3000:]
    assert "generation 2 of" in r.stderr and "never complete" in r.stderr, r.stderr[-3000:]
    assert_finished_on(r, h1.name)


def test_a_rerun_on_a_new_host_fetches_the_lost_host_s_images_from_its_surviving_partner(hosts2, env, tmp_path,
                                                                                          launch):
    """This host is lost after generation 1 was made complete by its partner copies, before the drain reached the
    shared level. The rerun puts its part on a new host (h2, which has no copy at all) and keeps h1's on h1: h2
    fetches the images from h1, which keeps them as partner copies, over the computation's own connections (the
    coordinator's rendezvous and the authenticated partner connection; no ssh between the nodes, nothing through
    the checkpoint directory), and the computation ends as it would have."""
    h1, h2, here = hosts2[0], hosts2[1], socket.gethostname()
    job, out = start(launch, hosts2, env, tmp_path, h1.name)
    assert json.loads(job.command("-bc", "--json").stdout)["last_checkpoint"]["levels"] == "local+partner"
    (comp,) = store.computations_in(str(tmp_path))
    job.command("-k")
    job.wait(30)
    shutil.rmtree(tmp_path / f"local-{here}")             # lost with its disk
    assert store.complete_generations(str(tmp_path), comp) == []       # (not on the shared level either)
    r = restart_script(tmp_path, env, {here: h2.name, h1.name: h1.name})
    assert f"fetched the partner copy kept on {h1.name}" in r.stderr, r.stderr[-3000:]
    fetched = partner_copies(tmp_path / f"local-{h2.name}", comp, 1)
    assert fetched and all(p.name in r.stderr for p in fetched), r.stderr[-3000:]
    assert_finished_on(r, h1.name)


def test_partner_copies_work_when_the_checkpoint_directory_is_not_shared(hosts2, env, tmp_path, launch):
    """The checkpoint directory is in /dev/shm, which each simulated host has to itself: the coordinator's and
    the other host's are different directories. The partner addresses go through the coordinator, so each host
    still gets the other's images (with drain: off: there is no shared level to drain to)."""
    env["HPCCKPT_DRAIN"] = "off"
    h1, here = hosts2[0], socket.gethostname()
    ckptdir = Path(tempfile.mkdtemp(prefix="hpcckpt-private-", dir="/dev/shm"))
    try:
        job = launch(*job_cmd(hosts2, h1.name, tmp_path), extra=["--ckptdir", str(ckptdir)])
        wait_for(lambda: len(ok_lines((tmp_path / "launch.0.out").read_text())) >= 20, 30, "the client's answers")
        r = job.command("-bc", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["last_checkpoint"]["levels"] == "local+partner", \
            r.stdout + r.stderr
        (comp,) = store.computations_in(str(ckptdir))
        mine, theirs = tmp_path / f"local-{here}", tmp_path / f"local-{h1.name}"
        assert partner_copies(mine, comp, 1) and partner_copies(theirs, comp, 1)
        # (h1 sees its own directory of that name: not the coordinator's manifests, only what its agent made)
        manifest = ckptdir / f"ckpt_{comp}" / levels.local_manifest_name(1)
        assert manifest.exists()
        seen_by_h1 = h1.run(["ls", "-A", str(manifest.parent)], capture_output=True, text=True)
        assert manifest.name not in seen_by_h1.stdout and "partners" not in seen_by_h1.stdout, seen_by_h1
        job.command("-k")
        job.wait(30)
        # the same nodes restart from their local copies; each keeps the other's partner copies, which nobody
        # needs: the restart is not held up waiting for a fetch that never comes (at most 60 s each)
        t0 = time.monotonic()
        r = run(["bash", str(ckptdir / "dmtcp_restart_script.sh"), "--coord-port", "0"], env, tmp_path, timeout=120)
        assert_finished_on(r, h1.name)
        assert time.monotonic() - t0 < 40, r.stderr[-2000:]
        assert "using the partner copy" not in r.stderr and "fetched" not in r.stderr, r.stderr[-2000:]
    finally:
        shutil.rmtree(ckptdir, ignore_errors=True)


def test_the_host_running_the_restart_command_fetches_its_lost_images_from_a_surviving_partner(hosts2, env, tmp_path,
                                                                                                launch):
    """A batch rerun: the restart command runs on the first node, which takes the part of a node lost with its
    disk (here: this host, its local level gone) while the drain had not reached the shared level. Its images
    are kept as partner copies on h1. Before, the restart command chose its copies before starting the other
    hosts' parts, so it could not fetch (an error, then a restart that fails); now it starts them first when it
    needs a fetch, and fetches from h1."""
    h1, here = hosts2[0], socket.gethostname()
    job, out = start(launch, hosts2, env, tmp_path, h1.name)
    assert json.loads(job.command("-bc", "--json").stdout)["last_checkpoint"]["levels"] == "local+partner"
    (comp,) = store.computations_in(str(tmp_path))
    job.command("-k")
    job.wait(30)
    shutil.rmtree(tmp_path / f"local-{here}")             # this node's disk is lost; its part reruns here
    assert store.complete_generations(str(tmp_path), comp) == []
    r = restart_script(tmp_path, env)
    assert "starting the other hosts' parts first" in r.stderr, r.stderr[-3000:]
    assert f"fetched the partner copy kept on {h1.name}" in r.stderr, r.stderr[-3000:]
    assert partner_copies(tmp_path / f"local-{here}", comp, 1)
    assert_finished_on(r, h1.name)


def test_a_fetched_incremental_image_brings_the_base_generations_it_builds_on(hosts2, env, tmp_path, launch):
    """--incremental with partner copies: generation 2's images store only what changed since generation 1. This
    host is lost with its disk before the drain; its part reruns here on an empty disk. The restart fetches
    generation 2's image from h1 (its partner) and also the generation-1 image it builds on, which h1 keeps too
    (before, only generation 2's: the restore then failed, the base missing)."""
    env.update(HPCCKPT_INCREMENTAL="1")
    h1, here = hosts2[0], socket.gethostname()
    cmd = job_cmd(hosts2, h1.name, tmp_path)
    job = launch(*cmd)
    wait_for(lambda: len(ok_lines((tmp_path / "launch.0.out").read_text())) >= 20, 30, "the client's answers")
    for _ in range(2):
        assert json.loads(job.command("-bc", "--json").stdout)["last_checkpoint"]["levels"] == "local+partner"
    (comp,) = store.computations_in(str(tmp_path))
    m2 = levels.read_local_manifest(str(tmp_path), comp, 2)
    assert any(1 in i.needs for i in m2.images if i.host == here), m2.images
    job.command("-k")
    job.wait(30)
    shutil.rmtree(tmp_path / f"local-{here}")
    assert store.complete_generations(str(tmp_path), comp) == []
    r = restart_script(tmp_path, env)
    assert f"fetched the partner copy kept on {h1.name}" in r.stderr, r.stderr[-3000:]
    assert partner_copies(tmp_path / f"local-{here}", comp, 2) and partner_copies(tmp_path / f"local-{here}", comp, 1)
    assert_finished_on(r, h1.name)


def test_a_kcheckpoint_s_partner_copies_let_a_rerun_survive_the_loss_of_the_first_node(hosts2, env, tmp_path,
                                                                                       launch):
    """dmtcp_command -kc (a batch job's last act) with partner copies and no drain: the agents make their partner
    copies before they exit, so the generation is complete on local+partner; the first node is then lost with
    its disk, and the rerun (the restart script, run there on an empty disk) fetches its images from h1."""
    env["HPCCKPT_DRAIN"] = "off"
    h1, here = hosts2[0], socket.gethostname()
    job, out = start(launch, hosts2, env, tmp_path, h1.name)
    assert job.command("-kc").returncode == 0
    job.wait(60)
    (comp,) = store.computations_in(str(tmp_path))
    assert partner_copies(tmp_path / f"local-{h1.name}", comp, 1)
    assert "checkpoint generation 1" in (tmp_path / "dmtcp_restart_script.sh").read_text()
    shutil.rmtree(tmp_path / f"local-{here}")
    r = restart_script(tmp_path, env)
    assert f"fetched the partner copy kept on {h1.name}" in r.stderr, r.stderr[-3000:]
    assert_finished_on(r, h1.name)

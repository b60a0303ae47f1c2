"""The launching command's settings reach the agents it starts on other hosts (agent/remoteio.py settings_env):
through the job's ssh shim at launch, and to the parts a restart starts on other hosts (cli/multihost.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import restart_in_background, wait_for
from hosts import Hosts
from test_multihost import job_cmd, ok_lines

from hpcckpt import settings as S
from hpcckpt.agent import remoteio
from hpcckpt.image.format import ImageReader, iter_chunks


def test_settings_env_round_trips_every_forwarded_field_and_keeps_host_bound_ones_here():
    s = S.load({"forked": False, "compress": True, "compress_level": 5, "incremental": True, "write_tracking": False,
                "ckpt_open_files": True, "allow_file_overwrite": True, "no_strict_checking": True,
                "plugins": ["/a/b.py:C", "m:K"], "modify_env": True, "path_prefixes": ["/x:/y", "/p:/q"],
                "local_dir": "/t/{host}", "partner": True, "drain": "sync", "drain_rate": "25%", "quiet": 1,
                "ckpt_signal": "USR2", "coord_host": "10.0.0.1", "bind": ["0.0.0.0"]}, environ={})
    env = remoteio.settings_env(s)
    assert not {"DMTCP_COORD_HOST", "HPCCKPT_COORD_BIND", "DMTCP_CHECKPOINT_DIR"} & set(env), env
    assert "DMTCP_CHECKPOINT_INTERVAL" not in env           # defaults are not forwarded
    there = S.load({}, environ=env)
    for name in remoteio.forwarded_fields():
        assert getattr(there, name) == getattr(s, name), name
    assert S.load({"compress": False}, environ=env).compress is False      # the remote command's flags win
    # a job file edited by hand: unknown names and NULs are not passed on
    assert remoteio.env_prefix({"LD_PRELOAD": "/x.so", "DMTCP_GZIP": "1", "HPCCKPT_DRAIN": "a\0b"}) == \
        ["env", "DMTCP_GZIP=1"]


hosts2 = Hosts.fixture(n=2, scope="module", subnet=None)


@pytest.fixture
def env(env, hosts2):
    return hosts2.ssh_env(env)


def images_by_host(ckptdir: Path) -> dict[str, list[dict]]:
    """{host: [image metadata]} of the newest complete checkpoint."""
    manifest = json.loads(sorted(ckptdir.glob("ckpt_*/gen*.json"))[-1].read_text())
    out: dict[str, list[dict]] = {}
    for entry in manifest["images"]:
        r = ImageReader(entry["path"])
        try:
            out.setdefault(entry["host"], []).append(r.meta)
        finally:
            r.close()
    return out


@pytest.mark.slow
@pytest.mark.multihost
@pytest.mark.skipif(os.geteuid() != 0, reason="the multi-host harness needs root")
def test_launch_and_restart_settings_reach_the_agents_on_other_hosts(hosts2, env, tmp_path, launch):
    h1 = hosts2[0]
    job = launch(*job_cmd(hosts2, h1.name, tmp_path), extra=("--no-forked-checkpoint", "--gzip"))
    out = tmp_path / "launch.0.out"
    wait_for(lambda: len(ok_lines(out.read_text())) >= 20, 30, "the client's first answers")
    assert job.command("-bc").returncode == 0
    remote = images_by_host(tmp_path)[h1.name]
    # the agent on the other host (started by `ssh h1 ...` inside the job) checkpointed frozen and compressed
    assert remote and all(m["stats"]["forked"] is False for m in remote), [m["stats"] for m in remote]
    for m in remote:
        codecs = {c.codec for c in iter_chunks(m)}
        assert codecs and codecs <= {"zstd", "zstd-shuffle8"}, codecs
    job.command("-k", check=True)
    job.wait(30)

    # both hosts restarted with --incremental: the next checkpoint of the other host's part is incremental too
    r = restart_in_background(tmp_path / "dmtcp_restart_script.sh", env, tmp_path, extra=("--incremental",))
    try:
        # (refused while the restart waits for its hosts)
        wait_for(lambda: r.command("-bc").returncode == 0, 60, "a checkpoint of the restarted computation")
        remote = images_by_host(tmp_path)[h1.name]
        assert remote and all(m["stats"]["incremental"] for m in remote), [m["stats"] for m in remote]
    finally:
        r.command("-k")
        r.wait(30)


def test_a_job_file_others_may_write_is_not_trusted(tmp_path, capsys):
    d = tmp_path / "run"
    path = str(d / "job.json")
    remoteio.write_job_file(path, "127.0.0.1", 7779, "comp", str(tmp_path), S.load({"forked": False}, environ={}))
    job = remoteio.read_job_file(path)
    assert job and job["settings"] == {"DMTCP_FORKED_CHECKPOINT": "0"}
    os.chmod(path, 0o666)
    assert remoteio.read_job_file(path) is None
    assert "writable by other users" in capsys.readouterr().err

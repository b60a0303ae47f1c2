"""DMTCP_PATH_PREFIX (DMTCP's pathvirt): the prefixes declared at launch are recorded in every image; at
restart the same variable lists where they are now, in the same order (engine/pathvirt.py)."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import checkpoint_and_kill, line_count, run, wait_for

from hpcckpt.engine import pathvirt


@pytest.mark.slow
def test_job_moved_to_another_directory_restarts_with_the_new_prefix(launch, counter, env, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    out = old / "out.txt"
    env["DMTCP_PATH_PREFIX"] = f"{old}:/unused/prefix"
    job = launch(counter, out, 4, 300, 20000, cwd=old)
    wait_for(lambda: line_count(out) >= 20, 30, "progress")
    checkpoint_and_kill(job)
    shutil.move(str(old), str(new))
    env2 = dict(env, DMTCP_PATH_PREFIX=f"{new}:/unused/prefix")
    r = run(["dmtcp_restart", "-p", "0", "--ckptdir", str(new), "--from", str(new)], env2, new, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = (new / "out.txt").read_text().splitlines()
    assert [int(ln.split()[1]) for ln in lines] == list(range(1, 301))


def test_without_the_new_prefix_the_moved_job_cannot_restart(launch, counter, env, tmp_path):
    """(What the variable is for: the same move without it fails, naming the missing file.)"""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    out = old / "out.txt"
    env["DMTCP_PATH_PREFIX"] = str(old)
    job = launch(counter, out, 4, 300, 20000, cwd=old)
    wait_for(lambda: line_count(out) >= 5, 30, "progress")
    checkpoint_and_kill(job)
    manifest = json.loads(sorted(old.glob("ckpt_*/gen*.json"))[-1].read_text())
    assert manifest["images"]
    shutil.move(str(old), str(new))
    env.pop("DMTCP_PATH_PREFIX")
    r = run(["dmtcp_restart", "-p", "0", "--ckptdir", str(new), "--from", str(new)], env, new, timeout=120)
    assert r.returncode != 0 and str(old) in r.stderr


def test_prefix_lists_must_pair_up():
    meta = {"path_prefix": "/a:/b"}
    assert pathvirt.prefixes_for(meta, [], {"DMTCP_PATH_PREFIX": "/x:/b"}) == ["/a:/x"]
    assert pathvirt.prefixes_for(meta, ["/o:/n"], {"DMTCP_NEW_PATH_PREFIX": "/x:/y"}) == ["/o:/n", "/a:/x", "/b:/y"]
    assert pathvirt.prefixes_for({}, [], {"DMTCP_PATH_PREFIX": "/x"}) == []
    with pytest.raises(pathvirt.PrefixError, match="1 prefix"):
        pathvirt.prefixes_for(meta, [], {"DMTCP_PATH_PREFIX": "/x"})
    assert pathvirt.record({"DMTCP_ORIGINAL_PATH_PREFIX": "/a"}) == {"path_prefix": "/a"}
    assert pathvirt.record({"DMTCP_PATH_PREFIX": "/n", "DMTCP_ORIGINAL_PATH_PREFIX": "/a"}) == {"path_prefix": "/n"}


def test_install_prefix_reaches_the_job_and_the_restart_script(launch, env, tmp_path):
    """--prefix DIR (DMTCP_PREFIX_PATH): hpcckpt lives under DIR on the other hosts; the job's ssh/srun shims
    start DIR/bin/python there, the restart script runs DIR/bin/hpcckpt (falling back to PATH where missing)."""
    job = launch("sh", "-c", 'echo "$DMTCP_PREFIX_PATH" > seen; exec sleep 30', extra=["--prefix", "/opt/hpc"])
    wait_for(lambda: (tmp_path / "seen").exists() and (tmp_path / "seen").read_text().strip(), 20, "the job")
    assert (tmp_path / "seen").read_text().strip() == "/opt/hpc"
    r = job.command("-bc")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "/opt/hpc/bin/hpcckpt" in (tmp_path / "dmtcp_restart_script.sh").read_text()
    from hpcckpt import installprefix
    assert installprefix.remote_python() != "/opt/hpc/bin/python"
    import os
    os.environ[installprefix.ENV] = "/opt/hpc/"
    try:
        assert installprefix.remote_python() == "/opt/hpc/bin/python"
    finally:
        del os.environ[installprefix.ENV]

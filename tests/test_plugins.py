"""Plugins (hpcckpt.plugins, docs/plugins.md) with real jobs: a plugin sees every event in order, publishes and
queries the key-value store at restart; a plugin failing before a checkpoint fails that checkpoint only; the
shipped plugins change the restored processes' environment (dmtcp_env.txt), remap paths for a migration and
run a command before each checkpoint; a bad plugin name is one line."""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from conftest import checkpoint_and_kill, compile_c, line_count, run, wait_for

pytestmark = pytest.mark.slow

RECORDER = textwrap.dedent('''
    import json, os
    from hpcckpt.plugins import Plugin

    class Recorder(Plugin):
        def _log(self, ev, **more):
            with open(os.environ["REC_LOG"], "a") as f:
                f.write(json.dumps({"event": ev.name, "gen": ev.generation, "pids": len(ev.pids), **more}) + "\\n")
        def presuspend(self, ev): self._log(ev)
        def precheckpoint(self, ev): self._log(ev)
        def resume(self, ev): self._log(ev)
        def pre_restore(self, ev): self._log(ev, images=len(ev.images))
        def restart(self, ev):
            ev.kv.publish("answer", {"from": ev.agent_id})
            ev.kv.barrier("published")
            self._log(ev, got=ev.kv.query("answer", 10))
        ''')


def _events(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_a_plugin_sees_every_event_and_the_kv_store(launch, counter, env, tmp_path):
    plugin = tmp_path / "recorder.py"
    plugin.write_text(RECORDER)
    env.update(HPCCKPT_PLUGINS=f"{plugin}:Recorder", REC_LOG=str(tmp_path / "rec.log"))
    out = tmp_path / "out.txt"
    job = launch(counter, out, 4, 400, 20000)
    wait_for(lambda: line_count(out) >= 5, 30, "progress")
    checkpoint_and_kill(job)
    evs = _events(tmp_path / "rec.log")
    assert [e["event"] for e in evs][:3] == ["presuspend", "precheckpoint", "resume"]
    assert all(e["gen"] == 1 and e["pids"] == 1 for e in evs[:3])
    r = run(["dmtcp_restart", "-p", "0", "--ckptdir", str(tmp_path), "--from", str(tmp_path)], env, tmp_path,
            timeout=120)
    assert r.returncode == 0, r.stderr
    evs = _events(tmp_path / "rec.log")[3:]
    assert [e["event"] for e in evs] == ["pre_restore", "restart"]
    assert evs[0]["images"] == 1 and evs[1]["pids"] == 1 and evs[1]["got"]["from"]
    assert line_count(out) == 400


def test_a_failing_plugin_fails_that_checkpoint_only(launch, counter, env, tmp_path):
    plugin = tmp_path / "flaky.py"
    plugin.write_text(textwrap.dedent('''
        import os
        from hpcckpt.plugins import Plugin
        class Flaky(Plugin):
            def presuspend(self, ev):
                if os.path.exists(os.environ["FAIL_FLAG"]):
                    raise RuntimeError("database not flushed")
        '''))
    flag = tmp_path / "fail"
    env.update(HPCCKPT_PLUGINS=str(plugin), FAIL_FLAG=str(flag))
    out = tmp_path / "out.txt"
    job = launch(counter, out, 4, 100000, 20000)
    wait_for(lambda: line_count(out) >= 5, 30, "progress")
    assert job.command("-bc").returncode == 0
    flag.write_text("")
    r = job.command("-bc")
    assert r.returncode != 0 and "database not flushed" in r.stdout + r.stderr
    n = line_count(out)
    wait_for(lambda: line_count(out) > n + 5, 20, "the job running on")
    assert len(list(tmp_path.glob("ckpt_*/gen*.json"))) == 1


def test_modify_env_changes_the_restored_processes_environment(launch, env, tmp_path, build_dir):
    prog = compile_c(build_dir, "envprog")
    out = tmp_path / "out.txt"
    env["HPCCKPT_TEST_VAR"] = "before"
    job = launch(prog, out, "HPCCKPT_TEST_VAR", 150)
    wait_for(lambda: line_count(out) >= 10, 30, "progress")
    checkpoint_and_kill(job)
    (tmp_path / "dmtcp_env.txt").write_text("# changed at restart\nHPCCKPT_TEST_VAR=after-$RESTART_HOST\n")
    env2 = dict(env, RESTART_HOST="node7")
    r = run(["dmtcp_restart", "--modify-env", "-p", "0", "--ckptdir", str(tmp_path), "--from", str(tmp_path)],
            env2, tmp_path, timeout=120)             # DMTCP's flag: the shipped ModifyEnv plugin
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert lines[0].endswith("HPCCKPT_TEST_VAR=before")
    assert lines[-2].endswith("HPCCKPT_TEST_VAR=after-node7")
    assert lines[-1] == "child after-node7"                  # passed on to what the program executes


def test_path_remap_moves_the_job_to_another_directory(launch, counter, env, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    out = old / "out.txt"
    job = launch(counter, out, 4, 300, 20000, cwd=old)
    wait_for(lambda: line_count(out) >= 20, 30, "progress")
    checkpoint_and_kill(job)
    shutil.move(str(old), str(new))
    env2 = dict(env, HPCCKPT_PLUGINS="hpcckpt.plugins.builtin:PathRemap", HPCCKPT_PATH_PREFIXES=f"{old}={new}")
    r = run(["dmtcp_restart", "-p", "0", "--ckptdir", str(new), "--from", str(new)], env2, new, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = (new / "out.txt").read_text().splitlines()
    assert [int(ln.split()[1]) for ln in lines] == list(range(1, 301))


def test_a_command_runs_before_each_checkpoint(launch, counter, env, tmp_path):
    marker = tmp_path / "marker"
    env.update(HPCCKPT_PLUGINS="hpcckpt.plugins.builtin:RunBeforeCheckpoint",
               HPCCKPT_PRECKPT_CMD=f"echo $HPCCKPT_GENERATION >> {marker}")
    out = tmp_path / "out.txt"
    job = launch(counter, out, 4, 100000, 20000)
    wait_for(lambda: line_count(out) >= 5, 30, "progress")
    for _ in range(2):
        assert job.command("-bc").returncode == 0
    assert marker.read_text().split() == ["1", "2"]


def test_a_bad_plugin_name_is_one_line(env, tmp_path, counter):
    for spec in ("nosuchmodule:X", "/nonexistent/p.py", "libdmtcp_foo.so"):
        r = run(["dmtcp_launch", "-p", "0", "--ckptdir", str(tmp_path), str(counter), str(tmp_path / "o"), "1", "5"],
                dict(env, HPCCKPT_PLUGINS=spec), tmp_path)
        assert r.returncode == 99 and "plugin" in r.stderr and "Traceback" not in r.stderr, (spec, r.stderr)

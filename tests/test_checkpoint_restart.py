"""The foundation end to end: an unmodified C program with a 64 MiB heap buffer and an open output file is
launched, checkpointed while it runs, killed, and restarted from its image; it continues exactly where it
was (every line equals a plain run's line for the same step)."""
from __future__ import annotations

import json
import os
import stat

import pytest

from conftest import line_count, newest_images, run, wait_for

pytestmark = pytest.mark.slow

MB, STEPS, DELAY = 64, 300, 10000


def _start(launch, counter, tmp_path, steps=STEPS, extra=()):
    out = tmp_path / "out.txt"
    job = launch(counter, out, MB, steps, DELAY, extra=extra)
    wait_for(lambda: line_count(out) >= 20, 30, "the program to make progress")
    return job, out


def _checkpoint(job) -> dict:
    r = job.command("-bc", "--json")
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["command_status"] == "DMT_COORD_SUCCESS" and reply["command"] == "DMT_BLOCKING_CKPT"
    return reply


def _kill(job):
    r = job.command("-k")
    assert r.returncode == 0, r.stderr
    assert job.wait(30) == 128 + 9      # launch exits with the program's status (killed by SIGKILL)


def test_restart_from_image_continues_exactly(launch, counter, tmp_path, env, plain_run):
    job, out = _start(launch, counter, tmp_path)
    reply = _checkpoint(job)
    assert reply["generation"] == 1 and reply["checkpoint"]["images"] == 1
    lines_at_ckpt = line_count(out)
    wait_for(lambda: line_count(out) > lines_at_ckpt + 10, 30, "progress after the checkpoint")
    _kill(job)
    images = newest_images(tmp_path)
    assert len(images) == 1 and images[0].name.startswith("ckpt_counter_") and images[0].suffix == ".dmtcp"
    assert stat.S_IMODE(os.stat(images[0]).st_mode) == 0o600          # images hold the program's memory
    r = run(["dmtcp_restart", "-p", "0", "--ckptdir", str(tmp_path), str(images[0])], env, tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == plain_run(MB, STEPS)
    # the restarted program wrote its stdout to the restart command's stdout, continuing after the checkpoint
    steps = [int(w) for w in r.stdout.split()[1::2]]      # lines "step N"
    assert steps and steps[-1] == STEPS and steps[0] > 1


def test_restart_script_and_two_rounds(launch, counter, tmp_path, env, plain_run):
    """Checkpoint, kill, restart via dmtcp_restart_script.sh; checkpoint the restored process, kill, restart
    again via the script: output identical to a plain run."""
    job, out = _start(launch, counter, tmp_path, steps=400)
    _checkpoint(job)
    _kill(job)
    script = tmp_path / "dmtcp_restart_script.sh"
    assert script.is_symlink() and os.access(script, os.X_OK)

    # round 2: restart through the script in the background, checkpoint the restored process, kill it
    import subprocess
    port_file = tmp_path / "port.restart"
    p = subprocess.Popen(["bash", str(script), "--coord-port", "0", "--port-file", str(port_file)], env=env,
                         cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "restart1.err", "w"))
    try:
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 30, "the restart's coordinator")
        before = line_count(out)
        wait_for(lambda: line_count(out) > before + 20, 30, "the restored program to make progress")
        r = run(["dmtcp_command", "--port-file", str(port_file), "-bc", "--json"], env, tmp_path)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["generation"] == 2          # the computation's generations go on
        run(["dmtcp_command", "--port-file", str(port_file), "-k"], env, tmp_path, check=True)
        assert p.wait(30) == 137
    finally:
        if p.poll() is None:
            p.kill()
    # round 3: the script now points at generation 2 and runs the program to its end
    r = run(["bash", str(script), "--coord-port", "0"], env, tmp_path, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert out.read_text() == plain_run(MB, 400)
    assert "generation 2" in script.read_text()


def test_interval_checkpoints_make_new_generations(launch, counter, tmp_path):
    job, out = _start(launch, counter, tmp_path, steps=100000, extra=("-i", "1"))
    comp_dirs = lambda: list(tmp_path.glob("ckpt_*/gen*.json"))  # noqa: E731
    wait_for(lambda: len(comp_dirs()) >= 1, 30, "a first interval checkpoint")
    first = max(int(p.stem[3:]) for p in comp_dirs())
    wait_for(lambda: max(int(p.stem[3:]) for p in comp_dirs()) > first, 30, "a second interval checkpoint")
    st = json.loads(job.command("-s", "--json").stdout)
    assert st["checkpoint_interval"] == 1 and st["last_checkpoint"]["generation"] >= 2
    # retention keeps the newest two complete generations (images and manifests)
    wait_for(lambda: max(int(p.stem[3:]) for p in comp_dirs()) >= 3, 30, "a third interval checkpoint")
    job.command("-i", "0", check=True)
    wait_for(lambda: len(comp_dirs()) == 2, 10, "retention to prune to 2 generations")
    assert len([d for d in tmp_path.glob("ckpt_*/gen*") if d.is_dir()]) == 2

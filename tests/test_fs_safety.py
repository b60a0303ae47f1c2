"""A checkpoint is complete or absent, one live copy per computation, and no other user gets in through a shared
checkpoint directory (issue 15 items 4, 11, 12, 13; docs/reliability/fsafety.md).

The attacker is uid 65534 (nobody) acting through setpriv in a world-writable sticky directory under /tmp, as
another local user would; root's checkpoint and restart must neither write through nor follow what it plants."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import line_count, newest_images, restart_in_background, run, wait_for

FAIL = 99
NOBODY = 65534


def _one_line(stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1, f"expected one error line, got: {stderr!r}"
    return lines[0]


def as_nobody(script: str) -> None:
    subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", "--",
                    "sh", "-ec", script], check=True, capture_output=True, timeout=30)


@pytest.fixture
def shared():
    """(a world-writable sticky directory like /tmp, a root-only directory with a file the attacker targets)"""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to act as another user")
    s = Path(tempfile.mkdtemp(prefix="hpcckpt-shared-", dir="/tmp"))
    os.chmod(s, 0o1777)
    v = Path(tempfile.mkdtemp(prefix="hpcckpt-victim-", dir="/tmp"))
    (v / "target").write_text("ORIGINAL\n")
    os.chmod(v / "target", 0o600)
    yield s, v
    shutil.rmtree(s, ignore_errors=True)
    shutil.rmtree(v, ignore_errors=True)


def _victim_intact(v: Path) -> None:
    assert sorted(os.listdir(v)) == ["target"], f"something was written into {v}: {os.listdir(v)}"
    assert (v / "target").read_text() == "ORIGINAL\n"
    st = os.stat(v / "target")
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0


def test_planted_names_in_shared_dir_are_never_followed(shared):
    """Symlinks at the restart script's names and the old predictable temporary names, a pre-created
    ckpt_<computation> with a generation symlink, and a symlinked ckpt_<computation>: root writes through none."""
    from hpcckpt.coordinator.script import SCRIPT_NAME, write_restart_script
    from hpcckpt.image import safefs, store
    s, v = shared
    pid = os.getpid()
    as_nobody(f"""
        ln -s {v}/target {s}/{SCRIPT_NAME}
        ln -s {v}/target {s}/dmtcp_restart_script_c1.sh
        ln -s {v}/target {s}/dmtcp_restart_script_c1.sh.{pid}.tmp
        ln -s {v}/target {s}/port.{pid}.tmp
        mkdir -m 777 {s}/ckpt_c2; ln -s {v} {s}/ckpt_c2/gen000001
        ln -s {v} {s}/ckpt_c3
    """)
    m = store.Manifest("c1", 1, time.time(), [store.ImageEntry("h", "/x/ckpt_a_1.dmtcp", "a", "1", 1)])
    path = write_restart_script(str(s), m, "localhost", 7779, 0)
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and "h /x/ckpt_a_1.dmtcp" in Path(path).read_text()
    assert os.readlink(s / SCRIPT_NAME) == "dmtcp_restart_script_c1.sh"
    safefs.atomic_write(str(s / "port"), b"1234\n", 0o644)
    assert (s / "port").read_text() == "1234\n" and not (s / "port").is_symlink()
    for comp, why in (("c2", "uid 65534"), ("c3", "symlink")):
        with pytest.raises(safefs.UnsafePath, match=why):
            store.make_generation_dir(str(s), comp, 1)
        with pytest.raises(safefs.UnsafePath, match=why):
            store.write_manifest(str(s), store.Manifest(comp, 1, time.time()))
        assert store.complete_generations(str(s), comp) == []
    assert store.computations_in(str(s)) == []          # (c1 has no directory; c2, c3 are not trusted)
    # a log never appends to another user's file, nor through a link
    as_nobody(f"touch {s}/theirs.log; ln -s {v}/target {s}/link.log")
    for name in ("theirs.log", "link.log"):
        with pytest.raises(safefs.UnsafePath):
            safefs.open_append(str(s / name))
    _victim_intact(v)
    # a directory writable by others without the sticky bit is refused outright
    os.chmod(s, 0o777)
    with pytest.raises(safefs.UnsafePath, match="writable by other users"):
        safefs.atomic_write(str(s / "port"), b"1\n")


def _status(job) -> dict:
    return json.loads(job.command("-s", "--json").stdout)


def test_checkpoint_refuses_precreated_computation_dir(shared, launch, counter, env, tmp_path):
    """Another user pre-creates ckpt_<computation> (generation symlink into a root-only directory) in a shared
    checkpoint directory: the checkpoint fails with one line naming it, writes nothing through it, and the job
    runs on; once it is gone, checkpoints work and root's files replace the links planted at their names.
    restart --from a directory holding only another user's checkpoint refuses it."""
    s, v = shared
    out = tmp_path / "out.txt"
    job = launch(counter, out, 4, 100000, 10000, cwd=s)
    wait_for(lambda: line_count(out) >= 3, 30, "progress")
    comp = _status(job)["computation"]
    as_nobody(f"mkdir -m 777 {s}/ckpt_{comp}; ln -s {v} {s}/ckpt_{comp}/gen000001")
    r = job.command("-bc")
    assert r.returncode == 1 and f"ckpt_{comp}" in r.stderr and "65534" in r.stderr, r.stderr
    assert job.proc.poll() is None
    _victim_intact(v)
    as_nobody(f"""rm -rf {s}/ckpt_{comp}
        ln -s {v}/target {s}/dmtcp_restart_script.sh; ln -s {v}/target {s}/dmtcp_restart_script_{comp}.sh""")
    r = job.command("-bc")
    assert r.returncode == 0, r.stderr
    cdir = s / f"ckpt_{comp}"
    st = os.lstat(cdir)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o077
    script = s / f"dmtcp_restart_script_{comp}.sh"
    assert not script.is_symlink() and os.stat(script).st_uid == 0 and "gen000002" in script.read_text()
    assert os.readlink(s / "dmtcp_restart_script.sh") == script.name
    _victim_intact(v)
    # restart --from a directory with only another user's "checkpoint": refused, its manifest never read
    other = Path(tempfile.mkdtemp(prefix="hpcckpt-from-", dir="/tmp"))
    try:
        os.chmod(other, 0o1777)
        img = newest_images(s)[0]
        evil = {"computation": "evil", "generation": 1, "created": 0,
                "images": [{"host": "localhost", "path": str(img), "program": "x", "unique_id": "u", "pid": 1}]}
        (tmp_path / "evil.json").write_text(json.dumps(evil))
        os.chmod(tmp_path / "evil.json", 0o644)
        shutil.copy(tmp_path / "evil.json", s / "evil.json")
        as_nobody(f"mkdir {other}/ckpt_evil; cat {s}/evil.json > {other}/ckpt_evil/gen000001.json")
        r = run(["dmtcp_restart", "-p", "0", "--from", str(other), "--ckptdir", str(tmp_path)], env, tmp_path)
        assert r.returncode == FAIL and "another user" in _one_line(r.stderr), r.stderr
    finally:
        shutil.rmtree(other, ignore_errors=True)


@pytest.mark.slow
def test_restart_of_running_computation_is_refused(launch, counter, env, tmp_path):
    """A restart of a computation still running with its checkpoint directory refuses in one line before
    touching anything (its output file goes on, untruncated); once it is gone (its lock died with it), of two
    simultaneous restarts exactly one proceeds; --force starts a second copy anyway."""
    env["HPCCKPT_LOCK_GRACE"] = "0.3"          # (a restart waits this long for a lock before refusing)
    out = tmp_path / "out.txt"
    job = launch(counter, out, 4, 100000, 10000)
    wait_for(lambda: line_count(out) >= 3, 30, "progress")
    assert job.command("-bc").returncode == 0
    script = tmp_path / "dmtcp_restart_script.sh"
    for cmd in (["dmtcp_restart", "-p", "0", "--from", str(tmp_path)], ["bash", str(script), "--coord-port", "0"],
                ["dmtcp_restart", "-p", "0", *map(str, newest_images(tmp_path))]):
        n = line_count(out)
        r = run(cmd, env, tmp_path, timeout=60)
        assert r.returncode == FAIL and "still running" in _one_line(r.stderr), (cmd, r.stderr)
        wait_for(lambda: line_count(out) > n + 3, 30, "the running job to go on")
        assert out.read_text().startswith("step 1 ")            # never truncated
    assert job.proc.poll() is None
    job.command("-k", check=True)
    job.wait(30)
    # two restarts at once: exactly one proceeds
    procs = [subprocess.Popen(["bash", str(script), "--coord-port", "0", "--port-file", str(tmp_path / f"p{i}")],
                              env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs), 60, "one of the two restarts to give up")
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        assert loser.returncode == FAIL and "still running" in _one_line(loser.stderr.read())
        n = line_count(out)
        wait_for(lambda: line_count(out) > n + 3, 30, "the restarted job to go on")
        assert winner.poll() is None
        # --force: a second live copy anyway
        forced = restart_in_background(script, env, tmp_path, extra=["--force"])
        forced.command("-k")
        forced.kill()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_checkpoint_is_complete_or_absent(launch, counter, env, tmp_path):
    """The restart script fails (generation 2) or the manifest after it does (generation 3): each checkpoint
    fails, no manifest counts it, the script still restarts generation 1, and the next checkpoint completes."""
    env["HPCCKPT_FAULT"] = "coordinator.script:error=ENOSPC@2,coordinator.before_commit:error=EIO@2"
    out = tmp_path / "out.txt"
    job = launch(counter, out, 4, 100000, 10000, extra=("--no-gzip",))
    wait_for(lambda: line_count(out) >= 3, 30, "progress")
    script = tmp_path / "dmtcp_restart_script.sh"
    assert job.command("-bc").returncode == 0
    cdir = newest_images(tmp_path)[0].parent.parent
    gen1 = script.read_text()
    assert "gen000001" in gen1
    for gen, why in ((2, "No space left"), (3, "Input/output error")):
        r = job.command("-bc")
        assert r.returncode == 1 and why in r.stderr, r.stderr
        assert not (cdir / f"gen{gen:06d}.json").exists()
        assert script.read_text() == gen1, f"generation {gen}'s failure left another restart script"
        assert os.readlink(script) == f"dmtcp_restart_script_{cdir.name[len('ckpt_'):]}.sh"
        assert sorted(p.name for p in cdir.glob("gen*.json")) == ["gen000001.json"]
    assert job.command("-bc").returncode == 0
    assert sorted(p.name for p in cdir.glob("gen*.json")) == ["gen000001.json", "gen000004.json"]
    assert "gen000004" in script.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".bak"))]
    assert job.proc.poll() is None


def test_way_to_a_named_directory_is_checked(shared):
    """A --ckptdir (or port file, log, ...) reached through another user's symlink in a sticky directory, or
    through a directory another user owns (who could swap its entries for links later), is refused."""
    from hpcckpt.image import safefs
    s, v = shared
    as_nobody(f"ln -s {v} {s}/link; mkdir -m 755 {s}/theirs")
    os.mkdir(s / "mine")
    for path, why in ((s / "link" / "sub", "symlink of uid 65534"), (s / "link", "symlink of uid 65534"),
                      (s / "theirs", "uid 65534")):
        with pytest.raises(safefs.UnsafePath, match=why):
            safefs.makedirs(str(path))
        with pytest.raises(safefs.UnsafePath):
            safefs.atomic_write(str(path / "port"), b"1\n")
    os.symlink(s / "mine", s / "rootlink")              # root's own link in the shared directory: followed
    safefs.atomic_write(str(s / "rootlink" / "port"), b"1\n")
    assert (s / "mine" / "port").read_text() == "1\n"
    _victim_intact(v)


def test_launch_refuses_a_checkpoint_dir_others_may_write(env, tmp_path):
    """A checkpoint directory writable by others without the sticky bit is refused at launch, in one line,
    rather than at the first checkpoint hours later."""
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    r = run(["dmtcp_launch", "-p", "0", "--ckptdir", str(d), "true"], env, tmp_path)
    assert r.returncode == FAIL and "writable by other users" in _one_line(r.stderr), r.stderr

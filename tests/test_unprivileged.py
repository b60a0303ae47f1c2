"""Checkpoint/restart as an ordinary user (uid 65534): the job runs in a user + PID + mount namespace of its
own, keeps its PIDs/TIDs across a restart, and a multi-threaded AVX program continues exactly.

The tests drop privileges with setpriv and run hpcckpt with Debian's system python3 (the default python3
here lives in root's home, which other users cannot read) from a world-readable copy of the package and its
dependencies."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, compile_c, wait_for

pytestmark = pytest.mark.slow

NOBODY = 65534
SYSTEM_PY = "/usr/bin/python3"
DEPS = ("zmq", "pyzmq.libs", "zstandard", "yaml", "_yaml", "psutil", "xxhash", "isal", "blake3")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another uid")
    if not (os.path.exists(SYSTEM_PY) and shutil.which("setpriv")):
        pytest.skip("needs /usr/bin/python3 and setpriv")
    v = subprocess.run([SYSTEM_PY, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
    if v.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip(f"system python {v.stdout.strip()} cannot use this venv's compiled dependencies")
    root = Path(tempfile.mkdtemp(prefix="hpcckpt-unpriv-", dir="/tmp"))
    os.chmod(root, 0o755)
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)))
    deps = root / "deps"
    deps.mkdir()
    for name in DEPS:
        if (site / name).exists():
            shutil.copytree(site / name, deps / name)
    shutil.copytree(REPO / "hpcckpt", root / "src" / "hpcckpt", ignore=shutil.ignore_patterns("__pycache__"))
    binp = root / "bin"
    binp.mkdir()
    wrapper = binp / "hpcckpt"
    wrapper.write_text(f"#!/bin/sh\nexec {SYSTEM_PY} -m hpcckpt.cli.main \"$@\"\n")
    for alias, sub in (("dmtcp_launch", "launch"), ("dmtcp_restart", "restart"), ("dmtcp_command", "command")):
        (binp / alias).write_text(f"#!/bin/sh\nexec {SYSTEM_PY} -m hpcckpt.cli.main {sub} \"$@\"\n")
    for f in binp.iterdir():
        f.chmod(0o755)
    work = root / "work"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)
    for d, _, files in os.walk(root):
        os.chmod(d, os.stat(d).st_mode | 0o755)
        for f in files:
            p = os.path.join(d, f)
            os.chmod(p, os.stat(p).st_mode | stat.S_IROTH | stat.S_IRGRP)
    yield root
    subprocess.run(["pkill", "-u", str(NOBODY), "-f", str(root)], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def _env(sandbox: Path) -> dict:
    return {"PATH": f"{sandbox}/bin:/usr/bin:/bin", "PYTHONPATH": f"{sandbox}/src:{sandbox}/deps",
            "HOME": str(sandbox / "work"), "HPCCKPT_RUNDIR": str(sandbox / "work" / "run"), "LANG": "C.UTF-8"}


def _as_nobody(cmd: list[str], sandbox: Path, **kw):
    return ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", "--"] + cmd


def _run(cmd, sandbox, timeout=120):
    return subprocess.run(_as_nobody(cmd, sandbox), env=_env(sandbox), cwd=sandbox / "work", capture_output=True,
                          text=True, timeout=timeout)


def _cycle(sandbox: Path, prog_args: list[str], out: Path, min_lines: int, extra: tuple = (),
           checkpoints: int = 1) -> subprocess.Popen:
    """launch as nobody -> wait for progress -> blocking checkpoint(s) -> kill. Returns the finished launch."""
    work = sandbox / "work"
    port = work / "port"
    if port.exists():
        port.unlink()
    p = subprocess.Popen(_as_nobody(["dmtcp_launch", "-p", "0", "--port-file", str(port), "--ckptdir", str(work)]
                                    + list(extra) + prog_args, sandbox), env=_env(sandbox), cwd=work,
                         stdout=subprocess.DEVNULL, stderr=open(work / "launch.err", "w"))
    try:
        wait_for(lambda: out.exists() and out.read_text().count("\n") >= min_lines, 60, "progress as nobody")
        for _ in range(checkpoints):
            r = _run(["dmtcp_command", "--port-file", str(port), "-bc"], sandbox)
            assert r.returncode == 0, r.stderr + (work / "launch.err").read_text()
        _run(["dmtcp_command", "--port-file", str(port), "-k"], sandbox)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    return p


def test_threads_as_unprivileged_user(sandbox, build_dir, plain_output):
    """Two incremental checkpoints as nobody (the second tracks writes with a userfaultfd the unprivileged
    agent injected), then a restart through the chain."""
    prog = compile_c(build_dir, "threads", "-pthread", "-mavx2", "-mfma")
    local = sandbox / "bin" / "threads"
    shutil.copy(prog, local)
    work = sandbox / "work"
    # the reference does not depend on the user: the session's plain run of 300 rounds (CPU-bound, 3.5 s)
    expected = plain_output(prog, 300)
    out = work / "out.txt"
    _cycle(sandbox, [str(local), str(out), "300"], out, 20, extra=("--incremental",), checkpoints=2)
    images = sorted(work.glob("ckpt_*/gen*/ckpt_threads_*.dmtcp"))
    assert images and images[0].stat().st_uid == NOBODY
    from hpcckpt.image.format import ImageReader
    with ImageReader(str(images[-1]), trust_unsigned=True) as r:     # (nobody's key is in its sandbox home)
        assert r.meta["base"] and r.meta["stats"]["write_tracked"], r.meta["stats"]
    r = _run(["bash", str(work / "dmtcp_restart_script.sh"), "--coord-port", "0"], sandbox, timeout=180)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == expected


def test_same_pids_as_unprivileged_user(sandbox, build_dir):
    prog = compile_c(build_dir, "ids", "-pthread")
    local = sandbox / "bin" / "ids"
    shutil.copy(prog, local)
    work = sandbox / "work"
    out = work / "ids.txt"
    for f in work.glob("ckpt_*"):
        shutil.rmtree(f)
    _cycle(sandbox, [str(local), str(out), "150", "20000"], out, 5)
    p = subprocess.Popen(_as_nobody(["bash", str(work / "dmtcp_restart_script.sh"), "--coord-port", "0"], sandbox),
                         env=_env(sandbox), cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def released():
            # the restored process, once it runs on its own (no longer traced by the restoring agent)
            for pid in subprocess.run(["pgrep", "-u", str(NOBODY), "-x", "ids"], capture_output=True,
                                      text=True).stdout.split():
                try:
                    f = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
                except FileNotFoundError:
                    continue
                if f["TracerPid"].strip() == "0" and not f["State"].strip().startswith("Z"):
                    return f
            return None
        fields = wait_for(released, 30, "the restored process to run")
        # the restored process is as unprivileged as the original: same uid, no capabilities
        assert fields["Uid"].split()[0] == str(NOBODY)
        assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
        assert p.wait(120) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
    lines = out.read_text().splitlines()
    assert len(lines) == 150
    bad = [x for x in lines if not x.endswith(" ok")]
    assert not bad, bad[:5]

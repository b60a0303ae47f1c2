"""Bad input gets one clear line and DMTCP_FAIL_RC (or 2 for dmtcp_command), and never damages the last good
checkpoint."""
from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from conftest import line_count, newest_images, run, wait_for

FAIL = 99


def _one_line(stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1, f"expected one error line, got: {stderr!r}"
    return lines[0]


@pytest.mark.parametrize("cmd,code", [
    (["dmtcp_launch", "--no-such-flag", "true"], FAIL),
    (["hpcckpt", "launch", "--bogus"], FAIL),
    (["dmtcp_restart", "--bogus"], FAIL),
    (["dmtcp_coordinator", "--bogus"], FAIL),
    (["dmtcp_command", "--bogus"], 2),
    (["hpcckpt", "nosuch"], 2),
])
def test_unknown_flag_one_line(cmd, code, env, tmp_path):
    r = run(cmd, env, tmp_path)
    assert r.returncode == code
    assert "error" in _one_line(r.stderr)


def test_fail_rc_is_configurable(env, tmp_path):
    env["DMTCP_FAIL_RC"] = "42"
    r = run(["dmtcp_restart", str(tmp_path / "missing.dmtcp")], env, tmp_path)
    assert r.returncode == 42


def test_missing_image(env, tmp_path):
    r = run(["dmtcp_restart", "-p", "0", str(tmp_path / "ckpt_x_1.dmtcp")], env, tmp_path)
    assert r.returncode == FAIL
    assert "no such checkpoint image" in _one_line(r.stderr)


def test_not_an_image(env, tmp_path):
    f = tmp_path / "ckpt_fake.dmtcp"
    f.write_bytes(b"\x7fELF not an image at all" * 100)
    r = run(["dmtcp_restart", "-p", "0", str(f)], env, tmp_path)
    assert r.returncode == FAIL and "not an hpcckpt checkpoint image" in _one_line(r.stderr)


def test_no_coordinator_reachable(env, tmp_path):
    r = run(["dmtcp_command", "-p", "1", "-s"], env, tmp_path)
    assert r.returncode == 2 and "no coordinator listening" in _one_line(r.stderr)
    r = run(["dmtcp_launch", "-j", "-p", "1", "true"], env, tmp_path)
    assert r.returncode == FAIL and "no coordinator" in _one_line(r.stderr)


def test_launch_of_missing_program(env, tmp_path):
    r = run(["dmtcp_launch", "-p", "0", "/no/such/program"], env, tmp_path)
    assert r.returncode == FAIL and "cannot run /no/such/program" in r.stderr.strip().splitlines()[-1]


def test_program_exit_code_comes_through(env, tmp_path):
    r = run(["dmtcp_launch", "-p", "0", "sh", "-c", "exit 7"], env, tmp_path)
    assert r.returncode == 7


@pytest.fixture
def good_checkpoint(launch, counter, tmp_path):
    """A job with one complete checkpoint; returns (job, image path, sha256 of the image)."""
    out = tmp_path / "out.txt"
    job = launch(counter, out, 16, 100000, 10000)
    wait_for(lambda: line_count(out) >= 5, 30, "progress")
    assert job.command("-bc").returncode == 0
    img = newest_images(tmp_path)[0]
    return job, img, hashlib.sha256(img.read_bytes()).hexdigest()


@pytest.mark.slow
def test_truncated_and_corrupted_images(good_checkpoint, env, tmp_path):
    job, img, digest = good_checkpoint
    job.command("-k", check=True)
    job.wait(30)
    data = img.read_bytes()
    trunc = tmp_path / "ckpt_trunc.dmtcp"
    trunc.write_bytes(data[: len(data) // 2])
    r = run(["dmtcp_restart", "-p", "0", str(trunc)], env, tmp_path)
    assert r.returncode == FAIL and "truncated" in _one_line(r.stderr)

    corrupt = tmp_path / "ckpt_corrupt.dmtcp"
    b = bytearray(data)
    b[4096 * 3 + 17] ^= 0xFF                       # flip a bit in the page data
    corrupt.write_bytes(bytes(b))
    r = run(["dmtcp_restart", "-p", "0", str(corrupt)], env, tmp_path)
    assert r.returncode == FAIL and "corrupted" in _one_line(r.stderr)
    # nothing was left running and the good image is untouched
    assert hashlib.sha256(img.read_bytes()).hexdigest() == digest


@pytest.mark.slow
def test_image_of_another_computation_is_refused(good_checkpoint, launch, counter, env, tmp_path):
    job, img, digest = good_checkpoint
    other_out = tmp_path / "other.txt"
    other = launch(counter, other_out, 4, 100000, 10000, cwd=tmp_path)
    wait_for(lambda: line_count(other_out) >= 2, 30, "the other job to run")
    # join the other computation's coordinator with the first computation's image
    r = run(["dmtcp_restart", "-j", "-p", str(other.port), str(img)], env, tmp_path)
    assert r.returncode == FAIL
    assert "computation" in _one_line(r.stderr)
    assert hashlib.sha256(img.read_bytes()).hexdigest() == digest
    assert other.proc.poll() is None and job.proc.poll() is None


@pytest.mark.slow
def test_unwritable_checkpoint_dir(good_checkpoint, env, tmp_path, immutable_dir, plain_run):
    """A checkpoint into a directory that became unwritable fails cleanly: the job keeps running, the command
    says why, and the previous checkpoint is still the one the restart script restarts."""
    job, img, digest = good_checkpoint
    comp_dir = img.parent.parent
    immutable_dir(comp_dir)                 # no new generation directory can be created
    r = job.command("-bc")
    assert r.returncode == 1
    assert "not" in r.stderr and "checkpoint failed" in r.stderr
    assert job.proc.poll() is None          # still running
    st = json.loads(job.command("-s", "--json").stdout)
    assert st["running"] and st["last_failure"] and st["last_checkpoint"]["generation"] == 1
    subprocess.run(["chattr", "-i", str(comp_dir)], check=True)
    assert hashlib.sha256(img.read_bytes()).hexdigest() == digest
    assert "gen000001" in (tmp_path / "dmtcp_restart_script.sh").read_text()
    # launching into an unwritable directory is refused up front
    ro = tmp_path / "ro"
    ro.mkdir()
    immutable_dir(ro)
    r = run(["dmtcp_launch", "-p", "0", "--ckptdir", str(ro), "true"], env, tmp_path)
    assert r.returncode == FAIL and "not writable" in _one_line(r.stderr)


def _fault_job(launch, counter, tmp_path, env, fault, steps=100000, delay=10000, extra=()):
    """A job whose agent has a fault point armed."""
    env["HPCCKPT_FAULT"] = fault
    env["HPCCKPT_PEER_TIMEOUT"] = "3"
    out = tmp_path / "out.txt"
    job = launch(counter, out, 16, steps, delay, extra=("--no-gzip",) + tuple(extra))
    wait_for(lambda: line_count(out) >= 5, 30, "progress")
    return job, out


@pytest.mark.slow
def test_agent_killed_mid_write_keeps_previous_checkpoint(launch, counter, env, tmp_path):
    """The agent dies in the middle of writing an image: no final image name, no manifest, the restart script
    still points at the previous complete checkpoint, and the program itself survives untouched (without a PID
    namespace the launch process is the agent, and the program outlives it)."""
    job, out = _fault_job(launch, counter, tmp_path, env, "dump.after_chunk:sleep=0.3",
                          extra=("--no-pid-namespace",))
    assert job.command("-bc").returncode == 0           # generation 1 completes (slowly)
    img = newest_images(tmp_path)[0]
    digest = hashlib.sha256(img.read_bytes()).hexdigest()
    prog_pid = json.loads(job.command("-l", "--json").stdout)["peers"][0]["pid"]
    assert job.command("-c").returncode == 0            # generation 2 starts, and we kill the agent mid-write
    gen2 = img.parent.parent / "gen000002"
    wait_for(lambda: list(gen2.glob("*.tmp")), 30, "the generation-2 image being written")
    log = tmp_path / "run" / f"coord-{job.port}.log"
    job.proc.kill()
    job.proc.wait(10)
    try:
        wait_for(lambda: "generation 2 failed" in log.read_text(), 30, "the coordinator to give up on the agent")
        assert "the previous checkpoint is kept" in log.read_text()
        assert not list(gen2.glob("*.dmtcp")), "an unfinished image got a final name"
        assert not (img.parent.parent / "gen000002.json").exists()
        assert "gen000001" in (tmp_path / "dmtcp_restart_script.sh").read_text()
        assert hashlib.sha256(img.read_bytes()).hexdigest() == digest
        n = line_count(out)                              # the orphaned program still runs correctly
        wait_for(lambda: line_count(out) > n + 5, 30, "the program to go on after its agent died")
    finally:
        import os
        import signal
        try:
            os.kill(prog_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_disk_full_during_checkpoint(launch, counter, env, tmp_path, plain_run):
    """ENOSPC while writing: the checkpoint fails with the reason, partial files are removed, the job goes on,
    and a later restart from the previous checkpoint is still exact."""
    job, out = _fault_job(launch, counter, tmp_path, env, "", steps=1500, delay=4000)
    assert job.command("-bc").returncode == 0
    img = newest_images(tmp_path)[0]
    job.command("-k")
    job.wait(30)
    env["HPCCKPT_FAULT"] = "dump.after_chunk:error=ENOSPC"
    port_file = tmp_path / "port.r"
    p = subprocess.Popen(["dmtcp_restart", "-p", "0", "--port-file", str(port_file), "--no-gzip", str(img)],
                         env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 30, "restart coordinator")
        r = run(["dmtcp_command", "--port-file", str(port_file), "-bc"], env, tmp_path)
        assert r.returncode == 1 and "No space left on device" in r.stderr
        assert not list(tmp_path.glob("ckpt_*/gen000002/*")), "partial files left behind"
        assert p.poll() is None
        run(["dmtcp_command", "--port-file", str(port_file), "-k"], env, tmp_path, check=True)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    env.pop("HPCCKPT_FAULT")
    r = run(["dmtcp_restart", "-p", "0", str(img)], env, tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == plain_run(16, 1500)


def _rewrite_metadata(path, change) -> None:
    """Edit an image's metadata in place (keeping it valid), to make images no machine here would produce."""
    import json as _json
    import zlib
    from hpcckpt.image import format as fmt
    raw = bytearray(open(path, "rb").read())
    magic, version, flags, meta_off, meta_len, _, data_end = fmt._HEADER.unpack_from(raw)
    meta = _json.loads(raw[meta_off:meta_off + meta_len])
    change(meta)
    body = _json.dumps(meta).encode()
    raw = raw[:meta_off] + body
    raw[0:fmt._HEADER.size] = fmt._HEADER.pack(magic, version, flags, meta_off, len(body), zlib.crc32(body), data_end)
    open(path, "wb").write(bytes(raw))
    fmt.resign(path)         # signed again with the tests' key: the edit is ours, the image stays authentic


@pytest.mark.slow
@pytest.mark.parametrize("case", ["vdso", "xstate", "mapped-file"])
def test_image_this_machine_cannot_restore(case, good_checkpoint, env, tmp_path):
    """A different kernel's vdso layout, CPU state this CPU lacks, a mapped file that changed: one line and
    DMTCP_FAIL_RC, nothing left running."""
    import base64
    job, img, _ = good_checkpoint
    job.command("-k", check=True)
    job.wait(30)
    bad = tmp_path / f"ckpt_bad_{case}.dmtcp"
    bad.write_bytes(img.read_bytes())

    def change(meta):
        proc = meta["process"]
        if case == "vdso":
            r = next(r for r in proc["regions"] if r["path"] == "[vdso]")
            r["end"] += 4096
        elif case == "xstate":
            x = bytearray(base64.b64decode(proc["threads"][0]["xstate"]))
            x[512:520] = (int.from_bytes(x[512:520], "little") | (1 << 62)).to_bytes(8, "little")  # unknown component
            proc["threads"][0]["xstate"] = base64.b64encode(bytes(x)).decode()
        else:
            r = next(r for r in proc["regions"] if r["backing"] == "file")
            r["file_mtime_ns"] += 1
    _rewrite_metadata(bad, change)
    r = run(["dmtcp_restart", "-p", "0", str(bad)], env, tmp_path)
    assert r.returncode == FAIL
    line = _one_line(r.stderr)
    assert {"vdso": "vdso layout", "xstate": "CPU state", "mapped-file": "changed since the checkpoint"}[case] in line
    assert subprocess.run(["pgrep", "-f", f"counter {tmp_path}"], capture_output=True).stdout == b""

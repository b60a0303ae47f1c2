"""Images and manifests are authenticated (image/auth.py), and a restart never runs a program as someone else
(engine/identity.py): edited images and manifests, empty or foreign image lists, unsigned images, images of
another user."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import line_count, newest_images, run, wait_for
from test_unprivileged import sandbox  # noqa: F401  (fixture: a world-readable hpcckpt for another uid)

FAIL = 99


def _one_line(stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1, f"expected one error line, got: {stderr!r}"
    return lines[0]


@pytest.fixture
def checkpointed(launch, counter, tmp_path):
    """A finished job's complete checkpoint: (image path, output file, total steps). The job would have run 150
    steps of 10 ms; it is checkpointed after 5 and killed."""
    out = tmp_path / "out.txt"
    job = launch(counter, out, 8, 150, 10000)
    wait_for(lambda: line_count(out) >= 5, 30, "progress")
    assert job.command("-bc").returncode == 0
    job.command("-k", check=True)
    job.wait(30)
    return newest_images(tmp_path)[0], out, 150


def _edit_meta(path: Path, change, resign: bool = False) -> None:
    """Edit an image's metadata and recompute its CRC (what an attacker without the key can do)."""
    import zlib
    from hpcckpt.image import format as fmt
    raw = bytearray(path.read_bytes())
    magic, version, flags, meta_off, meta_len, _, data_end = fmt._HEADER.unpack_from(raw)
    meta = json.loads(raw[meta_off:meta_off + meta_len])
    change(meta)
    body = json.dumps(meta).encode()
    raw = raw[:meta_off] + body
    raw[0:fmt._HEADER.size] = fmt._HEADER.pack(magic, version, flags, meta_off, len(body), zlib.crc32(body),
                                                data_end)
    path.write_bytes(bytes(raw))
    if resign:
        fmt.resign(str(path))


def test_edited_image_with_recomputed_crc_refused(checkpointed, env, tmp_path):
    """The issue's attack: an fd's path pointed at a file the attacker cannot write, CRC recomputed. Restart and
    inspect --verify refuse it in one line; the file is untouched."""
    img, _, _ = checkpointed
    r = run(["hpcckpt", "inspect", "--verify", str(img)], env, tmp_path)
    assert r.returncode == 0 and f"signed by uid {os.geteuid()} (MAC verified)" in r.stdout, r.stderr
    assert "(checksums and MACs): OK" in r.stdout
    victim = tmp_path / "root-only"
    victim.write_text("precious\n")
    victim.chmod(0o600)

    def point_fd_at_victim(meta):
        fd = next(f for f in meta["process"]["fds"] if f["kind"] == "file")
        fd["path"] = str(victim)
    _edit_meta(img, point_fd_at_victim)
    r = run(["dmtcp_restart", "-p", "0", str(img)], env, tmp_path)
    assert r.returncode == FAIL
    assert "not authentic" in _one_line(r.stderr) and "MAC does not match" in r.stderr
    r = run(["hpcckpt", "inspect", "--verify", str(img)], env, tmp_path)
    assert r.returncode == 1 and "not authentic" in _one_line(r.stderr)
    assert victim.read_text() == "precious\n"


def _forge_crc(data: bytearray, tamper: int, fix: int) -> None:
    """Flip a byte at `tamper` and choose 4 bytes at `fix` so the CRC-32 stays what it was: CRC-32 is linear over
    GF(2), so 32 unknown bits solve 32 equations (why a CRC is no authentication)."""
    import zlib
    n = len(data)
    zero = zlib.crc32(bytes(n))

    def effect(pos: int, bit: int) -> int:
        d = bytearray(n)
        d[pos] ^= 1 << bit
        return zlib.crc32(bytes(d)) ^ zero
    target = effect(tamper, 0)
    rows = [(effect(fix + i // 8, i % 8), 1 << i) for i in range(32)]   # (crc effect, which unknown bits)
    basis: dict[int, tuple[int, int]] = {}
    for v, m in rows:
        for b in sorted(basis, reverse=True):
            if v >> b & 1:
                v, m = v ^ basis[b][0], m ^ basis[b][1]
        if v:
            basis[v.bit_length() - 1] = (v, m)
    v, m = target, 0
    for b in sorted(basis, reverse=True):
        if v >> b & 1:
            v, m = v ^ basis[b][0], m ^ basis[b][1]
    assert v == 0, "no solution"
    data[tamper] ^= 1
    for i in range(32):
        if m >> i & 1:
            data[fix + i // 8] ^= 1 << (i % 8)


def test_page_data_with_forged_crc_refused(tmp_path):
    """Page data changed so that its chunk's CRC-32 still matches: the chunk's keyed tag catches it."""
    import zlib
    from hpcckpt.image.format import ImageError, ImageReader, ImageWriter, iter_chunks
    path = tmp_path / "one.dmtcp"
    w = ImageWriter(str(path))
    group = w.add_chunk(0, 2, os.urandom(8192))
    w.drain()
    w.finish({"process": {"regions": [{"chunks": [c.to_json() for c in group]}]}})
    with ImageReader(str(path)) as r:
        assert r.authenticated and r.verify() == 1
        chunk = next(iter_chunks(r.meta))
    raw = bytearray(path.read_bytes())
    data = raw[chunk.off:chunk.off + chunk.length]
    _forge_crc(data, 100, 200)
    assert zlib.crc32(bytes(data)) == chunk.crc
    raw[chunk.off:chunk.off + chunk.length] = data
    path.write_bytes(bytes(raw))
    with ImageReader(str(path)) as r, pytest.raises(ImageError, match="MAC mismatch in chunk"):
        r.verify()


@pytest.mark.slow
def test_unsigned_or_foreign_image_refused_unless_trusted(checkpointed, env, tmp_path):
    """An image without a MAC (format 1) or signed with another key is refused in one line; --trust-unsigned
    restarts it (the run then completes as it would have)."""
    img, out, steps = checkpointed
    from hpcckpt.image import format as fmt
    foreign_env = dict(env, HPCCKPT_KEY_FILE=str(tmp_path / "other-key"))
    r = run(["dmtcp_restart", "-p", "0", str(img)], foreign_env, tmp_path)
    assert r.returncode == FAIL and "not authentic" in _one_line(r.stderr)

    raw = bytearray(img.read_bytes())
    raw[8:12] = fmt.UNSIGNED_VERSION.to_bytes(4, "little")
    img.write_bytes(bytes(raw))
    r = run(["dmtcp_restart", "-p", "0", str(img)], env, tmp_path)
    assert r.returncode == FAIL
    assert "unsigned image" in _one_line(r.stderr) and "--trust-unsigned" in r.stderr
    r = run(["hpcckpt", "inspect", str(img)], env, tmp_path)      # looking is fine: it says it is not authentic
    assert r.returncode == 0 and "NOT authenticated" in r.stdout
    r = run(["dmtcp_restart", "-p", "0", "--trust-unsigned", str(img)], env, tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert line_count(out) == steps


def _manifest(ckptdir: Path, computation: str, images: list[dict]) -> Path:
    from hpcckpt.image import store
    entries = [store.ImageEntry(host=os.uname().nodename, path=i["path"], program="counter",
                                unique_id=i.get("unique_id", "u"), pid=1) for i in images]
    return Path(store.write_manifest(str(ckptdir), store.Manifest(computation, 1, time.time(), entries)))


@pytest.mark.slow
def test_edited_manifest_refused(checkpointed, env, tmp_path):
    """The genuine manifest restarts (to the end of the run); the same manifest edited is refused."""
    img, out, steps = checkpointed
    r = run(["dmtcp_restart", "-p", "0", "--from", str(tmp_path)], env, tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert line_count(out) == steps
    manifest = sorted(tmp_path.glob("ckpt_*/gen*.json"))[-1]
    d = json.loads(manifest.read_text())
    d["images"] = d["images"] * 2                   # e.g. an image listed twice, MAC left as it was
    manifest.write_text(json.dumps(d))
    r = run(["dmtcp_restart", "-p", "0", "--from", str(tmp_path)], env, tmp_path)
    assert r.returncode == FAIL
    line = _one_line(r.stderr)
    assert str(manifest) in line and "not authentic" in line


def test_manifest_without_images_refused(env, tmp_path):
    """A (validly signed) manifest with "images": [] restarted nothing and exited 0; now it is refused."""
    _manifest(tmp_path, "empty", [])
    r = run(["dmtcp_restart", "-p", "0", "--from", str(tmp_path)], env, tmp_path)
    assert r.returncode == FAIL and "lists no images" in _one_line(r.stderr)


def test_manifest_naming_another_computations_image_refused(checkpointed, env, tmp_path):
    """A manifest can only restart its own computation's images: one outside its directory, or one inside it
    whose own (authenticated) metadata says another computation, is refused."""
    img, _, _ = checkpointed
    elsewhere = tmp_path / "other"
    _manifest(elsewhere, "other", [{"path": str(img)}])
    r = run(["dmtcp_restart", "-p", "0", "--from", str(elsewhere)], env, tmp_path)
    assert r.returncode == FAIL and "outside" in _one_line(r.stderr)

    shutil.rmtree(elsewhere)
    inside = elsewhere / "ckpt_other" / "gen000001"
    inside.mkdir(parents=True)
    shutil.copy(img, inside / img.name)
    _manifest(elsewhere, "other", [{"path": str(inside / img.name)}])
    r = run(["dmtcp_restart", "-p", "0", "--from", str(elsewhere)], env, tmp_path)
    assert r.returncode == FAIL
    line = _one_line(r.stderr)
    assert "belongs to computation" in line and "not to the checkpoint" in line


def test_recorded_credentials_checked(tmp_path):
    """What root may become for an image (engine/identity.py): one consistent identity, the signer's own when a
    user signed it, no capabilities for a non-root process, only groups the user is in."""
    from hpcckpt.engine.errors import IdentityError
    from hpcckpt.engine.identity import owner_of

    def meta(**creds):
        base = {"uid": 65534, "gid": 65534, "uids": [65534] * 4, "gids": [65534] * 4, "groups": [], "cap_prm": 0}
        return {"process": {"pid": 7, "creds": dict(base, **creds)}}
    ident = owner_of("x", meta(groups=[65534, 0]), 65534)
    assert (ident.uid, ident.gid, ident.groups) == (65534, 65534, [65534])       # not root's group 0
    with pytest.raises(IdentityError, match="mixed"):
        owner_of("x", meta(uids=[65534, 0, 0, 0]), 65534)                        # a set-uid state
    with pytest.raises(IdentityError, match="signed by uid 65534 but holds a process of uid 0"):
        owner_of("x", meta(uid=0, uids=[0] * 4), 65534)
    with pytest.raises(IdentityError, match="capabilities"):
        owner_of("x", meta(cap_prm=1 << 21), 65534)
    with pytest.raises(IdentityError, match="gid 0"):
        owner_of("x", meta(gid=0, gids=[0] * 4), 65534)
    assert owner_of("x", meta(gid=0, gids=[0] * 4, groups=[0, 27]), 0).groups == [0, 27]   # root signed: as recorded


def test_key_file_must_be_private(tmp_path, monkeypatch):
    from hpcckpt.image import auth
    key = tmp_path / "key"
    monkeypatch.setenv(auth.KEY_ENV, str(key))
    auth._cache.clear()
    k = auth.key_for(create=True)
    assert len(k) == 32 and key.stat().st_mode & 0o777 == 0o600
    key.chmod(0o644)
    auth._cache.clear()
    with pytest.raises(auth.AuthError, match="private"):
        auth.key_for()
    key.unlink()
    os.symlink(tmp_path / "elsewhere", key)              # never followed
    with pytest.raises(auth.AuthError):
        auth.key_for(create=True)
    auth._cache.clear()


@pytest.mark.slow
def test_root_restarting_a_users_images_runs_as_that_user(sandbox, build_dir, tmp_path):
    """A job of uid 65534 (nobody) checkpointed; root restarts its images: the restart becomes nobody before it
    opens anything, the restored process runs with nobody's recorded credentials (not root's), and the run
    completes exactly. nobody, in turn, cannot restart an image root signed."""
    from conftest import compile_c
    from test_unprivileged import NOBODY, _cycle, _env, _run
    local = sandbox / "bin" / "counter"
    shutil.copy(compile_c(build_dir, "counter"), local)
    work = sandbox / "work"
    for f in work.glob("ckpt_*"):
        shutil.rmtree(f)
    plain = tmp_path / "plain.txt"
    subprocess.run([str(local), str(plain), "8", "200", "0"], check=True, stdout=subprocess.DEVNULL)
    out = work / "auth-out.txt"
    _cycle(sandbox, [str(local), str(out), "8", "200", "10000"], out, 5)
    images = [str(p) for p in newest_images(work)]
    assert images and os.stat(images[0]).st_uid == NOBODY
    # root reads nobody's key where nobody's restart would: nobody's passwd home is /nonexistent, so the key
    # lives in the sandbox (HOME there) and HPCCKPT_KEY_FILE (a file nobody owns) says so
    env = dict(_env(sandbox), HPCCKPT_KEY_FILE=str(work / ".hpcckpt" / "key"))
    p = subprocess.Popen(["dmtcp_restart", "--coord-port", "0", "--ckptdir", str(work), *images], env=env,
                         cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def released():
            for pid in subprocess.run(["pgrep", "-x", "counter"], capture_output=True, text=True).stdout.split():
                try:
                    f = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
                except FileNotFoundError:
                    continue
                if str(out) in Path(f"/proc/{pid}/cmdline").read_text() and f["TracerPid"].strip() == "0":
                    return f
            return None
        fields = wait_for(released, 30, "the restored process to run")
        assert fields["Uid"].split() == [str(NOBODY)] * 4 and fields["Gid"].split() == [str(NOBODY)] * 4
        assert fields["Groups"].strip() == ""
        assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
        assert p.wait(120) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
    assert out.read_text() == plain.read_text()
    # later checkpoints are nobody's too: a checkpoint directory only root can write is refused up front
    r = subprocess.run(["dmtcp_restart", "--coord-port", "0", "--ckptdir", str(tmp_path), *images], env=env,
                       cwd=work, capture_output=True, text=True, timeout=60)
    assert r.returncode == FAIL and "not a directory uid 65534 can write (the images' owner" in _one_line(r.stderr)

    from hpcckpt.image.format import ImageWriter
    mine = work / "ckpt_root.dmtcp"
    ImageWriter(str(mine)).finish({"computation": "r", "generation": 1, "process": {"regions": []}})
    mine.chmod(0o644)
    r = _run(["dmtcp_restart", "--coord-port", "0", str(mine)], sandbox)
    assert r.returncode == FAIL
    assert "signed by uid 0, not by you (uid 65534)" in _one_line(r.stderr)



def test_no_usable_home_is_one_clear_error(tmp_path, monkeypatch):
    """No key and nowhere to make one (a home like nobody's /nonexistent): the image is not written unsigned,
    the error says what to set."""
    from hpcckpt.image import auth
    from hpcckpt.image.format import ImageError, ImageWriter
    monkeypatch.delenv(auth.KEY_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "nonexistent"))
    auth._cache.clear()
    auth._read_as_root.clear()
    with pytest.raises(ImageError, match="cannot sign the image: cannot create .*; set HPCCKPT_KEY_FILE"):
        ImageWriter(str(tmp_path / "x.dmtcp"))
    assert not (tmp_path / "x.dmtcp.tmp").exists()

"""Multi-level storage without processes (fast): settings, the drain's pacing and verification, the shared
manifest only once every image arrived, wait_drained, the restart's choice of copy, and partner copies over an
authenticated connection (docs/storage.md)."""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from craft import write_synthetic

from hpcckpt import settings as S
from hpcckpt.agent import drain, partner
from hpcckpt.cli import levelopts
from hpcckpt.image import journal, levels, store

COMP = "c1"


def image(root: Path, gen: int, uid: str, partner_tree: bool = False) -> Path:
    root = Path(levels.partner_root(str(root))) if partner_tree else root
    d = Path(store.generation_dir(str(root), COMP, gen))
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    for p in (root.parent, root, root / f"ckpt_{COMP}", d):
        os.chmod(p, 0o700)
    path = d / store.image_name("prog", uid)

    def change(meta):
        meta.update(computation=COMP, generation=gen, unique_id=uid)
    return Path(write_synthetic(str(path), change))


def manifest(paths: list[Path], gen: int) -> store.Manifest:
    return store.Manifest(COMP, gen, time.time(), [store.ImageEntry("h", str(p), "prog", f"u{i}", 100 + i,
                                                                    os.path.getsize(p))
                                                   for i, p in enumerate(paths)])


def test_settings_come_from_env_yaml_and_flags(tmp_path):
    s = S.load({}, environ={"HPCCKPT_LOCAL_DIR": "/tmp/n-{host}", "HPCCKPT_DRAIN": "sync",
                            "HPCCKPT_PARTNER": "yes", "HPCCKPT_KEEP_LOCAL": "3", "HPCCKPT_DRAIN_RATE": "50M"})
    assert (s.local_dir, s.drain, s.partner, s.keep_local, S.parse_rate(s.drain_rate)) == \
        ("/tmp/n-{host}", "sync", True, 3, (50 * 2**20, 0.0))
    assert levels.local_root(s) == f"/tmp/n-{socket.gethostname()}"
    assert levels.local_root(s.replace(local_dir=str(tmp_path), ckptdir=str(tmp_path))) is None   # one level
    cfg = tmp_path / "c.yaml"
    cfg.write_text("local_dir: /scratch\ndrain: 'off'\ndrain_rate: 25%\n")
    s = S.load({}, str(cfg), environ={})
    assert (s.local_dir, s.drain, S.parse_rate(s.drain_rate)) == ("/scratch", "off", (0.0, 0.25))
    import argparse
    p = argparse.ArgumentParser()
    levelopts.add_options(p)
    args = p.parse_args(["--local-dir", "/l", "--drain", "async", "--partner", "--keep-local", "2",
                         "--drain-rate", "1G"])
    s = S.load(levelopts.flags(args), environ={})
    assert (s.local_dir, s.partner, s.keep_local, s.drain_rate) == ("/l", True, 2, "1G")
    for bad in ({"drain": "later"}, {"keep_local": 0}, {"drain_rate": "fast"}, {"drain_rate": "150%"},
                {"partner": True}):
        with pytest.raises(S.SettingsError):
            S.load(bad, environ={})


def test_pacer_keeps_a_byte_rate_and_a_share_of_the_time():
    slept: list[float] = []
    p = drain.Pacer(rate=1e6, sleep=slept.append)
    p.pace(500_000, 0.1)                       # 0.5 s at 1 MB/s, 0.1 s spent: sleep 0.4 s
    assert slept == [pytest.approx(0.4)]
    slept.clear()
    p = drain.Pacer(share=0.25, sleep=slept.append)
    p.pace(1 << 20, 0.1)                       # busy 0.1 s at 25 %: idle 0.3 s
    assert slept == [pytest.approx(0.3)]
    slept.clear()
    drain.Pacer(sleep=slept.append).pace(1 << 30, 0.01)
    assert slept == []                         # no limit: never sleeps


def test_copy_is_rate_limited_verified_and_renamed_only_when_good(tmp_path):
    src = image(tmp_path / "local", 1, "u0")
    dst = Path(store.make_generation_dir(str(tmp_path / "shared"), COMP, 1))
    size = src.stat().st_size
    t0 = time.monotonic()
    assert drain.copy_verified(str(src), str(dst), drain.Pacer(rate=size / 0.5)) == size
    assert time.monotonic() - t0 >= 0.45       # one 0.5 s worth of bytes at the limit
    assert (dst / src.name).read_bytes() == src.read_bytes()
    # a corrupted source (a bit of page data flipped): the copy does not verify, nothing is left behind
    bad = bytearray(src.read_bytes())
    bad[-200] ^= 0xFF
    src.write_bytes(bytes(bad))
    (dst / src.name).unlink()
    with pytest.raises(drain.DrainError, match=src.name):
        drain.copy_verified(str(src), str(dst), drain.Pacer())
    assert os.listdir(dst) == []


def test_shared_manifest_only_once_every_image_arrived(tmp_path):
    local, shared = tmp_path / "local", tmp_path / "shared"
    imgs = [image(local, 3, "u0"), image(local, 3, "u1")]
    m = manifest(imgs, 3)
    assert levels.commit(str(shared), m, [{"drain": "async"}], keep=2) == "local"
    assert levels.local_generations(str(shared), COMP) == [3] and store.complete_generations(str(shared), COMP) == []
    assert not levels.wait_drained(str(shared), 0.3)
    dst = store.make_generation_dir(str(shared), COMP, 3)
    drain.copy_verified(str(imgs[0]), dst, drain.Pacer())
    assert not levels.finish_shared(str(shared), COMP, 3)         # one of two images there: no manifest
    assert store.complete_generations(str(shared), COMP) == []
    drain.copy_verified(str(imgs[1]), dst, drain.Pacer())
    assert levels.finish_shared(str(shared), COMP, 3)
    sm = store.read_manifest(str(shared), COMP, 3)                # signed, names the shared copies
    assert [Path(i.path).parent for i in sm.images] == [Path(dst)] * 2
    assert levels.wait_drained(str(shared), 0.1)
    assert levels.levels_of(str(shared), COMP) == [{"generation": 3, "local": True, "shared": True}]
    assert [e["level"] for e in journal.read(str(shared)) if e["event"] == "level"] == ["local", "shared"]
    # drain: off: the local level is all there is, nothing to wait for; drain: sync: both manifests at once
    assert levels.commit(str(shared), manifest(imgs, 4), [{"drain": "off"}], keep=2) == "local"
    assert levels.wait_drained(str(shared), 5.0) and store.complete_generations(str(shared), COMP) == [3]
    for img in imgs:
        drain.copy_verified(str(img), store.make_generation_dir(str(shared), COMP, 5), drain.Pacer())
    assert levels.commit(str(shared), manifest(imgs, 5), [{"drain": "sync", "drained": True}], keep=2) == \
        "local+shared"
    assert store.complete_generations(str(shared), COMP) == [3, 5] and levels.local_generations(str(shared), COMP) \
        == [4, 5]                                                  # (keep=2 local manifests)


def test_restart_chooses_local_then_partner_then_shared_and_skips_bad_copies(tmp_path, caplog):
    local, shared = tmp_path / "local", tmp_path / "shared"
    s = S.load({"local_dir": str(local), "ckptdir": str(shared)}, environ={})
    src = image(local, 2, "u0")
    part = image(local, 2, "u0", partner_tree=True)
    sh = Path(store.make_generation_dir(str(shared), COMP, 2)) / src.name
    shutil.copy(src, sh)
    given = "/elsewhere/ckpt_c1/gen000002/" + src.name         # as the restart script of another host names it
    assert [(c.level, c.path) for c in levels.choose([given], s)] == [("local", str(src))]
    src.unlink()
    assert [(c.level, c.path) for c in levels.choose([given], s)] == [("partner", str(part))]
    part.write_bytes(part.read_bytes()[:-300])                  # a truncated partner copy is not used
    caplog.set_level("INFO")
    assert [(c.level, c.path) for c in levels.choose([given], s)] == [("shared", str(sh))]
    assert "the partner copy" in caplog.text and "is not usable" in caplog.text
    assert "using the shared copy" in caplog.text


@pytest.fixture
def partner_pair(tmp_path):
    node_b = tmp_path / "local-b"
    server = partner.PartnerServer(str(node_b), COMP)
    # (the coordinator passes this in the committed message: nothing goes through a shared directory)
    addr = {"agent_id": "agent-b", "host": "host-b", "addresses": ["127.0.0.1"], "port": server.port}
    (tmp_path / "shared").mkdir()
    yield tmp_path / "shared", node_b, server, addr
    server.close()


def test_partner_copy_goes_to_the_other_host_over_an_authenticated_connection(tmp_path, partner_pair):
    shared, node_b, _, addr = partner_pair
    assert levels.partner_of("agent-a", {"agent-a": "host-a", "agent-a2": "host-a", "agent-b": "host-b"}) == \
        "agent-b"
    assert levels.partner_of("agent-a", {"agent-a": "host-a", "agent-a2": "host-a"}) is None
    img = image(tmp_path / "local-a", 4, "ua")
    reports: list = []
    sender = partner.PartnerSender(str(shared), "agent-a", "host-a", drain.Pacer(),
                                   lambda *a, **k: reports.append((a, k)))
    assert sender.send(partner.PartnerJob(COMP, 4, [str(img)], addr)) == "host-b"
    copy = Path(levels.copy_path(str(node_b), levels.ImageName(COMP, 4, img.name), "partner"))
    assert copy.read_bytes() == img.read_bytes()
    assert [e.get("partner") for e in journal.read(str(shared)) if e["event"] == "partner"] == ["host-b"]
    assert reports[0][0] == (4, "partner", True) and reports[0][1]["partner"] == "host-b"
    assert not (shared / f"ckpt_{COMP}" / "partners").exists()


def test_partner_refuses_a_sender_without_the_key_and_a_listener_without_it(tmp_path, partner_pair, monkeypatch):
    shared, node_b, server, addr = partner_pair
    img = image(tmp_path / "local-a", 5, "ua")
    real = partner._key
    job = partner.PartnerJob(COMP, 5, [str(img)], addr)
    sender = partner.PartnerSender(str(shared), "agent-a", "host-a", drain.Pacer())
    monkeypatch.setattr(partner, "_key", lambda purpose: b"x" * 32)
    with pytest.raises(partner.PartnerError, match="closed by the other side"):   # refused by the server
        sender.send(job)
    assert not Path(levels.copy_path(str(node_b), levels.ImageName(COMP, 5, img.name), "partner")).exists()
    # a listener at the address that does not hold the user's key (a forged or stale address) but plays along:
    # it cannot prove the key, so no byte of the image goes to it
    monkeypatch.setattr(partner, "_key", real)
    rogue = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def play_along():
        conn, _ = rogue.accept()
        with conn:
            partner._send(conn, os.urandom(16))
            got.append(partner._recv(conn) + partner._recv(conn))
            partner._send(conn, os.urandom(32))         # a proof it cannot make
            conn.settimeout(2)
            try:
                while chunk := conn.recv(1 << 16):
                    got.append(chunk)
            except OSError:
                pass
    t = threading.Thread(target=play_along, daemon=True)
    t.start()
    with pytest.raises(partner.PartnerError, match="did not prove the user's key"):
        sender.send(partner.PartnerJob(COMP, 5, [str(img)], {**addr, "port": rogue.getsockname()[1]}))
    t.join(5)
    rogue.close()
    assert len(got) == 1 and len(got[0]) == 16 + 32          # its nonce and our proof: nothing of the image
    # no partner named (every agent on one host): said once, nothing sent
    with pytest.raises(partner.NoPartner):
        sender.send(partner.PartnerJob(COMP, 5, [str(img)], None))


def test_a_failing_drain_is_journaled_leaves_nothing_and_the_next_generation_drains(tmp_path, monkeypatch):
    from hpcckpt import faults
    local, shared = tmp_path / "local", tmp_path / "shared"
    s = S.load({"local_dir": str(local), "ckptdir": str(shared)}, environ={})
    d = drain.Drain(s, str(shared), "h")
    imgs = {g: image(local, g, "u0") for g in (1, 2)}
    for g, img in imgs.items():
        levels.commit(str(shared), manifest([img], g), [{"drain": "async"}], keep=2)
    monkeypatch.setattr(faults, "_SPEC", {"drain.after_block": "error=EIO@1"})     # the first copy fails
    d.submit(drain.DrainJob(COMP, 1, [str(imgs[1])]))
    assert d.wait_idle(10)
    d.submit(drain.DrainJob(COMP, 2, [str(imgs[2])]))
    assert d.wait_idle(10)
    assert d.state[1].startswith("failed") and "Input/output error" in d.state[1] and d.state[2] == "drained"
    assert os.listdir(store.generation_dir(str(shared), COMP, 1)) == []        # no temporary copy left
    assert store.complete_generations(str(shared), COMP) == [2]
    assert [(e["generation"], e["ok"]) for e in journal.read(str(shared)) if e["event"] == "drain"] == \
        [(1, False), (2, True)]
    assert not imgs[1].exists() and imgs[2].exists()      # keep_local 1: the failed older one went, the newest stays


def test_a_drain_behind_skips_superseded_generations_unless_a_newer_one_needs_them(tmp_path):
    local, shared = tmp_path / "local", tmp_path / "shared"
    s = S.load({"local_dir": str(local), "ckptdir": str(shared), "keep_local": 5}, environ={})
    d = drain.Drain(s, str(shared), "h")
    imgs = {g: image(local, g, "u0") for g in (1, 2, 3, 4)}
    for g, img in imgs.items():
        levels.commit(str(shared), manifest([img], g), [{"drain": "async"}], keep=5)
    for g in (1, 2, 3, 4):          # all four queued before the thread starts: a drain far behind
        d.local[g] = [str(imgs[g])]
        d.state[g] = "queued"
        d.jobs.append(drain.DrainJob(COMP, g, [str(imgs[g])], {3, 4} if g == 4 else {g}))
    d.thread = threading.Thread(target=d._run, daemon=True)
    d.thread.start()
    assert d.wait_idle(10)
    assert d.state[1].startswith("skipped") and d.state[2].startswith("skipped")
    assert d.state[3] == d.state[4] == "drained"                 # 4 is incremental on 3: 3 is drained too
    assert store.complete_generations(str(shared), COMP) == [3, 4]


def test_partner_server_bounds_the_connections_a_stranger_can_hold_open(tmp_path, monkeypatch):
    monkeypatch.setattr(partner, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(partner, "HANDSHAKE_S", 0.5)
    server = partner.PartnerServer(str(tmp_path / "local-b"), COMP)
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", server.port))
        extra.settimeout(5)
        assert extra.recv(64) == b""                       # closed at once: no thread, no buffer for it
        for s in idle:                                     # the silent ones are dropped after the handshake time
            s.settimeout(5)
            assert len(s.recv(64)) <= 4 + 16 and s.recv(64) == b""
        # and the slots are free again: a real partner gets through
        img = image(tmp_path / "local-a", 6, "ua")
        addr = {"agent_id": "b", "host": "host-b", "addresses": ["127.0.0.1"], "port": server.port}
        (tmp_path / "shared").mkdir()
        sender = partner.PartnerSender(str(tmp_path / "shared"), "a", "host-a", drain.Pacer())
        assert sender.send(partner.PartnerJob(COMP, 6, [str(img)], addr)) == "host-b"
    finally:
        server.close()


def test_levels_in_words_for_the_job_log_and_dmtcp_command_s(caplog):
    rows = [{"generation": 1, "local": True, "partner": "done", "shared": True, "drain": "done", "complete": True},
            {"generation": 2, "local": True, "partner": "running", "shared": False, "drain": "running",
             "complete": False},
            {"generation": 3, "local": True, "partner": "failed: n2: unreachable", "shared": False,
             "drain": "off", "complete": False, "error": "the partner copy of n2 failed"}]
    assert [levels.describe(r) for r in rows] == [
        "local+partner+shared", "local [partner running, drain running]", "local [partner failed: n2: unreachable]"]
    seen: dict[int, str] = {}
    caplog.set_level("INFO")
    levels.log_changes(rows, seen)
    levels.log_changes(rows, seen)                      # once per change, not per poll
    lines = [r.getMessage() for r in caplog.records if "levels" in r.getMessage()]
    assert lines == ["checkpoint generation 1: levels local+partner+shared",
                     "checkpoint generation 2: levels local [partner running, drain running] (not yet complete: "
                     "its partner copies are running)",
                     "checkpoint generation 3: levels local [partner failed: n2: unreachable] (never complete: "
                     "the partner copy of n2 failed)"]


@pytest.fixture
def coordinator(tmp_path, monkeypatch):
    """A real coordinator process, and this process set to find its secret (the restart's kv rendezvous)."""
    import subprocess
    import sys
    run = tmp_path / "run"
    monkeypatch.setenv("HPCCKPT_RUNDIR", str(run))
    env = dict(os.environ, HPCCKPT_RUNDIR=str(run))
    pf = tmp_path / "coord.port"
    p = subprocess.Popen([str(Path(sys.executable).parent / "dmtcp_coordinator"), "-p", "0", "--port-file", str(pf),
                          "--ckptdir", str(tmp_path / "shared")], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (pf.exists() and pf.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield "127.0.0.1", int(pf.read_text())
    finally:
        p.kill()
        p.wait(10)


def test_a_restart_part_without_a_copy_says_why_when_no_host_keeps_one(tmp_path, coordinator, caplog):
    """(agent/fetch.py) The image is on no level of this host: a part started by the restart waits (here 1 s) for
    a host that keeps a partner copy, then names the image and what to do; the restart command itself with no other
    host's part started (none in this restart: cli/restart.py starts them first when it needs a fetch) says so
    at once."""
    from hpcckpt.agent import fetch
    local, shared = tmp_path / "local", tmp_path / "shared"
    s = S.load({"local_dir": str(local), "ckptdir": str(shared), "partner": True, "restart_timeout": 1},
               environ={})
    given = f"/elsewhere/ckpt_{COMP}/gen000003/ckpt_prog_u9.dmtcp"
    caplog.set_level("INFO")
    t0 = time.monotonic()
    assert fetch.choose([given], s, lambda: coordinator, first=True) == [given]
    assert time.monotonic() - t0 < 1.0 and "no other host of this restart to fetch" in caplog.text
    caplog.clear()
    t0 = time.monotonic()
    assert fetch.choose([given], s, lambda: coordinator) == [given]
    assert 1.0 <= time.monotonic() - t0 < 5 and "no host of the restart keeps a partner copy" in caplog.text


def test_a_keeper_serves_the_restarted_generation_and_older_bases_only(tmp_path):
    """(agent/fetch.py) The copy server of a restart serves the images it keeps of the restarted generation and,
    for an incremental chain, those of older generations it keeps (asked for as gen<G>/<name>); nothing newer,
    nothing it does not keep, no other path."""
    from hpcckpt.agent import fetch
    keeper, fetcher = tmp_path / "keeper", tmp_path / "fetcher"
    g3 = image(keeper, 3, "u1", partner_tree=True)
    g2 = image(keeper, 2, "u1", partner_tree=True)
    image(keeper, 4, "u1", partner_tree=True)
    server = fetch.CopyServer(str(keeper), COMP, 3, [g3.name])
    addr = {"host": "keeper", "addresses": ["127.0.0.1"], "port": server.port}
    try:
        got = fetch._fetch_one(addr, str(fetcher), COMP, 3, g3.name)
        assert Path(got).read_bytes() == g3.read_bytes()
        got = fetch._fetch_one(addr, str(fetcher), COMP, 2, g2.name)
        assert Path(got).read_bytes() == g2.read_bytes() and "/gen000002/" in got
        for gen, name in ((4, g3.name), (2, "ckpt_prog_nothere.dmtcp"), (3, "ckpt_other.dmtcp")):
            with pytest.raises((partner.PartnerError, OSError)):
                fetch._fetch_one(addr, str(fetcher), COMP, gen, name)
    finally:
        server.close()

"""The engine's rooms (issue 18): the fd kinds in engine/fds/, shared memory in engine/shm/, the image layer
below the engine, every import pointing down; one rule for which host is this one. Seconds, no processes."""
from __future__ import annotations

import ast
import importlib.util
import ipaddress
import socket
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("check_structure", ROOT / "tools" / "check_structure.py")
assert spec and spec.loader
structure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(structure)

MODS = structure.module_files()
GRAPH = structure.edges(MODS)
OURS = ("hpcckpt.engine", "hpcckpt.image")
ABOVE_ENGINE = ("hpcckpt.agent", "hpcckpt.cli", "hpcckpt.coordinator", "hpcckpt.sched", "hpcckpt.plugins",
                "hpcckpt.aware")


def _in(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def test_no_import_cycle_in_engine_or_image():
    bad = [c for c in structure.cycles(GRAPH) if any(_in(m, OURS) for m in c)]
    assert not bad, bad


def test_layers_import_downward():
    """image/ imports nothing of the engine; the engine nothing of the layers above it; the fd ground
    (fds/entry.py) and the engine's errors nothing of fds/."""
    for mod, targets in GRAPH.items():
        if _in(mod, ("hpcckpt.image",)):
            assert not [t for t in targets if _in(t, ("hpcckpt.engine",) + ABOVE_ENGINE)], mod
        if _in(mod, ("hpcckpt.engine",)):
            assert not [t for t in targets if _in(t, ABOVE_ENGINE)], mod
    for ground in ("hpcckpt.engine.fds.entry", "hpcckpt.engine.errors", "hpcckpt.engine.linux"):
        assert not [t for t in GRAPH[ground] if _in(t, ("hpcckpt.engine.fds",))], ground


def test_no_private_names_imported_across_modules():
    """A module never reaches into another's private names (tcpwire once imported tcp's _new, _data, ...)."""
    found = []
    for mod, path in MODS.items():
        if not _in(mod, OURS):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("hpcckpt")):
                found += [f"{mod}: {a.name}" for a in node.names if a.name.startswith("_")
                          and not a.name.startswith("__")]
    assert not found, found


def test_no_long_module_in_engine_or_image():
    assert not [m for m in structure.long_modules(MODS) if _in(m[0], OURS)]


def test_every_fd_kind_is_known_to_the_image_checks():
    """The kinds of the registry are exactly the kinds image/validate.py accepts (besides the launcher's stdio):
    an image of a new kind is not refused, an unknown kind still is."""
    from hpcckpt.engine.fds.registry import KINDS
    from hpcckpt.image.fdstate import FD_KINDS
    names = [k.KIND for k in KINDS]
    assert len(names) == len(set(names))
    assert set(names) == FD_KINDS - {"stdio", "null"}


def test_one_rule_for_this_host():
    from hpcckpt.hostnames import is_local, local_ipv4s
    name = socket.gethostname()
    for host in ("", "localhost", "127.0.0.1", "127.0.0.2", "::1", "0.0.0.0", name, name.split(".")[0],
                 f"{name.split('.')[0]}.some.domain"):
        assert is_local(host), host
    for ip in local_ipv4s():
        assert is_local(ip), ip
    for host in ("192.0.2.1", "no-such-host.invalid"):        # TEST-NET-1: never an address of this machine
        assert not is_local(host), host


def test_a_name_resolving_to_loopback_is_not_this_host(monkeypatch):
    """A checkpoint's host name found on the restarting host as a loopback address (a stale /etc/hosts line, or
    Debian's 127.0.1.1 for a host's own name) does not make that host this one; a name resolving to one of this
    host's own addresses does."""
    from hpcckpt import hostnames
    own = [ip for ip in hostnames.local_ipv4s() if not ipaddress.ip_address(ip).is_loopback]
    table = {"otherhost": "127.0.1.1", "alias-of-me": own[0] if own else "192.0.2.7"}
    monkeypatch.setattr(socket, "gethostbyname", lambda h: table.get(h, "192.0.2.9"))
    assert not hostnames.is_local("otherhost")
    assert hostnames.is_local("alias-of-me") == bool(own)


@pytest.mark.parametrize("old", ["fdtable", "kinds", "tcp", "tcpwire", "tcpdrain", "tcpinfo", "ptys", "ttys",
                                 "sysvshm", "sysvipc", "shmfiles", "incremental"])
def test_no_module_left_at_its_old_place(old):
    assert not (ROOT / "hpcckpt" / "engine" / f"{old}.py").exists()


def test_kind_contract_is_declared_and_enforced():
    """Every kind follows the contract of fds/base.py; a kind missing a required method is refused when it is
    defined, and the fd table calls optional hooks without probing for them."""
    from hpcckpt.engine.fds.base import FdKind
    from hpcckpt.engine.fds.registry import KINDS
    assert all(issubclass(k, FdKind) for k in KINDS)
    with pytest.raises(TypeError, match="does not define dump"):
        type("NoDump", (FdKind,), {"KIND": "x", "matches": staticmethod(lambda e: True),
                                   "create": staticmethod(lambda f, s: -1)})
    with pytest.raises(TypeError, match="has no KIND"):
        type("NoName", (FdKind,), {})
    derived = type("Derived", (FdKind,), {"KIND": "y", "DERIVED": True, "create": staticmethod(lambda f, s: -1)})
    assert derived.matches(None) is False
    src = (ROOT / "hpcckpt" / "engine" / "fds" / "fdtable.py").read_text()
    assert "hasattr(" not in src and "getattr(" not in src


_MANY_KINDS = r"""
import mmap, os, select, socket, sys, time
keep = []
f = open(sys.argv[1] + "/data.txt", "w"); f.write("x" * 100); f.flush(); keep.append(f)
keep.append(os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY))
keep.append(os.open("/dev/null", os.O_RDWR))
r, w = os.pipe(); os.write(w, b"in the pipe"); keep += [r, w]
a, b = socket.socketpair(); a.send(b"queued"); keep += [a, b]
ev = os.eventfd(3); keep.append(ev)
ep = select.epoll(); ep.register(ev, select.EPOLLIN); keep.append(ep)
m, s = os.openpty(); os.write(m, b"typed\n"); keep += [m, s]
shm = open("/dev/shm/hpcckpt-rooms-%d" % os.getpid(), "w+b"); shm.truncate(8192); keep.append(shm)
keep.append(mmap.mmap(shm.fileno(), 8192)); keep[-1][:5] = b"hello"
lsk = socket.socket(); lsk.bind(("127.0.0.1", 0)); lsk.listen()
c = socket.create_connection(lsk.getsockname()); srv, _ = lsk.accept(); c.send(b"tcp bytes")
keep += [lsk, c, srv]
open(sys.argv[1] + "/ready", "w").close()
while True:
    time.sleep(0.1)
"""


def test_object_records_round_trip_real_images(env, tmp_path):
    """Every object a real dump writes reads back into its typed record (image/fdstate.py) and out again as the
    very same row, key order included: images keep their bytes, and rows of earlier versions (the same keys)
    load into the records."""
    import json
    import subprocess
    import time

    from hpcckpt.image.fdstate import FD_STATES, SHM_STATES
    from hpcckpt.image.format import ImageReader
    p = subprocess.Popen(["python3", "-c", _MANY_KINDS, str(tmp_path)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline and p.poll() is None, "the program did not start"
            time.sleep(0.05)
        r = subprocess.run(["hpcckpt", "dump", str(p.pid), "--kill", "--ckptdir", str(tmp_path / "ck")], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        for leftover in Path("/dev/shm").glob(f"hpcckpt-rooms-{p.pid}"):
            leftover.unlink()
    seen = set()
    for image in (tmp_path / "ck").glob("ckpt_*/gen*/*.dmtcp"):
        with ImageReader(str(image)) as reader:
            for row in reader.meta["process"]["objects"]:
                cls = FD_STATES.get(row["kind"]) or SHM_STATES[row["kind"]]
                seen.add(row["kind"])
                assert json.dumps(cls.from_dict(row).to_dict()) == json.dumps(row)
    assert {"file", "dir", "pipe", "pipe-inode", "unix", "eventfd", "epoll", "tcp", "pty", "ptmx", "pts",
            "shmfile"} <= seen, seen


def test_forced_dump_restarts_with_dev_null(env, tmp_path):
    """`hpcckpt dump --force` saves a socket to a process outside as kind "null"; the image checks accept that
    kind (they refused it: "unknown kind 'null'") and the restarted process finds /dev/null there. (A dumped
    process's stdin/out/err are the restarting command's, like DMTCP's: the answer goes to a file.)"""
    import socket
    import subprocess
    a, b = socket.socketpair()
    out = tmp_path / "out.txt"
    prog = "import os, sys, time\nfd = int(sys.argv[1])\nfor i in range(40):\n    time.sleep(0.05)\n" \
           "open(sys.argv[2], 'w').write(os.readlink(f'/proc/self/fd/{fd}'))"
    p = subprocess.Popen(["python3", "-c", prog, str(b.fileno()), str(out)], pass_fds=(b.fileno(),),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    b.close()
    try:
        time.sleep(0.5)
        ck = tmp_path / "ck"
        r = subprocess.run(["hpcckpt", "dump", str(p.pid), "--force", "--kill", "--ckptdir", str(ck)], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "/dev/null" in r.stderr, r.stderr
        p.wait(10)
        r = subprocess.run(["hpcckpt", "restart", "-p", "0", "--ckptdir", str(ck), "--from", str(ck)], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert out.read_text() == "/dev/null"
    finally:
        a.close()
        if p.poll() is None:
            p.kill()

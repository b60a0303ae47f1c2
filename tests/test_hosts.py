"""The multi-host harness (tests/hosts.py) itself: network, names, ssh, /dev/shm isolation, cleanup."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hosts import Hosts, HostsError, sweep_stale

pytestmark = [pytest.mark.slow, pytest.mark.multihost,
              pytest.mark.skipif(os.geteuid() != 0, reason="the multi-host harness needs root")]

PY = sys.executable
HERE = Path(__file__).resolve().parent

# One pair of hosts for the module: setup is ~0.3 s, each ssh ~0.5 s. subnet=None picks a free one, so these
# tests can run while another session's harness is up.
hosts2 = Hosts.fixture(n=2, scope="module", subnet=None, mount=True)


def out(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.args, r.returncode, r.stdout, r.stderr)
    return r.stdout.strip()


# A TCP server that answers one connection with its hostname, printing "listening" once bound.
SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
    print("listening", flush=True)
    c, _ = s.accept(); c.sendall(socket.gethostname().encode()); c.close()
""")
CLIENT = textwrap.dedent("""
    import socket, sys
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
        print(c.recv(100).decode())
""")


def test_hosts_talk_tcp_by_name(hosts2):
    h1, h2 = hosts2
    srv = h2.popen([PY, "-c", SERVER, h2.ip, "5555"], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline() == "listening\n"
        # By name: /etc/hosts has the harness' entries inside the hosts too.
        assert out(h1.run([PY, "-c", CLIENT, h2.name, "5555"], capture_output=True, text=True, timeout=10)) == h2.name
        assert srv.wait(5) == 0
    finally:
        srv.kill()
        srv.wait()
    # ... and the server really was in h2's network namespace: h2's address is not local to h1.
    r = h1.run([PY, "-c", f"import socket; socket.socket().bind(('{h2.ip}', 0))"], capture_output=True)
    assert r.returncode != 0


def test_hostnames_differ(hosts2):
    names = [out(h.run(["hostname"], capture_output=True, text=True)) for h in hosts2]
    assert names == hosts2.names
    assert len(set(names)) == 2 and socket.gethostname() not in names
    # Names resolve in the root namespace too.
    assert [socket.gethostbyname(n) for n in names] == [h.ip for h in hosts2]


def test_ssh_between_hosts(hosts2):
    h1, h2 = hosts2
    cfg = str(hosts2.ssh_config)
    assert out(h1.run(["ssh", "-F", cfg, h2.name, "hostname"], capture_output=True, text=True, timeout=30)) == h2.name
    # Plain `ssh` through the wrapper on PATH, from the root namespace, with the venv's python by full path.
    r = subprocess.run(["ssh", h1.name, PY, "-c", "'import socket; print(socket.gethostname())'"],
                       env=hosts2.ssh_env(), capture_output=True, text=True, timeout=30)
    assert out(r) == h1.name


def test_root_namespace_server_reachable(hosts2):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 0))
    srv.listen(2)
    srv.settimeout(10)
    port = srv.getsockname()[1]
    try:
        for h in hosts2:
            cli = h.popen([PY, "-c", CLIENT, hosts2.root_name, str(port)], stdout=subprocess.PIPE, text=True)
            conn, (peer, _) = srv.accept()
            assert peer == h.ip  # the connection comes from the host's own address
            conn.sendall(b"hello")
            conn.close()
            assert cli.communicate(timeout=10)[0].strip() == "hello"
    finally:
        srv.close()


def test_dev_shm_and_ipc_private_with_mount(hosts2):
    h1, h2 = hosts2
    f = f"/dev/shm/{hosts2.tag}-probe"
    try:
        out(h1.run(["sh", "-c", f"echo h1 > {f}"], capture_output=True, text=True))
        assert out(h1.run(["cat", f], capture_output=True, text=True)) == "h1"
        assert h2.run(["test", "-e", f]).returncode != 0
        assert not os.path.exists(f)
    finally:
        Path(f).unlink(missing_ok=True)
    ipc = {out(h.run(["readlink", "/proc/self/ns/ipc"], capture_output=True, text=True)) for h in hosts2}
    assert len(ipc) == 2 and os.readlink("/proc/self/ns/ipc") not in ipc


def _leftovers(tag: str) -> list[str]:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    left = [ln for ln in (netns + links).splitlines() if tag in ln]
    left += [f"/etc/hosts: {ln}" for ln in Path("/etc/hosts").read_text().splitlines() if tag in ln]
    left += [str(p) for p in Path("/tmp").glob(f"{tag}.*")] + [str(p) for p in Path("/run/hpcckpt-hosts").glob(f"{tag}*")]
    return left


def test_cleanup_leaves_nothing():
    # The other flavour: no private IPC/mount namespaces, no sshd.
    with Hosts(n=1, subnet=None, ipc=False, mount=False, ssh=False) as hs:
        h = hs[0]
        assert out(h.run(["hostname"], capture_output=True, text=True)) == h.name
        # Without mount=True /dev/shm is the machine's, seen by every host and the root namespace.
        f = Path(f"/dev/shm/{hs.tag}-shared")
        try:
            out(h.run(["sh", "-c", f"echo x > {f}"], capture_output=True, text=True))
            assert f.read_text() == "x\n"
        finally:
            f.unlink(missing_ok=True)
        stray = h.popen(["sleep", "600"])  # forgotten by the test: close() must kill it
        assert _leftovers(hs.tag)
    assert stray.wait(5) == -signal.SIGKILL
    assert _leftovers(hs.tag) == []


def test_setup_error_cleans_up(hosts2):
    hs = Hosts(n=1, subnet=hosts2.subnet, ssh=False)
    with pytest.raises(HostsError, match="pass another subnet"):
        hs.start()
    assert _leftovers(hs.tag) == []


def test_sweeper_removes_crashed_harness(hosts2):
    # A harness whose owner is SIGKILLed leaves its netns, links, sshd and /etc/hosts block behind.
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(HERE)!r})
        from hosts import Hosts
        hs = Hosts(n=1, subnet=None).start()
        print(hs.tag, hs[0]._sshd.pid, flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        tag, sshd_pid = child.stdout.readline().split()
    finally:
        child.kill()
        child.wait()
    assert _leftovers(tag)
    assert tag in sweep_stale()
    assert _leftovers(tag) == []
    st = Path(f"/proc/{sshd_pid}/stat")  # killed; may linger as a zombie until PID 1 reaps it
    assert not st.exists() or st.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    # A live harness (this session's) is left alone.
    assert out(hosts2[0].run(["hostname"], capture_output=True, text=True)) == hosts2[0].name

"""Simulated cluster for the distributed tests: several "hosts" on this one machine, each a set of namespaces.

    from hosts import Hosts

    with Hosts(n=2) as hs:                       # needs root, sshd (sh tests/hosts-deps.sh)
        h1, h2 = hs
        h1.run(["hostname"], capture_output=True, text=True).stdout   # -> "hc-k3x9qa-1\\n"
        subprocess.run(["ssh", "-F", hs.ssh_config, h2.name, "hostname"])
        subprocess.run(["mpirun", ...], env=hs.ssh_env())            # plain `ssh NAME` works via a wrapper

    hosts2 = Hosts.fixture(n=2)                  # in a test module: a pytest fixture named `hosts2`

Layout of one harness with tag `hc-<6 random chars>`:

* host i (1..n) is named `<tag>-i`. Its network namespace is a named one (`ip netns add <tag>-i`, so it shows
  in `ip netns list`) with `lo` up and `eth0` = `<subnet>.i/24`. A long-lived *holder* process runs inside it,
  started as `nsenter --net=/run/netns/<tag>-i unshare --uts [--ipc] [--mount --propagation slave]`, sets the
  hostname and (mount=True) mounts a private tmpfs on /dev/shm, then sleeps until its stdin (a pipe from the
  harness) closes, so a crashed harness does not leave holders behind. Commands enter a host with
  `nsenter -t <holder> --net --uts [--ipc] [--mount]`: same filesystem, users and environment as the caller.
* the switch is a bridge `<tag>-br` in the root namespace, with the root-side address `<subnet>.254`, so a
  coordinator listening on 0.0.0.0 in the root namespace is reachable from every host at `hs.root_ip`.
  The hosts get no default route (and ip_forward stays as it is): their traffic can only reach the subnet.
  Beware: the root namespace's own hostname usually resolves to 127.0.0.1, which inside a host is the host's
  own loopback; tell hosts to reach the root by `hs.root_ip` (or `hs.root_name`), never by `hostname`.
* names: the harness adds a marked block to the real /etc/hosts (`<subnet>.i <tag>-i` and
  `<subnet>.254 <tag>-root`) and removes it on close. We chose this over a bind mount over /etc/hosts in a
  per-host mount namespace because mount namespaces are optional here (mount=False shares the root's), and
  because a coordinator in the root namespace must resolve the hostnames its workers report too. The file is
  replaced atomically (rename) under a lock, so concurrent readers never see it half written. The same lines
  are in `hs.hosts_file` for reference.
* ssh: one `/usr/sbin/sshd -D` per host inside its namespaces, listening on `<subnet>.i:22` and 127.0.0.1:22,
  with throwaway host keys and one throwaway client key (root login by key only). `hs.ssh_config` has an
  entry per host name; `ssh -F <ssh_config> <name> cmd` works from the root namespace and from inside any
  host. The remote side gets sshd's login environment, not the caller's: PATH is sshd's compiled-in default
  (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin for root on Debian) plus whatever root's
  ~/.bashrc adds (bash reads it for ssh commands; on this VM it runs `pyenv init`, ~0.3 s per ssh), so call
  the venv's python (or any tool) by absolute path. sshd accepts HPCCKPT_* and DMTCP_* variables if the
  client sends them (`ssh -o SendEnv=HPCCKPT_*`).

Cleanup (close(), __exit__, and atexit as a last resort) kills every process left in the hosts' network
namespaces (so also anything a test started with popen or over ssh and forgot), then deletes the links, the
namespaces, the /etc/hosts block, the state file and the temp dir. State of live harnesses is registered in
/run/hpcckpt-hosts/<tag>.json (owner pid + start time); at start, leftovers (`hc-*` netns, links, /etc/hosts
blocks, temp dirs) whose owner is dead are swept, while those of a harness still running (another test session
on the same machine) are left alone. `python tests/hosts.py --sweep` runs the sweeper by hand.

Zombies: this machine's PID 1 reaps orphans slowly, so "process exists" is never taken as "alive": zombies
(state Z) count as dead everywhere below, and namespace membership is read from /proc/<pid>/ns/net, which a
zombie no longer has.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

STATE_DIR = Path("/run/hpcckpt-hosts")
NETNS_DIR = Path("/run/netns")
ETC_HOSTS = Path("/etc/hosts")
SSHD = "/usr/sbin/sshd"
DEPS_HINT = "run (as root) sh tests/hosts-deps.sh"
TAG_RE = re.compile(r"^(hc-[a-z0-9]{6})(?:[-.]|$)")
BLOCK_BEGIN = "# >>> hpcckpt test hosts {tag} >>>"
BLOCK_END = "# <<< hpcckpt test hosts {tag} <<<"

# The holder: set the hostname (its UTS ns is new), optionally mount the private /dev/shm (its mount ns is
# new), say "ready", then live until the harness closes our stdin or dies.
_HOLDER = r"""
import os, socket, subprocess, sys
name, shm = sys.argv[1], sys.argv[2] == "1"
socket.sethostname(name)
if shm:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", name + "-shm", "/dev/shm"],
                   check=True)
os.write(1, b"ready\n")
while os.read(0, 4096):
    pass
"""


class HostsError(RuntimeError):
    """Setup or use of the simulated hosts failed; the message says what to do."""


# ---------------------------------------------------------------- small helpers

def _run(cmd: Sequence[str], what: str, stdin: str | None = None) -> str:
    r = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True)
    if r.returncode != 0:
        raise HostsError(f"{what} failed: {' '.join(cmd)} -> {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def _proc_start(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the comm field may contain spaces and parentheses
    return fields[0], int(fields[19])


def _alive(pid: int, start: int | None = None) -> bool:
    """True if pid runs and is not a zombie (and, given start, is the same process, not a reused pid)."""
    st = _proc_start(pid)
    return st is not None and st[0] not in ("Z", "X") and (start is None or st[1] == start)


def _pids_in_netns(ns_path: Path) -> list[int]:
    """Pids whose network namespace is the one bound at ns_path (zombies have none and are skipped)."""
    try:
        target = os.stat(ns_path)
    except OSError:
        return []
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            s = os.stat(f"/proc/{d}/ns/net")
        except OSError:
            continue
        if (s.st_dev, s.st_ino) == (target.st_dev, target.st_ino):
            out.append(int(d))
    return out


def clear_stale_pyenv_lock(min_age: float = 5.0) -> bool:
    """Remove pyenv's rehash lock when no rehash holds it. Root's ~/.bashrc on these machines runs `pyenv init`,
    whose rehash takes $PYENV_ROOT/shims/.pyenv-shim as a lock; an ssh session killed during its rehash (our
    cleanup kills whole hosts) leaves the file behind, and every later ssh command then waits 60 s for it."""
    lock = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "shims" / ".pyenv-shim"
    try:
        if time.time() - lock.stat().st_mtime < min_age:
            return False
    except OSError:
        return False
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if b"pyenv-rehash" in (d / "cmdline").read_bytes():
                    return False
    with contextlib.suppress(OSError):
        lock.unlink()
        return True
    return False


def _kill_netns_processes(ns_path: Path, timeout: float = 10.0) -> None:
    """SIGKILL everything in a network namespace until nothing is left (sshd may fork while we kill)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in _pids_in_netns(ns_path) if p != os.getpid()]
        if not pids:
            return
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise HostsError(f"processes {pids} in {ns_path} survive SIGKILL (stuck in D state?)")
        time.sleep(0.01)


_lock_depth = 0
_thread_lock = threading.RLock()


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Machine-wide lock for the sweeper, the state files and /etc/hosts (other test sessions run here too).
    Re-entrant within this process: flock on a second descriptor of the same file would deadlock."""
    global _lock_depth
    with _thread_lock:
        if _lock_depth:
            _lock_depth += 1
            try:
                yield
            finally:
                _lock_depth -= 1
            return
        STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        with open(STATE_DIR / "lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            _lock_depth = 1
            try:
                yield
            finally:
                _lock_depth = 0
                fcntl.flock(f, fcntl.LOCK_UN)


def _rewrite_etc_hosts(edit: Callable[[list[str]], list[str]]) -> None:
    """Apply edit to /etc/hosts' lines; call with _locked() held. Atomic rename so that readers never see a
    half-written file; in-place write only if /etc/hosts is a mount point (containers bind-mount it)."""
    old = ETC_HOSTS.read_text()
    lines = edit(old.splitlines())
    new = "\n".join(lines) + ("\n" if lines else "")
    if new == old:
        return
    st = ETC_HOSTS.stat()
    tmp = ETC_HOSTS.with_name(f".hosts.hpcckpt.{os.getpid()}")
    try:
        tmp.write_text(new)
        os.chmod(tmp, st.st_mode & 0o7777)
        os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, ETC_HOSTS)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if e.errno not in (errno.EBUSY, errno.EXDEV):
            raise
        ETC_HOSTS.write_text(new)


def _drop_block(lines: list[str], tag: str) -> list[str]:
    begin, end = BLOCK_BEGIN.format(tag=tag), BLOCK_END.format(tag=tag)
    out, inside = [], False
    for ln in lines:
        if ln == begin:
            inside = True
        elif inside and ln == end:
            inside = False
        elif not inside:
            out.append(ln)
    return out


def _live_states() -> dict[str, dict[str, Any]]:
    """tag -> state of every registered harness whose owner still runs."""
    live = {}
    for f in STATE_DIR.glob("hc-*.json"):
        try:
            st = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if _alive(st["owner_pid"], st["owner_start"]):
            live[f.stem] = st
    return live


def _teardown_tag(tag: str, tmpdir: str | None) -> None:
    """Remove everything named after tag. Safe to call for partial setups and twice."""
    netns = sorted(p.name for p in NETNS_DIR.glob(f"{tag}-*")) if NETNS_DIR.is_dir() else []
    for ns in netns:
        _kill_netns_processes(NETNS_DIR / ns)
    # Delete the root-side links first: synchronous, while a netns' own links vanish only when the kernel
    # gets round to destroying the namespace.
    for link in _links(tag):
        subprocess.run(["ip", "link", "del", link], capture_output=True)
    for ns in netns:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    with _locked():
        _rewrite_etc_hosts(lambda ls: _drop_block(ls, tag))
        with contextlib.suppress(FileNotFoundError):
            (STATE_DIR / f"{tag}.json").unlink()
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _links(prefix: str) -> list[str]:
    """Root-namespace link names starting with prefix (bridge last, so ports are removed first)."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = [m.group(1) for m in re.finditer(r"^\d+:\s+([^:@\s]+)", out, re.M)]
    mine = [n for n in names if n.startswith(prefix)]
    return sorted(mine, key=lambda n: n.endswith("-br"))


def sweep_stale() -> list[str]:
    """Remove leftovers of crashed harnesses (netns, links, /etc/hosts blocks, temp dirs, state files) whose
    owner process is gone; leaves live harnesses alone. Returns the tags removed."""
    with _locked():
        live = _live_states()
        tags: dict[str, str | None] = {}
        for f in STATE_DIR.glob("hc-*.json"):
            if f.stem not in live:
                with contextlib.suppress(OSError, ValueError):
                    tags[f.stem] = json.loads(f.read_text()).get("tmpdir")
                tags.setdefault(f.stem, None)
        names = [p.name for p in NETNS_DIR.glob("hc-*")] if NETNS_DIR.is_dir() else []
        names += _links("hc-")
        begin = BLOCK_BEGIN.split("{tag}")[0]
        names += [ln[len(begin):].split()[0] for ln in ETC_HOSTS.read_text().splitlines() if ln.startswith(begin)]
        for name in names:
            m = TAG_RE.match(name)
            if m and m.group(1) not in live:
                tags.setdefault(m.group(1), None)
        for tag, tmpdir in tags.items():
            _teardown_tag(tag, tmpdir)
        # Temp dirs of harnesses that died before writing their state file.
        for d in Path(tempfile.gettempdir()).glob("hc-??????.*"):
            m = TAG_RE.match(d.name)
            if m and m.group(1) not in live and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
    return sorted(tags)


def check_prerequisites() -> None:
    """Raise HostsError saying what to do if this machine cannot run the harness."""
    if os.geteuid() != 0:
        raise HostsError("the multi-host harness needs root (network namespaces, bridges, mounts)")
    missing = [c for c in ("ip", "nsenter", "unshare", "mount", "ssh", "ssh-keygen") if shutil.which(c) is None]
    if not os.access(SSHD, os.X_OK):
        missing.append(SSHD)
    if missing:
        raise HostsError(f"missing {', '.join(missing)}: {DEPS_HINT}")


# ---------------------------------------------------------------- the hosts

class Host:
    """One simulated host. Commands run in its namespaces via nsenter; same filesystem, users and env."""

    def __init__(self, hosts: Hosts, index: int, name: str, ip: str):
        self.hosts, self.index, self.name, self.ip = hosts, index, name, ip
        self.netns = name  # the named network namespace (`ip netns exec <netns>` works for the net ns alone)
        self._holder: subprocess.Popen | None = None
        self._sshd: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.ip!r})"

    @property
    def holder_pid(self) -> int:
        # Our own unreaped child, so the pid cannot have been reused while poll() says it runs.
        if self._holder is None or self._holder.poll() is not None:
            raise HostsError(f"host {self.name} is not running (its namespace holder is gone)")
        return self._holder.pid

    def nsenter(self, cwd: str | os.PathLike | None = None) -> list[str]:
        """Command prefix that runs a program inside this host. nsenter resets the working directory when
        it enters a mount namespace, hence --wd (the filesystem is the same, so the path is valid)."""
        flags = ["--net", "--uts"]
        if self.hosts.ipc:
            flags.append("--ipc")
        if self.hosts.mount:
            flags.append("--mount")
        return ["nsenter", "-t", str(self.holder_pid), *flags, f"--wd={os.path.abspath(cwd or os.getcwd())}", "--"]

    def popen(self, cmd: str | Sequence[str | os.PathLike], **kw: Any) -> subprocess.Popen:
        """subprocess.Popen inside this host. nsenter execs the program (no fork without --pid), so the
        Popen's pid is the program's pid and signals reach it directly. shell=True is honoured."""
        if kw.pop("shell", False):
            argv = ["/bin/sh", "-c", cmd if isinstance(cmd, str) else " ".join(map(str, cmd))]
        else:
            argv = [cmd] if isinstance(cmd, str) else [os.fspath(c) for c in cmd]
        return subprocess.Popen(self.nsenter(kw.get("cwd")) + argv, **kw)

    def run(self, cmd: str | Sequence[str | os.PathLike], **kw: Any) -> subprocess.CompletedProcess:
        """subprocess.run inside this host (same keyword arguments: check, capture_output, timeout, ...)."""
        if kw.pop("shell", False):
            cmd = ["/bin/sh", "-c", cmd if isinstance(cmd, str) else " ".join(map(str, cmd))]
        elif isinstance(cmd, str):
            cmd = [cmd]
        return subprocess.run(self.nsenter(kw.get("cwd")) + [os.fspath(c) for c in cmd], **kw)

    def ssh_cmd(self, *cmd: str) -> list[str]:
        """argv that runs cmd on this host over ssh (from the root namespace or from any host)."""
        return ["ssh", "-F", str(self.hosts.ssh_config), self.name, *cmd]


class Hosts:
    """n simulated hosts; a context manager. See the module docstring for the layout.

    n: number of hosts (1..253); subnet: first three octets of their /24 (hosts .1..n, root side .254), or
    None for the first 10.200.X.0/24 that no live harness nor the root namespace uses (for tests that may run
    concurrently with other test sessions on the same machine);
    ipc: private IPC namespace per host (SysV shm/semaphores/mqueues do not cross hosts);
    mount: private mount namespace per host with its own tmpfs on /dev/shm (POSIX shm does not cross hosts;
    without it /dev/shm is the machine's, shared by all hosts); ssh: start an sshd per host.
    """

    def __init__(self, n: int = 2, subnet: str | None = "10.200.0", ipc: bool = True, mount: bool = False,
                 ssh: bool = True):
        if not 1 <= n <= 253:
            raise ValueError("n must be in 1..253 (one /24, .254 is the root side)")
        if subnet is not None and not re.fullmatch(r"\d{1,3}\.\d{1,3}\.\d{1,3}", subnet):
            raise ValueError(f"subnet must be three octets like '10.200.0' (or None), got {subnet!r}")
        self.n, self.ipc, self.mount, self.use_ssh = n, ipc, mount, ssh
        self._want_subnet = subnet
        self.subnet = subnet or ""  # chosen in start() when None
        self.tag = "hc-" + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(6))
        self.bridge = f"{self.tag}-br"
        self.root_name = f"{self.tag}-root"
        self.hosts = [Host(self, i, f"{self.tag}-{i}", f"{subnet}.{i}") for i in range(1, n + 1)]
        self.tmpdir: Path | None = None
        self.setup_seconds = 0.0
        self._started = self._closed = False

    # -- container protocol
    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __repr__(self) -> str:
        return f"Hosts({self.tag}, {[h.name for h in self.hosts]})"

    @property
    def root_ip(self) -> str:
        """The root namespace's address on the hosts' subnet (a server on 0.0.0.0 there is reachable)."""
        return f"{self.subnet}.254"

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    # -- paths in the temp dir
    def _path(self, name: str) -> Path:
        if self.tmpdir is None:
            raise HostsError("Hosts not started (use `with Hosts(...) as hs:` or call start())")
        return self.tmpdir / name

    @property
    def ssh_config(self) -> Path:
        """ssh client config: `ssh -F <this> <host name> cmd` works from the root namespace and every host."""
        return self._path("ssh_config")

    @property
    def identity(self) -> Path:
        return self._path("id_ed25519")

    @property
    def hosts_file(self) -> Path:
        """/etc/hosts-style lines for the hosts (the same lines are in the real /etc/hosts while running)."""
        return self._path("hosts")

    @property
    def bindir(self) -> Path:
        """Directory with `ssh` and `scp` wrappers that add -F <ssh_config>."""
        return self._path("bin")

    def ssh_env(self, base_env: dict[str, str] | None = None) -> dict[str, str]:
        """A copy of base_env (default os.environ) whose PATH starts with bindir, so programs that just run
        `ssh host cmd` (MPI launchers, restart scripts) use this harness' keys and names."""
        env = dict(os.environ if base_env is None else base_env)
        env["PATH"] = f"{self.bindir}:{env.get('PATH', os.defpath)}"
        return env

    # -- lifecycle
    def __enter__(self) -> Hosts:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Hosts:
        if self._started:
            return self
        self._started = True
        t0 = time.monotonic()
        check_prerequisites()
        clear_stale_pyenv_lock()
        atexit.register(self.close)
        try:
            self._register()
            self._make_network()
            self._start_holders()
            if self.use_ssh:
                self._start_sshds()
        except BaseException:
            self.close()
            raise
        self.setup_seconds = time.monotonic() - t0
        return self

    def close(self) -> None:
        """Kill everything in the hosts, delete links/namespaces/files. Idempotent."""
        if not self._started or self._closed:
            return
        self._closed = True
        for h in self.hosts:
            for p in (h._sshd, h._holder):
                if p is not None and p.stdin:
                    with contextlib.suppress(OSError):
                        p.stdin.close()
        try:
            _teardown_tag(self.tag, str(self.tmpdir) if self.tmpdir else None)
        finally:
            # Reap our own children (killed by the teardown) so that they do not linger as zombies.
            for h in self.hosts:
                for p in (h._sshd, h._holder):
                    if p is not None:
                        with contextlib.suppress(Exception):
                            p.kill()
                            p.wait(5)
            clear_stale_pyenv_lock(min_age=0)     # a rehash we killed with the hosts
            atexit.unregister(self.close)

    # -- setup steps
    def _register(self) -> None:
        """Under the machine-wide lock: sweep leftovers, pick/check the subnet, make the temp dir, write the
        state file and the /etc/hosts block. All before creating any link or namespace, so that a concurrent
        session's sweeper never takes our half-built hosts for leftovers."""
        with _locked():
            sweep_stale()
            live = {st.get("subnet"): tag for tag, st in _live_states().items()}
            addrs = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout

            def in_use(sub: str) -> str | None:
                if sub in live:
                    return f"used by live test hosts {live[sub]} (see {STATE_DIR / live[sub]}.json)"
                if re.search(rf"\sinet {re.escape(sub)}\.\d+/", addrs):
                    return "already configured in the root namespace (`ip -4 addr`)"
                return None

            if self._want_subnet is None:
                free = [f"10.200.{x}" for x in range(256) if in_use(f"10.200.{x}") is None]
                if not free:
                    raise HostsError("no free 10.200.X.0/24 subnet; pass subnet=")
                self.subnet = free[0]
            elif (why := in_use(self._want_subnet)) is not None:
                raise HostsError(f"subnet {self._want_subnet}.0/24 is {why}; pass another subnet= or subnet=None")
            for h in self.hosts:
                h.ip = f"{self.subnet}.{h.index}"
            self.tmpdir = Path(tempfile.mkdtemp(prefix=f"{self.tag}."))
            start = _proc_start(os.getpid())
            state = {"owner_pid": os.getpid(), "owner_start": start[1] if start else 0, "subnet": self.subnet,
                     "tmpdir": str(self.tmpdir), "n": self.n}
            (STATE_DIR / f"{self.tag}.json").write_text(json.dumps(state))
            lines = [f"{h.ip} {h.name}" for h in self.hosts] + [f"{self.root_ip} {self.root_name}"]
            self.hosts_file.write_text("\n".join(lines) + "\n")
            _rewrite_etc_hosts(lambda ls: ls + [BLOCK_BEGIN.format(tag=self.tag), *lines,
                                                BLOCK_END.format(tag=self.tag)])

    def _make_network(self) -> None:
        # One `ip -batch` for the root namespace and one per host: a few processes instead of 6n.
        root = [f"link add {self.bridge} type bridge",
                f"addr add {self.root_ip}/24 dev {self.bridge}",
                f"link set {self.bridge} up"]
        for h in self.hosts:
            veth = f"{self.tag}-v{h.index}"
            root += [f"netns add {h.netns}",
                     f"link add {veth} type veth peer name eth0 netns {h.netns}",
                     f"link set {veth} master {self.bridge} up"]
        _run(["ip", "-batch", "-"], "creating the bridge and network namespaces", "\n".join(root) + "\n")
        for h in self.hosts:
            cmds = ["link set lo up", f"addr add {h.ip}/24 dev eth0", "link set eth0 up"]
            _run(["ip", "-n", h.netns, "-batch", "-"], f"configuring {h.name}'s network", "\n".join(cmds) + "\n")

    def _start_holders(self) -> None:
        ns_flags = ["--uts"] + (["--ipc"] if self.ipc else []) + (["--mount", "--propagation", "slave"] if self.mount else [])
        for h in self.hosts:
            err = open(self._path(f"{h.name}.holder.log"), "w")
            # start_new_session: a Ctrl-C meant for pytest must not kill the hosts before the teardown runs.
            h._holder = subprocess.Popen(
                ["nsenter", f"--net={NETNS_DIR / h.netns}", "unshare", *ns_flags, "--",
                 sys.executable, "-c", _HOLDER, h.name, "1" if self.mount else "0"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
            err.close()
        for h in self.hosts:
            assert h._holder is not None and h._holder.stdout is not None
            line = h._holder.stdout.readline()  # blocks until ready or the holder dies (EOF)
            if line != b"ready\n":
                h._holder.wait(5)
                log = self._path(f"{h.name}.holder.log").read_text().strip()
                raise HostsError(f"namespace holder of {h.name} failed (exit {h._holder.returncode}): {log}")
            h._holder.stdout.close()

    def _start_sshds(self) -> None:
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
        _run(keygen + ["-C", f"{self.tag}-client", "-f", str(self.identity)], "ssh-keygen")
        self._path("authorized_keys").write_text(Path(f"{self.identity}.pub").read_text())
        # sshd refuses to start without its privilege separation dir (normally made by the init script).
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        for h in self.hosts:
            hostkey = self._path(f"{h.name}.hostkey")
            _run(keygen + ["-C", h.name, "-f", str(hostkey)], "ssh-keygen")
            cfg = self._path(f"{h.name}.sshd_config")
            cfg.write_text(_sshd_config(h.ip, hostkey, self._path("authorized_keys")))
            log = open(self._path(f"{h.name}.sshd.log"), "w")
            # -D: stay in the foreground, so that we own the process; -e: log to the log file.
            h._sshd = h.popen([SSHD, "-D", "-e", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                              stdout=log, stderr=log, start_new_session=True)
            log.close()
        self.ssh_config.write_text(self._ssh_client_config())
        self.bindir.mkdir()
        for prog in ("ssh", "scp"):
            w = self.bindir / prog
            w.write_text(f'#!/bin/sh\nexec /usr/bin/{prog} -F "{self.ssh_config}" "$@"\n')
            w.chmod(0o755)
        for h in self.hosts:
            self._wait_sshd(h)

    def _wait_sshd(self, h: Host, timeout: float = 15.0) -> None:
        """Until sshd answers with its banner at the host's IP, seen from the root namespace."""
        assert h._sshd is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if h._sshd.poll() is not None:
                log = self._path(f"{h.name}.sshd.log").read_text().strip()
                raise HostsError(f"sshd of {h.name} exited with {h._sshd.returncode}: {log}")
            with contextlib.suppress(OSError):
                with socket.create_connection((h.ip, 22), timeout=1) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return
            time.sleep(0.02)
        raise HostsError(f"sshd of {h.name} not answering on {h.ip}:22 after {timeout} s; "
                         f"log: {self._path(f'{h.name}.sshd.log')}")

    def _ssh_client_config(self) -> str:
        parts = [f"Host {h.name}\n    HostName {h.ip}\n" for h in self.hosts]
        # Common options also for the bare IPs, so `ssh -F cfg 10.200.0.2` works as well.
        parts.append(f"Host {self.tag}-* {self.subnet}.*\n"
                     "    User root\n"
                     f"    IdentityFile {self.identity}\n"
                     "    IdentitiesOnly yes\n"
                     "    StrictHostKeyChecking no\n"
                     "    UserKnownHostsFile /dev/null\n"
                     "    GlobalKnownHostsFile /dev/null\n"
                     "    CheckHostIP no\n"
                     "    UpdateHostKeys no\n"
                     "    LogLevel ERROR\n"
                     "    BatchMode yes\n"
                     "    ConnectTimeout 10\n")
        return "\n".join(parts)

    # -- pytest
    @staticmethod
    def fixture(n: int = 2, scope: str = "function", **kw: Any) -> Any:
        """A pytest fixture yielding started Hosts, e.g. `hosts3 = Hosts.fixture(n=3, mount=True)` at module
        level defines the fixture `hosts3`. Skips when not root; fails with the fix when sshd is missing."""
        import pytest

        @pytest.fixture(scope=scope)
        def _hosts() -> Iterator[Hosts]:
            if os.geteuid() != 0:
                pytest.skip("the multi-host harness needs root")
            with Hosts(n, **kw) as hs:
                yield hs
        return _hosts


def _sshd_config(ip: str, hostkey: Path, authorized_keys: Path) -> str:
    return "\n".join([
        f"ListenAddress {ip}:22",
        "ListenAddress 127.0.0.1:22",
        f"HostKey {hostkey}",
        "PidFile none",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        f"AuthorizedKeysFile {authorized_keys}",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        # Our keys live under /tmp (mode 1777), which StrictModes would reject.
        "StrictModes no",
        # No PAM: nothing to configure, and sessions need no login records.
        "UsePAM no",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        # MPI launchers open many connections at once; the default MaxStartups 10:30:100 drops some.
        "MaxStartups 200",
        "MaxSessions 200",
        "AcceptEnv LANG LC_* HPCCKPT_* DMTCP_*",
        "Subsystem sftp internal-sftp",
        "LogLevel INFO",
        "",
    ])


if __name__ == "__main__":
    if sys.argv[1:] == ["--sweep"]:
        print("removed:", " ".join(sweep_stale()) or "nothing")
    else:
        print("usage: python tests/hosts.py --sweep   (remove leftovers of crashed test-host harnesses)")
        sys.exit(2)

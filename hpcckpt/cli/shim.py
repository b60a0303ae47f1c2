"""The ssh and srun a launched job sees (hpcckpt/shims/ssh, hpcckpt/shims/srun -> here): the remote command
runs under an agent of the same computation on the other host, its standard I/O relayed over TCP connections
inside the computation (agent/remoteio.py explains the design).

    python -m hpcckpt.cli.shim ssh [ssh options] host command...
    python -m hpcckpt.cli.shim srun [srun options] command...

An ssh without a command (an interactive login) and calls outside a launched job go straight to the real
program. Exit status: the remote command's (srun: the highest of its tasks'), 255 (ssh) or the real
launcher's own when it fails before the command starts.
"""
from __future__ import annotations

import os
import select
import shlex
import shutil
import socket
import subprocess
import sys
import time

from .. import installprefix
from ..agent import remoteio
from ..coordinator import protocol
from ..coordinator.binding import address_towards, is_loopback, open_towards
from ..coordinator.client import CoordinatorUnreachable

# ssh options that take a value (OpenSSH 9)
SSH_VALUE_OPTS = set("BbcDEeFIiJLlmOoPpQRSWw")
SRUN_VALUE_SHORT = set("ABcdDeGiJLmMnNopqrStTwWx")
SRUN_VALUE_LONG = {"account", "acctg-freq", "bcast", "begin", "chdir", "cluster-constraint", "clusters",
                   "comment", "constraint", "container", "core-spec", "cores-per-socket", "cpu-bind",
                   "cpu-freq", "cpus-per-gpu", "cpus-per-task", "dependency", "distribution", "epilog", "error",
                   "exclude", "export", "gpu-bind", "gpu-freq", "gpus", "gpus-per-node", "gpus-per-socket",
                   "gpus-per-task", "gres", "gres-flags", "hint", "input", "job-name", "jobid", "kill-on-bad-exit",
                   "licenses", "mail-type", "mail-user", "mcs-label", "mem", "mem-bind", "mem-per-cpu",
                   "mem-per-gpu", "mincpus", "mpi", "network", "nice", "nodefile", "nodelist", "nodes",
                   "ntasks", "ntasks-per-core", "ntasks-per-gpu", "ntasks-per-node", "ntasks-per-socket",
                   "open-mode", "output", "partition", "power", "prolog", "propagate", "qos", "reservation",
                   "signal", "slurmd-debug", "sockets-per-node", "task-epilog", "task-prolog", "thread-spec",
                   "threads-per-core", "time", "time-min", "tmp", "uid", "gid", "wait", "wckey", "workdir"}
ACCEPT_TIMEOUT = float(os.environ.get("HPCCKPT_REMOTE_TIMEOUT", 120.0))


def split_ssh(args: list[str]) -> tuple[list[str], str | None, list[str]]:
    """(options, destination, command) of an ssh command line."""
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break
        # a cluster of flags, the last of which may take a value (attached or next)
        for j, ch in enumerate(a[1:], 1):
            if ch in SSH_VALUE_OPTS:
                if j == len(a) - 1:
                    i += 1
                break
        i += 1
    if i >= len(args):
        return args, None, []
    return args[:i], args[i], args[i + 1:]


def split_srun(args: list[str]) -> tuple[list[str], list[str]]:
    """(options, command) of an srun command line."""
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return args[:i], args[i + 1:]
        if not a.startswith("-"):
            break
        if a.startswith("--"):
            if "=" not in a and a[2:] in SRUN_VALUE_LONG:
                i += 1
        elif len(a) == 2 and a[1] in SRUN_VALUE_SHORT:
            i += 1
        i += 1
    return args[:i], args[i:]


def without_srun_input(opts: list[str]) -> list[str]:
    out, skip = [], False
    for a in opts:
        if skip:
            skip = False
        elif a in ("-i", "--input"):
            skip = True
        elif not (a.startswith("--input=") or (a.startswith("-i") and len(a) > 2)):
            out.append(a)
    return out


def real_program(name: str) -> str:
    """The real ssh/srun: first on PATH once our shim directory is taken out."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and os.path.realpath(p) != os.path.realpath(remoteio.SHIM_DIR))
    found = shutil.which(name, path=path)
    if not found:
        print(f"hpcckpt {name}: the real {name} is not on PATH", file=sys.stderr)
        sys.exit(127)
    return found


def ssh_hostname(real: str, opts: list[str], dest: str) -> str:
    """The host name ssh will really connect to (aliases in ssh_config resolved by `ssh -G`)."""
    try:
        out = subprocess.run([real, "-G", *opts, dest], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("hostname "):
                return line.split(None, 1)[1]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return dest.rsplit("@", 1)[-1]


class Relay:
    """The shim's side of the remote tasks' standard I/O."""

    def __init__(self, listener: socket.socket, token: bytes, launcher: subprocess.Popen):
        self.listener, self.token, self.launcher = listener, token, launcher
        self.ntasks: int | None = None
        self.socks: dict[tuple[int, int], socket.socket] = {}
        self.codes: dict[int, int] = {}
        self.ctl_buf: dict[int, bytes] = {}
        self.stdin_open = True

    def accept_all(self) -> int | None:
        """Accept every task's four connections; returns the launcher's exit status if it failed first."""
        deadline = time.monotonic() + ACCEPT_TIMEOUT
        while self.ntasks is None or len(self.socks) < 4 * self.ntasks:
            code = self.launcher.poll()
            if code is not None and code != 0:
                return code
            if time.monotonic() > deadline:
                print(f"hpcckpt: the remote command did not connect back within {ACCEPT_TIMEOUT:.0f} s",
                      file=sys.stderr)
                return 255
            r, _, _ = select.select([self.listener], [], [], 0.2)
            if not r:
                continue
            sk, _ = self.listener.accept()
            sk.settimeout(10)
            try:
                head = b""
                while len(head) < remoteio.HEADER.size:
                    part = sk.recv(remoteio.HEADER.size - len(head))
                    if not part:
                        break
                    head += part
            except OSError:
                head = b""
            sk.settimeout(None)
            if len(head) < remoteio.HEADER.size:
                sk.close()
                continue
            token, role, task, ntasks = remoteio.HEADER.unpack(head)
            if token != self.token:
                sk.close()
                continue
            self.ntasks = ntasks
            self.socks[(task, role)] = sk
        self.listener.close()
        return None

    def run(self) -> int:
        out = {sk: role for (task, role), sk in self.socks.items() if role in (1, 2)}     # -> our fd 1 or 2
        ctl = {sk: task for (task, role), sk in self.socks.items() if role == 3}
        stdin_to = self.socks.get((0, 0))
        for (_task, role), sk in self.socks.items():
            if role == 0 and sk is not stdin_to:
                sk.shutdown(socket.SHUT_WR)      # only the first task reads our standard input (like mpiexec)
        while out or ctl:
            watch = list(out) + list(ctl) + ([0] if self.stdin_open and stdin_to is not None else [])
            r, _, _ = select.select(watch, [], [], 1.0)
            self._reap_launcher()
            for ready in r:
                if not isinstance(ready, socket.socket):       # fd 0: our standard input
                    if stdin_to is not None:
                        self._forward_stdin(stdin_to)
                    continue
                sk = ready
                data = sk.recv(65536)
                if sk in out:
                    if data:
                        _write_all(out[sk], data)
                    else:
                        del out[sk]
                        sk.close()
                else:
                    task = ctl[sk]
                    self.ctl_buf[task] = self.ctl_buf.get(task, b"") + data
                    if not data or b"\n" in self.ctl_buf[task]:
                        text = self.ctl_buf[task].split(b"\n")[0].strip()
                        self.codes[task] = int(text) if text.isdigit() else 255
                        del ctl[sk]
                        sk.close()
        if stdin_to is not None:
            stdin_to.close()
        return max(self.codes.values(), default=255)

    def _forward_stdin(self, sk: socket.socket) -> None:
        try:
            data = os.read(0, 65536)
        except OSError:
            data = b""
        if data:
            try:
                sk.sendall(data)
                return
            except OSError:
                pass
        self.stdin_open = False
        try:
            sk.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _reap_launcher(self) -> None:
        """The real ssh/srun is no longer needed once connected (after a restart it does not even exist)."""
        try:
            self.launcher.poll()
        except ChildProcessError:
            pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except BrokenPipeError:
            return
        view = view[n:]


def _fill_std_fds() -> None:
    """Open /dev/null on a closed fd 0, 1 or 2 (Hydra starts srun with its standard input closed): else our
    listening socket would become "standard input", and be relayed as such once closed."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    kind, args = argv[0], argv[1:]
    _fill_std_fds()
    real = real_program(kind)
    job = remoteio.read_job_file(os.environ.get("HPCCKPT_JOB_FILE", ""))
    if kind == "ssh":
        opts, dest, command = split_ssh(args)
        if dest is None or not command or job is None:
            os.execv(real, [real, *args])        # a login session, or not inside a launched job
        towards = ssh_hostname(real, opts, dest)
        remote_cmd = remoteio.wrap(["/bin/sh", "-c", " ".join(command)])
    else:
        opts, command = split_srun(args)
        if not command or job is None:
            os.execv(real, [real, *args])
        # every task reads the coordinator's secret on its standard input (the job's own input goes over the
        # relay): whatever input the caller chose (Hydra says --input none), srun must pass ours to all tasks
        opts = without_srun_input(opts) + ["--input=all"]
        towards = None
        remote_cmd = remoteio.wrap(command)
    here = address_towards(towards)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", 0))
    listener.listen(256)
    token = os.urandom(16)
    coord_host = job["coord_host"]
    if is_loopback(coord_host) or coord_host == "0.0.0.0":
        # the coordinator is on this host and listens on loopback: have it listen towards the other host too
        coord_host = here
        try:
            open_towards(int(job["coord_port"]), here)
        except CoordinatorUnreachable as e:
            print(f"hpcckpt {kind}: cannot start the command on {towards or 'the allocated nodes'}: {e}",
                  file=sys.stderr)
            return 255
    python = installprefix.remote_python()      # (DMTCP_PREFIX_PATH: installed elsewhere there)
    launch = [python, "-m", "hpcckpt.cli.main", "launch", "--join", "--coord-host", coord_host,
              "--coord-port", str(job["coord_port"]), "--ckptdir", job["ckptdir"], "--secret-stdin",
              "--remote-io", f"{here}:{listener.getsockname()[1]}:{token.hex()}", "-q", "--", *remote_cmd]
    if os.environ.get("HPCCKPT_KEY_FILE"):
        # the key our images are signed with, the same file there (ssh does not pass the environment; a
        # cluster shares it through the home directory: image/auth.py)
        launch = ["env", f"HPCCKPT_KEY_FILE={os.environ['HPCCKPT_KEY_FILE']}", *launch]
    # the launching agent's settings (--no-forked-checkpoint, --gzip, storage levels, ...: agent/remoteio.py);
    # the flags above still win
    settings = job.get("settings")
    launch = [*remoteio.env_prefix(settings if isinstance(settings, dict) else {}), *launch]
    if kind == "ssh":
        assert dest is not None                  # a login session exec'ed the real ssh above
        full = [real, *opts, dest, shlex.join(launch)]
    else:
        full = [real, *opts, *launch]
    try:
        secret = protocol.read_secret(int(job["coord_port"]))
    except protocol.SecretError as e:
        print(f"hpcckpt {kind}: {e}", file=sys.stderr)
        return 255
    launcher = subprocess.Popen(full, stdin=subprocess.PIPE, stdout=2, stderr=2)
    assert launcher.stdin is not None
    try:
        launcher.stdin.write(secret.hex().encode() + b"\n")
        launcher.stdin.close()
    except BrokenPipeError:
        pass
    relay = Relay(listener, token, launcher)
    failed = relay.accept_all()
    if failed is not None:
        return failed
    return relay.run()


if __name__ == "__main__":
    sys.exit(main())

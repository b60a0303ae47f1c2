"""hpcckpt launch / dmtcp_launch / dmtcp_checkpoint [OPTIONS] COMMAND [ARGS...]"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys

from ..agent import remoteio
from ..agent.agent import Agent
from ..agent.aware_server import AwareServer
from ..agent.aware_server import new_name as new_aware_name
from ..agent.join import ANY, JOIN, NEW, find_or_start
from ..agent.procs import JobProcess, new_agent_id, new_unique_id
from ..coordinator import protocol
from ..coordinator.client import Connection, CoordinatorUnreachable
from ..coordinator.protocol import SecretError
from ..engine.linux import SYS, set_next_pid, syscall
from ..image import safefs, store
from ..plugins import PluginError
from ..relay import find as relays
from ..settings import RELAY_MODES
from . import dmtcpopts, jobrun, levelopts
from .common import Fail, Parser, add_coord_options, run_main, settings_from, setup_logging
from .jobrun import run_job

log = logging.getLogger("hpcckpt")
CLOSE_RANGE_CLOEXEC = 4

DESCRIPTION = """Runs COMMAND under checkpoint control and stays in the foreground until it ends, exiting with
its exit code (128+N if it was killed by signal N). Joins the coordinator at --coord-host:--coord-port if one
answers, else starts one in the background (which exits when the computation ends).

Compression: --gzip / DMTCP_GZIP=1 compress images with zstd (level 1, one independent frame per 4 MiB,
all cores); off by default because on numeric data it saves little and costs CPU while the program runs (see
bench/RESULTS.md). The option keeps DMTCP's name. Our own failures exit with DMTCP_FAIL_RC (default 99)."""


def parser(prog: str) -> Parser:
    p = Parser(prog, DESCRIPTION)
    add_coord_options(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-j", "--join-coordinator", "--join", dest="policy", action="store_const", const=JOIN,
                   help="join an existing coordinator; fail if none answers")
    g.add_argument("--new-coordinator", "--new", dest="policy", action="store_const", const=NEW,
                   help="start a new coordinator; fail if one already listens on the port")
    g.add_argument("--any-coordinator", dest="policy", action="store_const", const=ANY,
                   help="join one if it answers, else start one (default)")
    p.add_argument("-i", "--interval", metavar="S", help="checkpoint every S seconds (env DMTCP_CHECKPOINT_INTERVAL)")
    p.add_argument("-c", "--ckptdir", metavar="DIR", help="where images go (env DMTCP_CHECKPOINT_DIR; default: "
                                                          "current directory; created if missing)")
    z = p.add_mutually_exclusive_group()
    z.add_argument("--gzip", dest="compress", action="store_const", const=True,
                   help="compress images (zstd; env DMTCP_GZIP=1)")
    z.add_argument("--no-gzip", dest="compress", action="store_const", const=False,
                   help="write images uncompressed (env DMTCP_GZIP=0; default)")
    p.add_argument("--ckpt-signal", metavar="SIG", help="a signal sent to this launcher asks for a checkpoint of the "
                                                        "whole computation (env DMTCP_SIGCKPT; e.g. USR2)")
    f = p.add_mutually_exclusive_group()
    f.add_argument("--forked-checkpoint", dest="forked", action="store_const", const=True,
                   help="write images from a copy-on-write fork while the program runs on (default; env "
                        "DMTCP_FORKED_CHECKPOINT)")
    f.add_argument("--no-forked-checkpoint", dest="forked", action="store_const", const=False,
                   help="keep the program stopped until its images are written")
    p.add_argument("--incremental", action="store_const", const=True, default=None,
                   help="store only pages changed since the previous checkpoint (env HPCCKPT_INCREMENTAL=1)")
    p.add_argument("--no-pid-namespace", dest="pid_namespace", action="store_const", const=False,
                   help="run the job without its own PID namespace (restarted processes then get new PIDs; "
                        "env HPCCKPT_PID_NAMESPACE=0)")
    p.add_argument("-q", "--quiet", action="count", default=None,
                   help="only warnings and errors; twice: only errors (env DMTCP_QUIET=0|1|2)")
    p.add_argument("--relay", choices=RELAY_MODES, help="on: the agents of this node talk to the coordinator through "
                   "one relay (many agents per node; env HPCCKPT_RELAY; default off)")
    dmtcpopts.add_launch_options(p)
    # used by our ssh/srun inside a job (cli/shim.py) to start the remote part of a computation
    p.add_argument("--remote-io", metavar="HOST:PORT:TOKEN", help=argparse.SUPPRESS)
    p.add_argument("--secret-stdin", action="store_true", help=argparse.SUPPRESS)
    levelopts.add_options(p)                  # multi-level storage (--local-dir, --drain, ...)
    p.add_argument("command", nargs=argparse.REMAINDER, help="the program and its arguments")
    return p


def start_program(argv: list[str], env: dict | None = None, stdio: list[int] | None = None) -> tuple[int, int, int]:
    """Fork the program, held before exec until we write to the returned go-fd. Returns (pid, go_fd, err_fd).
    stdio: fds to become the program's 0, 1, 2 (and 3: a remote command's control connection)."""
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(go_w)
            os.close(err_r)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            if os.read(go_r, 1) != b"g":
                os._exit(127)
            os.close(go_r)
            keep = 3
            if stdio:
                # above every fd we may still hold, then into place
                high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in stdio]
                for n, fd in enumerate(high):
                    os.dup2(fd, n)
                keep = len(stdio)
            # Only standard I/O is passed on: descriptors inherited from whoever started us (a test harness,
            # a batch system) lead outside the computation and could not be checkpointed.
            syscall(SYS.close_range, keep, 0xFFFFFFFF, CLOSE_RANGE_CLOEXEC)
            if env is None:
                os.execvp(argv[0], argv)
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            os.write(err_w, f"{e.strerror}".encode())
        except BaseException:
            pass
        os._exit(127)
    os.close(go_r)
    os.close(err_w)
    return pid, go_w, err_r


def main(argv: list[str] | None = None, prog: str = "hpcckpt launch") -> int:
    def body(argv):
        args = parser(prog).parse_args(argv)
        if args.command[:1] == ["--"]:
            args.command = args.command[1:]
        if not args.command:
            raise Fail("no command given; usage: " + prog + " [OPTIONS] COMMAND [ARGS...]")
        if not args.command[0].strip():
            raise Fail(f"the command to run is an empty name {args.command[0]!r}")
        s = settings_from(args)
        setup_logging("launch", s.quiet, s.log_level)
        dmtcpopts.note_layerless(args)
        dmtcpopts.prepare(s, args)
        dmtcpopts.make_ckptdir(s.ckptdir)
        if not os.path.isdir(s.ckptdir):
            raise Fail(f"checkpoint directory {s.ckptdir} " + ("is not a directory" if os.path.lexists(s.ckptdir)
                                                                 else "does not exist"))
        if not os.access(s.ckptdir, os.W_OK | os.X_OK):
            raise Fail(f"checkpoint directory {s.ckptdir} is not writable")
        try:
            os.close(safefs.open_dir(s.ckptdir))     # the directory rule (image/safefs.py), up front
        except OSError as e:
            raise Fail(str(e)) from None
        if args.secret_stdin:
            store_secret(s.coord_port, sys.stdin.readline().strip())
        def find():
            try:
                return find_or_start(s, args.policy or ANY)
            except CoordinatorUnreachable as e:
                raise Fail(str(e)) from None
        found = [find()]         # before anything else: no coordinator, no job

        def coordinator():
            # the agent asks again only when its coordinator is gone for good: find (or start) one again
            if found:
                addr = found.pop()
                if s.relay == "on":       # (here, outside the job's namespaces: the relay is no part of the job)
                    relays.ensure_relay(s, *addr)
                return addr
            return find_or_start(s, JOIN if args.policy == JOIN else ANY)
        return run_job(s, prog, lambda: _fail_on_unreachable(coordinator),
                       lambda in_ns, get, not_job: _agent(s, get, args.command, in_ns, not_job, args.remote_io))
    return run_main(prog, body, argv)


def _fail_on_unreachable(fn):
    try:
        return fn()
    except CoordinatorUnreachable as e:
        raise Fail(str(e)) from None


def store_secret(port: int, text: str) -> None:
    """The coordinator's secret, handed to us by the shim that started us on this host (its rundir is not
    ours), kept where our own job's shims will look for it."""
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:        # never store a wrong one: on a shared file system it would lock everyone out
        raise Fail("--secret-stdin: no valid coordinator secret on standard input (did the launcher that "
                   "started us pass its standard input on?)")
    path = protocol.secret_path(port)
    try:
        if protocol.read_secret(port) == key:
            return                     # the same file system as the coordinator's host
    except SecretError:
        pass
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    store.atomic_write(path, key.hex().encode() + b"\n", mode=0o600)


def _agent(s, get_coordinator, command: list[str], in_namespace: bool, not_job: set[int],
           remote_io: str | None = None, computation: str | None = None) -> int:
    """The agent: start the program held before exec, join the coordinator, let the program go, serve."""
    host, port = get_coordinator()
    coordinator = (host, port)
    relay = relays.running_relay(host, port) if s.relay == "on" else None
    if relay is not None:
        host, port = relay              # this node's relay stands for us at the coordinator (hpcckpt/relay/)
    agent_id = new_agent_id()
    try:
        # (through a relay too, we sign with the computation's secret, found by the coordinator's port)
        conn = Connection(host, port, key=protocol.read_secret(coordinator[1]), routing_id=f"agent-{agent_id}".encode(),
                          peer_timeout=s.peer_timeout)
    except SecretError as e:
        raise Fail(str(e)) from None
    stdio = None
    if remote_io:
        try:
            stdio = remoteio.connect_back(remote_io)
        except OSError as e:
            raise Fail(f"cannot connect back to {remote_io.rsplit(':', 1)[0]} for standard I/O: {e}") from None
    job_file = os.path.join(protocol.rundir(), f"job-{os.urandom(8).hex()}.json")
    if in_namespace:
        # Programs name files after their PIDs (Open MPI's /tmp/ompi.<pid>, /dev/shm segments): in a namespace of
        # its own every job would get the same low PIDs and two jobs on a node would collide. A random first PID keeps
        # them apart; restarts give the job its PIDs back anyway.
        try:
            set_next_pid(300 + int.from_bytes(os.urandom(2), "little") % 30000)
        except OSError as e:
            log.debug("cannot choose the job's first PID: %s", e)
    api = AwareServer(lambda: set(), lambda: None, lambda: {})
    api.listen(new_aware_name())
    job_env = remoteio.job_environment(job_file)
    if api.name:
        job_env["HPCCKPT_AWARE"] = api.name          # hpcckpt.aware in the program finds us there
    pid, go, err = start_program(command, job_env,
                                 [sk.fileno() for sk in stdio] if stdio else None)
    for sk in stdio or []:
        sk.close()                       # the program's now
    proc = JobProcess(pid, new_unique_id(pid), os.path.basename(command[0]))
    try:
        agent = Agent(s, conn, [proc], pid_namespace=in_namespace, not_job=not_job, agent_id=agent_id,
                      computation=computation)   # (an application-level restart continues its computation)
    except PluginError as e:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        conn.close()
        raise Fail(str(e)) from None
    agent.job_file = job_file
    agent.coord_address = coordinator         # (the job file names the coordinator, not our relay)
    agent.link.find = get_coordinator          # a fallback when the coordinator is gone for good
    if relay is not None:
        agent.link.secret_port = coordinator[1]   # (the relay's port has no secret of its own)
    agent.serve_api(api)
    agent.on_root_exit = jobrun.root_exited   # children that outlive it go on
    try:
        agent.hello()
    except CoordinatorUnreachable as e:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        conn.close()
        raise Fail(str(e)) from None
    os.write(go, b"g")
    os.close(go)
    why = os.read(err, 4096).decode()
    os.close(err)
    if why:
        os.waitpid(pid, 0)
        agent.send({"type": "bye", "reason": "could not start the program"})
        conn.close()
        raise Fail(f"cannot run {command[0]}: {why}")
    try:
        return agent.run()
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())

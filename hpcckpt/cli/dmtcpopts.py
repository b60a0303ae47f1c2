"""DMTCP's own options of dmtcp_launch, dmtcp_restart and dmtcp_coordinator (DMTCP 3.x to 5.0), each mapped to
what it means for us (the table with reasons: docs/dmtcp-compat.md). The command modules add these to their
parsers and pass `flags(args)` into Settings (defaults < YAML < environment < flags)."""
from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("hpcckpt")

DMTCP_COMPAT = "DMTCP 3.0-5.0"

# DMTCP's plugins that have no separate layer here: the engine saves these resources from the kernel's view of
# the process (ptrace, /proc), so there is no wrapper library to leave out. Disabling one is accepted and said.
_LAYERLESS = {
    "alloc": "malloc arenas are saved as ordinary memory",
    "dl": "dlopen()ed libraries are saved as ordinary mappings",
    "ipc": "pipes, sockets, ptys and files are always saved (a computation with one we cannot save is refused)",
    "svipc": "System V shared memory, semaphores and queues are always saved",
    "timer": "POSIX timers and timerfds are always saved",
    "event": "epoll, eventfd, signalfd and inotify are always saved",
}


def _plugin_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DMTCP plugins")
    g.add_argument("--with-plugin", dest="plugins", metavar="LIST",
                   help="plugins to load: file paths (colon-separated, DMTCP's way) or module:Class (env DMTCP_PLUGIN)")
    g.add_argument("--modify-env", dest="modify_env", action="store_const", const=True,
                   help="at restart, apply NAME=VALUE / NAME lines of <ckptdir>/dmtcp_env.txt to the restarted "
                        "processes' environment")
    g.add_argument("--pathvirt", dest="pathvirt", action="store_const", const=True,
                   help="at restart, rewrite file paths by the OLD:NEW prefixes of DMTCP_PATH_MAPPING (or "
                        "--path-prefix)")
    g.add_argument("--path-prefix", dest="path_prefixes", action="append", metavar="OLD:NEW",
                   help="a path prefix to rewrite at restart (repeatable; implies --pathvirt)")
    for name in ("alloc", "dl", "ipc", "svipc", "timer", "event"):
        g.add_argument(f"--disable-{name}-plugin", dest=f"disable_{name}", action="store_true",
                       help=f"accepted; no separate layer here: {_LAYERLESS[name]}")
    g.add_argument("--disable-pid-plugin", dest="pid_namespace", action="store_const", const=False,
                   help="no PID virtualization: same as --no-pid-namespace (restarted processes get new PIDs)")
    g.add_argument("--disable-all-plugins", "--no-plugins", dest="disable_all", action="store_true",
                   help="no plugins of ours or yours are loaded (PID virtualization stays: see "
                        "--disable-pid-plugin)")
    # options of older DMTCP releases whose job is done here without being asked
    for flag, what in (("--ptrace", "processes traced by gdb/strace inside the job are saved as they are"),
                       ("--batch-queue", "Slurm, PBS and Grid Engine jobs are recognised from their environment"),
                       ("--rm", "Slurm, PBS and Grid Engine jobs are recognised from their environment"),
                       ("--ib", "InfiniBand verbs are not saved: run MPI over TCP or shared memory"),
                       ("--infiniband", "InfiniBand verbs are not saved: run MPI over TCP or shared memory"),
                       ("--ib2tcp", "InfiniBand verbs are not saved: run MPI over TCP or shared memory"),
                       ("--explicit-srun", "srun inside a job is always wrapped"),
                       ("--kernel-loader", "no split-process loader: the whole process is saved"),
                       ("--mpi", "MPI ranks are recognised and restored with their peers")):
        g.add_argument(flag, dest=f"noop_{flag.strip('-').replace('-', '_')}", action="store_true",
                       help=f"accepted: {what}")


def _applevel_flags(p: argparse.ArgumentParser, launch: bool) -> None:
    """The application-level mode (docs/applevel.md): the program writes its own restart files."""
    g = p.add_argument_group("application-level mode (docs/applevel.md)")
    if launch:
        g.add_argument("--engine", choices=("ptrace", "signal"), help="signal: the program writes its own restart "
                                                                      "files (env HPCCKPT_ENGINE)")
        g.add_argument("--app-files", metavar="GLOB", help="its restart files (env HPCCKPT_APP_FILES)")
    g.add_argument("--app-signal", metavar="SIG", help="asks it to write them (default USR1; env HPCCKPT_APP_SIGNAL)")
    g.add_argument("--app-command", metavar="CMD", help="run CMD instead of sending the signal (env "
                                                        "HPCCKPT_APP_COMMAND)")
    g.add_argument("--app-settle", metavar="S", help="unchanged S seconds = written (default 2; env "
                                                     "HPCCKPT_APP_SETTLE)")
    g.add_argument("--app-timeout", metavar="S", help="else the checkpoint fails (default 240; env "
                                                      "HPCCKPT_APP_TIMEOUT)")
    g.add_argument("--app-restart", metavar="CMD", help="the program's restart command (env HPCCKPT_APP_RESTART)")


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--tmpdir", dest="tmpdir", metavar="DIR",
                   help="directory for our temporary files (env DMTCP_TMPDIR; created if missing)")
    p.add_argument("--coord-logfile", dest="coord_logfile", metavar="FILE",
                   help="a coordinator we start writes its log to FILE (env DMTCP_COORD_LOG_FILENAME)")


def add_launch_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DMTCP checkpoint options")
    g.add_argument("--checkpoint-open-files", "--ckpt-open-files", dest="ckpt_open_files", action="store_const",
                   const=True, help="save the contents of every regular file open at checkpoint and put them back "
                                    "at restart (env DMTCP_CHECKPOINT_OPEN_FILES=1)")
    g.add_argument("--allow-file-overwrite", dest="allow_file_overwrite", action="store_const", const=True,
                   help="with --checkpoint-open-files: a restart may overwrite a file changed since the checkpoint "
                        "(default: it refuses, naming the file)")
    u = g.add_mutually_exclusive_group()
    u.add_argument("--enable-unique-checkpoint-filenames", dest="unique_ckpt", action="store_const", const=True,
                   help="keep every checkpoint (each in its own generation directory; none pruned)")
    u.add_argument("--disable-unique-checkpoint-filenames", dest="unique_ckpt", action="store_const", const=False,
                   help="keep only the newest checkpoints (--keep, default 2)")
    g.add_argument("--hbict", "--no-hbict", dest="noop_hbict", action="store_true",
                   help="accepted: delta compression is --incremental here")
    g.add_argument("--prefix", dest="install_prefix", metavar="DIR",
                   help="where hpcckpt is installed on the other hosts (DIR/bin/python, DIR/bin/hpcckpt; env "
                        "DMTCP_PREFIX_PATH; default: the same path as here)")
    _common_flags(p)
    _plugin_flags(p)
    _applevel_flags(p, launch=True)


def add_restart_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DMTCP restart options")
    g.add_argument("--no-strict-checking", dest="no_strict_checking", action="store_const", const=True,
                   help="restart images owned by another user (env DMTCP_DISABLE_STRICT_CHECKING)")
    g.add_argument("-r", "--restartdir", dest="restartdir", metavar="DIR",
                   help="restart the newest complete checkpoint found in DIR (same as --from)")
    g.add_argument("--debug-restart-pause", dest="restart_pause", metavar="N", type=int,
                   help="1..7: leave the restarted processes stopped, detached, for a debugger to attach "
                        "(env DMTCP_RESTART_PAUSE); they run on SIGCONT")
    g.add_argument("--gdb", dest="restart_pause", metavar="N", type=int, help="same as --debug-restart-pause")
    g.add_argument("--allow-file-overwrite", dest="allow_file_overwrite", action="store_const", const=True,
                   help="saved open files may overwrite files changed since the checkpoint")
    g.add_argument("--checkpoint-open-files", "--ckpt-open-files", dest="ckpt_open_files", action="store_const",
                   const=True, help="later checkpoints save the contents of open files")
    _common_flags(p)
    _plugin_flags(p)
    _applevel_flags(p, launch=False)


def add_coordinator_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DMTCP coordinator options")
    g.add_argument("--exit-after-ckpt", dest="exit_after_ckpt", action="store_const", const=True,
                   help="kill the computation once a checkpoint is complete")
    g.add_argument("--write-kv-data", dest="noop_write_kv", action="store_true",
                   help="accepted: the status file (--status-file) holds the coordinator's data")
    g.add_argument("--mpi", dest="noop_mpi", action="store_true", help="accepted: MPI ranks are recognised")
    _common_flags(p)


NAMES = ("ckpt_open_files", "allow_file_overwrite", "tmpdir", "no_strict_checking", "restart_pause",
         "unique_ckpt", "coord_logfile", "exit_after_ckpt", "plugins", "modify_env", "pathvirt", "path_prefixes",
         "engine", "app_files", "app_signal", "app_command", "app_settle", "app_timeout", "app_restart")


def flags(args: argparse.Namespace) -> dict:
    """The DMTCP options given, as Settings flags (None: not given)."""
    out = {k: getattr(args, k, None) for k in NAMES}
    prefixes = out.get("path_prefixes")
    if prefixes:
        out["path_prefixes"] = list(prefixes)
        out["pathvirt"] = True
    if getattr(args, "disable_all", False) or \
            os.environ.get("DMTCP_DISABLE_ALL_PLUGINS", "").strip().lower() in ("1", "yes", "true"):
        out["plugins"] = []
    if getattr(args, "pid_namespace", None) is False:
        out["pid_namespace"] = False
    elif os.environ.get("DMTCP_PID_PLUGIN", "").strip() == "0":     # the variable of --disable-pid-plugin
        out["pid_namespace"] = False
    return out


def note_layerless(args: argparse.Namespace) -> None:
    for name, why in _LAYERLESS.items():
        if getattr(args, f"disable_{name}", False):
            log.info("--disable-%s-plugin: nothing to disable here: %s", name, why)


def prepare(s, args: argparse.Namespace | None = None, engine: bool = True) -> None:
    """What the options mean for processes we start: the tmpdir exists, and a coordinator we start finds its log
    file and tmpdir in the environment it inherits (so do the job's shims: --prefix). engine=False: the engine's
    part (configure_engine) is left out - the coordinator has no engine, and a restart configures it later, off
    the path of its coordinator's start (issue 20)."""
    if args is not None and getattr(args, "install_prefix", None):
        os.environ["DMTCP_PREFIX_PATH"] = os.path.abspath(args.install_prefix)
    if s.tmpdir:
        os.makedirs(s.tmpdir, mode=0o700, exist_ok=True)
        os.environ["DMTCP_TMPDIR"] = os.path.abspath(s.tmpdir)
    if s.coord_logfile:
        os.environ["DMTCP_COORD_LOG_FILENAME"] = os.path.abspath(s.coord_logfile)
    if engine:
        configure_engine(s)
    if s.ckpt_open_files:          # agents started on other hosts and by ssh/srun inside the job
        os.environ["DMTCP_CHECKPOINT_OPEN_FILES"] = "1"
    if s.allow_file_overwrite:
        os.environ["DMTCP_ALLOW_FILE_OVERWRITE"] = "1"


def configure_engine(s) -> None:
    """The engine's share of the options (which open files a checkpoint saves)."""
    from ..engine.fds import openfiles
    openfiles.configure(s.ckpt_open_files, s.open_file_max_bytes, s.allow_file_overwrite)


def make_ckptdir(path: str) -> None:
    """DMTCP creates a missing checkpoint directory (one level, like mkdir -p of the path); so do we."""
    if not os.path.exists(path):
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            log.info("created checkpoint directory %s", path)
        except OSError as e:
            log.debug("cannot create %s: %s", path, e)     # the caller's check names the problem


# dmtcp_command: DMTCP strips leading dashes from a command word and accepts these
_COMMAND_WORDS = {"s": "-s", "status": "-s", "l": "-l", "list": "-l", "c": "-c", "checkpoint": "-c",
                  "bc": "-bc", "bcheckpoint": "-bc", "kc": "-kc", "kcheckpoint": "-kc", "xc": "-kc",
                  "xcheckpoint": "-kc", "k": "-k", "kill": "-k", "q": "-q", "quit": "-q", "i": "-i",
                  "interval": "-i", "h": "--help", "?": "--help", "help": "--help"}


def command_argv(argv: list[str]) -> list[str]:
    """dmtcp_command's command words in any of DMTCP's spellings (s, -s, --status, bc, -bc, xc, -i5, i 5) made
    into our parser's (-s, -bc, -kc, -i 5); options with values are left alone."""
    if argv == ["-h"]:                   # alone it is DMTCP's help; with a value, the coordinator host
        return ["--help"]
    out: list[str] = []
    takes_value = {"-h", "--coord-host", "--host", "-p", "--coord-port", "--port", "--port-file", "--config",
                   "--timeout", "-i", "--interval"}
    skip = False
    for a in argv:
        if skip:
            out.append(a)
            skip = False
            continue
        word = a.lstrip("-")
        if a in takes_value:
            out.append(a)
            skip = True
        elif a.startswith("-") and len(word) > 1 and word[0] == "i" and word[1:].isdigit():
            out += ["-i", word[1:]]
        elif a.startswith("-") and len(word) > 1 and word[0] == "p" and word[1:].isdigit():
            out += ["-p", word[1:]]
        elif word in _COMMAND_WORDS and (not a.startswith("--") or word in ("xcheckpoint",)) and \
                a not in ("-h",):
            mapped = _COMMAND_WORDS[word]
            out.append(mapped)
            skip = mapped == "-i"
        elif a == "--xcheckpoint":
            out.append("-kc")
        else:
            out.append(a)
    return out

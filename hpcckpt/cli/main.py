"""Entry points: `hpcckpt <subcommand>` and the DMTCP-named aliases (dmtcp_launch, dmtcp_restart, ...)."""
from __future__ import annotations

import sys

from .. import __version__

SUBCOMMANDS = {
    "coordinator": ("coordinator", "run the coordinator of a computation (dmtcp_coordinator)"),
    "launch": ("launch", "run a program under checkpoint control (dmtcp_launch)"),
    "restart": ("restart", "restart processes from checkpoint images (dmtcp_restart)"),
    "command": ("command", "control a running coordinator (dmtcp_command)"),
    "inspect": ("inspect", "print what a checkpoint image holds"),
    "dump": ("dump", "checkpoint processes that were not started under hpcckpt (attach with ptrace)"),
    "adopt": ("adopt", "(inside a job) take over processes started without hpcckpt: deadline checkpoints from then on"),
    "relay": ("relay", "(started by launch) a node's relay between its agents and the coordinator"),
    "status": ("status", "show the checkpoints in a checkpoint directory (generations, sizes, batch runs)"),
    "sbatch": ("batch", "submit a batch script to Slurm that checkpoints, requeues and restarts itself"),
    "qsub": ("batch", "submit a batch script to PBS or Grid Engine that checkpoints and carries on itself"),
    "batch-run": ("batch", "(inside a job) run a batch script under checkpoint control"),
}

USAGE = "usage: hpcckpt SUBCOMMAND [OPTIONS] ...\n\n" + "\n".join(
    f"  {name:<12} {text}" for name, (_, text) in SUBCOMMANDS.items()) + \
    "\n\nEvery subcommand answers --help. DMTCP names: dmtcp_coordinator, dmtcp_launch (dmtcp_checkpoint),\n" \
    "dmtcp_restart, dmtcp_command."


def _module(name: str):
    import importlib
    return importlib.import_module(f"hpcckpt.cli.{SUBCOMMANDS[name][0]}")


def _start(name: str, argv: list[str], prog: str, entry: str = "main") -> int:
    """Run a subcommand; environment values its modules read when imported are checked first (one line)."""
    from ..settings import SettingsError, check_environment
    try:
        check_environment()
    except SettingsError as e:
        from .common import env_fail_rc
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2 if name == "command" else 1 if name == "inspect" else env_fail_rc()
    return getattr(_module(name), entry)(argv, prog=prog)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("--help", "-h", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"hpcckpt {__version__}")
        return 0
    if argv[0] not in SUBCOMMANDS:
        print(f"hpcckpt: error: unknown subcommand {argv[0]!r} (see hpcckpt --help)", file=sys.stderr)
        return 2
    if argv[0] == "command":
        return _command(argv[1:], "hpcckpt command")
    entry = {"sbatch": "sbatch_main", "qsub": "qsub_main", "batch-run": "batch_run_main"}.get(argv[0], "main")
    return _start(argv[0], argv[1:], f"hpcckpt {argv[0]}", entry)


def dmtcp_coordinator() -> int:
    return _start("coordinator", sys.argv[1:], "dmtcp_coordinator")


def dmtcp_launch() -> int:
    return _start("launch", sys.argv[1:], "dmtcp_launch")


def dmtcp_checkpoint() -> int:
    return _start("launch", sys.argv[1:], "dmtcp_checkpoint")


def dmtcp_restart() -> int:
    return _start("restart", sys.argv[1:], "dmtcp_restart")


def dmtcp_command() -> int:
    return _command(sys.argv[1:], "dmtcp_command")


def _command(argv: list[str], prog: str) -> int:
    """dmtcp_command: the common calls go the quick way (cli/cmdquick.py: no settings, argparse or libzmq to
    import), the others through the full parser."""
    import os

    from . import cmdquick
    q = cmdquick.parse(argv, os.environ)
    return cmdquick.run(q, prog) if q is not None else _start("command", argv, prog)


if __name__ == "__main__":
    sys.exit(main())

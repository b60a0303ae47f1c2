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
    mod = _module(argv[0])
    entry = {"sbatch": "sbatch_main", "qsub": "qsub_main", "batch-run": "batch_run_main"}.get(argv[0], "main")
    return getattr(mod, entry)(argv[1:], prog=f"hpcckpt {argv[0]}")


def dmtcp_coordinator() -> int:
    return _module("coordinator").main(sys.argv[1:], prog="dmtcp_coordinator")


def dmtcp_launch() -> int:
    return _module("launch").main(sys.argv[1:], prog="dmtcp_launch")


def dmtcp_checkpoint() -> int:
    return _module("launch").main(sys.argv[1:], prog="dmtcp_checkpoint")


def dmtcp_restart() -> int:
    return _module("restart").main(sys.argv[1:], prog="dmtcp_restart")


def dmtcp_command() -> int:
    return _module("command").main(sys.argv[1:], prog="dmtcp_command")


if __name__ == "__main__":
    sys.exit(main())

"""What every command shares: argument parsing in DMTCP's style, logging, exit codes, one-line errors."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__
from ..applevel import config as applevel_config
from ..settings import DEFAULT_FAIL_RC, FIELD_NAMES, Settings, SettingsError, load
from . import dmtcpopts, levelopts
from .dmtcpopts import DMTCP_COMPAT

log = logging.getLogger("hpcckpt")


def env_fail_rc() -> int:
    try:
        rc = int(os.environ.get("DMTCP_FAIL_RC", DEFAULT_FAIL_RC))
        return rc if 0 <= rc <= 255 else DEFAULT_FAIL_RC
    except ValueError:
        return DEFAULT_FAIL_RC


class Fail(Exception):
    """A one-line error for the user; exits with the given code (DMTCP_FAIL_RC unless told otherwise)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse with DMTCP's conventions: -h is the coordinator host, --help is help, and bad usage is one
    line on stderr with the command's failure code."""

    def __init__(self, prog: str, description: str, fail_code: int | None = None, **kw):
        super().__init__(prog=prog, description=description, add_help=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
        self.fail_code = fail_code
        self.add_argument("--help", action="help", help="show this help and exit")
        self.add_argument("--version", action="version",
                          version=f"{prog} (hpcckpt) {__version__}, compatible with {DMTCP_COMPAT} commands")

    def error(self, message: str):
        code = self.fail_code if self.fail_code is not None else env_fail_rc()
        self.exit(code, f"{self.prog}: error: {message} (see --help)\n")


def add_coord_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("coordinator")
    g.add_argument("-h", "--coord-host", "--host", dest="coord_host", metavar="HOST",
                   help="coordinator host (env DMTCP_COORD_HOST / DMTCP_HOST; default 127.0.0.1)")
    g.add_argument("-p", "--coord-port", "--port", dest="coord_port", metavar="PORT",
                   help="coordinator port (env DMTCP_COORD_PORT / DMTCP_PORT; default 7779; 0 = random)")
    g.add_argument("--port-file", metavar="FILE", help="file the coordinator port is written to / read from")
    g.add_argument("--config", metavar="YAML", help="settings file (env HPCCKPT_CONFIG)")


def setup_logging(name: str, quiet: int = 0, level: str = "INFO") -> None:
    # DMTCP_QUIET: 1 leaves out notes, 2 warnings too
    lvl: int = ({1: logging.WARNING}.get(int(quiet), logging.ERROR) if int(quiet) else
                getattr(logging, str(level).upper(), logging.INFO))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[{name} %(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl or logging.INFO)


def settings_from(args: argparse.Namespace, **extra) -> Settings:
    """The command's Settings: every option whose dest is the name of a Settings field is that field's flag (the
    list comes from Settings itself: a field gets a flag by an option with its name as dest, in whatever spellings,
    DMTCP's included); dmtcpopts.flags() adds what DMTCP's options imply."""
    flags = {k: getattr(args, k) for k in FIELD_NAMES if hasattr(args, k)}
    flags.update({k: v for k, v in dmtcpopts.flags(args).items() if v is not None})
    flags.update({k: v for k, v in levelopts.flags(args).items() if v is not None})   # multi-level storage
    flags.update(extra)
    try:
        s = load(flags, getattr(args, "config", None))
        applevel_config.check(s)          # the application-level mode's keys (hpcckpt/applevel/config.py)
        return s
    except SettingsError as e:
        raise Fail(str(e)) from None


def run_main(prog: str, fn, argv, fail_code: int | None = None) -> int:
    """Run a command body, turning our errors into one line + exit code."""
    try:
        return fn(argv)
    except Fail as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.code if e.code is not None else (fail_code if fail_code is not None else env_fail_rc())
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:     # our output went to a reader that stopped (`| head`): done, like any filter
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except Exception as e:      # a bug of ours: one line, the traceback only at debug level
        log.debug("internal error", exc_info=True)
        print(f"{prog}: internal error: {type(e).__name__}: {e} (HPCCKPT_LOG_LEVEL=DEBUG shows details)",
              file=sys.stderr)
        return fail_code if fail_code is not None else env_fail_rc()

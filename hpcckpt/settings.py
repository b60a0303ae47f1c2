"""The one settings object: defaults < YAML file < environment < command-line flags.

Every command builds a Settings with `load(flags, config_path)`; the YAML file comes from --config or
HPCCKPT_CONFIG. DMTCP's environment variable names are honoured (DMTCP_COORD_HOST, DMTCP_PORT, ...), so
scripts written for DMTCP keep working.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PORT = 7779
DEFAULT_FAIL_RC = 99


class SettingsError(ValueError):
    """A wrong key, type or value in flags, environment or YAML; the message names where it came from."""


def _env(*names: str) -> dict:
    return {"env": names}


@dataclass
class Settings:
    # -- coordinator address --
    coord_host: str = field(default="127.0.0.1", metadata=_env("DMTCP_COORD_HOST", "DMTCP_HOST"))  # its host
    coord_port: int = field(default=DEFAULT_PORT, metadata=_env("DMTCP_COORD_PORT", "DMTCP_PORT"))  # 0: random
    port_file: str | None = None         # the coordinator writes its port there; commands read it from there
    # addresses the coordinator listens on besides loopback (0.0.0.0: every interface; docs/protocol.md, "Binding")
    bind: list = field(default_factory=list, metadata=_env("HPCCKPT_COORD_BIND"))
    status_file: str | None = None       # the coordinator keeps its status there (JSON)
    # -- checkpointing --
    interval: int = field(default=0, metadata=_env("DMTCP_CHECKPOINT_INTERVAL"))   # seconds, 0: no interval
    ckptdir: str = field(default=".", metadata=_env("DMTCP_CHECKPOINT_DIR"))   # images, manifests, restart script
    # Off by default, by measurement (bench/RESULTS.md): on numeric data zstd-1 saves ~5 % of the bytes but
    # costs ~0.5 GB/s of CPU per core, while the program itself runs on (forked checkpoints) - slower than
    # writing raw pages to the page cache. DMTCP_GZIP=1 / --gzip turn it on (worth it on slow filesystems and
    # compressible memory).
    compress: bool = field(default=False, metadata=_env("DMTCP_GZIP"))
    compress_level: int = field(default=1, metadata=_env("HPCCKPT_ZSTD_LEVEL"))   # zstd level (1..22)
    keep_generations: int = field(default=2, metadata=_env("HPCCKPT_KEEP"))   # complete checkpoints kept
    ckpt_signal: int = field(default=0, metadata=_env("DMTCP_SIGCKPT"))   # a signal to the launch asks for one
    # the job in a PID namespace of its own (same PIDs after a restart)
    pid_namespace: bool = field(default=True, metadata=_env("HPCCKPT_PID_NAMESPACE"))
    # copy-on-write snapshot: the job stops for ~30 ms/GiB, images are written while it runs
    forked: bool = field(default=True, metadata=_env("DMTCP_FORKED_CHECKPOINT"))
    # store changed pages only (unset: full images, and a restart goes on the way its images were taken)
    incremental: bool | None = field(default=None, metadata=_env("HPCCKPT_INCREMENTAL"))
    full_every: int = field(default=8, metadata=_env("HPCCKPT_FULL_EVERY"))   # a full image every N generations
    # incremental images read only the pages written since the last checkpoint (engine/wptrack.py)
    write_tracking: bool = field(default=True, metadata=_env("HPCCKPT_WRITE_TRACKING"))
    # -- failure handling --
    fail_rc: int = field(default=DEFAULT_FAIL_RC, metadata=_env("DMTCP_FAIL_RC"))   # exit code of our failures
    # a checkpoint phase without progress this long fails the round (the last good checkpoint is kept)
    phase_timeout: float = field(default=300.0, metadata=_env("HPCCKPT_PHASE_TIMEOUT"))
    rank_wait: float = field(default=30.0, metadata=_env("HPCCKPT_RANK_WAIT"))   # for MPI ranks to join
    # a restart waits this long for every host of the checkpoint (its gate, and TCP connections between hosts)
    restart_timeout: float = field(default=120.0, metadata=_env("HPCCKPT_RESTART_TIMEOUT"))
    # -- the program API (hpcckpt.aware) --
    # how long a checkpoint waits for delayed_checkpoints() blocks to end, and
    # for the programs' pre_checkpoint hooks, before it goes on
    aware_delay_max: float = field(default=60.0, metadata=_env("HPCCKPT_AWARE_DELAY_MAX"))
    aware_hook_max: float = field(default=30.0, metadata=_env("HPCCKPT_AWARE_HOOK_MAX"))   # (the hooks)
    # -- liveness --
    # both ways (docs/protocol.md "Liveness"): agents and coordinator send each other a heartbeat every
    # `heartbeat` s; a side silent for `peer_timeout` s is gone (a paused node or coordinator shorter than that is
    # tolerated). An agent whose coordinator's port stays closed `coord_fallback` s starts one itself (0: never).
    peer_timeout: float = field(default=90.0, metadata=_env("HPCCKPT_PEER_TIMEOUT"))
    heartbeat: float = field(default=2.0, metadata=_env("HPCCKPT_HEARTBEAT"))   # seconds between heartbeats
    coord_fallback: float = field(default=20.0, metadata=_env("HPCCKPT_COORD_FALLBACK"))   # 0: never
    # a per-node relay (hpcckpt/relay/, docs/design.md "Relays"): "on" - the agents of a node talk to one relay,
    # which is one peer of the coordinator for all of them (started by the node's first launch); "off": each agent
    # is a peer of the coordinator itself (the default)
    relay: str = field(default="off", metadata=_env("HPCCKPT_RELAY"))

    def heartbeat_s(self) -> float:
        """How often to send a heartbeat: several per peer_timeout, even when that is set short."""
        return min(self.heartbeat, self.peer_timeout / 3)
    # -- coordinator lifetime --
    exit_on_last: bool = False           # the coordinator exits when the last process leaves
    timeout: float = 0.0                 # ... when it had no process for this long (0: never)
    stale_timeout: float = 8 * 3600.0    # ... when its computation is gone for this long
    # 0: everything, 1: no notes (warnings and errors), 2: errors only (DMTCP_QUIET=0|1|2; -q, -q -q)
    quiet: int = field(default=0, metadata=_env("DMTCP_QUIET"))
    log_level: str = field(default="INFO", metadata=_env("HPCCKPT_LOG_LEVEL"))   # DEBUG shows details
    writers: int = field(default=4, metadata=_env("HPCCKPT_WRITERS"))   # images written at once (forked ckpts)
    # full 4 MiB chunks of image data go around the page cache (O_DIRECT; a third of the CPU per byte, no page
    # cache to fill); off: everything through the page cache. File systems without direct I/O fall back alone.
    direct_io: bool = field(default=True, metadata=_env("HPCCKPT_DIRECT_IO"))
    # -- DMTCP compatibility (docs/dmtcp-compat.md) --
    # save the contents of every regular file open at checkpoint (up to open_file_max_bytes each) and put them
    # back at restart (engine/openfiles.py)
    ckpt_open_files: bool = field(default=False, metadata=_env("DMTCP_CHECKPOINT_OPEN_FILES",
                                                               "DMTCP_CKPT_OPEN_FILES"))
    open_file_max_bytes: int = field(default=256 << 20, metadata=_env("HPCCKPT_OPEN_FILE_MAX_BYTES"))  # each
    # with ckpt_open_files: a file that exists at restart with other contents is overwritten by the saved copy
    # (else the restart refuses, naming the file)
    allow_file_overwrite: bool = field(default=False, metadata=_env("DMTCP_ALLOW_FILE_OVERWRITE",
                                                                    "DMTCP_ALLOW_OVERWRITE_WITH_CKPTED_FILES"))
    # our temporary files (the log of a coordinator we start); created 0700 if missing, exported to what we start
    tmpdir: str | None = field(default=None, metadata=_env("DMTCP_TMPDIR"))
    # restart checks that refuse: image owned by another user, image of another machine architecture
    no_strict_checking: bool = field(default=False, metadata=_env("DMTCP_DISABLE_STRICT_CHECKING"))
    # 1..7: the restarted processes are left stopped for a debugger before they run (cli/dmtcpcompat.py)
    restart_pause: int = field(default=0, metadata=_env("DMTCP_RESTART_PAUSE", "MTCP_RESTART_PAUSE"))
    # every checkpoint kept under its own generation directory (none pruned)
    unique_ckpt: bool = field(default=False, metadata=_env("DMTCP_UNIQUE_CKPT_PLUGIN", "DMTCP_UNIQUE_CKPT"))
    coord_logfile: str | None = field(default=None, metadata=_env("DMTCP_COORD_LOG_FILENAME"))   # its log
    exit_after_ckpt: bool = False         # coordinator: kill the computation once a checkpoint is complete
    # plugins ("module:Class" or file paths; DMTCP_PLUGIN is colon-separated), wired by the plugin mechanism
    plugins: list = field(default_factory=list, metadata=_env("DMTCP_PLUGIN", "HPCCKPT_PLUGINS"))
    # --modify-env: apply <ckptdir>/dmtcp_env.txt (NAME=VALUE / NAME lines) to the restarted processes
    modify_env: bool = field(default=False, metadata=_env("HPCCKPT_MODIFY_ENV"))   # (plugins/builtin.py)
    # --pathvirt: "OLD:NEW" path prefixes rewritten in the image's file paths at restart (DMTCP_PATH_MAPPING,
    # several separated by ';' or newlines)
    pathvirt: bool = field(default=False, metadata=_env("HPCCKPT_PATHVIRT"))
    path_prefixes: list = field(default_factory=list,                      # OLD:NEW pairs (engine/pathvirt.py)
                                metadata=_env("DMTCP_PATH_MAPPING", "HPCCKPT_PATH_PREFIXES"))
    # -- multi-level storage (docs/storage.md; storage block) --
    # node-local level (a node's $TMPDIR, /dev/shm, an NVMe mount); "{host}" in it is replaced by the host name.
    # None: one level, images go straight to ckptdir (the shared level) as before
    local_dir: str | None = field(default=None, metadata=_env("HPCCKPT_LOCAL_DIR"))
    # with local_dir: copy to ckptdir in the background after the checkpoint (async), before it counts as
    # complete (sync), or never (off: the local level, and partner copies, are all there is)
    drain: str = field(default="async", metadata=_env("HPCCKPT_DRAIN"))
    partner: bool = field(default=False, metadata=_env("HPCCKPT_PARTNER"))   # a copy on one other node
    keep_local: int = field(default=1, metadata=_env("HPCCKPT_KEEP_LOCAL"))   # generations kept on a node
    # the drain's limit: bytes/s ("200M", "1G"), or "N%": busy at most N % of the time; "0": no limit
    drain_rate: str = field(default="0", metadata=_env("HPCCKPT_DRAIN_RATE"))
    # -- end of the storage block --

    # -- application-level mode (docs/applevel.md, hpcckpt/applevel/): the program writes its own restart files --
    engine: str = field(default="ptrace", metadata=_env("HPCCKPT_ENGINE"))   # ptrace (transparent) | signal
    app_signal: str = field(default="USR1", metadata=_env("HPCCKPT_APP_SIGNAL"))   # signal: asks for its files
    app_command: str | None = field(default=None, metadata=_env("HPCCKPT_APP_COMMAND"))   # signal: run instead
    app_files: str | None = field(default=None, metadata=_env("HPCCKPT_APP_FILES"))   # signal: restart files' glob
    app_settle: float = field(default=2.0, metadata=_env("HPCCKPT_APP_SETTLE"))   # signal: unchanged S s = written
    app_timeout: float = field(default=240.0, metadata=_env("HPCCKPT_APP_TIMEOUT"))   # signal: else round fails
    app_restart: str | None = field(default=None, metadata=_env("HPCCKPT_APP_RESTART"))   # signal: restart command

    def replace(self, **kw) -> Settings:
        return dataclasses.replace(self, **kw)


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
FIELD_NAMES = tuple(_FIELDS)         # (cli/common.py: a parser option whose dest is one of these is its flag)
_TRUE = {"1", "yes", "true", "on", "y"}
_FALSE = {"0", "no", "false", "off", "n", ""}


def _coerce(name: str, value: Any, source: str) -> Any:
    f = _FIELDS[name]
    typ = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if value is None:
            if "None" in typ:
                return None
            raise ValueError("a value is required")
        if name in _DMTCP_SPECIAL:
            return _DMTCP_SPECIAL[name](value)
        if typ.startswith("bool"):
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError(f"expected yes/no, got {value!r}")
        if typ.startswith("int"):
            if isinstance(value, bool):
                raise ValueError(f"expected an integer, got {value!r}")
            if name == "ckpt_signal" and isinstance(value, str) and not value.strip().lstrip("-").isdigit():
                return signal_number(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
        if typ.startswith("float"):
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            try:
                v = float(value)
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
            if v != v or v in (float("inf"), float("-inf")):
                raise ValueError(f"expected a finite number, got {value!r}")
            return v
        return str(value)
    except (ValueError, TypeError, AttributeError) as e:
        raise SettingsError(f"{source}: bad value for {name}: {e}") from None


def _quiet(value: Any) -> int:
    """DMTCP_QUIET=0|1|2 and -q (1) / -q -q (2); yes/no still accepted."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return max(0, min(2, value))
    v = str(value).strip().lower()
    if v.isdigit():
        return max(0, min(2, int(v)))
    if v in _TRUE:
        return 1
    if v in _FALSE:
        return 0
    raise ValueError(f"expected 0, 1 or 2, got {value!r}")


def _list_of_plugins(value: Any) -> list:
    """DMTCP_PLUGIN is a colon-separated list of paths; ours may also name "module:Class" (no '/'): entries are
    separated by ',' or whitespace, and an entry holding a '/' is further split at ':'."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if str(v)]
    out: list[str] = []
    for tok in str(value).replace(",", " ").split():
        parts: list[str] = []
        for p in tok.split(":"):
            if parts and p and not p.startswith("/") and "/" in parts[-1]:
                parts[-1] += ":" + p         # /path/file.py:Class stays one entry
            elif p:
                parts.append(p)
        out.extend(parts if "/" in tok else [tok])
    return out


def _list_of_prefixes(value: Any) -> list:
    """OLD:NEW (or OLD=NEW) pairs, separated by ';' or newlines (DMTCP_PATH_MAPPING)."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace("\n", ";").split(";")
    out = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        sep = "=" if "=" in item else ":"
        old, _, new = item.partition(sep)
        if not old.startswith("/") or not new.startswith("/"):
            raise ValueError(f"expected OLD:NEW absolute path prefixes, got {item!r}")
        out.append(f"{old.rstrip('/') or '/'}:{new.rstrip('/') or '/'}")
    return out


def _pause(value: Any) -> int:
    v = int(value)
    if not 0 <= v <= 7:
        raise ValueError(f"expected 0..7, got {value!r}")
    return v


def _list_of_addresses(value: Any) -> list:
    """Addresses separated by ',' or whitespace (HPCCKPT_COORD_BIND=ADDR[,ADDR...]), or a YAML/flag list."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
    return [str(a).strip() for a in items if str(a).strip()]


_DMTCP_SPECIAL = {"quiet": _quiet, "plugins": _list_of_plugins, "path_prefixes": _list_of_prefixes,
                  "restart_pause": _pause, "bind": _list_of_addresses}


def _validate(s: Settings) -> Settings:
    if s.unique_ckpt:
        s.keep_generations = (1 << 20) - 1   # DMTCP's unique checkpoint names: no checkpoint is overwritten
    if not 0 <= s.coord_port <= 65535:
        raise SettingsError(f"coordinator port {s.coord_port} is out of range 0..65535")
    if s.interval < 0:
        raise SettingsError(f"checkpoint interval must be >= 0 seconds, got {s.interval}")
    if s.keep_generations < 1:
        raise SettingsError(f"keep_generations must be >= 1, got {s.keep_generations}")
    if not 0 <= s.fail_rc <= 255:
        raise SettingsError(f"DMTCP_FAIL_RC must be 0..255, got {s.fail_rc}")
    if not 1 <= s.compress_level <= 22:
        raise SettingsError(f"compress_level must be 1..22, got {s.compress_level}")
    if s.heartbeat <= 0 or s.peer_timeout <= 0:
        raise SettingsError(f"heartbeat ({s.heartbeat} s) and peer_timeout ({s.peer_timeout} s) must be > 0")
    if s.coord_fallback < 0:
        raise SettingsError(f"coord_fallback must be >= 0 seconds, got {s.coord_fallback}")
    _validate_storage(s)
    if s.relay not in RELAY_MODES:
        raise SettingsError(f"relay must be one of {', '.join(RELAY_MODES)}, got {s.relay!r}")
    return _validate_input(s)


# -- storage block: multi-level storage settings (docs/storage.md) ---------------------------------------------
DRAIN_MODES = ("async", "sync", "off")
RELAY_MODES = ("off", "on")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_rate(text: str) -> tuple[float, float]:
    """A drain rate: (bytes per second, share of the time 0..1); (0, 0) is no limit. ValueError if malformed."""
    t = str(text).strip().upper().removesuffix("/S").removesuffix("B")
    try:
        return _rate(t, text)
    except ValueError as e:
        raise ValueError(str(e) if "expected" in str(e) or "share" in str(e) else f"not a rate: {text!r}") from None


def _rate(t: str, text: str) -> tuple[float, float]:
    if t.endswith("%"):
        share = float(t[:-1]) / 100
        if not 0 < share <= 1:
            raise ValueError(f"a share must be 1..100 %, got {text!r}")
        return 0.0, (0.0 if share == 1 else share)
    unit = t[-1:] if t[-1:] in _UNITS else ""
    rate = float(t[:len(t) - len(unit)] or "x") * _UNITS[unit]
    if rate < 0 or rate != rate or rate == float("inf"):
        raise ValueError(f"expected bytes per second >= 0, got {text!r}")
    return rate, 0.0


def _validate_storage(s: Settings) -> None:
    if s.drain not in DRAIN_MODES:
        raise SettingsError(f"drain must be one of {', '.join(DRAIN_MODES)}, got {s.drain!r}")
    if s.keep_local < 1:
        raise SettingsError(f"keep_local must be >= 1 generation, got {s.keep_local}")
    if s.local_dir is not None and (s.local_dir == "" or "\0" in s.local_dir):
        raise SettingsError(f"local_dir {s.local_dir!r} is not a path")
    if s.partner and not s.local_dir:
        raise SettingsError("partner copies need a node-local level: set local_dir (HPCCKPT_LOCAL_DIR, --local-dir)")
    try:
        parse_rate(s.drain_rate)
    except ValueError as e:
        raise SettingsError(f"drain_rate {s.drain_rate!r}: {e} (bytes/s like 200M, or a share like 25%)") from None
# -- end of the storage block ------------------------------------------------------------------------------------


# -- bad-input validation block (badinput) ---------------------------------------------------------------------
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL")


def signal_number(name: str) -> int:
    """A signal given by name (USR1, SIGUSR1, RTMIN+2) as its number; ValueError naming it if there is none."""
    import signal
    v = name.strip().upper()
    v = v if v.startswith("SIG") else "SIG" + v
    for base in ("SIGRTMIN", "SIGRTMAX"):
        if v.startswith(base) and v != base:
            off = v[len(base):]
            if off[:1] in "+-" and off[1:].isdigit():
                return int(getattr(signal, base)) + int(off)
    sig = getattr(signal, v, None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"{name!r} is not a signal name")
    return int(sig)


def _validate_input(s: Settings) -> Settings:
    import signal
    if not s.coord_host or not s.coord_host.strip() or any(c.isspace() for c in s.coord_host):
        raise SettingsError(f"coordinator host {s.coord_host!r} is not a host name or address")
    if s.ckpt_signal:
        if not 1 <= s.ckpt_signal <= signal.SIGRTMAX:
            raise SettingsError(f"checkpoint signal {s.ckpt_signal} is not a signal number (1..{int(signal.SIGRTMAX)})")
        if s.ckpt_signal in (signal.SIGKILL, signal.SIGSTOP):
            raise SettingsError(f"checkpoint signal {signal.Signals(s.ckpt_signal).name} cannot be caught; "
                                f"choose another (e.g. USR2)")
    if not 1 <= s.writers <= 1024:
        raise SettingsError(f"HPCCKPT_WRITERS (images written at once) must be 1..1024, got {s.writers}")
    for name, top in (("interval", 1 << 31), ("keep_generations", 1 << 20), ("full_every", 1 << 20),
                      ("phase_timeout", 1e9), ("rank_wait", 1e9), ("timeout", 1e9), ("stale_timeout", 1e9),
                      ("restart_timeout", 1e9), ("peer_timeout", 1e9)):
        if getattr(s, name) >= top:      # (beyond what timers and sleeps take: OverflowError deep inside)
            raise SettingsError(f"{name} {getattr(s, name)} is too large (at most {int(top) - 1})")
    if s.full_every < 1:
        raise SettingsError(f"full_every must be >= 1, got {s.full_every}")
    for name in ("phase_timeout", "rank_wait", "timeout", "stale_timeout"):
        if getattr(s, name) < 0:
            raise SettingsError(f"{name} must be >= 0 seconds, got {getattr(s, name)}")
    if s.phase_timeout == 0:
        raise SettingsError("phase_timeout must be > 0 seconds")
    if s.restart_timeout <= 0:
        raise SettingsError(f"restart_timeout (HPCCKPT_RESTART_TIMEOUT) must be > 0 seconds, got {s.restart_timeout}")
    if str(s.log_level).upper() not in _LOG_LEVELS:
        raise SettingsError(f"log level {s.log_level!r} is not one of {', '.join(_LOG_LEVELS)}")
    for name in ("ckptdir", "port_file", "status_file"):
        v = getattr(s, name)
        if v is not None and (v == "" or "\0" in v):
            raise SettingsError(f"{name} {v!r} is not a path")
    for name in ("port_file", "status_file"):   # written and read by us: a FIFO or device there would block
        v = getattr(s, name)
        if v is not None and os.path.exists(v) and not os.path.isfile(v):
            raise SettingsError(f"{name.replace('_', ' ')} {v} exists and is not a regular file")
    return s


def read_config_text(path: str, what: str = "config") -> str:
    """The text of a small configuration file, or SettingsError in one line. Only a regular file is read: a FIFO
    would block forever (O_NONBLOCK lets the open return so that fstat can refuse it), a device never end."""
    import stat
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise SettingsError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "directory" if stat.S_ISDIR(st.st_mode) else "FIFO" if stat.S_ISFIFO(st.st_mode) else \
                "socket" if stat.S_ISSOCK(st.st_mode) else "device" if stat.S_ISCHR(st.st_mode) or \
                stat.S_ISBLK(st.st_mode) else "special file"
            raise SettingsError(f"cannot read {what} {path}: it is a {kind}, not a regular file")
        if st.st_size > 16 << 20:
            raise SettingsError(f"cannot read {what} {path}: {st.st_size} bytes is too large for a {what}")
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
    except OSError as e:
        raise SettingsError(f"cannot read {what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as e:
        raise SettingsError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None


def yaml_error_line(path: str, e: Exception) -> str:
    """A YAML parse error in one line: what and where (PyYAML's own message spans several lines)."""
    problem = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{path}: not valid YAML: {problem}{where}"
# Timeouts checked by every entry point first (cli/main.py), also by commands that build no Settings (inspect):
# HPCCKPT_REMOTE_TIMEOUT is read at import by cli/shim.py (not a Settings field: a bad value there was a 25-line
# traceback before any command could say anything); the two others are Settings fields, refused the same way
# whichever command meets them.
ENV_SECONDS = ("HPCCKPT_PEER_TIMEOUT", "HPCCKPT_RESTART_TIMEOUT", "HPCCKPT_REMOTE_TIMEOUT")


def check_environment(environ=None) -> None:
    environ = os.environ if environ is None else environ
    for name in ENV_SECONDS:
        if name not in environ:
            continue
        v = environ[name]
        try:
            f = float(v)
        except ValueError:
            raise SettingsError(f"environment {name}: expected a number of seconds, got {v!r}") from None
        if not 0 < f < 1e9:
            raise SettingsError(f"environment {name}: expected a number of seconds > 0, got {v!r}")


# -- end of the bad-input validation block ---------------------------------------------------------------------


def load_yaml(path: str) -> dict:
    import yaml
    text = read_config_text(path)
    try:
        data = yaml.safe_load(text) or {}
    except (yaml.YAMLError, RecursionError) as e:
        raise SettingsError(yaml_error_line(path, e)) from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of settings at the top level")
    return data


def load(flags: dict[str, Any] | None = None, config: str | None = None,
         environ: dict[str, str] | None = None, yaml_section: dict | None = None) -> Settings:
    """Build settings. flags: values given on the command line (None = not given)."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config = config or env.get("HPCCKPT_CONFIG")
    data = yaml_section if yaml_section is not None else (load_yaml(config) if config else {})
    for key, v in data.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            known = ", ".join(sorted(_FIELDS))
            raise SettingsError(f"{config}: unknown setting {key!r} (known: {known})")
        values[name] = _coerce(name, v, f"{config}: {key}")
    for name, f in _FIELDS.items():
        for var in f.metadata.get("env", ()):
            if var in env and env[var] != "":
                values[name] = _coerce(name, env[var], f"environment {var}")
                break
    for name, v in (flags or {}).items():
        if v is not None:
            values[name] = _coerce(name, v, f"option --{name.replace('_', '-')}")
    return _validate(Settings(**values))

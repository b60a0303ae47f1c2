"""dmtcp_command --json in DMTCP's schema (version 1): its command and status names and fields first, ours
beside them. DMTCP's readers reject the fields `ok`, `type` and `phase`, so ours never carries them: success is
command_status == "DMT_COORD_SUCCESS" and the round's phase is `checkpoint_phase`."""
from __future__ import annotations

SCHEMA_VERSION = 1
SUCCESS = "DMT_COORD_SUCCESS"
NOT_RUNNING = "DMT_COORD_NOT_RUNNING"         # nothing to checkpoint, or a checkpoint already in progress
NOT_FOUND = "DMT_COORD_NOT_FOUND"             # no coordinator answers (or it refused us)
INVALID = "DMT_COORD_INVALID_COMMAND"
CKPT_FAILED = "DMT_COORD_CKPT_FAILED"         # ours: a blocking checkpoint was tried and failed (DMTCP has none)

COMMANDS = {"status": "DMT_STATUS", "list": "DMT_LIST", "checkpoint": "DMT_CHECKPOINT",
            "bcheckpoint": "DMT_BLOCKING_CKPT", "kcheckpoint": "DMT_KILL_AFTER_CKPT",
            "interval": "DMT_UPDATE_CKPT_INTERVAL", "kill": "DMT_KILL", "quit": "DMT_QUIT", "help": "DMT_HELP",
            "version": "DMT_VERSION"}
_DROPPED = {"ok", "type", "phase", "re", "command", "command_status"}


def head(cmd: str | None, status: str, host: str, port: int) -> dict:
    return {"schema_version": SCHEMA_VERSION, "command": COMMANDS.get(cmd or "", "DMT_INVALID_COORDINATOR_COMMAND"),
            "command_status": status, "coordinator_host": str(host), "coordinator_port": int(port)}


def status_of(cmd: str, reply: dict) -> str:
    if reply.get("ok"):
        return SUCCESS
    err = str(reply.get("error") or "")
    if cmd in ("checkpoint", "bcheckpoint", "kcheckpoint"):
        refused = any(w in err for w in ("already in progress", "restart is in progress", "no process"))
        return CKPT_FAILED if reply.get("generation") and not refused and cmd != "checkpoint" else NOT_RUNNING
    return INVALID


def workers_text(peers: list[dict]) -> str:
    """DMTCP's client list: a header, then one line per process."""
    lines = ["Client List:", "#, PROG[virtPID:realPID]@HOST, DMTCP-UNIQUEPID, STATE"]
    for row in peers:
        lines.append(f"{row.get('peer')}, {row.get('program')}[{row.get('pid')}:{row.get('pid')}]@{row.get('host')}, "
                     f"{row.get('unique_id')}, {str(row.get('state') or '').upper()}")
    return "\n".join(lines) + "\n"


def convert(cmd: str, reply: dict, host: str, port: int) -> dict:
    status = status_of(cmd, reply)
    out = head(cmd, status, host, port)
    if status == SUCCESS:
        if cmd == "status":
            out.update(num_peers=int(reply.get("num_peers") or 0), running=bool(reply.get("running")),
                       checkpoint_interval=int(reply.get("checkpoint_interval") or 0))
        elif cmd == "list":
            out["workers"] = workers_text(reply.get("peers") or [])
        elif cmd in ("checkpoint", "bcheckpoint", "kcheckpoint"):
            out["num_peers"] = int(reply.get("num_peers") or 0)
        elif cmd == "interval":
            out["checkpoint_interval"] = int(reply.get("checkpoint_interval") or 0)
    for k, v in reply.items():          # ours, beside DMTCP's
        if k not in _DROPPED and k not in out:
            out[k] = v
    if reply.get("phase") is not None:
        out["checkpoint_phase"] = reply["phase"]
    return out


def not_found(cmd: str | None, host: str, port: int, error: str) -> dict:
    return {**head(cmd, NOT_FOUND, host, port), "error": error}

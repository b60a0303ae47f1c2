"""Commands (dmtcp_command), the console (l s c f k q ?), status and listing: the coordinator's user-facing
side (a mixin of Coordinator)."""
from __future__ import annotations

import json
import logging
import time

from .. import __version__
from ..image import store
from . import binding, protocol
from .barrier import State
from .base import CoordinatorBase, Waiter

log = logging.getLogger("hpcckpt.coordinator")


class Commands(CoordinatorBase):
    def status(self) -> dict:
        nprocs = sum(len(p.processes) for p in self.peers.values())
        r = self.round
        return {
            "schema_version": protocol.STATUS_SCHEMA_VERSION,
            "coordinator_host": self.s.coord_host, "coordinator_port": self.port,
            "coordinator_version": __version__, "computation": self.computation,
            "listening": list(self.bound),
            "num_peers": nprocs, "num_agents": self._agent_count(),
            "running": bool(self.peers) and r is None,
            "state": r.state.value if r else State.RUNNING.value,
            "phase": r.phase.value if r and r.phase else None,
            "checkpoint_interval": self.interval, "ckptdir": self.ckptdir,
            "generation": self.generation, "last_checkpoint": self.last_checkpoint,
            "levels": self.storage_levels(),         # per generation (storagestate.py, docs/storage.md)
            "last_failure": self.last_failure,
            "waiting_for_ranks": self.ranks.missing() if self.waiting is not None else [],
            "checkpoint_progress": None if r is None else {
                "generation": r.generation, "phase": r.phase.value if r.phase else None,
                "elapsed_s": round(time.time() - r.started, 3),
                "frozen": not r.resumed, "bytes_written": sum(p.progress.get("bytes", 0) for p in self.peers.values()
                                                              if p.ident in r.peers),
                "agents": self._agent_count(r.peers), "agents_durable": self._agent_count(r.durable)},
            "restart": None if self.gate is None else {
                "generation": self.gate.generation, "hosts": sorted(set(self.gate.expected.values())),
                "missing": sorted(self.gate.missing().values()), "restored": len(self.gate.restored)},
        }

    def listing(self) -> list[dict]:
        out = []
        for p in sorted(self._listed_peers(), key=lambda p: p.peer_id):     # (a relay's agents each: relayed.py)
            for proc in p.processes or [{}]:
                out.append({"peer": p.peer_id, "host": p.host, "agent_pid": p.agent_pid, "pid": proc.get("pid"),
                            "program": proc.get("program"), "unique_id": proc.get("unique_id"),
                            "rank": proc.get("rank"),
                            "state": p.state, "restarted": p.restarted})
        return out

    def answer(self, waiter: Waiter, msg: dict) -> None:
        """Reply to a request (connection, nonce): the reply names the request, its client takes only that."""
        ident, nonce = waiter
        self.send(ident, {**msg, "re": nonce})

    def _on_command(self, ident: bytes, msg: dict) -> None:
        # only authenticated, fresh requests get here (server._on_frames): the status is theirs to see
        cmd = msg.get("cmd")
        waiter: Waiter = (ident, msg["nonce"])
        reply = {"type": "reply", "command": cmd, "ok": True}
        if cmd == "status":
            reply.update(self.status())
        elif cmd == "list":
            reply.update(self.status())
            reply["peers"] = self.listing()
        elif cmd in ("checkpoint", "bcheckpoint", "kcheckpoint"):
            blocking = cmd != "checkpoint"
            frozen = msg.get("frozen", False)      # the computation stops after it (the batch driver's requeue)
            if not isinstance(frozen, bool):
                err: str | None = f"bad frozen {frozen!r}: true or false"
            else:
                err = self.start_checkpoint(kill_after=(cmd == "kcheckpoint"), waiter=waiter if blocking else None,
                                            frozen=frozen)
            if err:
                reply.update(ok=False, error=err)
            elif blocking:
                return          # the reply comes when the round ends
            else:
                reply["generation"] = self.generation
        elif cmd == "interval":
            try:
                self.interval = max(0, int(msg.get("value", 0)))
            except (TypeError, ValueError):
                reply.update(ok=False, error=f"bad interval {msg.get('value')!r}")
            else:
                self._reset_interval()
                log.info("checkpoint interval set to %s", self.interval or "off")
                reply["checkpoint_interval"] = self.interval
        elif cmd == "abandon":       # a restart's launcher saw one of its hosts fail before it could join
            if self.gate is None and self.peers:
                reply["note"] = "the restart had already gone through"
            elif self.gate is None:
                reply.update(ok=False, error="no restart is in progress yet")
            else:
                self.gate.abandoned = str(msg.get("reason") or "abandoned")
                self._check_gate()
        elif cmd == "listen":        # an agent is about to start on another host (cli/shim.py, cli/multihost.py)
            addr = str(msg.get("address") or "")
            err = binding.bindable(addr) or self.listen_on(addr, f"asked for by {msg.get('why') or 'a command'}")
            if err:
                reply.update(ok=False, error=err)
            reply["listening"] = list(self.bound)
        elif cmd == "kill":
            self.kill_computation()
        elif cmd == "quit":
            self.kill_computation()
            self.quit = True
        else:
            reply.update(ok=False, error=f"unknown command {cmd!r}")
        self.answer(waiter, {**self.status(), **reply})
        self._write_status()

    def kill_computation(self) -> None:
        if self.peers:
            log.info("killing the computation (%d peer(s))", len(self.peers))
        self.broadcast({"type": "kill"})

    # --------------------------------------------------------------------------------------------- console --
    HELP = """Commands:
  l : list connected processes        s : status
  c : checkpoint (bc: and wait)       kc: checkpoint, then kill the computation
  i N: checkpoint every N seconds (0 = off)
  f : force a restart to go on with missing peers
  k : kill the computation            q : kill the computation and quit
  ? : this help"""

    def _console(self, line: str) -> None:
        if not line:
            return
        cmd, _, arg = line.partition(" ")
        if cmd == "?" or cmd == "h":
            print(self.HELP, flush=True)
        elif cmd == "l":
            for row in self.listing():
                rank = f" rank {row['rank']}" if row.get("rank") is not None else ""
                print(f"{row['peer']}: {row['host']} pid {row['pid']} {row['program']}{rank} {row['state']}",
                      flush=True)
            if not self.peers:
                print("no processes connected", flush=True)
        elif cmd == "s":
            st = self.status()
            print(f"Coordinator: {self.s.coord_host}:{self.port}  computation {st['computation']}\n"
                  f"NUM_PEERS={st['num_peers']}\nRUNNING={'yes' if st['running'] else 'no'}\n"
                  f"CKPT_INTERVAL={st['checkpoint_interval']}\nGENERATION={st['generation']}", flush=True)
        elif cmd in ("c", "bc", "kc"):
            err = self.start_checkpoint(kill_after=(cmd == "kc"))
            print(err or "checkpoint started", flush=True)
        elif cmd == "i" and not str(arg or "").strip():      # DMTCP's console: `i` alone shows the interval
            print(f"interval: {self.interval or 'off'}", flush=True)
        elif cmd == "i":
            try:
                self.interval = max(0, int(arg))
                self._reset_interval()
                print(f"interval: {self.interval or 'off'}", flush=True)
            except ValueError:
                print("usage: i SECONDS", flush=True)
        elif cmd == "f":
            if self.gate is None:
                print("no restart is waiting for missing peers", flush=True)
            else:
                self.gate.forced = True
                print(f"going on without {', '.join(sorted(self.gate.missing().values())) or 'nobody'}", flush=True)
                self._check_gate()
        elif cmd == "k":
            self.kill_computation()
        elif cmd == "q":
            self.kill_computation()
            self.quit = True
        else:
            print(f"unknown command {cmd!r}; type ? for help", flush=True)

    # ------------------------------------------------------------------------------------------ status file --
    def _write_status(self) -> None:
        if not self.s.status_file:
            return
        st = self.status()
        st["peers"] = self.listing()
        try:
            store.atomic_write(self.s.status_file, json.dumps(st, indent=1).encode(), mode=0o644)
        except OSError as e:
            log.warning("cannot write status file %s: %s", self.s.status_file, e)

"""What the agent adds for programs and sites that cooperate: the program API server (hpcckpt.aware,
agent/aware_server.py) and plugins (hpcckpt.plugins) called at the protocol's events."""
from __future__ import annotations

from .. import plugins
from ..engine.fds import awarefd
from .aware_server import AwareServer
from .base import AgentBase


class Extensions(AgentBase):
    """Mixed into Agent (agent.py)."""

    def serve_api(self, server: AwareServer) -> None:
        """Answer the program API (hpcckpt.aware) of this agent's processes through server."""
        self.aware = server
        server.job_pids = lambda: {p.pid for p in self.job()}
        server.request_checkpoint = lambda: self.send({"type": "request", "cmd": "checkpoint"})
        server.status = lambda: {"computation": self.computation, "generation": self.last_generation,
                                 "ckptdir": self.ckptdir, "interval": self.interval, "agent_id": self.agent_id,
                                 "host": self.host, "peers": dict(self.expected_agents) or {self.agent_id: self.host},
                                 "restarted": self.restarted_generation is not None}
        awarefd.SERVER = server                 # its connections are checkpointed as such (engine/awarefd.py)

    def plugin_event(self, event: str, gen: int, **extra) -> None:
        """Call the plugins (--with-plugin) at an event; a PluginError fails the phase it happens in."""
        if not self.plugins:
            return
        pids = extra.pop("pids", None)
        if pids is None:
            pids = [fp.pid for fp in self.ckpt.frozen] if self.ckpt is not None else \
                [p.pid for p in self.job() if not p.zombie]
        ev = plugins.Event(event, gen, self.computation or "", self.host, self.agent_id, pids, self.ckptdir,
                           kv=plugins.KV(self), **extra)
        self.plugins.call(event, ev)


#!/usr/bin/env python3
"""The coordinator at scale: N peers that speak the real protocol over ZeroMQ, one barrier round and one full
checkpoint round with empty images, the coordinator's CPU and memory, for N = 16 ... 4096.

    .venv/bin/python bench/scale.py [--peers 16,64,256,1024,4096] [--rounds 3] [--out bench/RESULTS-scale.md]

How peers are simulated: a real `dmtcp_coordinator` process; W worker processes (W = 4, or fewer for small N)
each hold N/W ZeroMQ DEALER sockets - one per peer, each its own TCP connection to the coordinator, as an agent's
would be - and answer every message as an agent with no processes would: hello/welcome, a heartbeat every
2 s, an ack for each phase (checkpoint: no images). Nothing is frozen or written but the manifest and the restart
script, so the figures are the coordinator's and the protocol's own cost.

Measured per N: the time for all peers to join; a checkpoint round as `dmtcp_command -bc` sees it (wall time
and the coordinator's own duration and per-phase times: each phase is one barrier: broadcast to N peers, N acks);
the coordinator's CPU seconds per round and its RSS. The floor, same run: one ZeroMQ round trip to all N
peers with no protocol at all (broadcast + N replies, measured from a plain ROUTER in this process).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
from scale_workers import _raise_nofile, agent_ack, real_relay_worker, relay_worker  # noqa: E402


def worker(port: int, rundir: str, first: int, count: int, ready, stop) -> None:
    """count simulated peers (agents without processes) in one process."""
    os.environ["HPCCKPT_RUNDIR"] = rundir
    _raise_nofile()
    import zmq

    from hpcckpt.coordinator import protocol
    key = protocol.read_secret(port)
    ctx = zmq.Context()
    ctx.MAX_SOCKETS = count + 64
    socks = []
    poller = zmq.Poller()
    for i in range(count):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://127.0.0.1:{port}")
        n = first + i
        s.send_multipart(protocol.encode(key, {
            "type": "hello", "role": "peer", "host": f"sim{n // 64}", "agent_pid": 100000 + n,
            "processes": [{"pid": 1000 + n, "unique_id": f"sim-{n}", "program": "sim"}], "ckptdir": rundir,
            "computation": "scale", "restart": False, "generation": None, "agent_id": f"a{n:06d}", "agents": {},
            "agent_ids": [f"a{n:06d}"]}))
        poller.register(s, zmq.POLLIN)
        socks.append(s)
    welcomed = 0
    last_hb = time.monotonic()
    told = False
    while not stop.is_set():
        events = dict(poller.poll(100))
        for s in events:
            while True:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = protocol.decode(key, frames)
                except protocol.ProtocolError:
                    continue
                t = msg.get("type")
                if t == "welcome":
                    welcomed += 1
                elif t == "phase" and msg["phase"] != "abort":
                    s.send_multipart(protocol.encode(key, agent_ack(msg)))
        if welcomed == count and not told:
            ready.put(count)
            told = True
        if time.monotonic() - last_hb > 2.0:
            for s in socks:
                s.send_multipart(protocol.encode(key, {"type": "heartbeat"}))
            last_hb = time.monotonic()
    for s in socks:
        s.close(0)
    ctx.term()


def zmq_floor(n: int, rounds: int = 5) -> float:
    """One broadcast to n DEALERs and n replies through a bare ROUTER (no JSON, no MAC): the transport's floor."""
    import threading

    import zmq
    ctx = zmq.Context()
    ctx.MAX_SOCKETS = n + 64
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    dealers = []
    for i in range(n):
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.IDENTITY, f"d{i}".encode())
        d.connect(f"tcp://127.0.0.1:{port}")
        dealers.append(d)

    def echo():
        poller = zmq.Poller()
        for d in dealers:
            poller.register(d, zmq.POLLIN)
        while not stop.is_set():
            for d in dict(poller.poll(50)):
                while True:
                    try:
                        d.send(d.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
    for d in dealers:
        d.send(b"hi")
    idents = [router.recv_multipart()[0] for _ in range(n)]
    th = threading.Thread(target=echo, daemon=True)
    th.start()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for ident in idents:
            router.send_multipart([ident, b"x"])
        for _ in range(n):
            router.recv_multipart()
        times.append(time.perf_counter() - t0)
    stop.set()
    th.join()
    for d in dealers:
        d.close(0)
    router.close(0)
    ctx.term()
    return statistics.median(times)


def proc_stats(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return cpu, rss


def one(n: int, rounds: int, work: Path, relay: int = 0, local: bool = True, real: bool = False) -> dict:
    """n peers; relay > 0: behind n / relay relays of relay agents each (relay_worker, or real=True:
    real_relay_worker, the relay module's own code)."""
    tag = f"{n}" + (f"{'R' if real else 'r'}{relay}{'l' if local else 'v'}" if relay else "")
    rundir = work / f"run{tag}"
    ck = work / f"ck{tag}"
    ck.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMTCP_", "HPCCKPT_"))}
    env["HPCCKPT_RUNDIR"] = str(rundir)
    port_file = work / f"port{tag}"
    prof = os.environ.get("HPCCKPT_BENCH_COORD_WRAPPER")       # e.g. a script that profiles the coordinator
    head = [sys.executable, prof] if prof else [str(BIN / "dmtcp_coordinator")]
    coord = subprocess.Popen([*head, "-p", "0", "--port-file", str(port_file), "--ckptdir",
                              str(ck), "-q"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=open(work / f"coord{tag}.err", "w"), preexec_fn=_raise_nofile)
    try:
        t0 = time.monotonic()
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() - t0 > 20:
                raise SystemExit("bench: the coordinator did not start")
            time.sleep(0.02)
        port = int(port_file.read_text())
        units = n // relay if relay else n              # the coordinator's peers
        workers = max(1, min(4, units // 16 if not relay else units))
        ready: mp.Queue[int] = mp.Queue()
        stop = mp.Event()
        procs = []
        t_join = time.monotonic()
        per = [units // workers + (1 if i < units % workers else 0) for i in range(workers)]
        first = 0
        for c in per:
            args = (port, str(rundir), first, c, relay, local, ready, stop) if relay else \
                (port, str(rundir), first, c, ready, stop)
            p = mp.Process(target=(real_relay_worker if real else relay_worker) if relay else worker, args=args)
            p.start()
            procs.append(p)
            first += c
        for _ in procs:
            ready.get(timeout=300)
        join_s = time.monotonic() - t_join
        rows: list[dict[str, Any]] = []
        for _ in range(rounds):
            cpu0, _ = proc_stats(coord.pid)
            t0 = time.monotonic()
            r = subprocess.run([str(BIN / "dmtcp_command"), "--port-file", str(port_file), "-bc", "--json"], env=env,
                               capture_output=True, text=True, timeout=600)
            wall = time.monotonic() - t0
            cpu1, rss = proc_stats(coord.pid)
            if r.returncode != 0:
                raise SystemExit(f"bench: checkpoint with {n} peers failed: {r.stdout} {r.stderr}")
            reply = json.loads(r.stdout)
            ck_info = reply.get("checkpoint") or {}
            phases = ck_info.get("phase_s") or {}
            rows.append({"wall_s": wall, "duration_s": ck_info.get("duration_s"), "cpu_s": cpu1 - cpu0, "rss": rss,
                         "barrier_s": statistics.median(phases.values()) if phases else None, "phases": phases})
        stop.set()
        for p in procs:
            p.join(30)
        med = {k: statistics.median(float(r[k]) for r in rows if r[k] is not None)
               for k in ("wall_s", "duration_s", "cpu_s", "barrier_s", "rss")}
        return {"peers": n, "relay": relay, "local": local, "real": real, "join_s": join_s, **med,
                "floor_s": zmq_floor(units), "rounds": rows}
    finally:
        subprocess.run([str(BIN / "dmtcp_command"), "--port-file", str(port_file), "-q"], env=env,
                       capture_output=True, timeout=60)
        try:
            coord.wait(30)
        except subprocess.TimeoutExpired:
            coord.kill()


def plot(results: list[dict], tree: list[dict], path: Path, real: list[dict] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = [r["peers"] for r in results]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.loglog(ns, [r["barrier_s"] * 1e3 for r in results], "o-", label="one barrier (median phase), one coordinator")
    ax.loglog(ns, [r["duration_s"] * 1e3 for r in results], "s-", label="checkpoint round (5 barriers + commit)")
    ax.loglog(ns, [r["floor_s"] * 1e3 for r in results], "^--", label="floor: bare ZeroMQ broadcast + replies")
    ax.loglog(ns, [ns[0] and results[0]["barrier_s"] * 1e3 * n / ns[0] for n in ns], ":", color="grey",
              label="linear from the smallest N")
    crit = [t for t in tree if t["mode"] == "critical path"]
    if crit:
        ax.loglog([t["peers"] for t in crit], [t["barrier_s"] * 1e3 for t in crit], "D-", color="tab:green",
                  label=f"tree: coordinator + one node's relay ({crit[0]['relay']} agents each)")
    full = [t for t in tree if t["mode"] == "all on this machine"]
    if full:
        ax.loglog([t["peers"] for t in full], [t["barrier_s"] * 1e3 for t in full], "x:", color="tab:green",
                  label="tree, every node emulated on this machine")
    rcrit = [t for t in real or [] if t["mode"] == "critical path"]
    if rcrit:
        ax.loglog([t["peers"] for t in rcrit], [t["barrier_s"] * 1e3 for t in rcrit], "P-", color="tab:purple",
                  label=f"REAL relay code: coordinator + one node ({rcrit[0]['relay']} agents each)")
    rfull = [t for t in real or [] if t["mode"] == "all on this machine"]
    if rfull:
        ax.loglog([t["peers"] for t in rfull], [t["barrier_s"] * 1e3 for t in rfull], "+:", color="tab:purple",
                  label="REAL relay code, every node emulated on this machine")
    ax.axhline(50, color="tab:red", linewidth=0.8, linestyle="--", label="goal: 50 ms per barrier at 4096")
    ax.set_xlabel("peers")
    ax.set_ylabel("ms")
    ax.set_title(f"coordinator at scale ({platform.node()}, {os.cpu_count()} cores)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def tree_rows(n: int, relay: int, rounds: int, work: Path, node: dict) -> list[dict]:
    """A tree of n agents behind n / relay per-node relays: the coordinator's stage (relays answer at once); with
    node, one node's stage measured alone (one relay and its agents: every node does this at the same time on a
    cluster), their sum (the critical path of a barrier on a cluster); and every node emulated at once here."""
    coord = {**one(n, rounds, work, relay, local=False), "mode": "coordinator stage"}
    full = {**one(n, rounds, work, relay, local=True), "mode": "all on this machine"}
    crit = {"peers": n, "relay": relay, "mode": "critical path", "join_s": None, "cpu_s": coord["cpu_s"],
            "rss": coord["rss"], "wall_s": None, "floor_s": None,
            "barrier_s": coord["barrier_s"] + node["barrier_s"], "duration_s": coord["duration_s"] +
            node["duration_s"]}
    return [coord, full, crit]


def real_tree_rows(n: int, relay: int, rounds: int, work: Path, node: dict) -> list[dict]:
    """The same stages with the real relay code (real_relay_worker): the coordinator's stage (relays without
    agents), every node at once on this machine, and the critical path (coordinator stage + one node's stage)."""
    coord = {**one(n, rounds, work, relay, local=False, real=True), "mode": "coordinator stage"}
    full = {**one(n, rounds, work, relay, local=True, real=True), "mode": "all on this machine"}
    crit = {"peers": n, "relay": relay, "real": True, "mode": "critical path", "join_s": None,
            "cpu_s": coord["cpu_s"], "rss": coord["rss"], "wall_s": None, "floor_s": None,
            "barrier_s": coord["barrier_s"] + node["barrier_s"], "duration_s": coord["duration_s"] +
            node["duration_s"]}
    return [coord, full, crit]


def _ms(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v * 1e3, fmt)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default="16,64,256,1024,4096")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree", default="1024,4096", help="peer counts to measure behind relays too ('' for none)")
    ap.add_argument("--relay", type=int, default=64, help="agents per relay (per node) in the tree")
    ap.add_argument("--real-tree", default="1024,4096", help="agent counts behind the REAL relay code "
                    "(hpcckpt/relay/) too ('' for none)")
    ap.add_argument("--out", default=str(HERE / "RESULTS-scale.md"))
    args = ap.parse_args()
    _raise_nofile()
    ns = [int(x) for x in args.peers.split(",")]
    results: list[dict] = []
    tree: list[dict] = []
    real: list[dict] = []
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="hpcckpt-scale-") as d:
        for n in ns:
            r = one(n, args.rounds, Path(d))
            results.append(r)
            print(f"{n:5d} peers: join {r['join_s']:.2f} s, barrier {r['barrier_s'] * 1e3:.1f} ms, round "
                  f"{r['duration_s'] * 1e3:.0f} ms (wall {r['wall_s'] * 1e3:.0f} ms), coordinator CPU "
                  f"{r['cpu_s']:.2f} s/round, RSS {r['rss'] / 1e6:.0f} MB, floor {r['floor_s'] * 1e3:.1f} ms",
                  flush=True)
        tree_ns = [int(x) for x in args.tree.split(",") if x]
        if tree_ns:     # one node: one relay and its agents (every node of a cluster does this at the same time)
            node = {**one(args.relay, args.rounds, Path(d), args.relay, local=True), "mode": "one node's stage"}
            tree.append(node)
            print(f"tree: one node ({args.relay} agents, one relay): barrier {node['barrier_s'] * 1e3:.1f} ms, "
                  f"round {node['duration_s'] * 1e3:.0f} ms", flush=True)
        for n in tree_ns:
            rows = tree_rows(n, args.relay, args.rounds, Path(d), node)
            tree += rows
            for t in rows:
                print(f"tree {n:5d} agents / {args.relay} per relay, {t['mode']}: barrier "
                      f"{t['barrier_s'] * 1e3:.1f} ms, round {t['duration_s'] * 1e3:.0f} ms", flush=True)
        real_ns = [int(x) for x in args.real_tree.split(",") if x]
        if real_ns:
            rnode = {**one(args.relay, args.rounds, Path(d), args.relay, local=True, real=True),
                     "mode": "one node's stage"}
            real.append(rnode)
        for n in real_ns:
            rows = real_tree_rows(n, args.relay, args.rounds, Path(d), rnode)
            real += rows
            for t in ([rnode] if n == real_ns[0] else []) + rows:
                print(f"REAL relay {t['peers']:5d} agents / {args.relay} per relay, {t['mode']}: barrier "
                      f"{t['barrier_s'] * 1e3:.1f} ms, round {t['duration_s'] * 1e3:.0f} ms, coordinator CPU "
                      f"{t['cpu_s']:.2f} s", flush=True)
    load1 = os.getloadavg()
    out = Path(args.out)
    png: Path | None = out.with_suffix(".png")
    try:
        assert png is not None
        plot(results, tree, png, real)
    except ImportError:
        png = None
    cmd = "python bench/scale.py " + " ".join(sys.argv[1:])
    lines = ["# The coordinator at scale\n",
             f"`{cmd.strip()}` on {platform.node()}, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
             f"load average {load0[0]:.2f} at the start and {load1[0]:.2f} at the end (other work running). "
             f"Medians of {args.rounds} rounds. Simulated peers (bench/scale.py docstring): real ZeroMQ connections "
             f"and protocol, no processes.\n",
             "## One coordinator\n",
             "| peers | join (s) | one barrier (ms) | checkpoint round (ms) | `-bc` wall (ms) | coordinator CPU per "
             "round (s) | coordinator RSS (MB) | floor: bare ZeroMQ round trip (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['peers']} | {r['join_s']:.2f} | {r['barrier_s'] * 1e3:.1f} | {r['duration_s'] * 1e3:.0f} | "
                     f"{r['wall_s'] * 1e3:.0f} | {r['cpu_s']:.2f} | {r['rss'] / 1e6:.0f} | {r['floor_s'] * 1e3:.1f} |")
    if png:
        lines.append(f"\n![scaling]({png.name})\n")
    lines.append("\nPer-phase times of the last round at the largest N: " +
                 ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in results[-1]["rounds"][-1]["phases"].items()))
    if tree:
        lines += ["\n## A tree: per-node relays (bench/scale_workers.py relay_worker)\n",
                  f"Agents behind relays of {args.relay} agents (one relay per node); the coordinator sees one peer "
                  "per relay.\n",
                  "| agents | relays | stage | one barrier (ms) | checkpoint round (ms) | coordinator CPU per "
                  "round (s) |",
                  "|---|---|---|---|---|---|"]
        for t in tree:
            lines.append(f"| {t['peers']} | {max(1, t['peers'] // t['relay'])} | {t['mode']} | {_ms(t['barrier_s'])} | "
                         f"{_ms(t['duration_s'], '.0f')} | {t['cpu_s']:.2f} |")
    if real:
        lines += ["\n## The real relay (hpcckpt/relay/, bench/scale_workers.py real_relay_worker)\n",
                  f"The relay module's own code (the `hpcckpt relay` process's Relay class: its handlers, tally.py's "
                  f"aggregation, its MAC/freshness checks and re-signing), {args.relay} simulated agents per relay; "
                  "several relays per bench process, one poll loop.\n",
                  "| agents | relays | stage | one barrier (ms) | checkpoint round (ms) | coordinator CPU per "
                  "round (s) |",
                  "|---|---|---|---|---|---|"]
        for t in real:
            lines.append(f"| {t['peers']} | {max(1, t['peers'] // t['relay'])} | {t['mode']} | {_ms(t['barrier_s'])} | "
                         f"{_ms(t['duration_s'], '.0f')} | {t['cpu_s']:.2f} |")
    notes = ""
    if out.exists() and "## Notes" in out.read_text():
        notes = out.read_text()[out.read_text().index("## Notes"):]
    out.write_text("\n".join(lines) + "\n\n" + notes)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

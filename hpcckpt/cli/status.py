"""hpcckpt status [CKPTDIR] — what a checkpoint directory holds, at a glance: each computation, each generation
(complete, failed, unfinished) with its time, size, memory, ratio, duration, frozen time, hosts and processes,
which one a restart would use, and for batch jobs the job, its runs and its next deadline (from the event
journal, image/journal.py). `--json` for scripts, `--plot FILE.png` for the job's timeline (matplotlib)."""
from __future__ import annotations

import json
import os
import re
import sys
import time

from ..image import journal, levels, store
from ..settings import SettingsError, load
from .common import Fail, Parser, run_main

_GEN_DIR = re.compile(r"^gen(\d{6,})$")


def parser(prog: str) -> Parser:
    p = Parser(prog, "Shows the computations and checkpoint generations in a checkpoint directory (default: "
                     "DMTCP_CHECKPOINT_DIR, else the current directory): which are complete, which a restart "
                     "would use, sizes and times; for batch jobs the runs, requeues and next deadline.",
               fail_code=2)
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="draw the timeline (runs, checkpoints, requeues, sizes)")
    p.add_argument("ckptdir", nargs="?", help="checkpoint directory")
    return p


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def generations(ckptdir: str, comp: str, events: list[dict]) -> list[dict]:
    """Every generation of a computation: complete ones (manifest), failed ones (the journal says so) and
    unfinished ones (a directory without a manifest: in progress, or interrupted)."""
    cdir = store.computation_dir(ckptdir, comp)
    rows: dict[int, dict] = {}
    for gen in store.complete_generations(ckptdir, comp):
        try:
            m = store.read_manifest(ckptdir, comp, gen)
        except Exception as e:           # a damaged manifest is shown, not fatal for the listing
            rows[gen] = {"generation": gen, "state": "damaged", "error": f"manifest unreadable: {e}"}
            continue
        st = m.stats or {}
        present = [i for i in m.images if i.host != os.uname().nodename or _size(i.path) is not None]
        rows[gen] = {
            "generation": gen, "state": "complete", "time": m.created,
            "images": len(m.images), "images_missing_here": len(m.images) - len(present),
            "stored_bytes": sum(i.size for i in m.images), "memory_bytes": st.get("bytes_in"),
            "ratio": st.get("ratio"), "duration_s": st.get("duration_s"), "frozen_s": st.get("frozen_s"),
            "hosts": sorted({i.host for i in m.images}),
            "processes": len(m.images),
            "incremental": any(set(i.needs or []) - {gen} for i in m.images),
            "needs": sorted({n for i in m.images for n in (i.needs or []) if n != gen}),
        }
    try:
        names = os.listdir(cdir)
    except OSError:
        names = []
    for n in names:
        mt = _GEN_DIR.match(n)
        if mt and int(mt[1]) not in rows:
            gen = int(mt[1])
            d = os.path.join(cdir, n)
            try:
                files = os.listdir(d)
                t = os.stat(d).st_mtime
            except OSError:
                files, t = [], None
            rows[gen] = {"generation": gen, "state": "unfinished", "time": t,
                         "stored_bytes": sum(_size(os.path.join(d, f)) or 0 for f in files),
                         "note": "no manifest: being written, or interrupted (never used by a restart)"}
    for ev in events:
        if ev.get("event") == "checkpoint" and ev.get("computation") in (comp, None) and not ev.get("ok", True):
            egen = ev.get("generation")
            if isinstance(egen, int) and (egen not in rows or rows[egen]["state"] == "unfinished"):
                rows[egen] = {"generation": egen, "state": "failed", "time": ev.get("time"),
                              "phase": ev.get("phase"), "error": ev.get("error")}
    levels.annotate(ckptdir, comp, rows, events)   # multi-level storage: on which levels each generation is
    usable = [g for g, r in rows.items() if r["state"] == "complete" and not r.get("images_missing_here")]
    if usable:
        rows[max(usable)]["restart_uses"] = True
    return [rows[g] for g in sorted(rows)]


def batch_info(ckptdir: str, events: list[dict]) -> dict | None:
    runs = [e for e in events if e.get("event") == "run"]
    if not runs:
        try:
            with open(os.path.join(ckptdir, ".hpcckpt-runs")) as f:
                return {"runs": int(f.read().strip() or 0)}
        except (OSError, ValueError):
            return None
    last = runs[-1]
    info = {"scheduler": last.get("scheduler"), "job": last.get("job"), "runs": len(runs),
            "run": last.get("run"), "deadline": last.get("deadline"),
            "requeues": sum(1 for e in events if e.get("event") == "requeue"),
            "finished": next((e for e in reversed(events) if e.get("event") == "end"), None)}
    for e in reversed(events):
        if e.get("event") == "deadline":
            info["deadline"] = e.get("deadline")
            break
    return info


def collect(ckptdir: str) -> dict:
    if not os.path.isdir(ckptdir):
        raise Fail(f"{ckptdir} is not a directory", code=2)
    events = journal.read(ckptdir)
    comps = store.computations_in(ckptdir)
    return {"ckptdir": os.path.abspath(ckptdir), "time": time.time(), "batch": batch_info(ckptdir, events),
            "computations": [{"computation": c, "generations": generations(ckptdir, c, events)} for c in comps],
            "events": len(events)}


def _mb(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _when(t) -> str:
    if not t:
        return "-"
    return time.strftime("%m-%d %H:%M:%S", time.localtime(t))


def render(st: dict) -> str:
    out = [f"checkpoint directory {st['ckptdir']}"]
    b = st.get("batch")
    if b:
        parts = [f"{b.get('scheduler') or 'batch'} job {b.get('job') or '?'}", f"{b.get('runs', 0)} run(s)"]
        if b.get("requeues"):
            parts.append(f"{b['requeues']} requeue(s)")
        if b.get("finished"):
            parts.append(f"finished (exit {b['finished'].get('code')})")
        elif b.get("deadline"):
            left = b["deadline"] - st["time"]
            parts.append(f"next deadline {_when(b['deadline'])} "
                         f"({'in ' + str(int(left)) + ' s' if left > 0 else 'passed'})")
        out.append("  " + ", ".join(parts))
    if not st["computations"]:
        out.append("  no checkpoints here")
    for c in st["computations"]:
        out.append(f"computation {c['computation']}")
        head = f"  {'gen':>5}  {'taken':<14} {'stored':>9} {'memory':>9} {'ratio':>5} {'took':>7} {'frozen':>7} " \
               f"{'hosts':>5} {'procs':>5}  state"
        out.append(head)
        for g in c["generations"]:
            state = g["state"]
            if g.get("incremental"):
                state += f" (incremental, needs {','.join(map(str, g['needs']))})"
            if g.get("images_missing_here"):
                state += f", {g['images_missing_here']} image(s) missing"
            if g.get("error"):
                state += f": {g.get('phase') + ': ' if g.get('phase') else ''}{g['error']}"
            if g.get("levels"):
                state += f" [{g['levels']}]"
            if g.get("restart_uses"):
                state += "   <- restart uses this"
            ratio = f"{g['ratio']:.2f}" if isinstance(g.get("ratio"), (int, float)) else "-"
            took = f"{g['duration_s']:.2f}s" if isinstance(g.get("duration_s"), (int, float)) else "-"
            frozen = f"{g['frozen_s']:.3f}s" if isinstance(g.get("frozen_s"), (int, float)) else "-"
            out.append(f"  {g['generation']:>5}  {_when(g.get('time')):<14} {_mb(g.get('stored_bytes')):>9} "
                       f"{_mb(g.get('memory_bytes')):>9} {ratio:>5} {took:>7} {frozen:>7} "
                       f"{len(g.get('hosts', [])) or '-':>5} {g.get('processes', '-'):>5}  {state}")
    return "\n".join(out)


def plot(st: dict, events: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Fail("--plot needs matplotlib (pip install matplotlib)") from None
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 5), sharex=True, gridspec_kw={"height_ratios": [1, 2]})
    t0 = min([e["time"] for e in events if isinstance(e.get("time"), (int, float))] +
             [g["time"] for c in st["computations"] for g in c["generations"] if g.get("time")] + [st["time"]])

    def rel(t):
        return (t - t0) / 60.0
    runs = [e for e in events if e.get("event") == "run"]
    ends = [e for e in events if e.get("event") in ("requeue", "end", "stop")]
    for i, r in enumerate(runs):
        stop = next((e["time"] for e in ends if e["time"] >= r["time"]), st["time"])
        ax.barh(0, rel(stop) - rel(r["time"]), left=rel(r["time"]), height=0.5,
                color="tab:blue" if i % 2 == 0 else "tab:cyan")
        ax.text(rel(r["time"]), 0.35, f"run {r.get('run', i)}", fontsize=8)
        if r.get("deadline"):
            ax.axvline(rel(r["deadline"]), color="tab:red", linestyle=":", linewidth=1)
    for e in events:
        if e.get("event") == "requeue":
            ax.plot(rel(e["time"]), 0, "v", color="tab:orange")
    ax.set_yticks([])
    ax.set_title(f"runs (bars), requeues (triangles), deadlines (dotted) - {st['ckptdir']}", fontsize=9)
    for c in st["computations"]:
        ok = [g for g in c["generations"] if g["state"] == "complete" and g.get("time")]
        bad = [g for g in c["generations"] if g["state"] == "failed" and g.get("time")]
        ax2.plot([rel(g["time"]) for g in ok], [(g.get("stored_bytes") or 0) / 1e6 for g in ok], "o-",
                 label=f"{c['computation']} stored MB")
        if bad:
            ax2.plot([rel(g["time"]) for g in bad], [0] * len(bad), "x", color="tab:red", label="failed")
    ax2.set_xlabel("minutes")
    ax2.set_ylabel("checkpoint size (MB)")
    if st["computations"]:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise Fail(f"cannot write {path}: {e.strerror}") from None
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None, prog: str = "hpcckpt status") -> int:
    def body(argv):
        args = parser(prog).parse_args(argv)
        d = args.ckptdir
        if d is None:
            try:
                d = load({}, None).ckptdir
            except SettingsError as e:
                raise Fail(str(e), code=2) from None
        st = collect(d)
        if args.plot:
            plot(st, journal.read(d), args.plot)
        if args.json:
            json.dump(st, sys.stdout, indent=1)
            print()
        else:
            print(render(st))
            if args.plot:
                print(f"timeline written to {args.plot}")
        return 0
    return run_main(prog, body, argv)

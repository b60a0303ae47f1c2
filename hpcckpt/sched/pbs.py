"""PBS Pro / OpenPBS adapter (verified here against the OpenPBS emulator in tests/pbs_emulator; `make test-pbs`
with PBS_EXEC runs the same scenario on a real server).

Facts it is built on (OpenPBS 23.06): no warning signal before the walltime and no remaining-time variable,
so the deadline comes from `qstat -f $PBS_JOBID` (Resource_List.walltime, and stime, reset on each rerun); at
the limit every process gets SIGTERM, then SIGKILL after the queue's kill_delay, and the job is not rerun even
with -r y; `qrerun` from inside a job fails for ordinary users (Unauthorized Request, 159). So the way to go on is a
continuation job: before exiting, the job submits its own wrapper again with `-W depend=afterany:$PBS_JOBID`
from the submit directory, with the user's options and one -v list (the user's own, from the command line and
#PBS -v, merged with ours: the checkpoint directory, a run counter, the predecessor's id). A continuation whose
predecessor the user deleted stops at once.
"""
from __future__ import annotations

import json
import os
import shlex
import time
from typing import TYPE_CHECKING

from .base import CANCELLED_MARK, QSUB_FLAGS, Requeued, Scheduler, SchedulerError, hms, read_directives

if TYPE_CHECKING:
    from .config import JobConfig


def parse_qstat_f(text: str) -> dict[str, str]:
    """`qstat -f` attributes (continuation lines folded back)."""
    out: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("\t") and key:
            out[key] += line[1:]               # a folded continuation line (the fold may fall on a space)
        elif " = " in line:
            key, _, value = line.lstrip().rstrip("\n").partition(" = ")
            out[key] = value
    return out



def split_v(text: str) -> list[str]:
    """A -v list into its VAR[=value] items (commas inside quotes stay, as qsub reads them)."""
    lex = shlex.shlex(text, posix=True)
    lex.whitespace, lex.whitespace_split = ",", True
    try:
        return [item for item in lex if item]
    except ValueError:
        return [item for item in text.split(",") if item]


def directive_v(script: str) -> list[str]:
    """The -v items of a script's #PBS lines (qsub reads directives up to the first command)."""
    items: list[str] = []
    try:
        lines = read_directives(script, "#PBS")
    except OSError:
        return items
    for line in lines:
        try:
            words = shlex.split(line[len("#PBS"):], posix=False)     # quotes kept: split_v reads them
        except ValueError:
            words = line[len("#PBS"):].split()
        for i, w in enumerate(words):
            if w == "-v" and i + 1 < len(words):
                items += split_v(words[i + 1])
            elif w.startswith("-v") and len(w) > 2:
                items += split_v(w[2:])
    return items


def merge_v(opts: list[str], script: str, ours: dict[str, str]) -> list[str]:
    """opts with every -v (qsub keeps only the last one, and one on the command line hides the script's #PBS -v)
    folded into a single -v: the script's items, then the command line's, then ours (ours win)."""
    items = directive_v(script)
    rest: list[str] = []
    i = 0
    while i < len(opts):
        if opts[i] == "-v" and i + 1 < len(opts):
            items += split_v(opts[i + 1])
            i += 2
            continue
        if opts[i].startswith("-v") and len(opts[i]) > 2:
            items += split_v(opts[i][2:])
        else:
            rest.append(opts[i])
        i += 1
    merged: dict[str, str] = {}
    for item in items:
        name = item.split("=", 1)[0]
        merged[name] = item
    for k, v in ours.items():
        merged[k] = f"{k}={v}"
    if not merged:
        return rest
    # values with a comma or a quote are quoted, as qsub expects
    return rest + ["-v", ",".join(_v_item(x) for x in merged.values())]


def _v_item(item: str) -> str:
    name, eq, value = item.partition("=")
    if eq and any(c in value for c in ",'\""):
        return f"{name}=\"{value}\"" if '"' not in value else f"{name}='{value}'"
    return item


class PBS(Scheduler):
    name = "pbs"
    directive = "#PBS"
    launcher = "pbs"
    wrapper_commands = ("qsub", "qstat")
    option_flags = QSUB_FLAGS
    option_pairs = frozenset({"-pe"})

    @classmethod
    def detect(cls, env: dict) -> bool:
        return bool(env.get("PBS_JOBID"))

    def job_id(self) -> str:
        return self.env["PBS_JOBID"]

    def run_count(self) -> int:
        try:
            return int(self.env.get("HPCCKPT_RUN") or 0)      # continuation jobs carry it
        except ValueError:
            return 0

    def _qstat(self) -> dict[str, str]:
        return parse_qstat_f(self.run([self.command("qstat"), "-f", self.job_id()]))

    def command(self, name: str) -> str:
        exec_dir = self.env.get("PBS_EXEC")
        return os.path.join(exec_dir, "bin", name) if exec_dir else self.env.get(f"HPCCKPT_{name.upper()}", name)

    def end_time(self) -> float | None:
        a = self._qstat()
        wall = a.get("Resource_List.walltime")
        stime = a.get("stime")
        if not wall or not stime:
            return None
        start = time.mktime(time.strptime(stime, "%a %b %d %H:%M:%S %Y"))
        return start + hms(wall)

    def cancelled(self) -> bool:
        """PBS sends SIGTERM for a qdel and at the walltime alike (then SIGKILL after kill_delay): a SIGTERM at
        or past the walltime is the limit (checkpoint within kill_delay and continue), any other a qdel."""
        try:
            end = self.end_time()
        except SchedulerError:
            return True
        return end is None or time.time() < end - 2

    def predecessor_stopped(self, ckptdir: str) -> str | None:
        """A continuation goes on only if its predecessor was not deleted by the user: our driver marks a run it
        saw deleted (CANCELLED_MARK), and `qstat -x -f` tells how the predecessor ended where the server keeps
        job history (a qdel: comment 'terminated by USER@HOST', Exit_status 271 for a job killed by SIGTERM)."""
        prev = self.env.get("HPCCKPT_PREV")
        if not prev:
            return None
        try:
            with open(os.path.join(ckptdir, CANCELLED_MARK)) as f:
                if prev in f.read().split():
                    return f"job {prev} was deleted by its user"
        except OSError:
            pass
        try:
            a = parse_qstat_f(self.run([self.command("qstat"), "-x", "-f", prev]))
        except SchedulerError:
            return None                  # no job history on this server: the mark is what we have
        comment = a.get("comment", "")
        if "terminated by" in comment or (a.get("Exit_status") == "271" and "walltime" not in comment):
            return f"job {prev} was deleted by its user ({comment or 'Exit_status 271'})"
        return None

    def cancel_continuation(self, continuation: str) -> None:
        try:
            self.run([self.command("qdel"), continuation])
        except SchedulerError:
            pass                         # it checks how we ended (predecessor_stopped) anyway

    def submit_dir(self) -> str:
        return self.env.get("PBS_O_WORKDIR") or os.getcwd()

    def node_list(self) -> list[str]:
        """$PBS_NODEFILE's hosts in its order (the first runs the job script), each once (one line per slot)."""
        path = self.env.get("PBS_NODEFILE")
        if path and os.path.exists(path):
            with open(path) as f:
                return list(dict.fromkeys(line.strip() for line in f if line.strip()))
        return super().node_list()

    remote_stdin = False            # tm_spawn: the task's standard input is not ours

    def remote_command(self, host: str, argv: list[str]) -> list[str]:
        """pbs_tmrsh (the Task Manager's rsh): the command runs as a task of this job on host, which must be
        in $PBS_NODEFILE."""
        return [self.command("pbs_tmrsh"), host, *argv]

    def requeue(self) -> Requeued:
        """Submit the continuation (our own wrapper again, after this job); this run then ends with 0."""
        wrapper = self.env.get("HPCCKPT_WRAPPER")
        if not wrapper or not os.path.exists(wrapper):
            raise SchedulerError("cannot continue: the wrapper script (HPCCKPT_WRAPPER) is gone")
        carry = {"HPCCKPT_RUN": str(self.run_count() + 1), "HPCCKPT_WRAPPER": wrapper,
                 "HPCCKPT_CKPTDIR": self.env.get("HPCCKPT_CKPTDIR", ""), "HPCCKPT_PREV": self.job_id()}
        try:
            with open(wrapper + ".opts") as f:          # the options the job was first submitted with
                opts = json.load(f)
        except (OSError, ValueError):
            opts = []
        opts = merge_v(opts, wrapper, {k: v for k, v in carry.items() if v})
        # from the submit directory, like the first job: relative -o/-e paths and the default .o/.e files land
        # there, and PBS_O_WORKDIR stays the same
        out = self.run([self.command("qsub"), *opts, "-W", f"depend=afterany:{self.job_id()}", wrapper],
                       cwd=self.submit_dir())
        return Requeued(exit_code=0, continuation=out.strip())

    # -- the submit side --------------------------------------------------------------------------------------
    @classmethod
    def installed(cls, env: dict[str, str]) -> bool:
        return bool(env.get("PBS_EXEC"))

    def wrapper_directives(self, cfg: JobConfig) -> list[str]:
        return ["#PBS -r n"]                     # we continue with our own follow-up job, not a rerun

    def submit_options(self, opts: list[str], wrapper: str) -> list[str]:
        """One -v (qsub keeps only the last): the user's, with the wrapper's path for the continuations."""
        return merge_v(opts, wrapper, {"HPCCKPT_WRAPPER": wrapper})

    def after_job_options(self, job_id: str) -> list[str]:
        return ["-W", f"depend=afterany:{job_id}"]

    def submit(self, script_path: str, options: list[str], cwd: str) -> str:
        return self.run([self.command("qsub"), *options, script_path], cwd=cwd).strip()

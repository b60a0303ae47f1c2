"""The emulator's daemon: pbs_server, the scheduler and pbs_mom of a one-node OpenPBS complex in one process.

It runs as root, listens on <state_dir>/server.sock (mode 0666; the caller's uid comes from SO_PEERCRED), keeps
each job in <state_dir>/jobs/<seq>.json and starts every job as a real process tree (its own session) under the
uid of the user who ran qsub. See README.md for what it reproduces. Standard library only."""
from __future__ import annotations

import json
import os
import pwd
import secrets
import selectors
import shutil
import signal
import socket
import struct
import sys
import time
import traceback

from . import protocol as P

DEFAULTS = {
    "kill_delay": 10,        # queue workq kill_delay: SIGTERM ... kill_delay seconds ... SIGKILL
    "operators": [],         # server operators (may qrerun); root and managers always may
    "managers": [],
    "acl_roots": [],         # users allowed to run jobs as uid 0 (OpenPBS rejects root's jobs by default)
    "mom_poll": 10,          # seconds between resources_used updates of running jobs
    "walltime_slack": 0,     # extra seconds a job may run past its walltime before it is killed
    "passwd": {},            # {"user": {"home": "/dir", "shell": "/bin/bash"}}: overrides of the passwd entry
    "job_requeue_timeout": 45,
}
START_ONLY = ("server_name", "first_job_id")
KNOWN_RESOURCES = {
    "walltime", "ncpus", "mem", "vmem", "pmem", "pvmem", "cput", "pcput", "select", "place", "nodes", "nodect",
    "mpiprocs", "ompthreads", "host", "vnode", "arch", "file", "software", "naccelerators", "ngpus", "accelerator",
}
DEP_TYPES = ("after", "afterok", "afternotok", "afterany")
SUB_QUEUED, SUB_HELD, SUB_RUNNING, SUB_RERUN, SUB_TERMINATED, SUB_FINISHED, SUB_FAILED = 10, 20, 42, 43, 91, 92, 93
SUB_EXITING = 51
EXITING_S = 1.0              # a real job shows state E (obit, stage-out) for a moment before F
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def log(state_dir: str, text: str) -> None:
    with open(os.path.join(state_dir, "server.log"), "a") as f:
        f.write(time.strftime("%m/%d/%Y %H:%M:%S;") + text + "\n")


def write_json(path: str, obj, mode: int = 0o600) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def proc_stat(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, session, ...]."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].split()


def session_pids(sid: int) -> list[int]:
    """Every live process of session sid (how pbs_mom finds a job's processes without cgroups)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            f = proc_stat(int(name))
            if f and int(f[3]) == sid and f[0] != b"Z":
                out.append(int(name))
    return out


def signal_session(sid: int, sig: int) -> int:
    n = 0
    for pid in session_pids(sid):
        try:
            os.kill(pid, sig)
            n += 1
        except OSError:
            pass
    return n


class Job:
    """One job: `d` is what is persisted (and what qstat shows), the other attributes live only while it runs."""

    def __init__(self, d: dict):
        self.d = d
        self.pid = 0
        self.fd_o = self.fd_e = -1
        self.start_mono = 0.0
        self.kill_reason = None      # 'walltime' | 'qdel' | 'rerun'
        self.kill_deadline = 0.0
        self.killed9 = False
        self.last_poll = 0.0
        self.cput = 0.0
        self.waiters: list[tuple[socket.socket, float]] = []   # qrerun clients waiting for the requeue
        self.deleted_by = ""         # USER@HOST of a qdel
        self.exiting: tuple | None = None   # (finish() arguments, when): in state E until then

    @property
    def id(self) -> str:
        return self.d["id"]

    @property
    def state(self) -> str:
        return self.d["state"]


class Server:
    def __init__(self, state_dir: str):
        self.dir = os.path.abspath(state_dir)
        self.cfg = dict(DEFAULTS)
        try:
            with open(self.path("config.json")) as f:
                self.cfg.update(json.load(f))
        except (OSError, ValueError):
            pass
        self.cfg.setdefault("server_name", socket.gethostname().split(".")[0])
        self.cfg.setdefault("first_job_id", 0)
        self.name = self.cfg["server_name"]
        self.host = socket.gethostname()
        self.cfg.setdefault("next_seq", int(self.cfg["first_job_id"]))
        self.jobs: dict[str, Job] = {}
        self.stopping = False
        for sub, mode in (("jobs", 0o700), ("spool", 0o711), ("mom_priv", 0o711), ("mom_priv/jobs", 0o711),
                          ("aux", 0o755), ("tmp", 0o711), ("undelivered", 0o700)):
            os.makedirs(self.path(sub), exist_ok=True)
            os.chmod(self.path(sub), mode)
        self.load_jobs()
        self.save_config()

    # ------------------------------------------------------------------------------------------ persistence

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def save_config(self) -> None:
        write_json(self.path("config.json"), self.cfg, 0o600)
        write_json(self.path("server.json"), {"server_name": self.name, "host": self.host,
                                              "pid": os.getpid(), "version": P.PBS_VERSION}, 0o644)

    def save(self, job: Job) -> None:
        job.d["mtime"] = int(time.time())
        write_json(self.path("jobs", f"{job.d['seq']}.json"), job.d)

    def load_jobs(self) -> None:
        files = [f for f in os.listdir(self.path("jobs")) if f.endswith(".json")]
        for f in sorted(files, key=lambda n: int(n.split(".")[0])):
            try:
                with open(self.path("jobs", f)) as fh:
                    job = Job(json.load(fh))
            except (OSError, ValueError):
                continue
            if job.state == "E" and job.d["exit_status"] is not None:
                self.finish(job, job.d["exit_status"], SUB_FINISHED, None)    # it had ended: finish it
            elif job.state in ("R", "E"):       # the daemon died under a running job: its processes are gone
                if job.d["rerunable"]:
                    self.set_state(job, "Q", SUB_QUEUED)
                else:
                    self.finish(job, P.JOB_EXEC_FAIL1, SUB_FAILED, "and failed (emulator restarted)")
            self.jobs[job.id] = job

    def log(self, text: str) -> None:
        log(self.dir, text)

    # ------------------------------------------------------------------------------------------ main loop

    def serve(self) -> None:
        sp = P.socket_path(self.dir)
        if os.path.exists(sp):
            os.unlink(sp)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(sp)
        os.chmod(sp, 0o666)
        lsock.listen(128)
        with open(self.path("server.pid"), "w") as f:
            f.write(f"{os.getpid()}\n")
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stopping", True))
        sel = selectors.DefaultSelector()
        sel.register(lsock, selectors.EVENT_READ)
        self.log(f"Server@{self.name}: version {P.PBS_VERSION} (emulator) started, pid {os.getpid()}")
        while not self.stopping:
            for _key, _ev in sel.select(0.1):
                try:
                    conn, _ = lsock.accept()
                except OSError:
                    continue
                self.handle(conn)
            try:
                self.tick()
            except Exception:
                self.log("tick failed: " + traceback.format_exc().replace("\n", " | "))
        self.shutdown_jobs()
        sel.close()
        lsock.close()
        for f in (sp, self.path("server.pid")):
            try:
                os.unlink(f)
            except OSError:
                pass
        self.log("Server shutdown completed")

    def shutdown_jobs(self) -> None:
        """Stop: every running job is killed (SIGTERM, then SIGKILL after 2 s) and marked finished."""
        running = [j for j in self.jobs.values() if j.pid]
        for j in running:
            signal_session(j.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2
        while running and time.monotonic() < deadline:
            self.reap()
            running = [j for j in running if j.pid]
            time.sleep(0.05)
        for j in running:
            signal_session(j.pid, signal.SIGKILL)
        end = time.monotonic() + 5
        while any(j.pid for j in running) and time.monotonic() < end:
            self.reap()
            time.sleep(0.05)

    # ------------------------------------------------------------------------------------------ requests

    def handle(self, conn: socket.socket) -> None:
        keep = False
        try:
            conn.settimeout(5)
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, gid = struct.unpack("3i", creds)
            msg = P.recv_msg(conn)
            if msg is None:
                return
            op = msg.get("op")
            fn = getattr(self, "op_" + str(op), None)
            if fn is None:
                reply = {"rc": 1, "err": f"pbs_emulator: unknown request {op!r}\n"}
            else:
                try:
                    user = pwd.getpwuid(uid).pw_name
                except KeyError:
                    user = str(uid)
                reply = fn(msg, uid, gid, user, conn)
            if reply is None:
                keep = True           # answered later (qrerun waits for the requeue)
            else:
                P.send_msg(conn, reply)
        except Exception:
            self.log("request failed: " + traceback.format_exc().replace("\n", " | "))
            try:
                P.send_msg(conn, {"rc": 1, "err": "pbs_emulator: internal error, see server.log\n"})
            except OSError:
                pass
        finally:
            if not keep:
                conn.close()

    def is_manager(self, uid: int, user: str) -> bool:
        return uid == 0 or user in self.cfg["managers"]

    def is_operator(self, uid: int, user: str) -> bool:
        return self.is_manager(uid, user) or user in self.cfg["operators"]

    def find(self, text: str) -> tuple[Job | None, str]:
        jid = P.normalize_jobid(text, self.name) or text
        return self.jobs.get(jid), jid

    def op_ping(self, msg, uid, gid, user, conn):
        return {"rc": 0, "server": self.name, "pid": os.getpid()}

    def op_shutdown(self, msg, uid, gid, user, conn):
        if uid != 0:
            return {"rc": P.exit_code(P.PBSE_PERM), "err": "pbs-emu: Unauthorized Request \n"}
        self.stopping = True
        return {"rc": 0}

    def op_config(self, msg, uid, gid, user, conn):
        new = msg.get("set") or {}
        if new:
            if uid != 0:
                return {"rc": P.exit_code(P.PBSE_PERM), "err": "pbs-emu: Unauthorized Request \n"}
            for k, v in new.items():
                if k in START_ONLY:
                    return {"rc": 2, "err": f"pbs-emu: {k} can only be set when the server starts\n"}
                if k not in DEFAULTS:
                    return {"rc": 2, "err": f"pbs-emu: unknown setting {k}\n"}
                self.cfg[k] = v
            self.save_config()
            self.log(f"settings changed by {user}: {json.dumps(new)}")
        show = {k: self.cfg[k] for k in list(DEFAULTS) + list(START_ONLY)}
        return {"rc": 0, "config": show}

    # ---- qsub

    def op_submit(self, msg, uid, gid, user, conn):
        a = msg["attrs"]
        if uid == 0 and user not in self.cfg["acl_roots"]:
            return {"rc": P.exit_code(P.PBSE_BADUSER), "err": f"qsub: {P.MESSAGES[P.PBSE_BADUSER]}\n"}
        q = a.get("queue") or ""
        if q.split("@")[0] not in ("", P.QUEUE):
            return {"rc": P.exit_code(P.PBSE_UNKQUE), "err": f"qsub: {P.MESSAGES[P.PBSE_UNKQUE]}\n"}
        res: dict[str, str] = dict(a.get("resources") or {})
        for r, v in res.items():
            if r not in KNOWN_RESOURCES:
                return {"rc": P.exit_code(P.PBSE_UNKRESC),
                        "err": f"qsub: {P.MESSAGES[P.PBSE_UNKRESC]} Resource_List.{r}\n"}
        walltime = None
        if "walltime" in res:
            walltime = P.parse_duration(res["walltime"])
            if walltime is None:
                return {"rc": P.exit_code(P.PBSE_BADATVAL),
                        "err": f"qsub: {P.MESSAGES[P.PBSE_BADATVAL]} Resource_List.walltime\n"}
            res["walltime"] = P.fmt_duration(walltime)
        ncpus = 1
        sel = res.get("select")
        if sel:
            for part in sel.split("+")[0].split(":")[1:]:
                if part.startswith("ncpus="):
                    ncpus = int(part[6:]) if part[6:].isdigit() else 1
        elif res.get("ncpus", "").isdigit():
            ncpus = int(res["ncpus"])
        res.setdefault("ncpus", str(ncpus))
        res.setdefault("nodect", "1")
        res.setdefault("place", "pack")
        res.setdefault("select", f"1:ncpus={ncpus}")
        # dependencies: the client already expanded ids to N.server (parse_depend_list)
        depend, hold, unknown = [], False, []
        for dtype, ids in a.get("depend") or []:
            if dtype not in DEP_TYPES:
                return {"rc": 2, "err": f"qsub: pbs_emulator supports only {', '.join(DEP_TYPES)} dependencies\n"}
            keep_ids = []
            for raw in ids:
                parent, jid = self.find(raw)
                if parent is None:
                    # real OpenPBS accepts it (rc 0); the job is deleted when the server resolves it
                    keep_ids.append(jid)
                    unknown.append(jid)
                    continue
                if parent.state == "F":
                    verdict = self.dep_verdict(dtype, parent)
                    if verdict is False:
                        return {"rc": P.exit_code(P.PBSE_HISTDEPEND),
                                "err": f"qsub: {P.MESSAGES[P.PBSE_HISTDEPEND]}\n"}
                    continue                       # already satisfied
                keep_ids.append(parent.id)
            if keep_ids:
                depend.append([dtype, keep_ids])
                hold = True
        seq = int(self.cfg["next_seq"])
        self.cfg["next_seq"] = seq + 1
        self.save_config()
        jid = f"{seq}.{self.name}"
        now = int(time.time())
        name = a["name"]
        submit_host = a.get("submit_host") or self.host
        workdir = a["workdir"]
        out = a.get("output_path") or f"{submit_host}:{workdir}/{name}.o{seq}"
        err = a.get("error_path") or f"{submit_host}:{workdir}/{name}.e{seq}"
        d = {
            "id": jid, "seq": seq, "name": name, "owner": user, "uid": uid, "gid": gid,
            "submit_host": submit_host, "workdir": workdir, "ctime": now, "qtime": now, "etime": now,
            "mtime": now, "stime": None, "state": "H" if hold else "Q", "substate": SUB_HELD if hold else SUB_QUEUED,
            "hold_types": "s" if hold else "n", "rerunable": bool(a.get("rerunable", True)),
            "join": a.get("join") or "n", "keep": a.get("keep") or "n", "mail_points": a.get("mail_points") or "a",
            "mail_users": a.get("mail_users"), "account": a.get("account"), "project": a.get("project"),
            "priority": a.get("priority") or "0", "checkpoint": a.get("checkpoint") or "u",
            "shell_path": a.get("shell_path"), "output_path": out, "error_path": err, "resources": res,
            "walltime": walltime, "ncpus": ncpus, "variables": a.get("variables") or [], "depend": depend,
            "run_count": 0, "exit_status": None, "session_id": None, "comment": None, "used": None,
            "submit_args": a.get("submit_args") or "", "umask": a.get("umask"), "exec_host": None,
            "history_ts": None, "jobdir": None, "depend_unknown": unknown,
        }
        with open(self.path("jobs", f"{seq}.SC"), "w") as f:
            f.write(msg.get("script") or "")
        job = Job(d)
        self.jobs[jid] = job
        self.save(job)
        self.log(f"Job;{jid};Job Queued at request of {user}@{submit_host}, owner = {user}@{submit_host}, "
                 f"job name = {name}, queue = {P.QUEUE}")
        return {"rc": 0, "jobid": jid}

    @staticmethod
    def dep_verdict(dtype: str, parent: Job):
        """True: satisfied, False: can never be satisfied, None: not decided yet (parent not finished)."""
        if parent.state != "F":
            return None
        st = parent.d["exit_status"]
        if dtype in ("after", "afterany"):
            return True
        if dtype == "afterok":
            return st == 0
        return st is not None and st != 0          # afternotok

    # ---- qstat

    def op_stat(self, msg, uid, gid, user, conn):
        ids = msg.get("ids")
        history = bool(msg.get("history"))
        out = []
        if not ids:
            for job in self.jobs.values():
                if job.state != "F" or history:
                    out.append({"id": job.id, "attrs": self.status(job)})
        else:
            for raw in ids:
                job, jid = self.find(raw)
                if job is None:
                    out.append({"id": jid, "error": P.PBSE_UNKJOBID})
                elif job.state == "F" and not history:
                    out.append({"id": jid, "error": P.PBSE_HISTJOBID})
                else:
                    out.append({"id": jid, "attrs": self.status(job)})
        return {"rc": 0, "jobs": out, "server": self.name}

    def status(self, job: Job) -> list:
        """The job's attributes as pbs_statjob returns them: [name, resource, value], in OpenPBS order."""
        d = job.d
        A: list = []

        def add(name, value, resource=None):
            if value is not None:
                A.append([name, resource, str(value)])

        add("Job_Name", d["name"])
        add("Job_Owner", f"{d['owner']}@{d['submit_host']}")
        if d["used"]:
            for r in ("cpupercent", "cput", "mem", "ncpus", "vmem", "walltime"):
                add("resources_used", d["used"].get(r), r)
        add("job_state", d["state"])
        add("queue", P.QUEUE)
        add("server", self.name)
        add("Account_Name", d["account"])
        add("Checkpoint", d["checkpoint"])
        add("ctime", d["ctime"])
        if d["depend"]:
            add("depend", ",".join(t + "".join(f":{i}@{self.name}" for i in ids) for t, ids in d["depend"]))
        add("Error_Path", d["error_path"])
        if d["exec_host"]:
            add("exec_host", f"{d['exec_host']}/0")
            add("exec_vnode", f"({d['exec_host']}:ncpus={d['ncpus']})")
        add("Hold_Types", d["hold_types"])
        add("Join_Path", d["join"])
        add("Keep_Files", d["keep"])
        add("Mail_Points", d["mail_points"])
        add("Mail_Users", d["mail_users"])
        add("mtime", d["mtime"])
        add("Output_Path", d["output_path"])
        add("Priority", d["priority"])
        add("qtime", d["qtime"])
        add("Rerunable", "True" if d["rerunable"] else "False")
        for r in sorted(d["resources"]):
            add("Resource_List", d["resources"][r], r)
        add("Shell_Path_List", d["shell_path"])
        add("stime", d["stime"])
        add("session_id", d["session_id"])
        add("jobdir", d["jobdir"])
        add("substate", d["substate"])
        add("Variable_List", ",".join(f"{k}={v.replace(',', chr(92) + ',')}" for k, v in d["variables"]))
        add("umask", d["umask"])
        add("comment", d["comment"])
        add("etime", d["etime"])
        add("run_count", d["run_count"])
        add("Exit_status", d["exit_status"])
        add("Submit_arguments", d["submit_args"])
        add("history_timestamp", d["history_ts"])
        add("project", d["project"] or "_pbs_project_default")
        add("Submit_Host", d["submit_host"])
        return A

    # ---- qdel

    def op_delete(self, msg, uid, gid, user, conn):
        errs, rc = [], 0
        for raw in msg.get("ids") or []:
            job, jid = self.find(raw)
            code = 0
            if job is None:
                code = P.PBSE_UNKJOBID
            elif job.state == "F":
                if msg.get("history") and (self.is_operator(uid, user) or job.d["owner"] == user):
                    self.purge(job)
                else:
                    code = P.PBSE_HISTJOBID
            elif not (self.is_operator(uid, user) or job.d["owner"] == user):
                code = P.PBSE_PERM
            elif job.state == "E":
                code = P.PBSE_BADSTATE                # exiting: nothing left to delete
            else:
                self.delete(job, user, force=bool(msg.get("force")), manager=self.is_manager(uid, user))
            if code:
                errs.append(f"qdel: {P.MESSAGES[code]} {jid}\n")
                rc = P.exit_code(code)
        return {"rc": rc, "err": "".join(errs)}

    def delete(self, job: Job, by: str, force: bool, manager: bool) -> None:
        self.log(f"Job;{job.id};Job to be deleted at request of {by}")
        job.deleted_by = f"{by}@{self.host}"
        if job.state in ("Q", "H"):
            job.d["comment"] = None
            self.finish(job, None, SUB_TERMINATED, None)
            return
        if force and manager:                          # qdel -Wforce by a manager: gone at once, status 265
            if job.pid:
                signal_session(job.pid, signal.SIGKILL)
            job.kill_reason = "qdel-force"
            return
        if job.kill_reason in (None, "rerun"):
            job.kill_reason = "qdel"                    # "deleting instead of rerunning"
            job.d["substate"] = SUB_RUNNING
            if not job.kill_deadline:
                self.begin_kill(job, signal.SIGKILL if force else signal.SIGTERM)
        elif force:
            signal_session(job.pid, signal.SIGKILL)

    def purge(self, job: Job) -> None:
        del self.jobs[job.id]
        for f in (f"{job.d['seq']}.json", f"{job.d['seq']}.SC"):
            try:
                os.unlink(self.path("jobs", f))
            except OSError:
                pass

    # ---- qrerun

    def op_rerun(self, msg, uid, gid, user, conn):
        job, jid = self.find(msg["id"])
        err = None
        if job is None:
            err = (P.PBSE_UNKJOBID, f"qrerun: {P.MESSAGES[P.PBSE_UNKJOBID]} {jid}\n")
        elif job.state == "F":
            err = (P.PBSE_HISTJOBID, f"qrerun: {P.MESSAGES[P.PBSE_HISTJOBID]}\n")
        elif not self.is_operator(uid, user):
            err = (P.PBSE_PERM, f"qrerun: {P.MESSAGES[P.PBSE_PERM]} {jid}\n")
        elif not job.d["rerunable"] and not msg.get("force"):
            err = (P.PBSE_NORERUN, f"qrerun: {P.MESSAGES[P.PBSE_NORERUN]} {jid}\n")
        elif job.state != "R" or (job.kill_reason and not msg.get("force")):
            err = (P.PBSE_BADSTATE, f"qrerun: {P.MESSAGES[P.PBSE_BADSTATE]} {jid}\n")
        if err:
            return {"rc": P.exit_code(err[0]), "err": err[1]}
        self.log(f"Job;{job.id};Job Rerun at request of {user}")
        if msg.get("force") and self.is_manager(uid, user):
            job.kill_reason = "rerun-force"             # requeued at once, processes killed
            signal_session(job.pid, signal.SIGKILL)
            return {"rc": 0}
        job.kill_reason = "rerun"
        job.d["substate"] = SUB_RERUN
        job.waiters.append((conn, time.monotonic() + float(self.cfg["job_requeue_timeout"])))
        self.begin_kill(job, signal.SIGTERM)
        return None                                     # replied when the job is back in the queue

    # ------------------------------------------------------------------------------------------ the clock

    def tick(self) -> None:
        now = time.monotonic()
        self.reap()
        for job in list(self.jobs.values()):
            if job.pid:
                if job.kill_deadline and not job.killed9 and now >= job.kill_deadline:
                    signal_session(job.pid, signal.SIGKILL)
                    job.killed9 = True
                if now - job.last_poll >= float(self.cfg["mom_poll"]):
                    self.poll_usage(job)
                    # pbs_mom checks limits when it polls the job: a 5 s walltime is enforced at the first
                    # poll past it (~10 s with the default poll)
                    limit = job.d["walltime"]
                    if limit is not None and not job.kill_reason:
                        elapsed = int(now - job.start_mono)     # pbs_mom counts whole seconds: value > limit
                        if elapsed > limit + float(self.cfg["walltime_slack"]):
                            self.kill_walltime(job, elapsed)
            if job.exiting and now >= job.exiting[1]:
                args, job.exiting = job.exiting[0], None
                self.finish(job, *args)
            for conn, deadline in list(job.waiters):
                if now >= deadline:
                    job.waiters.remove((conn, deadline))
                    self.answer(conn, {"rc": P.exit_code(P.PBSE_INTERNAL),
                                       "err": "qrerun: Response timed out. Job rerun request still in progress for "
                                              f"{job.id}\n"})
        self.release_dependencies()
        for job in list(self.jobs.values()):
            if job.state == "Q":
                self.run(job)

    def release_dependencies(self) -> None:
        for job in list(self.jobs.values()):
            if job.state != "H" or not job.d["depend"]:
                continue
            remaining, doomed = [], None
            for dtype, ids in job.d["depend"]:
                left = []
                for pid_ in ids:
                    parent = self.jobs.get(pid_)
                    if pid_ in job.d.get("depend_unknown", []):
                        verdict = False                  # a job the server never knew
                    else:
                        verdict = True if parent is None else self.dep_verdict(dtype, parent)
                    if verdict is None:
                        left.append(pid_)
                    elif verdict is False:
                        doomed = pid_
                if left:
                    remaining.append([dtype, left])
            if doomed:
                job.d["depend"] = remaining
                job.d["comment"] = f"Job deleted as result of dependency on job {doomed}"
                self.finish(job, None, SUB_TERMINATED, None)
            elif not remaining:
                job.d["depend"] = []
                job.d["hold_types"] = "n"
                self.set_state(job, "Q", SUB_QUEUED)
                self.log(f"Job;{job.id};Dependency released")
            elif remaining != job.d["depend"]:
                job.d["depend"] = remaining
                self.save(job)

    def set_state(self, job: Job, state: str, sub: int) -> None:
        job.d["state"], job.d["substate"] = state, sub
        if state == "Q":
            job.d["qtime"] = job.d["etime"] = int(time.time())
        self.save(job)

    # ------------------------------------------------------------------------------------------ pbs_mom

    def user_info(self, job: Job) -> tuple:
        pw = pwd.getpwnam(job.d["owner"])
        over = self.cfg["passwd"].get(job.d["owner"], {})
        home = over.get("home", pw.pw_dir)
        shell = job.d["shell_path"] or over.get("shell") or pw.pw_shell
        if not job.d["shell_path"] and "shell" not in over:
            try:
                with open("/etc/shells") as f:
                    shells = {ln.strip() for ln in f if ln.startswith("/")}
            except OSError:
                shells = set()
            if shell not in shells:
                shell = "/bin/sh"          # e.g. nobody's /usr/sbin/nologin (see README: deviations)
        groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
        return pw, home, shell, groups

    def open_out(self, path: str, uid: int, gid: int) -> int:
        new = not os.path.exists(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if new:
            os.fchown(fd, uid, gid)
        return fd

    def stream_paths(self, job: Job, pw, home: str) -> tuple[str, str]:
        """Where the job's stdout/stderr go while it runs: the spool (delivered at the end), $HOME for -k, or
        the final path for direct write (-k with d)."""
        d, keep = job.d, job.d["keep"]
        paths = []
        for key, suffix, letter in (("output_path", "OU", "o"), ("error_path", "ER", "e")):
            if "d" in keep and letter in keep:
                paths.append(self.dest_path(job, d[key], suffix))
            elif letter in keep:
                paths.append(os.path.join(home, f"{d['name']}.{letter}{d['seq']}"))
            else:
                paths.append(self.path("spool", f"{job.id}.{suffix}"))
        return paths[0], paths[1]

    def dest_path(self, job: Job, value: str, suffix: str) -> str:
        path = value.split(":", 1)[1] if ":" in value and not value.startswith("/") else value
        if os.path.isdir(path):
            path = os.path.join(path, f"{job.id}.{suffix}")
        return path

    def run(self, job: Job) -> None:
        d = job.d
        try:
            pw, home, shell, groups = self.user_info(job)
        except KeyError:
            d["comment"] = "job failed: no such user"
            self.finish(job, P.JOB_EXEC_FAIL1, SUB_FAILED, None)
            return
        uid, gid = pw.pw_uid, pw.pw_gid
        out_path, err_path = self.stream_paths(job, pw, home)
        fd_o = self.open_out(out_path, uid, gid)
        fd_e = fd_o if d["join"] == "oe" else self.open_out(err_path, uid, gid)
        if d["join"] == "eo":
            os.close(fd_o)
            fd_o = fd_e
        tmpdir = self.path("tmp", f"pbs.{job.id}")
        os.makedirs(tmpdir, exist_ok=True)
        os.chown(tmpdir, uid, gid)
        os.chmod(tmpdir, 0o700)
        nodefile = self.path("aux", job.id)
        with open(nodefile, "w") as f:
            f.write(self.host + "\n")
        os.chmod(nodefile, 0o644)
        script = self.path("mom_priv", "jobs", f"{job.id}.SC")
        shutil.copyfile(self.path("jobs", f"{d['seq']}.SC"), script)
        os.chown(script, uid, gid)
        os.chmod(script, 0o700)
        # /etc/profile.d/pbs.sh appends the PBS commands to PATH (and the man pages to MANPATH)
        env = {"PATH": f"/usr/local/bin:/usr/bin:/bin:{self.path('bin')}", "MANPATH": f":{self.path('man')}"}
        for k, v in d["variables"]:
            env[k] = v
        env.update({
            "HOME": home, "LOGNAME": pw.pw_name, "USER": pw.pw_name, "SHELL": shell,
            "PBS_O_INTERACTIVE_AUTH_METHOD": "resvport", "PBS_O_INTERACTIVE_ENCRYPT_METHOD": "",
            "PBS_JOBNAME": d["name"], "PBS_JOBID": job.id, "PBS_QUEUE": P.QUEUE,
            "PBS_JOBCOOKIE": secrets.token_hex(16).upper(), "PBS_NODENUM": "0", "PBS_TASKNUM": "1",
            "PBS_MOMPORT": "15003", "PBS_NODEFILE": nodefile, "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_JOBDIR": home,
            "TMPDIR": tmpdir, "NCPUS": str(d["ncpus"]), "OMP_NUM_THREADS": str(d["ncpus"]), "ENVIRONMENT": "BATCH",
        })
        umask = int(d["umask"], 8) if d["umask"] else 0o077
        argv = [shell, script]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                    # the job's top process
            try:
                os.close(r)
                os.setsid()
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(fd_o, 1)
                os.dup2(fd_e, 2)
                for s in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
                    signal.signal(s, signal.SIG_DFL)
                os.setgroups(groups)
                os.setgid(gid)
                os.setuid(uid)
                os.umask(umask)
                try:
                    os.chdir(home)
                except OSError:
                    os.write(2, f"Could not chdir to Home directory {home}\n".encode())
                    os.write(w, b"chdir")
                    os._exit(P.JOB_EXEC_FAIL1 & 0xFF)
                os.set_inheritable(w, False)
                os.execve(argv[0], argv, env)
            except BaseException as e:                  # noqa: BLE001 - report anything, never return
                try:
                    os.write(2, f"PBS: job could not start: {e}\n".encode())
                    os.write(w, b"exec")
                finally:
                    os._exit(P.JOB_EXEC_FAIL1 & 0xFF)
        os.close(w)
        failed = os.read(r, 64)
        os.close(r)
        job.pid, job.fd_o, job.fd_e = pid, fd_o, fd_e
        job.start_mono = job.last_poll = time.monotonic()
        job.kill_reason, job.kill_deadline, job.killed9, job.cput = None, 0.0, False, 0.0
        now = int(time.time())
        d.update(stime=now, run_count=d["run_count"] + 1, session_id=pid, exec_host=self.host, jobdir=home,
                 exit_status=None, state="R", substate=SUB_RUNNING,
                 used={"cpupercent": 0, "cput": "00:00:00", "mem": "0kb", "ncpus": d["ncpus"], "vmem": "0kb",
                       "walltime": "00:00:00"},
                 comment=time.strftime("Job run at %a %b %d at %H:%M", time.localtime(now))
                 + f" on ({self.host}:ncpus={d['ncpus']})")
        if failed:
            job.kill_reason = "startfail"
        self.save(job)
        self.log(f"Job;{job.id};Job Run (run_count={d['run_count']}, session {pid})")

    def begin_kill(self, job: Job, sig: int) -> None:
        """What pbs_mom does to terminate a job: SIGTERM to every process of its session now, SIGKILL to
        whatever is left kill_delay seconds later (tick())."""
        signal_session(job.pid, sig)
        job.killed9 = sig == signal.SIGKILL
        job.kill_deadline = time.monotonic() + float(self.cfg["kill_delay"])

    def kill_walltime(self, job: Job, elapsed: int) -> None:
        job.kill_reason = "walltime"
        msg = f"=>> PBS: job killed: walltime {elapsed} exceeded limit {job.d['walltime']}\n"
        try:
            os.write(job.fd_e, msg.encode())
        except OSError:
            pass
        self.log(f"Job;{job.id};{msg[4:].strip()}")
        self.begin_kill(job, signal.SIGTERM)

    def poll_usage(self, job: Job) -> None:
        job.last_poll = time.monotonic()
        cput, rss, vsz = 0.0, 0, 0
        for pid in session_pids(job.pid):
            f = proc_stat(pid)
            if f:
                cput += sum(int(x) for x in f[11:15]) / CLK_TCK
                vsz += int(f[20]) // 1024
                rss += int(f[21]) * PAGE_KB
        job.cput = max(job.cput, cput)
        self.record_usage(job, rss, vsz)

    def record_usage(self, job: Job, rss: int | None = None, vsz: int | None = None) -> None:
        wall = time.monotonic() - job.start_mono
        u = job.d["used"]
        u["walltime"] = P.fmt_duration(wall)
        u["cput"] = P.fmt_duration(job.cput)
        u["cpupercent"] = int(100 * job.cput / wall) if wall >= 1 else 0
        if rss is not None:
            u["mem"] = f"{rss}kb"
            u["vmem"] = f"{vsz}kb"
        self.save(job)

    def reap(self) -> None:
        for job in list(self.jobs.values()):
            if not job.pid:
                continue
            try:
                pid, status, ru = os.wait4(job.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status, ru = job.pid, 0, None
            if pid == 0:
                continue
            code = os.waitstatus_to_exitcode(status)
            code = 256 - code if code < 0 else code            # killed by signal N -> 256+N (PBS convention)
            signal_session(job.pid, signal.SIGKILL)            # the top process is gone: kill what is left
            if ru is not None:
                job.cput = max(job.cput, ru.ru_utime + ru.ru_stime)
            self.record_usage(job)
            self.end_run(job, code)

    def end_run(self, job: Job, code: int) -> None:
        d = job.d
        for fd in {job.fd_o, job.fd_e}:
            try:
                os.close(fd)
            except OSError:
                pass
        sid = job.pid
        job.pid, job.fd_o, job.fd_e = 0, -1, -1
        shutil.rmtree(self.path("tmp", f"pbs.{job.id}"), ignore_errors=True)
        for f in (self.path("aux", job.id), self.path("mom_priv", "jobs", f"{job.id}.SC")):
            try:
                os.unlink(f)
            except OSError:
                pass
        reason = job.kill_reason
        job.kill_reason, job.kill_deadline, job.killed9 = None, 0.0, False
        self.log(f"Job;{job.id};Exit_status={code} (session {sid}, reason {reason})")
        if reason in ("rerun", "rerun-force"):
            d["exit_status"] = None
            d["exec_host"] = d["jobdir"] = d["session_id"] = None
            d["used"] = None
            self.set_state(job, "Q", SUB_QUEUED)
            for conn, _ in job.waiters:
                self.answer(conn, {"rc": 0})
            job.waiters.clear()
            return
        deleted = f"and terminated by {job.deleted_by}" if job.deleted_by else "and terminated"
        job.deleted_by = ""
        if reason == "walltime":
            args = (P.JOB_EXEC_KILL_WALLTIME, SUB_FINISHED, "and exceeded resource walltime")
        elif reason == "qdel":
            # OpenPBS 23.06 reports the deletion's SIGTERM (271) whatever the job did with it (trapped it and
            # exited, or outlived kill_delay and got SIGKILL)
            args = (256 + signal.SIGTERM, SUB_TERMINATED, deleted)
        elif reason == "qdel-force":
            args = (256 + signal.SIGKILL, SUB_TERMINATED, deleted)
        elif reason == "startfail":
            args = (P.JOB_EXEC_FAIL1, SUB_FAILED, "and failed")
        else:
            args = (code, SUB_FINISHED, "and finished")
        d["exit_status"] = args[0]
        d["state"], d["substate"] = "E", SUB_EXITING
        job.exiting = (args, time.monotonic() + EXITING_S)
        self.save(job)

    def answer(self, conn: socket.socket, reply: dict) -> None:
        try:
            conn.settimeout(2)
            P.send_msg(conn, reply)
        except OSError:
            pass                                  # e.g. qrerun ran inside the job and was killed with it
        finally:
            conn.close()

    def finish(self, job: Job, exit_status, sub: int, how: str | None) -> None:
        d = job.d
        d["exit_status"] = exit_status
        if how and d["comment"]:
            d["comment"] = d["comment"].split(" and ")[0] + " " + how
        d["history_ts"] = int(time.time())
        d["state"], d["substate"] = "F", sub
        if d["run_count"]:
            self.deliver_output(job)
        for conn, _ in job.waiters:
            self.answer(conn, {"rc": 0})
        job.waiters.clear()
        self.save(job)

    def deliver_output(self, job: Job) -> None:
        """Stage out: copy the spooled stdout/stderr to Output_Path/Error_Path as the job's owner (cp, so an
        existing file is replaced), like pbs_mom at the end of the job. Spool files are appended to by every
        run, so the delivered file holds the output of all runs of a rerun job."""
        d = job.d
        try:
            pw = pwd.getpwnam(d["owner"])
        except KeyError:
            return
        groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
        umask = int(d["umask"], 8) if d["umask"] else 0o077
        for key, suffix, letter in (("output_path", "OU", "o"), ("error_path", "ER", "e")):
            spool = self.path("spool", f"{job.id}.{suffix}")
            if letter in d["keep"] or not os.path.exists(spool):
                continue
            dest = self.dest_path(job, d[key], suffix)
            pid = os.fork()
            if pid == 0:
                try:
                    os.setgroups(groups)
                    os.setgid(pw.pw_gid)
                    os.setuid(pw.pw_uid)
                    os.umask(umask)
                    with open(spool, "rb") as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os._exit(0)
                except BaseException:          # noqa: BLE001
                    os._exit(1)
            _, status = os.waitpid(pid, 0)
            if status == 0:
                os.unlink(spool)
            else:
                self.log(f"Job;{job.id};Post job file processing error; could not copy {spool} to {dest}")
                os.replace(spool, self.path("undelivered", os.path.basename(spool)))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: server.py STATE_DIR", file=sys.stderr)
        sys.exit(2)
    if os.geteuid() != 0:
        print("pbs_emulator server: must run as root", file=sys.stderr)
        sys.exit(1)
    os.umask(0o022)
    srv = Server(argv[0])
    srv.serve()

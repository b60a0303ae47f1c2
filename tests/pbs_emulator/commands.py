"""The emulator's client commands: qsub, qstat, qdel, qrerun. Like the real ones they parse their options with
getopt (GNU argument permutation), qsub reads #PBS directives from the script, and qstat formats what the
server returns (prt_attr line folding, ctime dates, -F json). Messages and exit codes follow OpenPBS 23.06.

Each bin/<cmd> wrapper written by `pbs-emu start` calls main(cmd, args, state_dir)."""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time

from . import protocol as P

CMDLINE, DIRECTIVE = 3, 2

QSUB_USAGE = (
    "usage: qsub [-a date_time] [-A account_string] [-c interval]\n"
    "\t[-C directive_prefix] [-e path] [-f ] [-h ] [-I [-X]] [-j oe|eo] [-J X-Y[:Z]]\n"
    "\t[-k keep] [-l resource_list] [-m mail_options] [-M user_list]\n"
    "\t[-N jobname] [-o path] [-p priority] [-P project] [-q queue] [-r y|n]\n"
    "\t[-R o|e|oe] [-S path] [-u user_list] [-W otherattributes=value...]\n"
    "\t[-S path] [-u user_list] [-W otherattributes=value...]\n"
    "\t[-v variable_list] [-V ] [-z] [script | -- command [arg1 ...]]\n"
    "       qsub --version\n")
QSTAT_USAGE = (
    "usage: \n"
    "qstat [-f] [-J] [-p] [-t] [-x] [-E] [-F format | -w] [-D delim] [ job_identifier... | destination... ]\n"
    "qstat [-a|-i|-r|-H|-T] [-J] [-t] [-u user] [-n] [-s] [-G|-M] [-1] [-w]\n"
    "\t[ job_identifier... | destination... ]\n"
    "qstat -Q [-f] [-F format] [-D delim] [ destination... ]\n"
    "qstat -q [-G|-M] [ destination... ]\n"
    "qstat -B [-f] [-F format] [-D delim] [ server_name... ]\n"
    "qstat --version\n")
QDEL_USAGE = "usage:\n\tqdel [-W force|suppress_email=X] [-x] job_identifier...\n\tqdel --version\n"
QRERUN_USAGE = "usage: qrerun [-W force] job_identifier...\n       qrerun --version\n"

TIME_ATTRS = {"ctime", "etime", "stime", "mtime", "qtime", "Execution_Time"}
CHAR_LINE_LIMIT = 78


class Exit(Exception):
    def __init__(self, code: int, err: str = "", out: str = ""):
        super().__init__(err)
        self.code, self.err, self.out = code, err, out


def getopt(prog: str, args: list[str], spec: str, stop_at_ddash_keep: bool = False):
    """glibc getopt() with argument permutation: options may follow operands; '--' ends the options.
    Returns (options, operands). With stop_at_ddash_keep the '--' and what follows stay in the operands
    (qsub's '-- command args' form)."""
    opts, operands = [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            operands.extend(args[i:] if stop_at_ddash_keep else args[i + 1:])
            break
        if not a.startswith("-") or a == "-":
            operands.append(a)
            i += 1
            continue
        j = 1
        while j < len(a):
            c = a[j]
            k = spec.find(c)
            if k < 0 or c == ":":
                raise Exit(2, f"{prog}: invalid option -- '{c}'\n")
            if spec[k + 1:k + 2] == ":":
                if j + 1 < len(a):
                    val = a[j + 1:]
                else:
                    i += 1
                    if i >= len(args):
                        raise Exit(2, f"{prog}: option requires an argument -- '{c}'\n")
                    val = args[i]
                opts.append((c, val))
                break
            opts.append((c, None))
            j += 1
        i += 1
    return opts, operands


def connect_error(prog: str, server: str, err: P.ConnectError) -> Exit:
    return Exit(1, f"{prog}: cannot connect to server {server} (errno={err.args[0]})\n")


# ============================================================================================== qsub

def make_argv(line: str) -> list[str]:
    """qsub's make_argv(): split a directive line on blanks, honouring quotes and backslashes."""
    out, cur, have, i = [], [], False, 0
    line = line.strip()
    while i < len(line):
        ch = line[i]
        if ch in "\"'":
            end = line.find(ch, i + 1)
            if end < 0:
                raise Exit(1, f"qsub: unmatched {ch}\n")
            cur.append(line[i + 1:end])
            have, i = True, end + 1
        elif ch == "\\" and i + 1 < len(line):
            cur.append(line[i + 1])
            have, i = True, i + 2
        elif ch.isspace():
            if have:
                out.append("".join(cur))
            cur, have = [], False
            while i < len(line) and line[i].isspace():
                i += 1
        else:
            cur.append(ch)
            have, i = True, i + 1
    if have:
        out.append("".join(cur))
    return out


def split_resources(text: str) -> list[tuple[str, str]] | None:
    out = []
    for item in text.split(","):
        item = item.strip()
        if "=" not in item:
            return None
        k, v = item.split("=", 1)
        if not k or not v or not re.match(r"^[A-Za-z][\w-]*$", k):
            return None
        out.append((k, v))
    return out


def expand_depend(text: str, server: str) -> list | None:
    """parse_depend_list(): 'afterany:12:13.srv,afterok:14' -> [['afterany', ['12.srv', '13.srv']], ...]."""
    types = ("on", "synccount", "after", "afterok", "afternotok", "afterany", "before", "beforeok",
             "beforenotok", "beforeany", "syncwith", "runone")
    out = []
    for item in text.split(","):
        words = [w for w in item.strip().split(":")]
        if len(words) < 2 or words[0] not in types or any(not w for w in words[1:]):
            return None
        if words[0] in ("on", "synccount"):
            out.append([words[0], words[1:]])
            continue
        ids = []
        for w in words[1:]:
            jid = P.normalize_jobid(w.split("@")[0], server)
            if jid is None:
                return None
            ids.append(jid)
        out.append([words[0], ids])
    return out


class QsubOpts:
    UNSUPPORTED = {"a": "deferred execution (-a)", "h": "user holds (-h)", "I": "interactive jobs (-I)",
                   "J": "array jobs (-J)", "X": "X11 forwarding (-X)", "u": "-u user_list", "R": "-R"}

    def __init__(self, server: str, cwd: str, host: str):
        self.server, self.cwd, self.host = server, cwd, host
        self.prio: dict[str, int] = {}
        self.a: dict = {"resources": {}}
        self.res_prio: dict[str, int] = {}
        self.v_value: list | None = None
        self.V = False
        self.z = False
        self.prefix = None

    def may(self, key: str, passet: int) -> bool:
        if self.prio.get(key, 0) <= passet:
            self.prio[key] = passet
            return True
        return False

    def path_value(self, value: str) -> str:
        """prepare_path(): '[host:]path' with a relative path made absolute against the submit directory."""
        host, path = self.host, value
        if ":" in value and not value.startswith("/"):
            host, path = value.split(":", 1)
        if not path.startswith("/"):
            path = os.path.normpath(os.path.join(self.cwd, path))
        return f"{host}:{path}"

    def process(self, opts: list, passet: int) -> str:
        """process_opts(): returns the error text ('' if fine); cmdline values beat directive values."""
        err = []
        for c, val in opts:
            if c in self.UNSUPPORTED:
                err.append(f"qsub: {self.UNSUPPORTED[c]} is not supported by pbs_emulator\n")
            elif c == "A" and self.may("A", passet):
                self.a["account"] = val
            elif c == "P" and self.may("P", passet):
                self.a["project"] = val
            elif c == "c" and self.may("c", passet):
                if val.strip() == "u":
                    err.append("qsub: illegal -c value\n")
                self.a["checkpoint"] = val.strip()
            elif c == "C" and self.may("C", passet):
                self.prefix = val
            elif c == "e" and self.may("e", passet):
                self.a["error_path"] = self.path_value(val)
            elif c == "o" and self.may("o", passet):
                self.a["output_path"] = self.path_value(val)
            elif c == "f":
                pass
            elif c == "j" and self.may("j", passet):
                if val not in ("oe", "eo", "n"):
                    err.append("qsub: illegal -j value\n")
                self.a["join"] = val
            elif c == "k" and self.may("k", passet):
                if not re.match(r"^(n|[oed]{1,3})$", val) or len(set(val)) != len(val) or val == "d":
                    err.append("qsub: illegal -k value\n")
                self.a["keep"] = val
            elif c == "l":
                items = split_resources(val)
                if items is None:
                    err.append("qsub: illegal -l value\n")
                    continue
                for k, v in items:
                    if self.res_prio.get(k, 0) <= passet:
                        self.res_prio[k] = passet
                        self.a["resources"][k] = v
            elif c == "m" and self.may("m", passet):
                val = val.strip()
                if not re.match(r"^(n|[abej]+)$", val):
                    err.append("qsub: illegal -m value\n")
                self.a["mail_points"] = val
            elif c == "M" and self.may("M", passet):
                self.a["mail_users"] = val
            elif c == "N" and self.may("N", passet):
                if not re.match(r"^[A-Za-z][A-Za-z0-9_+.-]{0,235}$", val):
                    err.append("qsub: illegal -N value\n")
                self.a["name"] = val
            elif c == "p" and self.may("p", passet):
                val = val.strip()
                if not re.match(r"^[+-]?\d+$", val) or not -1024 <= int(val) <= 1023:
                    err.append("qsub: illegal -p value\n")
                self.a["priority"] = val
            elif c == "q" and self.may("q", passet):
                self.a["queue"] = val
            elif c == "r" and self.may("r", passet):
                if val not in ("y", "n"):
                    err.append("qsub: illegal -r value\n")
                self.a["rerunable"] = val == "y"
            elif c == "S" and self.may("S", passet):
                self.a["shell_path"] = val
            elif c == "v" and self.may("v", passet):
                self.v_value = []
                for item in re.split(r"(?<!\\),", val):
                    if not item:
                        continue
                    if "=" in item:
                        k, v = item.split("=", 1)
                        v = v.strip("'\"") if len(v) > 1 and v[0] == v[-1] and v[0] in "'\"" else v
                    else:
                        k, v = item, os.environ.get(item)
                        if v is None:
                            raise Exit(1, "qsub: cannot send environment with the job\n")
                    if not k.startswith("PBS_O_"):
                        self.v_value.append([k, v.replace("\\,", ",")])
            elif c == "V" and self.may("V", passet):
                self.V = True
            elif c == "z" and self.may("z", passet):
                self.z = True
            elif c == "W":
                val = val.strip()
                if not val or "=" not in val:
                    err.append("qsub: illegal -W value\n")
                    continue
                key, value = val.split("=", 1)
                if key == "depend":
                    if self.may("Wdepend", passet):
                        dep = expand_depend(value, self.server)
                        if dep is None:
                            err.append("qsub: illegal -W value\n")
                        else:
                            self.a["depend"] = dep
                elif key == "umask":
                    if self.may("Wumask", passet):
                        if not re.match(r"^[0-7]{1,4}$", value):
                            err.append("qsub: illegal -W value\n")
                        self.a["umask"] = value.zfill(3)
                elif key == "block":
                    err.append("qsub: -W block is not supported by pbs_emulator\n")
                else:
                    err.append(f"qsub: -W {key} is not supported by pbs_emulator\n")
        return "".join(err)


def is_executable_line(s: str) -> bool:
    """pbs_isexecutable(): the first line that is not blank, not a comment, not ':' and not '#!'."""
    if s.startswith(":") or s.startswith("#!"):
        return False
    t = s.lstrip()
    return bool(t) and not t.startswith("#")


def qsub(prog: str, args: list[str], state_dir: str, server: str) -> Exit:
    host = socket.gethostname()
    cwd = os.environ.get("PWD")
    try:
        if not cwd or os.stat(cwd)[1:3] != os.stat(".")[1:3]:
            cwd = os.getcwd()
    except OSError:
        cwd = os.getcwd()
    o = QsubOpts(server, cwd, host)
    try:
        opts, operands = getopt(prog, args, "a:A:c:C:e:fhIj:J:k:l:m:M:N:o:p:P:q:r:R:S:u:v:VW:Xz",
                                stop_at_ddash_keep=True)
    except Exit as e:
        return Exit(2, e.err + QSUB_USAGE)
    err = o.process(opts, CMDLINE)
    executable = None
    bad_operands = False
    if operands and operands[0] == "--":
        executable = operands[1:]
        bad_operands = not executable
    elif len(operands) > 1:
        bad_operands = True             # the script must be the last argument
    if err or bad_operands:
        return Exit(2, err + QSUB_USAGE)
    script_path = operands[0] if operands and not executable else None
    if executable:
        text = "exec " + " ".join(_sh_quote(w) for w in executable) + "\n"
        o.a.setdefault("name", "STDIN")
    else:
        if script_path in (None, "-"):
            text = sys.stdin.read()
            if "name" not in o.a:
                o.a["name"] = "STDIN"
        else:
            try:
                os.stat(script_path)
            except OSError as e:
                return Exit(1, f"qsub: script file:: {os.strerror(e.errno)}\n")
            if not os.path.isfile(script_path):
                return Exit(1, "qsub: script not a file\n")
            try:
                with open(script_path, errors="surrogateescape") as f:
                    text = f.read()
            except OSError as e:
                return Exit(8, f"qsub: opening script file:: {os.strerror(e.errno)}\n")
            if "name" not in o.a:
                o.a["name"] = os.path.basename(script_path)[:236]
        prefix = o.prefix if o.prefix is not None else os.environ.get("PBS_DPREFIX", "#PBS")
        if prefix:
            lines = text.splitlines(keepends=True)
            i = 0
            while i < len(lines):
                line = lines[i]
                stripped = line.lstrip()
                if stripped.startswith(prefix):
                    body = stripped[len(prefix):]
                    while body.rstrip("\n").endswith("\\") and i + 1 < len(lines):
                        i += 1
                        body = body.rstrip("\n")[:-1] + lines[i]
                    if body[:1] not in ("", " ", "\t", "\n"):
                        i += 1
                        continue
                    words = make_argv(body)
                    try:
                        dopts, extra = getopt(prog, words, "a:A:c:C:e:fhIj:J:k:l:m:M:N:o:p:P:q:r:R:S:u:v:VW:Xz")
                        derr = o.process(dopts, DIRECTIVE)
                        if extra and not derr:
                            derr = "qsub: illegal directive arguments\n"
                    except Exit as e:
                        derr = e.err
                    if derr:
                        return Exit(1, derr + "qsub: directive error: " + " ".join(words) + " \n")
                elif is_executable_line(line):
                    break
                i += 1
    # the job's Variable_List: PBS_O_* (job_env_basic), -v, then the whole environment with -V
    env = os.environ
    variables = [["PBS_O_HOME", env.get("HOME", "/")]]
    for k in ("LANG", "LOGNAME", "PATH", "MAIL", "SHELL", "TZ"):
        if k in env:
            variables.append([f"PBS_O_{k}", env[k]])
    variables.append(["PBS_O_WORKDIR", cwd])
    variables.append(["PBS_O_SYSTEM", os.uname().sysname])
    if o.v_value:
        variables.extend(o.v_value)
    if o.V:
        variables.extend([k, v] for k, v in env.items() if not k.startswith("PBS_O_"))
    variables.append(["PBS_O_QUEUE", P.QUEUE])
    variables.append(["PBS_O_HOST", host])
    o.a.update(variables=variables, workdir=cwd, submit_host=host, submit_args=" ".join(args))
    try:
        reply = P.request(state_dir, {"op": "submit", "attrs": o.a, "script": text})
    except P.ConnectError as e:
        return connect_error("qsub", server, e)
    if reply["rc"] != 0:
        return Exit(reply["rc"], reply.get("err", ""))
    return Exit(0, "", "" if o.z else reply["jobid"] + "\n")


def _sh_quote(w: str) -> str:
    return w if re.match(r"^[\w@%+=:,./-]+$", w) else "'" + w.replace("'", "'\"'\"'") + "'"


# ============================================================================================== qstat

def prt_attr(name: str, resource: str | None, value: str) -> str:
    """qstat's prt_attr(): 'name.resource = value', folded at commas near column 78 with '\\n\\t'."""
    out = [f"    {name}"]
    start = len(name) + 7
    if resource:
        start += len(resource) + 1
        out.append(f".{resource}")
    out.append(" = ")
    tokens = [t for t in value.split(",") if t]          # strtok() semantics
    first = True
    for n, tok in enumerate(tokens):
        if len(tok) + start < CHAR_LINE_LIMIT:
            out.append(tok)
            start += len(tok)
        else:
            if not first:
                out.append("\n\t")
                start = 9
            for ch in tok:
                out.append(ch)
                start += 1
                if start > CHAR_LINE_LIMIT:
                    start = 8
                    out.append("\n\t")
        if n + 1 < len(tokens):
            first = False
            out.append(",")
    return "".join(out)


def display_value(name: str, value: str) -> str:
    if name in TIME_ATTRS:
        try:
            return time.ctime(int(value))
        except ValueError:
            return value
    return value


def _json_value(v: str):
    if re.match(r"^-?\d+$", v):
        return int(v)
    if re.match(r"^-?\d+\.\d+$", v):
        return float(v)
    return v


def qstat(prog: str, args: list[str], state_dir: str, server: str) -> Exit:
    try:
        opts, operands = getopt(prog, args, "fxF:D:wEHJptT1nsiraGMu:QqB")
    except Exit as e:
        return Exit(2, e.err + QSTAT_USAGE)
    full = history = False
    fmt = "default"
    only_finished = False
    for c, val in opts:
        if c == "f":
            full = True
        elif c == "x":
            history = True
        elif c == "H":
            history = only_finished = True
        elif c == "F":
            if val.lower() not in ("json", "dsv", "default"):
                return Exit(2, QSTAT_USAGE)
            fmt = val.lower()
        elif c in "wEJt":
            pass
        else:
            return Exit(2, f"qstat: option -{c} is not supported by pbs_emulator\n")
    if fmt != "default" and not full:
        return Exit(2, QSTAT_USAGE)
    ids = []
    for op in operands:
        if re.match(r"^\d+(\.|$)", op):
            ids.append(op)
        # a destination (queue[@server] or @server): every job of the one queue
    try:
        reply = P.request(state_dir, {"op": "stat", "ids": ids or None, "history": history})
    except P.ConnectError as e:
        return connect_error("qstat", server, e)
    out, err, rc = [], [], 0
    jobs = []
    for j in reply["jobs"]:
        if "error" in j:
            code = j["error"]
            if code == P.PBSE_HISTJOBID:
                err.append(f"qstat: {j['id']} {P.MESSAGES[code]}, use -x or -H to obtain historical job information\n")
            else:
                err.append(f"qstat: {P.MESSAGES[code]} {j['id']}\n")
            rc = P.exit_code(code)
            continue
        if only_finished and dict((a[0], a[2]) for a in j["attrs"]).get("job_state") != "F":
            continue
        jobs.append(j)
    if fmt == "json":
        doc = {"timestamp": int(time.time()), "pbs_version": P.PBS_VERSION, "pbs_server": reply["server"], "Jobs": {}}
        for j in jobs:
            obj: dict = {}
            for name, res, value in j["attrs"]:
                value = display_value(name, value)
                if name == "Variable_List":
                    obj[name] = {kv.split("=", 1)[0]: kv.split("=", 1)[1] if "=" in kv else ""
                                 for kv in re.split(r"(?<!\\),", value)}
                elif res:
                    obj.setdefault(name, {})[res] = _json_value(value)
                else:
                    obj[name] = _json_value(value)
            doc["Jobs"][j["id"]] = obj
        out.append(json.dumps(doc, indent=4, separators=(",", ":")) + "\n")
    elif fmt == "dsv":
        for j in jobs:
            parts = [f"Job Id: {j['id']}"]
            for name, res, value in j["attrs"]:
                value = display_value(name, value).replace("|", "\\|")
                parts.append(f"{name}.{res}={value}" if res else f"{name}={value}")
            out.append("|".join(parts) + "\n")
    elif full:
        for j in jobs:
            out.append(f"Job Id: {j['id']}\n")
            for name, res, value in j["attrs"]:
                out.append(prt_attr(name, res, display_value(name, value)) + "\n")
            out.append("\n")
    elif jobs:
        out.append("Job id            Name             User              Time Use S Queue\n")
        out.append("----------------  ---------------- ----------------  -------- - -----\n")
        for j in jobs:
            a = {(n if r is None else f"{n}.{r}"): v for n, r, v in j["attrs"]}
            seq, _, srv = j["id"].partition(".")
            jid = f"{seq}.{srv.split('.')[0]}"
            if len(jid) > 17:
                jid = jid[:16] + "*"
            name = a.get("Job_Name", "")
            if len(name) >= 16:
                name = name[:15] + "*"
            owner = a.get("Job_Owner", "").split("@")[0]
            if len(owner) > 16:
                owner = owner[:15] + "*"
            timeu = a.get("resources_used.cput", "0")
            out.append("%-17s %-16s %-16s  %8s %1s %-16s\n" % (jid, name, owner, timeu, a.get("job_state", ""),
                                                             a.get("queue", "")))
    return Exit(rc, "".join(err), "".join(out))


# ============================================================================================== qdel / qrerun

def qdel(prog: str, args: list[str], state_dir: str, server: str) -> Exit:
    try:
        opts, operands = getopt(prog, args, "W:x")
    except Exit as e:
        return Exit(2, e.err + QDEL_USAGE)
    force = history = False
    for c, val in opts:
        if c == "W":
            if val == "force":
                force = True
            elif not (val.startswith("suppress_email=") or val.isdigit()):
                return Exit(2, "qdel: illegal -W value\n" + QDEL_USAGE)
        elif c == "x":
            history = True
    if not operands:
        return Exit(2, QDEL_USAGE)
    err, ids = [], []
    for op in operands:
        if P.normalize_jobid(op, server) is None:
            err.append(f"qdel: illegally formed job identifier: {op}\n")
        else:
            ids.append(op)
    rc = 1 if err else 0
    if ids:
        try:
            reply = P.request(state_dir, {"op": "delete", "ids": ids, "force": force, "history": history})
        except P.ConnectError as e:
            return connect_error("qdel", server, e)
        err.append(reply.get("err", ""))
        rc = reply["rc"] or rc
    return Exit(rc, "".join(err))


def qrerun(prog: str, args: list[str], state_dir: str, server: str) -> Exit:
    try:
        opts, operands = getopt(prog, args, "W:")
    except Exit:
        return Exit(2, QRERUN_USAGE)
    force = False
    for c, val in opts:
        if val != "force":
            return Exit(2, QRERUN_USAGE)
        force = True
    if not operands:
        return Exit(2, QRERUN_USAGE)
    err, rc = [], 0
    for op in operands:
        if P.normalize_jobid(op, server) is None:
            err.append(f"qrerun: illegally formed job identifier: {op}\n")
            rc = 1
            continue
        try:
            reply = P.request(state_dir, {"op": "rerun", "id": op, "force": force})
        except P.ConnectError as e:
            err.append(f"qrerun: cannot connect to server {server} (errno={e.args[0]})\n")
            rc = 1
            continue
        if reply["rc"]:
            err.append(reply.get("err", ""))
            rc = reply["rc"]
    return Exit(rc, "".join(err))


COMMANDS = {"qsub": qsub, "qstat": qstat, "qdel": qdel, "qrerun": qrerun}


def main(cmd: str, args: list[str], state_dir: str, prog: str | None = None) -> int:
    prog = prog or cmd
    if args[:1] == ["--version"]:
        print(f"pbs_version = {P.PBS_VERSION}")
        return 0
    server = P.read_public_config(state_dir).get("server_name") or socket.gethostname().split(".")[0]
    try:
        res = COMMANDS[cmd](prog, args, state_dir, server)
    except Exit as e:
        res = e
    if res.out:
        sys.stdout.write(res.out)
        sys.stdout.flush()
    if res.err:
        sys.stderr.write(res.err)
        sys.stderr.flush()
    return res.code

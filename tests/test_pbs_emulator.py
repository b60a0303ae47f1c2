"""Tests of the OpenPBS emulator itself (tests/pbs_emulator): real jobs, run as root's daemon under the uid that
submitted them (uid 65534 here, via setpriv and Debian's /usr/bin/python3), through the real command names."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from pbs_emulator import Emulator, parse_qstat_f
from pbs_emulator.commands import prt_attr

NOBODY = "nobody"
KILL_DELAY = 2

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not os.access("/usr/bin/python3", os.X_OK),
    reason="needs root, setpriv and /usr/bin/python3 (jobs run as uid 65534)")


@pytest.fixture(scope="module")
def world():
    """A world-readable scratch tree: nobody's home and submit directory."""
    root = Path(tempfile.mkdtemp(prefix="pbs-emu-test-", dir="/tmp"))
    root.chmod(0o755)
    for d in ("home", "work"):
        (root / d).mkdir()
        os.chown(root / d, 65534, 65534)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def emu(world):
    e = Emulator(kill_delay=KILL_DELAY, acl_roots=["root"],
                 passwd={NOBODY: {"home": str(world / "home"), "shell": "/bin/bash"}})
    e.start()
    yield e
    e.stop()


@pytest.fixture
def work(world):
    d = Path(tempfile.mkdtemp(dir=world / "work"))
    d.chmod(0o755)
    os.chown(d, 65534, 65534)
    return d


def script(work: Path, name: str, text: str) -> str:
    p = work / name
    p.write_text(text)
    os.chown(p, 65534, 65534)
    return name


def submit(emu, work, *args, user=NOBODY, **kw):
    return emu.qsub(list(args), user=user, cwd=str(work), **kw)


def server_name(emu) -> str:
    return json.loads((Path(emu.state_dir) / "server.json").read_text())["server_name"]


# ------------------------------------------------------------------------------------------------ basics

def test_submit_runs_as_owner_in_home_with_pbs_environment(emu, work, world):
    script(work, "env.sh", "#!/bin/bash\n#PBS -N fromscript\n#PBS -l walltime=00:10:00\n"
           "echo pwd=$(pwd); id -u; env | sort; cat $PBS_NODEFILE; test -d $TMPDIR -a -w $TMPDIR && echo tmpok\n"
           "echo to-stderr >&2\n")
    jid = submit(emu, work, "-N", "fromcli", "-v", "FOO=bar", "env.sh",
                 env=dict(emu.env(user=NOBODY), NOTPASSED="1"))
    seq, _, srv = jid.partition(".")
    assert seq.isdigit() and srv == server_name(emu)
    a = emu.wait(jid)
    assert a["Exit_status"] == "0" and a["run_count"] == "1" and a["job_state"] == "F"
    assert a["Job_Name"] == "fromcli"                          # command line beats #PBS
    assert a["Resource_List.walltime"] == "00:10:00"           # from the #PBS line
    assert a["Rerunable"] == "True"
    assert re.fullmatch(r"\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}", a["stime"])
    assert a["Job_Owner"].startswith("nobody@")
    out = (work / f"fromcli.o{seq}").read_text()
    assert (work / f"fromcli.e{seq}").read_text() == "to-stderr\n"
    assert (work / f"fromcli.o{seq}").stat().st_uid == 65534
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert env["pwd"] == str(world / "home")                   # starts in $HOME, not PBS_O_WORKDIR
    assert "65534" in out.splitlines()
    assert env["PBS_JOBID"] == jid and env["PBS_JOBNAME"] == "fromcli"
    assert env["PBS_O_WORKDIR"] == str(work) and env["PBS_JOBDIR"] == str(world / "home")
    assert env["PBS_ENVIRONMENT"] == "PBS_BATCH" and env["NCPUS"] == "1"
    assert env["TMPDIR"].endswith(f"pbs.{jid}") and "tmpok" in out
    assert not Path(env["TMPDIR"]).exists()                    # removed when the job ended
    assert not [k for k in env if "WALLTIME" in k.upper() or "REMAIN" in k.upper()]
    assert env["FOO"] == "bar" and "NOTPASSED" not in env     # -v passes FOO; only -V would pass the rest
    # as on OpenPBS 23.06: PBS commands last on PATH (/etc/profile.d/pbs.sh appends them), MANPATH and the
    # interactive-auth variables set, no MAIL
    assert env["PATH"].split(":")[-1] == str(Path(emu.state_dir) / "bin")
    assert "MANPATH" in env and "MAIL" not in env
    assert "PBS_O_INTERACTIVE_AUTH_METHOD" in env and "PBS_O_INTERACTIVE_ENCRYPT_METHOD" in env
    assert os.uname().nodename in out.splitlines()             # the node file lists this host


def test_qsub_rejects_bad_options_like_qsub(emu, work):
    script(work, "ok.sh", "true\n")
    p = emu.run(["qsub", "-r", "x", "ok.sh"], user=NOBODY, cwd=str(work))
    assert p.returncode == 2 and "qsub: illegal -r value" in p.stderr and "usage: qsub" in p.stderr
    p = emu.run(["qsub", "-l", "walltime=abc", "ok.sh"], user=NOBODY, cwd=str(work))
    assert (p.returncode, p.stderr) == (166, "qsub: Illegal attribute or resource value Resource_List.walltime\n")
    p = emu.run(["qsub", "missing.sh"], user=NOBODY, cwd=str(work))
    assert p.returncode == 1 and "No such file" in p.stderr
    script(work, "bad.sh", "#PBS -r x\ntrue\n")
    p = emu.run(["qsub", "bad.sh"], user=NOBODY, cwd=str(work))
    assert p.returncode == 1 and "qsub: directive error: -r x" in p.stderr
    p = emu.run(["qstat", "999999"], user=NOBODY)
    assert (p.returncode, p.stderr) == (153, f"qstat: Unknown Job Id 999999.{server_name(emu)}\n")
    emu.set(acl_roots=[])                                      # OpenPBS default: root's jobs are refused
    try:
        p = emu.run(["qsub", "ok.sh"], cwd=str(work))
        assert (p.returncode, p.stderr) == (175, "qsub: Bad UID for job execution\n")
    finally:
        emu.set(acl_roots=["root"])


def test_qstat_formats(emu, work):
    script(work, "v.sh", "true\n")
    jid = submit(emu, work, "-v", "LONGVAR=" + "x" * 120 + ",OTHER=1", "v.sh")
    emu.wait(jid)
    p = emu.run(["qstat", "-x", "-f", jid])
    assert "\n\t" in p.stdout                                   # long Variable_List folded like prt_attr()
    a = parse_qstat_f(p.stdout)[jid]
    assert "LONGVAR=" + "x" * 120 in a["Variable_List"] and a["Exit_status"] == "0"
    doc = json.loads(emu.run(["qstat", "-x", "-f", "-F", "json", jid]).stdout)
    j = doc["Jobs"][jid]
    assert j["Exit_status"] == 0 and j["Variable_List"]["OTHER"] == "1" and j["Resource_List"]["ncpus"] == 1
    p = emu.run(["qstat", jid])
    assert p.returncode == 35 and "Job has finished, use -x or -H" in p.stderr
    lines = emu.run(["qstat", "-x", jid]).stdout.splitlines()
    assert lines[0].startswith("Job id            Name") and lines[2].split()[-2:] == ["F", "workq"]
    assert prt_attr("comment", None, "a,b") == "    comment = a,b"


# ------------------------------------------------------------------------------------------------ walltime

@pytest.mark.slow
def test_walltime_sigterm_then_sigkill_after_kill_delay_no_rerun(emu, work):
    script(work, "wt.sh", "#PBS -l walltime=00:00:02\n#PBS -r y\n#PBS -j oe\n"
           "trap 'date +%s.%N > $PBS_O_WORKDIR/term' TERM\n"
           "echo $$ > $PBS_O_WORKDIR/pid; date +%s.%N > $PBS_O_WORKDIR/start\n"
           "while :; do date +%s.%N > $PBS_O_WORKDIR/beat; sleep 0.1; done\n")
    jid = submit(emu, work, "wt.sh")
    seen = set()
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        a = emu.qstat(jid)
        seen.add(a.get("job_state"))
        if a.get("job_state") == "F":
            break
        time.sleep(0.1)
    assert a["Exit_status"] == "-29" and a["run_count"] == "1"
    assert "E" in seen                                         # exiting, then finished, as a real job does
    assert a["comment"].endswith("exceeded resource walltime"), a["comment"]
    t_start, t_term, t_last = (float((work / f).read_text()) for f in ("start", "term", "beat"))
    # enforced at pbs_mom's first poll past the walltime (default poll 10 s): ~10 s, not 2
    assert 9 <= t_term - t_start <= 13, t_term - t_start
    assert t_last - t_term >= KILL_DELAY - 0.5                 # trap kept it alive until SIGKILL
    assert not Path(f"/proc/{(work / 'pid').read_text().strip()}").exists()
    out = (work / f"wt.sh.o{jid.split('.')[0]}").read_text()
    assert "=>> PBS: job killed: walltime" in out and "exceeded limit 2" in out
    time.sleep(1.5)
    assert emu.qstat(jid)["run_count"] == "1"                  # -r y does not rerun a walltime kill


@pytest.mark.slow
def test_resources_used_walltime_is_coarse(emu, work):
    emu.set(mom_poll=2)
    try:
        script(work, "w.sh", "sleep 3.5\n")
        jid = submit(emu, work, "w.sh")
        emu.wait(jid, states="R")
        time.sleep(1)
        assert emu.qstat(jid)["resources_used.walltime"] == "00:00:00"
        time.sleep(1.6)
        assert emu.qstat(jid)["resources_used.walltime"] == "00:00:02"
        assert emu.wait(jid)["resources_used.walltime"] == "00:00:03"
    finally:
        emu.set(mom_poll=10)


# ------------------------------------------------------------------------------------------------ qrerun

@pytest.mark.slow
def test_operator_qrerun_requeues_run_count_stime_and_appends_output(emu, work):
    emu.set(operators=[NOBODY])
    try:
        # full paths: PBS commands come last on a job's PATH, after e.g. Grid Engine's /usr/bin/qstat
        b = emu.bin_dir
        script(work, "rr.sh", "echo run-$(cat $PBS_O_WORKDIR/n 2>/dev/null || echo 1) $(date +%s)\n"
               "echo err-run >&2\n"
               f"{b}/qstat -f $PBS_JOBID | grep -E 'run_count|stime' >> $PBS_O_WORKDIR/seen\n"
               f"if [ ! -e $PBS_O_WORKDIR/n ]; then echo 2 > $PBS_O_WORKDIR/n; sleep 1.2; {b}/qrerun $PBS_JOBID;"
               " sleep 30; fi\n")
        jid = submit(emu, work, "rr.sh")
        a = emu.wait(jid, timeout=30)
        assert a["Exit_status"] == "0" and a["run_count"] == "2"
        seen = (work / "seen").read_text().split("\n")
        stimes = [ln.split(" = ")[1] for ln in seen if "stime" in ln]
        counts = [ln.split(" = ")[1] for ln in seen if "run_count" in ln]
        assert counts == ["1", "2"] and stimes[0] != stimes[1]  # stime reset by the rerun
        seq = jid.split(".")[0]
        out = (work / f"rr.sh.o{seq}").read_text().splitlines()
        assert [ln.split()[0] for ln in out] == ["run-1", "run-2"]   # both runs, appended
        assert (work / f"rr.sh.e{seq}").read_text().count("err-run") == 2
    finally:
        emu.set(operators=[])


@pytest.mark.slow
def test_qrerun_unauthorized_for_ordinary_user_and_not_rerunnable(emu, work):
    script(work, "u.sh", f"{emu.bin_dir}/qrerun $PBS_JOBID; echo rc=$?\nsleep 60\n")
    jid = submit(emu, work, "u.sh")
    seq = jid.split(".")[0]
    emu.wait(jid, states="R")
    time.sleep(1)                      # the job's own qrerun has been refused by now (output is spooled)
    p = emu.run(["qrerun", jid], user=NOBODY)                  # also from outside the job
    assert (p.returncode, p.stderr) == (159, f"qrerun: Unauthorized Request  {jid}\n")
    time.sleep(0.5)
    assert emu.run(["qdel", jid], user=NOBODY).returncode == 0
    a = emu.wait(jid)
    assert a["run_count"] == "1"
    assert (work / f"u.sh.o{seq}").read_text() == "rc=159\n"
    assert (work / f"u.sh.e{seq}").read_text() == f"qrerun: Unauthorized Request  {jid}\n"
    script(work, "n.sh", "sleep 60\n")
    jid = submit(emu, work, "-r", "n", "n.sh")
    emu.wait(jid, states="R")
    assert emu.qstat(jid)["Rerunable"] == "False"
    p = emu.run(["qrerun", jid])                               # root is a manager, but -r n
    assert (p.returncode, p.stderr) == (190, f"qrerun: job is not rerunnable {jid}\n")
    emu.run(["qdel", jid])
    emu.wait(jid)


# ------------------------------------------------------------------------------------------------ depend, qdel

@pytest.mark.slow
def test_depend_afterany_holds_until_parent_finished(emu, work):
    script(work, "a.sh", "sleep 2; date +%s.%N > $PBS_O_WORKDIR/a_end; exit 3\n")
    script(work, "b.sh", "date +%s.%N > $PBS_O_WORKDIR/b_start\n")
    a = submit(emu, work, "a.sh")
    b = submit(emu, work, "-W", f"depend=afterany:{a}", "b.sh")
    c = submit(emu, work, "-W", f"depend=afterany:{b.split('.')[0]}", "b.sh")
    sb = emu.qstat(b)
    assert sb["job_state"] == "H" and sb["Hold_Types"] == "s"
    assert sb["depend"] == f"afterany:{a}@{server_name(emu)}"
    assert emu.wait(a)["Exit_status"] == "3"
    assert emu.wait(b, timeout=10)["Exit_status"] == "0"
    assert emu.wait(c, timeout=10)["Exit_status"] == "0"
    assert float((work / "b_start").read_text()) >= float((work / "a_end").read_text())
    # an unknown job in the dependency: accepted (rc 0) as OpenPBS does, and the job is deleted later
    p = emu.run(["qsub", "-W", "depend=afterany:987654", "b.sh"], user=NOBODY, cwd=str(work))
    assert p.returncode == 0, p.stderr
    a = emu.wait(p.stdout.strip(), timeout=10)
    assert a["run_count"] == "0" and "dependency on job 987654" in a["comment"], a


@pytest.mark.slow
def test_qdel_running_and_held_jobs(emu, work):
    script(work, "d.sh", "trap 'echo got-TERM' TERM\necho started\nwhile :; do sleep 0.1; done\n")
    run = submit(emu, work, "d.sh")
    held = submit(emu, work, "-W", f"depend=afterany:{run}", "d.sh")
    emu.wait(run, states="R")
    time.sleep(0.3)
    p = emu.run(["qdel", run], user="root")
    assert p.returncode == 0
    t0 = time.monotonic()
    a = emu.wait(run, timeout=15)
    assert time.monotonic() - t0 >= KILL_DELAY - 0.5           # TERM trapped: killed by SIGKILL after kill_delay
    assert a["Exit_status"] == "271" and a["substate"] == "91"  # the deletion's SIGTERM, as OpenPBS reports
    assert re.search(r"terminated by root@\S+$", a["comment"]), a["comment"]
    assert "got-TERM" in (work / f"d.sh.o{run.split('.')[0]}").read_text()
    held2 = submit(emu, work, "-W", f"depend=afterany:{held}", "d.sh")
    assert emu.qstat(held2)["job_state"] == "H"
    p = emu.run(["qdel", held2], user=NOBODY)
    assert p.returncode == 0
    a = emu.wait(held2, timeout=5)
    assert a["run_count"] == "0" and "Exit_status" not in a
    emu.run(["qdel", held])
    emu.wait(held, timeout=15)
    script(work, "r.sh", "sleep 60\n")
    rootjob = emu.qsub(["r.sh"], cwd=str(work))
    p = emu.run(["qdel", rootjob], user=NOBODY)
    assert (p.returncode, p.stderr) == (159, f"qdel: Unauthorized Request  {rootjob}\n")
    emu.run(["qdel", rootjob])
    emu.wait(rootjob, timeout=15)

"""Who a restart runs as: never as someone other than the user the checkpointed processes were.

A restart by an ordinary user restores only that user's own images (their MAC verifies only with the user's
key; see image/auth.py) and processes that ran as that user (check_processes). A restart by root of images
whose processes ran as another user becomes that user first (become_owner): the recorded groups, gid and uid
are set on the whole restart before it opens any file named by the images, so every file is reopened with
the owner's rights, the processes run as the owner, and later checkpoints are the owner's. Credentials that
cannot be given back safely (processes of several users, set-uid states, capabilities of a non-root process,
groups the owner is not in) are refused in one line.
"""
from __future__ import annotations

import ctypes
import os
import pwd
from dataclasses import dataclass

from .errors import IdentityError

PR_SET_DUMPABLE = 4


@dataclass
class Identity:
    uid: int
    gid: int
    groups: list[int]


def _ids(creds: dict, key: str, one: str) -> list[int]:
    return list(creds.get(key) or [creds.get(one, -1)] * 4)


def owner_of(path: str, meta: dict, signer: int | None) -> Identity:
    """The identity the process of one image (already authenticated: signer is its key's uid, None if trusted
    unsigned) must be restored as."""
    creds = meta.get("process", {}).get("creds") or {}
    uids, gids = set(_ids(creds, "uids", "uid")), set(_ids(creds, "gids", "gid"))
    pid = meta.get("process", {}).get("pid")
    if len(uids) != 1 or len(gids) != 1 or -1 in uids | gids:
        raise IdentityError(f"{path}: process {pid} ran with mixed or unknown ids (uids {sorted(uids)}, gids "
                            f"{sorted(gids)}); its credentials cannot be restored safely, restart refused")
    uid, gid = uids.pop(), gids.pop()
    if signer is not None and signer != 0 and signer != uid:
        raise IdentityError(f"{path}: signed by uid {signer} but holds a process of uid {uid}; restart refused")
    if uid != 0 and creds.get("cap_prm", 0):
        raise IdentityError(f"{path}: process {pid} (uid {uid}) had capabilities {creds['cap_prm']:#x}, which "
                            f"a restart cannot give back safely; restart refused")
    groups = list(creds.get("groups") or [])
    if signer is None or signer != 0:
        # the owner vouches for its images only within what the system lets it be: gid and groups are checked
        # against the group database (a group shown as overflow gid inside a user namespace is left out)
        try:
            pw = pwd.getpwuid(uid)
            allowed = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
        except KeyError:
            allowed = set()
        if uid != 0 and gid not in allowed:
            raise IdentityError(f"{path}: process {pid} ran with gid {gid}, which uid {uid} is not a member of; "
                                f"restart refused")
        groups = [g for g in groups if g in allowed]
    return Identity(uid, gid, sorted(set(groups)))


def become_owner(readers) -> Identity | None:
    """In a restart run by root: the one identity every image's process had, taken on by this process (None:
    they ran as root, nothing to change). Raises IdentityError if they differ or cannot be restored."""
    if os.geteuid() != 0 or not readers:
        return None
    ids = {r.path: owner_of(r.path, r.meta, r.signer) for r in readers}
    distinct = {(i.uid, i.gid, tuple(i.groups)) for i in ids.values()}
    if len(distinct) > 1:
        raise IdentityError("the images hold processes of different users or groups ("
                            + "; ".join(sorted({f"uid {u} gid {g}" for u, g, _ in distinct}))
                            + "): restart each user's processes separately; restart refused")
    ident = next(iter(ids.values()))
    if ident.uid == 0:
        return None
    assume(ident)
    return ident


def assume(ident: Identity) -> None:
    """setgroups, setresgid, setresuid (all of real, effective, saved, filesystem), then dumpable again (the
    kernel clears it on a uid change, which would leave our own /proc files root's: the user namespace of the
    restart is set up through them). The environment follows: HOME, USER, and a run directory of root's
    dropped so the owner's own is used."""
    os.setgroups(ident.groups)
    os.setresgid(ident.gid, ident.gid, ident.gid)
    os.setresuid(ident.uid, ident.uid, ident.uid)
    if os.getresuid() != (ident.uid,) * 3 or os.getresgid() != (ident.gid,) * 3:
        raise IdentityError(f"could not become uid {ident.uid} gid {ident.gid}; restart refused")
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    try:
        pw = pwd.getpwuid(ident.uid)
        os.environ.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    except KeyError:
        pass
    rundir = os.environ.get("HPCCKPT_RUNDIR")
    if rundir:
        try:
            theirs = os.stat(rundir).st_uid == ident.uid
        except OSError:
            theirs = False
        if not theirs:
            del os.environ["HPCCKPT_RUNDIR"]


def check_processes(metas) -> None:
    """Engine-level guard (restore_computation): every process is restored as the user it ran as, i.e. as
    us. A caller that did not become the owner first gets a one-line refusal, never a process of another
    user running with our credentials."""
    me = os.geteuid()
    for meta, reader in metas:
        creds = meta.process.creds or {}
        uids = set(_ids(creds, "uids", "uid")) - {-1}
        if uids and uids != {me}:
            raise IdentityError(f"{reader.path}: process {meta.process.pid} ran as uid "
                                f"{'/'.join(map(str, sorted(uids)))}, this restart runs as uid {me}: a process is "
                                f"never restored as another user; restart as that user (or as root)")

"""The command-line options of the multi-level storage (docs/storage.md), shared by launch and restart."""
from __future__ import annotations

import argparse

from ..settings import DRAIN_MODES

NAMES = ("local_dir", "drain", "partner", "keep_local", "drain_rate")


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-level storage (docs/storage.md)")
    g.add_argument("--local-dir", metavar="DIR", help="write images to this node-local directory first ({host}: the "
                   "host name; env HPCCKPT_LOCAL_DIR); the checkpoint directory becomes the shared level")
    g.add_argument("--drain", choices=DRAIN_MODES, help="copy images to the checkpoint directory in the background "
                   "(async, default), before the checkpoint completes (sync), or never (off) (env HPCCKPT_DRAIN)")
    g.add_argument("--partner", dest="partner", action="store_const", const=True,
                   help="also keep a copy of each node's images on one other node (env HPCCKPT_PARTNER)")
    g.add_argument("--no-partner", dest="partner", action="store_const", const=False, help=argparse.SUPPRESS)
    g.add_argument("--keep-local", metavar="N", help="generations kept on each node's local level (default 1)")
    g.add_argument("--drain-rate", metavar="RATE", help="limit of the drain: bytes/s (200M) or a share of the time "
                   "(25%%); 0: none (env HPCCKPT_DRAIN_RATE)")


def flags(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k, None) for k in NAMES}


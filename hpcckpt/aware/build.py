"""Build the C library of the program API: `python -m hpcckpt.aware.build DIR` writes DIR/libhpcckpt_aware.so
and DIR/hpcckpt_aware.h (gcc or $CC). Link C, C++ or Fortran programs with -L DIR -lhpcckpt_aware."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "c")


def build(outdir: str) -> str:
    os.makedirs(outdir, exist_ok=True)
    lib = os.path.join(outdir, "libhpcckpt_aware.so")
    cc = os.environ.get("CC", "gcc")
    subprocess.run([cc, "-O2", "-fPIC", "-shared", "-pthread", "-o", lib, os.path.join(SRC, "hpcckpt_aware.c")],
                   check=True)
    shutil.copy(os.path.join(SRC, "hpcckpt_aware.h"), outdir)
    return lib


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m hpcckpt.aware.build DIR", file=sys.stderr)
        return 2
    try:
        print(build(argv[0]))
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"hpcckpt.aware.build: error: {e}", file=sys.stderr)
        return 99
    return 0


if __name__ == "__main__":
    sys.exit(main())

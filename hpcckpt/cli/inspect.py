"""hpcckpt inspect IMAGE... — print what an image holds, optionally verifying its MACs and every checksum."""
from __future__ import annotations

import json
import sys

from ..applevel import archive as applevel_archive
from ..applevel import config as applevel_config
from ..image.format import ImageError, ImageReader
from ..image.validate import check_image
from .common import Fail, Parser, run_main


def parser(prog: str) -> Parser:
    p = Parser(prog, "Prints a checkpoint image's metadata: process, threads, memory regions, files.")
    p.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    p.add_argument("--verify", action="store_true",
                   help="check the image is authentic (its metadata's MAC, with the key of the user who signed it) "
                        "and read every chunk to check its checksum and MAC; exit 1 if not")
    p.add_argument("images", nargs="+")
    return p


def summary(path: str, meta: dict, signer: int | None = None) -> str:
    proc = meta["process"]
    signed = f"signed by uid {signer} (MAC verified)" if signer is not None else "NOT authenticated (no valid MAC)"
    lines = [f"{path}",
             f"  {signed}",
             f"  computation {meta['computation']} generation {meta['generation']} unique id {meta['unique_id']}",
             f"  program {meta['program']} pid {proc['pid']} on {meta['hostname']}, hpcckpt {meta['hpcckpt_version']}",
             f"  exe {proc['exe']}  cwd {proc['cwd']}  argv {' '.join(proc.get('argv', []))}",
             f"  threads {len(proc['threads'])}: " + ", ".join(str(t['tid']) for t in proc['threads'])]
    stored = sum(c[3] for c in iter_chunks_raw(meta))  # [page, npages, off, length, crc, codec]
    pages = sum(c[1] for c in iter_chunks_raw(meta))
    lines.append(f"  memory: {len(proc['regions'])} regions, {pages} pages saved ({pages * 4096 / 1e6:.1f} MB), "
                 f"{stored / 1e6:.1f} MB stored")
    for r in proc["regions"]:
        n = sum(c[1] for c in r["chunks"])
        lines.append(f"    {r['start']:012x}-{r['end']:012x} {r['perms']} {r['backing']:<11} {n:>8} pages  "
                     f"{r['path']}")
    lines.append("  fds: " + ", ".join(f"{f['fd']}={f['kind']}:{f['path']}" for f in proc["fds"]))
    if meta.get("stats"):
        lines.append(f"  stats: {meta['stats']}")
    return "\n".join(lines)


def iter_chunks_raw(meta: dict):
    for r in meta["process"]["regions"]:
        yield from r["chunks"]


def main(argv: list[str] | None = None, prog: str = "hpcckpt inspect") -> int:
    def body(argv):
        args = parser(prog).parse_args(argv)
        for path in args.images:
            if path.endswith(applevel_config.SUFFIX):      # an application-level archive (hpcckpt/applevel/)
                try:
                    print(applevel_archive.describe(path, args.verify, args.json))
                except (applevel_archive.ArchiveError, OSError) as e:
                    raise Fail(str(e), 1) from None
                continue
            try:
                # printing a foreign or unsigned image is harmless: only --verify insists on a valid MAC
                with ImageReader(path, trust_unsigned=not args.verify) as r:
                    if args.verify:
                        check_image(path, r.meta, r.size)
                        n = r.verify()
                    if args.json:
                        print(json.dumps(r.meta, indent=1))
                    else:
                        print(summary(path, r.meta, r.signer))
                    if args.verify:
                        print(f"  verified {n} chunks (checksums and MACs): OK")
            except ImageError as e:
                raise Fail(str(e), 1) from None
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:   # edited metadata
                raise Fail(f"{path}: invalid image metadata ({type(e).__name__}: {str(e)[:80]}); "
                           f"--verify says what is wrong, --json prints it as it is", 1) from None
        return 0
    return run_main(prog, body, argv, fail_code=1)



if __name__ == "__main__":
    sys.exit(main())

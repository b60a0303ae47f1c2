"""Cost of checksums and MACs over 1 GiB of 4 MiB chunks, 1 and 2 threads (docs/image-format.md, Authentication)."""
import hashlib, hmac, os, time, sys
from concurrent.futures import ThreadPoolExecutor
from isal.isal_zlib import crc32
import xxhash
data = [os.urandom(4 << 20) for _ in range(16)]
key = os.urandom(32)
N = 256  # 1 GiB
def run(name, f, threads=1):
    t = time.perf_counter()
    if threads == 1:
        for i in range(N): f(data[i % 16])
    else:
        with ThreadPoolExecutor(threads) as ex: list(ex.map(lambda i: f(data[i % 16]), range(N)))
    dt = time.perf_counter() - t
    print(f"{name:34s} threads={threads} 1 GiB: {dt:.3f} s ({1/dt:.2f} GiB/s)")
fs = {"crc32 (isal)": crc32,
      "sha256": lambda b: hashlib.sha256(b).digest(),
      "hmac-sha256": lambda b: hmac.new(key, b, "sha256").digest(),
      "blake2b keyed": lambda b: hashlib.blake2b(b, key=key, digest_size=32).digest(),
      "xxh3-128 (not crypto)": lambda b: xxhash.xxh3_128_digest(b)}
try:
    import blake3
    fs["blake3 keyed"] = lambda b: blake3.blake3(b, key=key).digest()
    fs["blake3 keyed max_threads=2"] = lambda b: blake3.blake3(b, key=key, max_threads=2).digest()
except ImportError: print("no blake3")
for n, f in fs.items():
    run(n, f); run(n, f, 2)

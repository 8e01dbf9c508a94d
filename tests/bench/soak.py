"""Mixed readers under eviction (audit 2, item 3's target): no open may fail, no byte may differ.

    python3 -m tests.bench.soak [--seconds 90] [--readers 32] [--files 39] [--file-mb 16]
        [--cache-size 200M] [-o OPTION ...]

The source holds more than the cache may (39 x 16 MiB = 624 MiB against cache_size=200M), so
files are evicted and fetched again all the time. `readers` processes each loop: pick a file,
open it and read it whole one of four ways (read(), pread() at random offsets, mmap, O_DIRECT
with an aligned buffer), and compare every byte with the source. Prints the opens, the failed
opens and reads (by errno) and the reads that got a wrong byte (by digest); passthrough on, as by default. Needs root.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import mmap
import os
import random
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tests.bench.throughput import cli

MiB = 1 << 20
WAYS = ("read", "pread", "mmap", "direct")


def read_whole(path: Path, way: str, size: int, rng: random.Random) -> bytes:
    if way == "read":
        with open(path, "rb", buffering=0) as f:
            return f.read()
    if way == "mmap":
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            return bytes(m)
    if way == "pread":
        fd = os.open(path, os.O_RDONLY)
        try:
            out = bytearray(size)
            offsets = list(range(0, size, MiB))
            rng.shuffle(offsets)
            for offset in offsets:
                out[offset:offset + MiB] = os.pread(fd, MiB, offset)
            return bytes(out)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4 * MiB)  # page-aligned, as O_DIRECT wants
        out = bytearray()
        while n := os.preadv(fd, [buf], len(out)):
            out += buf[:n]
        return bytes(out)
    finally:
        os.close(fd)


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def reader(mountpoint: str, wanted: dict[str, tuple[int, bytes]], seconds: float, seed: int) -> dict:
    """Read random files random ways for `seconds`; wanted: name -> (size, digest)."""
    rng = random.Random(seed)
    names = sorted(wanted)
    stats: collections.Counter = collections.Counter()
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        name, way = rng.choice(names), rng.choice(WAYS)
        stats["opens"] += 1
        try:
            data = read_whole(Path(mountpoint) / name, way, wanted[name][0], rng)
        except OSError as e:
            stats[f"failed {way}: {os.strerror(e.errno) if e.errno else e}"] += 1
            continue
        if (len(data), digest(data)) != wanted[name]:
            stats["wrong reads"] += 1
    return dict(stats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--readers", type=int, default=32)
    parser.add_argument("--files", type=int, default=39)
    parser.add_argument("--file-mb", type=int, default=16)
    parser.add_argument("--cache-size", default="200M")
    parser.add_argument("-o", dest="options", action="append", default=[])
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="soak-"))
    source, mountpoint, cache = top / "src", top / "mnt", top / "cache"
    source.mkdir()
    mountpoint.mkdir()
    names = [f"model-{i + 1:05d}-of-{args.files:05d}.safetensors" for i in range(args.files)]
    wanted = {}
    for name in names:
        data = os.urandom(args.file_mb * MiB)
        (source / name).write_bytes(data)
        wanted[name] = (len(data), digest(data))
    options = ["-o", f"cache_size={args.cache_size}"]
    for option in args.options:
        options += ["-o", option]
    cli("mount", source, mountpoint, "--cache-dir", cache, *options)
    try:
        with ProcessPoolExecutor(args.readers) as pool:
            results = list(pool.map(reader, [str(mountpoint)] * args.readers, [wanted] * args.readers,
                                    [args.seconds] * args.readers, range(args.readers)))
        total: collections.Counter = collections.Counter()
        for result in results:
            total.update(result)
        failed = sum(count for key, count in total.items() if key.startswith("failed"))
        print(f"{args.readers} readers, {args.seconds:.0f} s, {args.files} x {args.file_mb} MiB under "
              f"cache_size={args.cache_size}: {total['opens']} opens, {failed} failed, "
              f"{total['wrong reads']} reads with a wrong byte")
        for key, count in sorted(total.items()):
            if key.startswith("failed"):
                print(f"  {key}: {count}")
    finally:
        cli("umount", mountpoint)
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

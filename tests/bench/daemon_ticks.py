"""What the daemon costs in CPU on a small machine (issue 20's targets for the 2-core machine).

    python3 -m tests.bench.daemon_ticks [--size-gb 1] [--files 8] [--readers 4] [--rounds 2]
        [--source-dir /dev/shm/tick-src] [--cache-dir /dev/shm/tick-cache] [-o OPTION ...]

Each round, alternating the variants so a noisy machine shows as spread, not as a bias:
  cp -r        a plain copy of the source tree into the cache's filesystem (wall time)
  prefetch     `fusecache prefetch` of the whole tree into an empty cache: wall time and the
               daemon's CPU ticks (user + system, 1/100 s)
  restart      a remount over the complete cache, then `readers` processes mmap the files
               split between them: the daemon's ticks over the pass, with verify=sealed (the
               default) and with verify=always
Needs root. Source and cache are both on tmpfs by default (what is measured is the daemon,
not a disk).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

from tests.bench.throughput import GiB, cli, cpu_ticks, drop_caches, make_source, read_all

MOUNTPOINT = Path("/tmp/ticks-mnt")


def ticks(pid: int) -> int:
    return sum(cpu_ticks(pid))  # user + system, the reader processes' too


def mount(source: Path, cache: Path, options: list[str]) -> int:
    MOUNTPOINT.mkdir(exist_ok=True)
    args: list[object] = ["mount", source, MOUNTPOINT, "--cache-dir", cache]
    for option in options:
        args += ["-o", option]
    cli(*args)
    return json.loads(cli("status", MOUNTPOINT, "--json"))["pid"]


def copy(source: Path, cache: Path) -> float:
    shutil.rmtree(cache, ignore_errors=True)
    started = time.monotonic()
    subprocess.run(["cp", "-r", str(source), str(cache)], check=True)
    return time.monotonic() - started


def prefetch(source: Path, cache: Path, options: list[str]) -> tuple[float, int]:
    shutil.rmtree(cache, ignore_errors=True)
    pid = mount(source, cache, options)
    before = ticks(pid)
    started = time.monotonic()
    cli("prefetch", MOUNTPOINT)
    wall = time.monotonic() - started
    spent = ticks(pid) - before
    time.sleep(1.0)  # the last files' seals
    cli("umount", MOUNTPOINT)
    return wall, spent


def restart(source: Path, cache: Path, options: list[str], readers: int) -> tuple[float, int]:
    pid = mount(source, cache, options)
    files = sorted(p for p in MOUNTPOINT.rglob("*") if p.is_file())
    drop_caches()
    before = ticks(pid)
    rate = read_all(files, readers, "split", use_mmap=True)
    spent = ticks(pid) - before
    cli("umount", MOUNTPOINT)
    return rate, spent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--source-dir", type=Path, default=Path("/dev/shm/tick-src"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/dev/shm/tick-cache"))
    parser.add_argument("-o", dest="options", action="append", default=[])
    args = parser.parse_args()
    make_source(args.source_dir, int(args.size_gb * GiB), args.files)
    size = sum(p.stat().st_size for p in args.source_dir.rglob("*") if p.is_file())
    copy_dir = args.cache_dir.with_name(args.cache_dir.name + "-cp")
    try:
        for round_ in range(args.rounds):
            cp_wall = copy(args.source_dir, copy_dir)
            wall, spent = prefetch(args.source_dir, args.cache_dir, args.options)
            print(f"round {round_ + 1}: cp -r {size / cp_wall / 1e9:.2f} GB/s | prefetch {size / wall / 1e9:.2f} GB/s, "
                  f"daemon {spent} ticks ({spent / 100 / (size / 1e9):.2f} CPU-s per GB)", flush=True)
            for verify in ("sealed", "always") if round_ % 2 == 0 else ("always", "sealed"):
                rate, spent = restart(args.source_dir, args.cache_dir, args.options + [f"verify={verify}"],
                                      args.readers)
                print(f"round {round_ + 1}: restart verify={verify}: {args.readers} mmap readers "
                      f"{rate:.2f} GB/s, daemon {spent} ticks", flush=True)
    finally:
        subprocess.run(["umount", "-l", str(MOUNTPOINT)], capture_output=True)
        shutil.rmtree(copy_dir, ignore_errors=True)
        shutil.rmtree(args.cache_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

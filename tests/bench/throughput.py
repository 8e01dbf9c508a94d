"""Read throughput through a fusecache mount against a direct read of the same files.

    python3 -m tests.bench.throughput [--size-gb 2] [--files 4] [--readers 1] [--chunk-sizes 1M,4M,16M]
                                      [--source-dir DIR] [--cache-dir DIR] [--json OUT]

Per chunk size, one run measures side by side (page cache dropped before each cold pass):
  direct   read the source files directly                (what the disk/network gives)
  cold     first read through a fresh mount, empty cache (source -> cache -> reader)
  warm     after a remount, cache full, page cache dropped (cache file -> reader)
  hot      second read through the same mount            (kernel page cache, keep_cache)
Readers read whole files sequentially in 16 MiB reads, `--readers` processes at once, each
starting at a different file. Needs root (drop_caches, mounting).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from fusecache.config import parse_size

MiB = 1 << 20
GiB = 1 << 30


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_file(path: str) -> int:
    buf = bytearray(16 * MiB)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return total


def read_all(paths: list[Path], readers: int) -> float:
    """GB/s for `readers` processes reading every file, each starting at another file."""
    jobs = [[str(paths[(r + i) % len(paths)]) for i in range(len(paths))] for r in range(readers)]
    started = time.monotonic()
    with ProcessPoolExecutor(readers) as pool:
        total = sum(pool.map(_read_list, jobs))
    return total / (time.monotonic() - started) / 1e9


def _read_list(paths: list[str]) -> int:
    return sum(read_file(p) for p in paths)


def cli(*args: object) -> str:
    result = subprocess.run([sys.executable, "-m", "fusecache", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"fusecache {args[0]}: {result.stderr.strip()}")
    return result.stdout


def make_source(directory: Path, size: int, files: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(16 * MiB)
    paths = []
    for i in range(files):
        path = directory / f"shard-{i:03d}.bin"
        paths.append(path)
        if path.exists() and path.stat().st_size == size // files:
            continue
        with open(path, "wb") as f:
            for _ in range(size // files // len(block)):
                f.write(block)
    return paths


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def measure(source: Path, paths: list[Path], cache_root: Path, chunk: str, readers: int,
            options: list[str]) -> dict:
    mountpoint = Path(tempfile.mkdtemp(prefix="fcbench-mnt-"))
    cache = cache_root / f"cache-{chunk}"
    shutil.rmtree(cache, ignore_errors=True)
    mount_args = ["mount", source, mountpoint, "--cache-dir", cache, "-o", f"chunk_size={chunk}"]
    for option in options:
        mount_args += ["-o", option]
    via_mount = [mountpoint / p.name for p in paths]
    row: dict = {"chunk_size": chunk}
    try:
        drop_caches()
        row["direct"] = read_all(paths, readers)
        cli(*mount_args)
        pid = json.loads(cli("status", mountpoint, "--json"))["pid"]
        drop_caches()
        cpu0 = cpu_seconds(pid)
        row["cold"] = read_all(via_mount, readers)
        row["cold_daemon_cpu_s"] = cpu_seconds(pid) - cpu0
        row["hot"] = read_all(via_mount, readers)
        cli("umount", mountpoint)
        cli(*mount_args)
        drop_caches()
        row["warm"] = read_all(via_mount, readers)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        mountpoint.rmdir()
        shutil.rmtree(cache, ignore_errors=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--readers", type=int, default=1)
    parser.add_argument("--chunk-sizes", default="1M,4M,16M")
    parser.add_argument("--source-dir", type=Path, default=Path("/var/tmp/fcbench-source"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/tmp/fcbench-cache"))
    parser.add_argument("-o", dest="options", action="append", default=[], help="extra mount option")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    for chunk in args.chunk_sizes.split(","):
        parse_size(chunk)  # fail early on a typo
    paths = make_source(args.source_dir, int(args.size_gb * GiB), args.files)
    rows = []
    print(f"{args.size_gb} GB in {args.files} files, {args.readers} reader(s); GB/s "
          f"(ratios against direct in the same row)")
    print(f"{'chunk':>6} {'direct':>7} {'cold':>13} {'warm':>13} {'hot':>13} {'daemon cpu s':>12}")
    for chunk in args.chunk_sizes.split(","):
        row = measure(args.source_dir, paths, args.cache_dir, chunk, args.readers, args.options)
        rows.append(row)
        d = row["direct"]
        print(f"{chunk:>6} {d:7.2f} {row['cold']:6.2f} ({row['cold'] / d:4.2f}x) "
              f"{row['warm']:6.2f} ({row['warm'] / d:4.2f}x) {row['hot']:6.2f} ({row['hot'] / d:4.2f}x) "
              f"{row['cold_daemon_cpu_s']:12.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

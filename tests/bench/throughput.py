"""Read throughput through a fusecache mount against direct reads of the same bytes.

    python3 -m tests.bench.throughput [--size-gb 2] [--files 4] [--readers 1] [--pattern all|split]
        [--mmap] [--chunk-sizes 4M] [--source-dir DIR] [--cache-dir DIR] [-o OPTION ...] [--json OUT]

Per chunk size, one run measures side by side, dropping the page cache before each pass but
the hot one:
  direct   the source files read directly (the source's own speed)
  cold     first read through a fresh mount, empty cache (source -> cache -> reader)
  hot      a second read through the same mount (kernel page cache, keep_cache)
  cache    the filled cache files read directly (the best a cached read could do)
  warm     after a remount with the page cache dropped (cache file -> reader)
GB/s are of checkpoint bytes over wall time. With --pattern all (data parallel) every reader
reads every file, starting at another one; with split, reader r reads files[r::readers].
--mmap reads the way safetensors does: mmap each file and touch all of it (numpy sum).
Also reports the daemon's user and system CPU seconds during the cold pass. Needs root.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import BinaryIO

from fusecache.config import parse_size

MiB = 1 << 20
GiB = 1 << 30
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_file(f: BinaryIO, use_mmap: bool) -> int:
    """Read an open file whole: by read(), or mapped and faulted in the way safetensors does."""
    if use_mmap:
        import numpy as np

        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            np.frombuffer(mm, dtype=np.uint8)[::4096].sum()  # faults in every page, in order
            return len(mm)
    buf = memoryview(bytearray(16 * MiB))
    total = 0
    while n := f.readinto(buf):
        total += n
    return total


def _read_list(paths: list[str], use_mmap: bool) -> list[float]:
    """Read the files one after another; when each open returned (CLOCK_MONOTONIC, which all
    processes share)."""
    opened = []
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            opened.append(time.monotonic())
            read_file(f, use_mmap)
    return opened


def reader_jobs(paths: list[Path], readers: int, pattern: str) -> list[list[str]]:
    names = [str(p) for p in paths]
    if pattern == "split":
        return [names[r::readers] for r in range(readers)]
    return [names[r % len(names):] + names[:r % len(names)] for r in range(readers)]


def timed_read(paths: list[Path], readers: int, pattern: str, use_mmap: bool) -> tuple[float, list[float]]:
    """Seconds `readers` processes take to read `paths`, and when each of their opens returned
    (seconds from the start, sorted): through passthrough an open waits for its file to be
    complete in the cache."""
    jobs = reader_jobs(paths, readers, pattern)
    with ProcessPoolExecutor(readers) as pool:
        list(pool.map(_read_list, [[]] * readers, [use_mmap] * readers))  # start the workers first
        started = time.monotonic()
        opened = [t for times in pool.map(_read_list, jobs, [use_mmap] * readers) for t in times]
        return time.monotonic() - started, sorted(t - started for t in opened)


def read_all(paths: list[Path], readers: int, pattern: str, use_mmap: bool) -> float:
    """GB/s of distinct checkpoint bytes for `readers` processes reading `paths`."""
    size = sum(p.stat().st_size for p in paths)
    return size / timed_read(paths, readers, pattern, use_mmap)[0] / 1e9


def cli(*args: object) -> str:
    result = subprocess.run([sys.executable, "-m", "fusecache", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"fusecache {args[0]}: {result.stderr.strip()}")
    return result.stdout


def make_source(directory: Path, size: int, files: int) -> list[Path]:
    """Files of random-looking bytes (a 64 MiB random block, its first bytes varied per block)."""
    directory.mkdir(parents=True, exist_ok=True)
    block = bytearray(os.urandom(64 * MiB))
    paths = []
    for i in range(files):
        path = directory / f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        paths.append(path)
        if path.exists() and path.stat().st_size == size // files:
            continue
        with open(path, "wb") as f:
            for n in range(size // files // len(block)):
                block[:16] = f"{i:08d}{n:08d}".encode()
                f.write(block)
    return paths


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(user, system) clock ticks of the daemon pid and of its reader processes (its children)."""
    user = system = 0
    children = " ".join(p.read_text() for p in Path(f"/proc/{pid}/task").glob("*/children"))
    for one in [pid, *map(int, children.split())]:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # it ended meanwhile
            continue
        user, system = user + int(fields[11]), system + int(fields[12])
    return user, system


class PySpy:
    """py-spy sampling a daemon's Python threads while a `with` block runs, twice: every thread
    on a CPU into path, and the thread holding the GIL alone into path's `.gil` sibling (raw
    collapsed stacks: one line per stack and its count); nothing where path is None.
    Non-blocking: the daemon is never stopped to be sampled."""

    def __init__(self, pid: int, path: Path | None, rate: int = 200) -> None:
        command = [os.environ.get("PY_SPY", "py-spy"), "record", "--pid", str(pid), "--rate", str(rate),
                   "--format", "raw", "--nonblocking", "--threads", "--output"]
        self.commands = [] if path is None else [
            [*command, str(path)], [*command, str(path.with_suffix(".gil" + path.suffix)), "--gil"]]
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> "PySpy":
        self.processes = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                          for c in self.commands]
        if self.processes:
            time.sleep(1.0)  # attached
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGINT)  # py-spy writes what it sampled, then ends
        for process in self.processes:
            process.wait()


def cpu_seconds(pid: int) -> tuple[float, float]:
    """cpu_ticks in seconds."""
    user, system = cpu_ticks(pid)
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def measure(source: Path, paths: list[Path], cache: Path, chunk: str, args: argparse.Namespace) -> dict:
    mountpoint = Path(tempfile.mkdtemp(prefix="fcbench-mnt-"))
    shutil.rmtree(cache, ignore_errors=True)
    mount_args = ["mount", source, mountpoint, "--cache-dir", cache, "-o", f"chunk_size={chunk}"]
    for option in args.options:
        mount_args += ["-o", option]
    via_mount = [mountpoint / p.name for p in paths]

    def timed(files: list[Path], drop: bool = True) -> float:
        if drop:
            drop_caches()
        return read_all(files, args.readers, args.pattern, args.mmap)

    row: dict = {"chunk_size": chunk}
    try:
        row["direct"] = timed(paths)
        cli(*mount_args)
        pid = json.loads(cli("status", mountpoint, "--json"))["pid"]
        user0, sys0 = cpu_seconds(pid)
        row["cold"] = timed(via_mount)
        user1, sys1 = cpu_seconds(pid)
        row["cold_daemon_user_s"], row["cold_daemon_sys_s"] = user1 - user0, sys1 - sys0
        row["hot"] = timed(via_mount, drop=False)
        row["cache"] = timed(sorted(cache.rglob("*.data")))
        cli("umount", mountpoint)
        cli(*mount_args)
        row["warm"] = timed(via_mount)
        cli("umount", mountpoint)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        mountpoint.rmdir()
        shutil.rmtree(cache, ignore_errors=True)
    return row


def resident_fraction(path: str) -> float:
    """The share of the file's pages in the page cache (mincore over a mapping of it): what the
    tests and the benchmarks measure of a cache or a source file left in memory."""
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    vector = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        address = ctypes.addressof(ctypes.c_char.from_buffer(m))
        failed = libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0
    if failed:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(v & 1 for v in vector) / pages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--readers", type=int, default=1)
    parser.add_argument("--pattern", choices=("all", "split"), default="all")
    parser.add_argument("--mmap", action="store_true", help="read through mmap, as safetensors does")
    parser.add_argument("--chunk-sizes", default="4M")
    parser.add_argument("--source-dir", type=Path, default=Path("/var/tmp/fcbench-source"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/tmp/fcbench-cache"))
    parser.add_argument("-o", dest="options", action="append", default=[], help="extra mount option")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    chunks = args.chunk_sizes.split(",")
    for chunk in chunks:
        parse_size(chunk)  # fail early on a typo
    paths = make_source(args.source_dir, int(args.size_gb * GiB), args.files)
    rows = []
    print(f"{args.size_gb:g} GiB in {args.files} files, {args.readers} reader(s) ({args.pattern}"
          f"{', mmap' if args.mmap else ''}), options {args.options or 'default'}; GB/s, ratio to direct")
    print(f"{'chunk':>6} {'direct':>7} {'cold':>13} {'cache':>13} {'hot':>13} {'warm':>13} {'daemon cpu usr/sys s':>21}")
    for chunk in chunks:
        row = measure(args.source_dir, paths, args.cache_dir / f"c{chunk}", chunk, args)
        rows.append(row)
        d = row["direct"]
        cells = " ".join(f"{row[k]:6.2f} ({row[k] / d:4.2f}x)" for k in ("cold", "cache", "hot", "warm"))
        print(f"{chunk:>6} {d:7.2f} {cells} {row['cold_daemon_user_s']:10.1f}/{row['cold_daemon_sys_s']:.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

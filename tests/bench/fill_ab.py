"""The daemon's fill, builds side by side: `fusecache prefetch` of one tree into an empty cache
with each build's daemon in turn, alternating over rounds (issue 20, item 2).

    python3 -m tests.bench.fill_ab [--size-gb 1] [--files 8] [--rounds 2]
        [--source-dir /dev/shm/fillab-src] [--cache-dir /dev/shm/fillab-cache]
        [--perf DIR] [--py-spy DIR] [-o OPTION ...] BUILD_SRC [BUILD_SRC ...]

Each BUILD_SRC is the `src` folder of a build (e.g. `git archive COMMIT src | tar -x -C DIR`),
put first on the daemon's PYTHONPATH. Each round prints `cp -r` of the tree (wall) and, per
build, the prefetch's wall time and the daemon's CPU ticks (user and system, 1/100 s). With
--perf, each build's first prefetch runs under `perf record -g` on the daemon, written to
DIR/<n>.data (`perf report -i ... --children --sort sym` then says where the time went); with
--py-spy, under py-spy into DIR/<n>.txt (the Python stacks of its threads, raw).
Needs root. tmpfs to tmpfs by default: what is measured is the daemon, not a disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.bench.throughput import GiB, PySpy, cpu_ticks, make_source

MOUNTPOINT = Path("/tmp/fillab-mnt")


def cli(build: Path, *args: object) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(build), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "fusecache", *map(str, args)], capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"fusecache {args[0]}: {result.stderr.strip()}")
    return result.stdout


def prefetch(build: Path, source: Path, cache: Path, options: list[str], perf: Path | None,
             spy: Path | None) -> tuple[float, int, int]:
    """(wall seconds, user ticks, system ticks) of the daemon over one prefetch into an empty cache."""
    shutil.rmtree(cache, ignore_errors=True)
    MOUNTPOINT.mkdir(exist_ok=True)
    args: list[object] = ["mount", source, MOUNTPOINT, "--cache-dir", cache]
    for option in options:
        args += ["-o", option]
    cli(build, *args)
    pid = json.loads(cli(build, "status", MOUNTPOINT, "--json"))["pid"]
    recorder = None
    if perf is not None:
        recorder = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-p", str(pid), "-o", str(perf)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # perf attached
    with PySpy(pid, spy):
        user, system = cpu_ticks(pid)
        started = time.monotonic()
        cli(build, "prefetch", MOUNTPOINT)
        wall = time.monotonic() - started
        user_after, system_after = cpu_ticks(pid)
    if recorder is not None:
        recorder.send_signal(signal.SIGINT)
        recorder.wait()
    time.sleep(1.0)  # the last files' seals
    cli(build, "umount", MOUNTPOINT)
    return wall, user_after - user, system_after - system


def copy(source: Path, target: Path) -> float:
    shutil.rmtree(target, ignore_errors=True)
    started = time.monotonic()
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    wall = time.monotonic() - started
    shutil.rmtree(target)
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("builds", nargs="+", type=Path)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--source-dir", type=Path, default=Path("/dev/shm/fillab-src"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/dev/shm/fillab-cache"))
    parser.add_argument("--perf", type=Path, help="record each build's first prefetch with perf into this dir")
    parser.add_argument("--py-spy", type=Path, help="record each build's first prefetch with py-spy into this dir")
    parser.add_argument("-o", dest="options", action="append", default=[])
    args = parser.parse_args()
    make_source(args.source_dir, int(args.size_gb * GiB), args.files)
    size = sum(p.stat().st_size for p in args.source_dir.rglob("*") if p.is_file())
    for folder in (args.perf, args.py_spy):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    copy_dir = args.cache_dir.with_name(args.cache_dir.name + "-cp")
    try:
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}: cp -r {size / copy(args.source_dir, copy_dir) / 1e9:.2f} GB/s", flush=True)
            order = list(enumerate(args.builds))
            for n, build in order if round_ % 2 == 0 else order[::-1]:
                perf = args.perf / f"{n}.data" if args.perf is not None and round_ == 0 else None
                spy = args.py_spy / f"{n}.txt" if args.py_spy is not None and round_ == 0 else None
                wall, user, system = prefetch(build, args.source_dir, args.cache_dir, args.options, perf, spy)
                print(f"round {round_ + 1}: {build}: prefetch {size / wall / 1e9:.2f} GB/s, daemon {user + system} ticks "
                      f"(user {user}, system {system}; {(user + system) / 100 / (size / 1e9):.2f} CPU-s per GB)", flush=True)
    finally:
        subprocess.run(["umount", "-l", str(MOUNTPOINT)], capture_output=True)
        shutil.rmtree(args.cache_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

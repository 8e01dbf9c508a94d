"""Readers through live restarts and kill -9 of the serving process (issue 21's target).

    python3 -m tests.bench.liverestart [--size-gb 1] [--files 8] [--readers 4]
        [--events kill9,restart] [--interval 3] [--source-dir DIR] [--cache-dir DIR] [-o OPTION ...]

Mounts SOURCE with `fusecache mount` and prefetches it whole, so that every byte is cached.
Then `readers` processes read the checkpoint in a loop, half with read() and half through
mmap, a file at a time, 4 MiB at a time, each piece compared (blake2b) with the source's; each
holds its descriptor and mapping while the events happen. The events run one after another,
`interval` seconds apart (and after the last, until every reader has read the checkpoint
whole once more): `restart` is `fusecache restart MOUNTPOINT`, `kill9` a SIGKILL of the
serving process (the pid in `fusecache status`). Prints, per reader and in all: whole passes,
failed reads (by errno), pieces with a wrong byte, the longest one read or open took (the pause
a reader saw), and the bytes the daemons fetched from the source after the prefetch (which the
target wants at 0; each daemon's count, read just before it is replaced, summed). `-o passthrough=off` measures the FUSE path. Needs root.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import mmap
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from tests.bench.throughput import cli, make_source

GiB, MiB = 1 << 30, 1 << 20
PIECE = 4 * MiB
AFTER_LAST_EVENT = 300.0  # seconds the readers get for one more whole pass after the last event


def digests(path: Path) -> list[bytes]:
    with open(path, "rb") as f:
        return [hashlib.blake2b(piece, digest_size=16).digest() for piece in iter(lambda: f.read(PIECE), b"")]


def read_pieces(path: Path, use_mmap: bool):
    """Yield (index, bytes) of each piece of path, the file held open (and mapped) throughout."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if use_mmap:
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
                for index, offset in enumerate(range(0, len(m), PIECE)):
                    yield index, m[offset:offset + PIECE]
        else:
            index = 0
            while piece := os.pread(fd, PIECE, index * PIECE):
                yield index, piece
                index += 1
    finally:
        os.close(fd)


def reader(number: int, mountpoint: str, wanted: dict[str, list[bytes]], stop, last_pass, results) -> None:
    use_mmap = number % 2 == 1
    names = sorted(wanted)
    names = names[number % len(names):] + names[:number % len(names)]
    stats: collections.Counter = collections.Counter()
    longest = 0.0
    pass_ends: list[float] = []  # CLOCK_MONOTONIC, the same in every process
    while not stop.is_set():
        for name in names:
            started = time.monotonic()
            pieces = 0
            try:
                for index, piece in read_pieces(Path(mountpoint) / name, use_mmap):
                    now = time.monotonic()
                    longest = max(longest, now - started)
                    started = now
                    pieces += 1
                    if hashlib.blake2b(piece, digest_size=16).digest() != wanted[name][index]:
                        stats["wrong pieces"] += 1
            except OSError as e:
                stats[f"failed: {os.strerror(e.errno) if e.errno else e}"] += 1
                continue
            except (ValueError, IndexError):  # a mapping shorter or longer than the file was
                stats["failed: wrong length"] += 1
                continue
            if pieces != len(wanted[name]):
                stats["failed: wrong length"] += 1
            if stop.is_set():
                break
        else:
            stats["passes"] += 1
            pass_ends.append(time.monotonic())
            last_pass[number] = pass_ends[-1]
    results.put((number, "mmap" if use_mmap else "read", dict(stats), longest, pass_ends))


def status(mountpoint: Path) -> dict:
    return json.loads(cli("status", mountpoint, "--json"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--events", default="kill9,restart", help="comma-separated, run in this order")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds before, between and after events")
    parser.add_argument("--source-dir", type=Path)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("-o", dest="options", action="append", default=[])
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="liverestart-"))
    source = args.source_dir or top / "src"
    cache = args.cache_dir or top / "cache"
    mountpoint = top / "mnt"
    mountpoint.mkdir()
    paths = make_source(source, int(args.size_gb * GiB), args.files)
    wanted = {path.name: digests(path) for path in paths}
    options = [item for option in args.options for item in ("-o", option)]
    cli("mount", source, mountpoint, "--cache-dir", cache, *options)
    try:
        cli("prefetch", mountpoint)
        fetched = status(mountpoint)["metrics"]["bytes_from_source"]
        stop, results = multiprocessing.Event(), multiprocessing.Queue()
        last_pass = multiprocessing.Array("d", args.readers)
        readers = [multiprocessing.Process(target=reader, args=(n, str(mountpoint), wanted, stop, last_pass, results))
                   for n in range(args.readers)]
        for process in readers:
            process.start()
        time.sleep(args.interval)
        refetched, baseline, last_event = 0, fetched, time.monotonic()  # a daemon's counters start at 0: summed over daemons
        for event in args.events.split(","):
            now = status(mountpoint)
            pid = now["pid"]
            refetched, baseline = refetched + now["metrics"]["bytes_from_source"] - baseline, 0
            started = time.monotonic()
            if event == "kill9":
                os.kill(pid, signal.SIGKILL)
            elif event == "restart":
                cli("restart", mountpoint)
            else:
                raise SystemExit(f"unknown event {event!r}")
            last_event = time.monotonic()
            print(f"{event} of pid {pid}: {last_event - started:.2f} s", flush=True)
            time.sleep(args.interval)
        deadline = time.monotonic() + AFTER_LAST_EVENT
        while min(last_pass) < last_event and time.monotonic() < deadline:
            time.sleep(0.1)  # until every reader has read the checkpoint whole once more
        stop.set()
        gathered = sorted(results.get(timeout=600) for _ in readers)
        for process in readers:
            process.join()
        refetched += status(mountpoint)["metrics"]["bytes_from_source"] - baseline
    finally:
        cli("umount", mountpoint)
        if args.source_dir is None:
            shutil.rmtree(source, ignore_errors=True)
        if args.cache_dir is None:
            shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)
    total: collections.Counter = collections.Counter()
    for number, way, stats, longest, pass_ends in gathered:
        total.update(stats)
        after = sum(end > last_event for end in pass_ends)
        print(f"reader {number} ({way}): {stats.get('passes', 0)} passes ({after} after the last event), "
              f"longest piece or open {longest:.2f} s, "
              f"{ {k: v for k, v in stats.items() if k != 'passes'} or 'no error'}")
    failed = sum(count for key, count in total.items() if key.startswith("failed"))
    print(f"{args.readers} readers, {args.size_gb:g} GiB in {args.files} files, events {args.events}, "
          f"options {args.options or 'default'}: {total['passes']} passes, {failed} failed reads, "
          f"{total['wrong pieces']} wrong pieces, longest pause {max(g[3] for g in gathered):.2f} s, "
          f"{sum(any(end > last_event for end in g[4]) for g in gathered)} of {args.readers} readers with a pass "
          f"after the last event, "
          f"{refetched} bytes fetched from the source again")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

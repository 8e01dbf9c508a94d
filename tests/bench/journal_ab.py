"""What the crash journal costs the requests it does not serve, builds side by side: the
journal is written from a snapshot of everything the kernel holds, so its cost grows with the
mount's inodes (journal.py).

    python3 -m tests.bench.journal_ab [--files 2000] [--entries 20000] [--opendirs 20]
        [--rounds 2] [--base /tmp/journal-ab] BUILD_SRC [BUILD_SRC ...]

Each BUILD_SRC is the `src` folder of a build (e.g. `git archive COMMIT src | tar -x -C DIR`),
put first on the daemon's PYTHONPATH; the builds alternate within each round. Per build and
round it prints:
- `opens`: --files files of 4 KiB, prefetched (complete: their opens go passthrough), then
  each opened, read and closed in turn, twice: milliseconds per file, each pass. A
  passthrough inode's first open and last release must be journaled before they are
  answered.
- `opendir`: a directory of --entries names listed once (the kernel then holds an inode for
  each), then --opendirs opens of it with one readdir each: milliseconds per open.
Needs root (passthrough).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from tests.bench.fill_ab import cli


def make_tree(source: Path, files: int, entries: int) -> None:
    if source.exists():
        return
    (source / "small").mkdir(parents=True)
    for i in range(files):
        (source / "small" / f"f{i:05d}").write_bytes(os.urandom(4096))
    (source / "big").mkdir()
    for i in range(entries):
        (source / "big" / f"entry-with-a-longish-name-{i:06d}").touch()


def measure(build: Path, source: Path, base: Path, opendirs: int) -> tuple[list[float], float]:
    """(ms per file of each opens pass, ms per opendir) with this build's daemon."""
    mountpoint, cache = base / "mnt", base / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    mountpoint.mkdir(exist_ok=True)
    cli(build, "mount", source, mountpoint, "--cache-dir", cache)
    try:
        cli(build, "prefetch", mountpoint / "small")
        time.sleep(1.0)  # the last seals written
        names = sorted(os.listdir(mountpoint / "small"))
        passes = []
        for _ in range(2):
            started = time.perf_counter()
            for name in names:
                with open(mountpoint / "small" / name, "rb") as f:
                    f.read()
            passes.append((time.perf_counter() - started) / len(names) * 1e3)
        os.listdir(mountpoint / "big")
        started = time.perf_counter()
        for _ in range(opendirs):
            fd = os.open(mountpoint / "big", os.O_RDONLY | os.O_DIRECTORY)
            try:
                with os.scandir(fd) as it:
                    next(it)
            finally:
                os.close(fd)
        return passes, (time.perf_counter() - started) / opendirs * 1e3
    finally:
        cli(build, "umount", mountpoint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--entries", type=int, default=20000)
    parser.add_argument("--opendirs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base", type=Path, default=Path("/tmp/journal-ab"))
    parser.add_argument("builds", nargs="+", type=Path)
    args = parser.parse_args()
    source = args.base / "src"
    make_tree(source, args.files, args.entries)
    for round_ in range(1, args.rounds + 1):
        order = args.builds if round_ % 2 else list(reversed(args.builds))
        for build in order:
            passes, opendir = measure(build.resolve(), source, args.base, args.opendirs)
            print(f"round {round_} {build}: opens {passes[0]:.2f}, {passes[1]:.2f} ms per file "
                  f"({args.files} files); opendir {opendir:.1f} ms ({args.entries} entries held)", flush=True)


if __name__ == "__main__":
    main()

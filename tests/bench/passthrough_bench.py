"""Passthrough against the FUSE path and a direct read, side by side in one run (issue 13).

    python3 -m tests.bench.passthrough_bench [--size-gb 16] [--files 16] [--readers 8]
        [--source-dir /dev/shm/src] [--cache-dir /dev/shm/ptcache] [--rounds 2] [-o OPTION ...]

Each round measures, dropping the page cache before every pass (a tmpfs source and cache stay
in memory: what is dropped is the mount's own page cache):
  direct            the source files read directly
  cold              a fresh mount over an empty cache, passthrough on (opens wait for streams)
  restart           a remount over the complete cache, passthrough on (the first open of each
                    file checks its chunks); then a second pass on that mount ("verified")
  fuse-restart      the same with passthrough=off: every byte through the daemon (kernel session)
  pyfuse3-restart   the same through the pyfuse3 session (the daemon before this change)
each with read() and with mmap (safetensors' way). Rounds alternate the variants, so a noisy
machine shows as spread, not as a bias. Also printed: the mount's page cache beyond the tmpfs
cache after an mmap restart pass (Cached - Shmem grown over the pass), in % of the checkpoint,
and the daemon's bytes served and passthrough opens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from tests.bench.throughput import GiB, cli, drop_caches, make_source, read_all

MOUNTPOINT = Path("/tmp/ptbench-mnt")


def meminfo() -> dict[str, int]:
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/meminfo")}


def mount(source: Path, cache: Path, options: list[str]) -> None:
    MOUNTPOINT.mkdir(exist_ok=True)
    args = ["mount", source, MOUNTPOINT, "--cache-dir", cache]
    for option in options:
        args += ["-o", option]
    cli(*args)


def status() -> dict:
    return json.loads(cli("status", MOUNTPOINT, "--json"))


def timed_pass(files: list[Path], readers: int, use_mmap: bool) -> tuple[float, int]:
    """GB/s of one pass, and how much the page cache outside tmpfs grew during it."""
    drop_caches()
    before = meminfo()
    rate = read_all(files, readers, "split", use_mmap)
    after = meminfo()
    grown = (after["Cached"] - after["Shmem"]) - (before["Cached"] - before["Shmem"])
    return rate, grown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=16)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--source-dir", type=Path, default=Path("/dev/shm/src"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/dev/shm/ptcache"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="direct,cold,restart,fuse-restart,pyfuse3-restart")
    parser.add_argument("-o", dest="options", action="append", default=[])
    args = parser.parse_args()
    size = int(args.size_gb * GiB)
    files = make_source(args.source_dir, size, args.files)
    mounted = sorted(MOUNTPOINT / f.name for f in files)
    variants = args.variants.split(",")
    results: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)
        print(f"{name:32s} {value:7.2f}", flush=True)

    for round_number in range(args.rounds):
        order = variants if round_number % 2 == 0 else list(reversed(variants))
        for variant in order:
            for use_mmap in (False, True):
                kind = "mmap" if use_mmap else "read"
                if variant == "direct":
                    record(f"direct {kind} GB/s", timed_pass(files, args.readers, use_mmap)[0])
                    continue
                options = list(args.options)
                if variant == "cold":
                    shutil.rmtree(args.cache_dir, ignore_errors=True)
                elif not (args.cache_dir.exists() and any(args.cache_dir.rglob("*.data"))):
                    mount(args.source_dir, args.cache_dir, options)  # fill the cache once
                    cli("prefetch", MOUNTPOINT)
                    cli("umount", MOUNTPOINT)
                if variant == "fuse-restart":
                    options.append("passthrough=off")
                if variant == "pyfuse3-restart":
                    options.append("session=pyfuse3")
                mount(args.source_dir, args.cache_dir, options)
                try:
                    started = time.monotonic()
                    rate, grown = timed_pass(mounted, args.readers, use_mmap)
                    record(f"{variant} {kind} GB/s", rate)
                    state = status()
                    served = state["metrics"]["bytes_served"]
                    opens = state["metrics"]["passthrough_opens"]
                    print(f"  {time.monotonic() - started:.1f} s; page cache beyond tmpfs +{100 * grown / size:.0f}% "
                          f"of the checkpoint; daemon served {served / size:.2f}x; passthrough opens {opens}; "
                          f"passthrough {state['passthrough']}", flush=True)
                    if use_mmap:
                        record(f"{variant} mmap page cache %", 100 * grown / size)
                    if variant == "restart":  # again on the same mount: every file verified already
                        record(f"restart, verified {kind} GB/s", timed_pass(mounted, args.readers, use_mmap)[0])
                finally:
                    cli("umount", MOUNTPOINT)
    print("\nsummary (min / max over rounds)")
    for name, values in results.items():
        print(f"{name:32s} {min(values):7.2f} {max(values):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

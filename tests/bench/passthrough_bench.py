"""Passthrough against the FUSE path and a direct read, side by side in one run (issue 13).

    python3 -m tests.bench.passthrough_bench [--size-gb 16] [--files 16] [--readers 8]
        [--source-dir /dev/shm/src] [--cache-dir /dev/shm/ptcache] [--rounds 2] [-o OPTION ...]
        [--variants direct,cold,restart,restart-always,fuse-restart,fuse-restart-1q,fuse-restart-16q,
        fuse-restart-threads,pyfuse3-restart]
        [--libfuse-hp PATH --variants ...,libfuse-hp,libfuse-hp-clone]

Each round measures, dropping the page cache before every pass (a tmpfs source and cache stay
in memory: what is dropped is the mount's own page cache):
  direct            the source files read directly
  cold              a fresh mount over an empty cache, passthrough on (opens wait for streams)
  restart           a remount over the complete, sealed cache, passthrough on (verify=sealed:
                    a sealed file goes to the kernel unread); then a second pass on that mount
                    ("verified")
  restart-always    the same with verify=always: the first open of each file checks its chunks
  fuse-restart      the same with passthrough=off: every byte through the daemon (kernel session)
  fuse-restart-1q   the same with queues=1: the trio thread reads every request (before issue 22)
  fuse-restart-16q  the same with 16 readers (the default is one per core, at most 8)
  fuse-restart-threads  fuse-restart with reader threads where a cache in memory gets processes
  pyfuse3-restart   the same through the pyfuse3 session (the daemon before this change)
  libfuse-hp        libfuse's C example passthrough_hp over the source, 16 threads, without
                    passthrough (the bar of issue 22; build it from libfuse's example/, the
                    version of the installed libfuse3, and pass its path as --libfuse-hp)
  libfuse-hp-clone  the same with --clone-fd (a /dev/fuse clone per thread)
each with read() and with mmap (safetensors' way). Rounds alternate the variants, so a noisy
machine shows as spread, not as a bias. Also printed: the mount's page cache beyond the tmpfs
cache after an mmap restart pass (Cached - Shmem grown over the pass), in % of the checkpoint,
the daemon's bytes served and passthrough opens, and its CPU seconds (user+sys) over each
variant's first pass. --variants picks and orders the variants (all by default). The cache is
filled once (a prefetch, or the cold variant's pass) and unmounted only once every file is
sealed, so that the restarts find what a daemon that finished its streams leaves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.bench.throughput import GiB, cli, cpu_seconds, drop_caches, make_source, read_all

MOUNTPOINT = Path("/tmp/ptbench-mnt")
VARIANTS = ("direct", "cold", "restart", "restart-always", "fuse-restart", "fuse-restart-1q", "fuse-restart-16q",
            "fuse-restart-threads", "pyfuse3-restart", "libfuse-hp", "libfuse-hp-clone")
VARIANT_OPTIONS = {"restart-always": ["verify=always"], "fuse-restart": ["passthrough=off"],
                   "fuse-restart-1q": ["passthrough=off", "queues=1"],
                   "fuse-restart-16q": ["passthrough=off", "queues=16"], "pyfuse3-restart": ["session=pyfuse3"],
                   "fuse-restart-threads": ["passthrough=off", "readers=threads"]}
SEAL_MAGIC = b"FCSEAL01"  # fusecache.store.SEAL_MAGIC: the last 48 bytes of a sealed index
SEAL_SIZE = 48
SEAL_TIMEOUT = 120.0


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


def sealed_count(cache: Path) -> int:
    count = 0
    for index in cache.rglob("*.idx"):
        with open(index, "rb") as f:
            f.seek(max(index.stat().st_size - SEAL_SIZE, 0))
            count += f.read(SEAL_SIZE).startswith(SEAL_MAGIC)
    return count


def wait_sealed(cache: Path, files: int) -> None:
    """Wait until each file's index ends with its seal (written by the stream right after the
    file completes), so that an unmount does not leave files a restart must check."""
    deadline = time.monotonic() + SEAL_TIMEOUT
    while (sealed := sealed_count(cache)) < files:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {sealed} of {files} cache files sealed after {SEAL_TIMEOUT:.0f} s")
        time.sleep(0.2)


def libfuse_hp(binary: Path, source: Path, clone_fd: bool) -> subprocess.Popen:
    """passthrough_hp mounted at MOUNTPOINT over source, in the foreground of a child process.
    libfuse 3.17's example turns passthrough on unless told --nopassthrough; older ones have
    none (and no such option)."""
    MOUNTPOINT.mkdir(exist_ok=True)
    args = [str(binary), "--foreground", "--num-threads=16", str(source), str(MOUNTPOINT)]
    if "--nopassthrough" in subprocess.run([str(binary), "--help"], capture_output=True, text=True).stdout:
        args.insert(1, "--nopassthrough")
    if clone_fd:
        args.insert(1, "--clone-fd")
    process = subprocess.Popen(args)
    deadline = time.monotonic() + 10
    while not os.path.ismount(MOUNTPOINT):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{binary} did not mount")
        time.sleep(0.05)
    return process


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
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--libfuse-hp", type=Path, help="libfuse's passthrough_hp, for the libfuse-hp variants")
    parser.add_argument("-o", dest="options", action="append", default=[])
    args = parser.parse_args()
    size = int(args.size_gb * GiB)
    files = make_source(args.source_dir, size, args.files)
    mounted = sorted(MOUNTPOINT / f.name for f in files)
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; known: {','.join(VARIANTS)}")
    if any(v.startswith("libfuse-hp") for v in variants) and args.libfuse_hp is None:
        parser.error("the libfuse-hp variants need --libfuse-hp PATH")
    results: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)
        print(f"{name:36s} {value:7.2f}", flush=True)

    for round_number in range(args.rounds):
        order = variants if round_number % 2 == 0 else list(reversed(variants))
        for variant in order:
            for use_mmap in (False, True):
                kind = "mmap" if use_mmap else "read"
                if variant == "direct":
                    record(f"direct {kind} GB/s", timed_pass(files, args.readers, use_mmap)[0])
                    continue
                if variant.startswith("libfuse-hp"):
                    process = libfuse_hp(args.libfuse_hp, args.source_dir, variant.endswith("clone"))
                    try:
                        rate, grown = timed_pass(mounted, args.readers, use_mmap)
                        record(f"{variant} {kind} GB/s", rate)
                        if use_mmap:
                            record(f"{variant} mmap page cache %", 100 * grown / size)
                    finally:
                        subprocess.run(["fusermount3", "-u", str(MOUNTPOINT)], check=False)
                        process.wait(timeout=30)
                    continue
                if variant == "cold":
                    shutil.rmtree(args.cache_dir, ignore_errors=True)
                elif not (args.cache_dir.exists() and any(args.cache_dir.rglob("*.data"))):
                    mount(args.source_dir, args.cache_dir, args.options)  # fill the cache once
                    try:
                        started = time.monotonic()
                        cli("prefetch", MOUNTPOINT)
                        wait_sealed(args.cache_dir, len(files))
                        print(f"cache filled and sealed in {time.monotonic() - started:.1f} s", flush=True)
                    finally:
                        cli("umount", MOUNTPOINT)
                mount(args.source_dir, args.cache_dir, args.options + VARIANT_OPTIONS.get(variant, []))
                try:
                    pid = status()["pid"]
                    cpu_before = sum(cpu_seconds(pid))
                    started = time.monotonic()
                    rate, grown = timed_pass(mounted, args.readers, use_mmap)
                    cpu = sum(cpu_seconds(pid)) - cpu_before
                    record(f"{variant} {kind} GB/s", rate)
                    record(f"{variant} {kind} daemon CPU s", cpu)
                    state = status()
                    served = state["metrics"]["bytes_served"]
                    opens = state["metrics"]["passthrough_opens"]
                    print(f"  {time.monotonic() - started:.1f} s; page cache beyond tmpfs +{100 * grown / size:.0f}% "
                          f"of the checkpoint; daemon served {served / size:.2f}x; passthrough opens {opens}; "
                          f"passthrough {state['passthrough']}", flush=True)
                    if use_mmap:
                        record(f"{variant} mmap page cache %", 100 * grown / size)
                    if variant in ("restart", "restart-always"):  # again on the same mount: every file verified
                        record(f"{variant}, verified {kind} GB/s", timed_pass(mounted, args.readers, use_mmap)[0])
                    if variant == "cold":
                        wait_sealed(args.cache_dir, len(files))
                finally:
                    cli("umount", MOUNTPOINT)
    print("\nsummary (min / max over rounds)")
    for name, values in results.items():
        print(f"{name:36s} {min(values):7.2f} {max(values):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

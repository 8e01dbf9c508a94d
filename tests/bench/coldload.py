"""Cold checkpoint loads through the mount from a latency-bound source (issue 14).

    python3 -m tests.bench.coldload [--size-gb 32] [--files 32] [--ranks 8] [--rtt-ms 1]
        [--stream-rate 2G] [--node-cap 10G] [--request 1M] [--rounds 2]
        [--variants "streams=2,fill_reads_max=2;streams=2"] [--read] [--py-spy DIR]

What a node of ranks meets on a cold start from Lustre or NFS, through a fusecache mount over
an empty cache whose source is latency-bound (latmount: each request to the source a round
trip plus its bytes at one stream's rate, all streams under the node's cap). With `--pattern
all` every rank loads every file (data parallel, each rank starting at a file of its own);
with `split` the ranks share the files out (each byte is loaded by one rank). Ranks mmap
(`--read`: read()). Reported per variant (a set of mount options; variants alternate,
`--rounds` times, medians): the checkpoint's bytes over the wall time from the ranks' start to
the last rank's end, that rate against the node cap, the bytes the daemon read from the source
against the checkpoint (each byte once is 1.000x), and the same load again on the same mount
once everything is cached ("warm": what the ranks themselves cost, the floor of any cold
load), and how much of the source the page cache holds right after the cold load (a source
on disk: a second copy of the checkpoint in RAM unless the daemon drops it), and when the
ranks' opens returned (one through passthrough waits for its file to complete: the ranks can
read only what has completed), and the daemon's CPU over the cold load. Source and cache on
tmpfs (/dev/shm) by default. With --py-spy, every cold load's daemon is sampled by py-spy
into DIR/<round>-<variant>.txt (raw collapsed stacks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from fusecache.config import parse_size

from .throughput import GiB, PySpy, cli, cpu_ticks, drop_caches, make_source, resident_fraction, timed_read

MOUNTPOINT = Path("/tmp/coldload-mnt")


def load(files: list[Path], args: argparse.Namespace) -> tuple[float, list[float]]:
    """Seconds the ranks take to load the files, the page cache dropped first, and when their
    opens returned (throughput.timed_read): the ranks can read only files already complete."""
    drop_caches()
    # "all": each rank from its own file on
    return timed_read(files, args.ranks, args.pattern, use_mmap=not args.read)


def load_once(args: argparse.Namespace, files: list[Path], options: list[str],
              spy: Path | None) -> tuple[float, float, dict]:
    """One cold load: (seconds, seconds of a warm load after it, the daemon's metrics after
    the cold one, with the CPU ticks it spent on the cold load); with spy, the cold load's
    Python stacks in the daemon (py-spy) go there."""
    shutil.rmtree(args.cache_dir, ignore_errors=True)
    MOUNTPOINT.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "tests.bench.latmount", args.source_dir, MOUNTPOINT,
               "--cache-dir", args.cache_dir, "--rtt-ms", args.rtt_ms, "--stream-rate", args.stream_rate,
               "--node-cap", args.node_cap, "--request", args.request]
    for option in options:
        command += ["-o", option]
    subprocess.run(list(map(str, command)), check=True)
    try:
        mounted = [MOUNTPOINT / f.name for f in files]
        pid = json.loads(cli("status", MOUNTPOINT, "--json"))["pid"]
        with PySpy(pid, spy):
            ticks = sum(cpu_ticks(pid))
            seconds, opened = load(mounted, args)
            ticks = sum(cpu_ticks(pid)) - ticks
        metrics = json.loads(cli("status", MOUNTPOINT, "--json"))["metrics"]
        metrics["daemon_ticks"] = ticks
        metrics["opened_at"] = opened
        metrics["source_resident"] = sum(resident_fraction(f) * f.stat().st_size for f in files)
        warm, _ = load(mounted, args)
    finally:
        cli("umount", MOUNTPOINT)
    return seconds, warm, metrics


def opens(metrics: dict, seconds: float) -> str:
    """When the ranks' opens returned, against the load's end."""
    times = metrics["opened_at"]
    return f"opens returned by {times[len(times) // 2]:.2f} (half), {times[-1]:.2f} s (all) of {seconds:.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=32)
    parser.add_argument("--files", type=int, default=32)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--rtt-ms", type=float, default=1.0)
    parser.add_argument("--stream-rate", default="2G")
    parser.add_argument("--node-cap", default="10G")
    parser.add_argument("--request", default="1M")
    parser.add_argument("--variants", default="streams=2,fill_reads_max=2;streams=2",
                        help="mount options of each variant, variants separated by ';'")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pattern", choices=("all", "split"), default="all")
    parser.add_argument("--read", action="store_true", help="ranks read() instead of mmap")
    parser.add_argument("--py-spy", type=Path, help="record each cold load's daemon with py-spy into this dir")
    parser.add_argument("--source-dir", type=Path, default=Path("/dev/shm/coldload-src"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/dev/shm/coldload-cache"))
    args = parser.parse_args()
    size = int(args.size_gb * GiB)
    files = make_source(args.source_dir, size, args.files)
    for stale in set(args.source_dir.iterdir()) - set(files):  # an earlier run's shards: siblings too
        stale.unlink()
    cap = parse_size(args.node_cap)
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(";")
    samples: dict[str, list[tuple[float, float, dict]]] = {v: [] for v in variants}
    for round_number in range(args.rounds):
        for variant in variants if round_number % 2 == 0 else reversed(variants):
            spy = args.py_spy / f"{round_number}-{variants.index(variant)}.txt" if args.py_spy else None
            seconds, warm, metrics = load_once(args, files, [variant] if variant else [], spy)
            samples[variant].append((seconds, warm, metrics))
            print(f"  {variant or 'defaults'}: {size / seconds / 1e9:.2f} GB/s (warm {size / warm / 1e9:.2f}), "
                  f"source {metrics['bytes_from_source'] / size:.3f}x, daemon served "
                  f"{metrics['bytes_served'] / size:.2f}x, passthrough opens {metrics['passthrough_opens']}, "
                  f"source in RAM after it {metrics['source_resident'] / size:.1%}; {opens(metrics, seconds)}; "
                  f"daemon {metrics['daemon_ticks'] / 100 / (size / 1e9):.2f} CPU-s per GB",
                  flush=True)
    shutil.rmtree(args.cache_dir, ignore_errors=True)
    print(f"{args.ranks} ranks ({args.pattern}, {'read()' if args.read else 'mmap'}) loading {args.size_gb:g} GiB in "
          f"{args.files} files from a source of {args.rtt_ms:g} ms a {args.request} request, "
          f"{args.stream_rate}/s a stream, {args.node_cap}/s a node; {os.cpu_count()} CPUs; median of "
          f"{args.rounds} alternating rounds")
    for variant in variants:
        seconds = statistics.median(s for s, _, _ in samples[variant])
        warm = statistics.median(w for _, w, _ in samples[variant])
        pulled = max(m["bytes_from_source"] for _, _, m in samples[variant])
        rate = size / seconds
        print(f"  {variant or 'defaults':<34} {rate / 1e9:6.2f} GB/s  {rate / cap:6.1%} of the node cap  "
              f"source bytes {pulled / size:.3f}x  warm {size / warm / 1e9:.2f} GB/s  "
              f"[{', '.join(f'{size / s / 1e9:.2f}' for s, _, _ in samples[variant])}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Another user's small read during a listing storm (audit 2, item 11).

    python3 -m tests.bench.storm [--threads 2000] [--seconds 20] [--dirs 200] [--files 200]

A root mount with allow_other; user `nobody` lists directories of it (listdir + lstat of every
entry, round and round) from `--threads` threads; meanwhile root opens and reads a 1-byte file
of the mount once every half second and the latencies are printed, beside the same read of
the source itself under the same storm. Run it with PYTHONPATH pointing at another build to
compare (the daemon is started as `python3 -m fusecache`, which inherits it). Needs root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.throughput import cli

STORM = r"""
import os, sys, threading, time
root, threads, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
dirs = sorted(os.listdir(root))
stop = time.monotonic() + seconds
def storm(i):
    while time.monotonic() < stop:
        d = os.path.join(root, dirs[i % len(dirs)])
        for name in os.listdir(d):
            os.lstat(os.path.join(d, name))
        i += 7
ts = [threading.Thread(target=storm, args=(i,), daemon=True) for i in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
"""


# the storm needs only the standard library, from an interpreter `nobody` may run
STORM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def small_reads(path: Path, seconds: float) -> list[float]:
    latencies = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        started = time.monotonic()
        with open(path, "rb") as f:
            f.read()
        latencies.append(time.monotonic() - started)
        time.sleep(0.5)
    return latencies


def report(name: str, latencies: list[float]) -> None:
    print(f"{name}: {len(latencies)} opens+reads, median {statistics.median(latencies) * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--dirs", type=int, default=200)
    parser.add_argument("--files", type=int, default=200)
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="storm-"))
    os.chmod(top, 0o755)
    source, mountpoint, cache = top / "src", top / "mnt", top / "cache"
    for d in range(args.dirs):
        (source / "tree" / f"d{d}").mkdir(parents=True)
        for i in range(args.files):
            (source / "tree" / f"d{d}" / f"f{i}").touch()
    (source / "small").write_bytes(b"x")
    for path in (source, source / "tree", *source.glob("tree/*")):
        os.chmod(path, 0o755)
    mountpoint.mkdir()
    cli("mount", source, mountpoint, "--cache-dir", cache, "-o", "allow_other")
    try:
        for name, root in (("source", source), ("mount", mountpoint)):
            storm = subprocess.Popen(["prlimit", "--nofile=16384", "runuser", "-u", "nobody", "--", STORM_PYTHON, "-c", STORM,
                                      str(root / "tree"), str(args.threads), str(args.seconds)])
            time.sleep(2)  # the storm is up
            report(f"{name} under a {args.threads}-thread listing storm by nobody",
                   small_reads(root / "small", args.seconds - 4))
            storm.wait()
    finally:
        cli("umount", mountpoint)
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

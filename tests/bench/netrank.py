"""One rank process of the network benchmark.

    python3 -m tests.bench.netrank DIR --rank R --world N --layout dp|tp
                                   [--prefetch-threads T] [--cgroup-procs FILE]

It joins its memory cgroup first (so everything it allocates and every page it faults in is
charged there), imports the loader, prints `ready`, waits for a line on stdin, loads, and
prints one JSON line: {"digest": ..., "seconds": ...}. The ready/go handshake keeps the
interpreter start-up of N processes on 2 cores out of the measured wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--layout", choices=("dp", "tp"), required=True)
    parser.add_argument("--prefetch-threads", type=int, default=0)
    parser.add_argument("--cgroup-procs", type=Path, help="cgroup.procs file to join before anything else")
    args = parser.parse_args()
    if args.cgroup_procs:
        args.cgroup_procs.write_text("0\n")  # "0": the writing process itself
    from tests.bench.netload import digest, start_prefetch  # after joining: numpy's memory counts

    print("ready", flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    if args.prefetch_threads:
        start_prefetch(args.directory, args.rank, args.world, args.prefetch_threads)
    result = digest(args.directory, args.rank, args.world, args.layout)
    print(json.dumps({"digest": result, "seconds": time.monotonic() - started}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`fusecache mount` over a latency-bound source: a Lustre-like source on any machine.

    python3 -m tests.bench.latmount SOURCE MOUNTPOINT --cache-dir DIR [--rtt-ms 1]
        [--stream-rate 2G] [--node-cap 10G] [--request 1M] [-o OPTION ...]

The daemon is fusecache's own, forked into the background as `fusecache mount` does, with one
change: its source is fillbench's LatencySource, so every read of the source costs a round trip
per request plus its bytes at one stream's rate, under the node's cap (fillbench.Link). Reads
through the mount, the cache, passthrough and the control socket are the product's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fusecache import cli, daemon
from fusecache.config import parse_size

from .fillbench import LatencySource, Link


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rtt-ms", type=float, default=1.0)
    parser.add_argument("--stream-rate", default="2G", help="bytes/s one stream moves")
    parser.add_argument("--node-cap", default="10G", help="bytes/s all streams move together")
    parser.add_argument("--request", default="1M", help="bytes of one request to the source")
    link_args, mount_args = parser.parse_known_args()
    link = Link(link_args.rtt_ms / 1000, parse_size(link_args.stream_rate), parse_size(link_args.node_cap))
    request = parse_size(link_args.request)

    def latency_source(root: Path, **source_options: bool) -> LatencySource:
        return LatencySource(root, link, request, **source_options)

    daemon.Source = latency_source  # the one place the daemon makes its source
    return cli.main(["mount", *mount_args])


if __name__ == "__main__":
    sys.exit(main())

"""How fast the cache fills from a latency-bound source: the engine in process, no FUSE.

    python3 -m tests.bench.fillbench [--size-gb 4] [--files 8] [--rtt-ms 1] [--stream-rate 2G]
        [--node-cap 10G] [--request 1M] [--variants "streams=2,fill_reads_max=2;streams=2"] [--rounds 2]

A Lustre or NFS client gives one sequential reader a fraction of what the node can pull:
each request costs a round trip plus its bytes at the stream's rate, and all streams share
the node's link. `LatencySource` models that over files on local storage (tmpfs by default):
every read of the source is split into requests of `--request` bytes, each taking `--rtt-ms`
plus its bytes at `--stream-rate`, and all of them together never faster than `--node-cap`.
The engine prefetches every file (as `fusecache prefetch` does) and the fill rate is reported
against the node cap, with the bytes read from the source against the data (each byte once).
Each variant is a set of mount options (`;` between variants); they run in alternation,
`--rounds` times, medians reported: the machine is shared. A variant `copy:N` is no fusecache
at all: N threads take the files' 32 MiB blocks in file order from one queue, read each from the
same source and pwrite it into the cache's filesystem (no checksum): what a naive parallel copy
gets from this source into this machine, to hold the engine's fill against.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import trio

from fusecache.budget import CacheBudget
from fusecache.config import build_config, parse_size
from fusecache.engine import Engine
from fusecache.metrics import Metrics
from fusecache.source import Identity, Source
from fusecache.store import CacheStore

from .throughput import GiB, MiB, make_source


class Link:
    """A node's link to the source: per-request latency and per-stream rate, under a cap on
    what all streams move together. Thread-safe: every fetch thread is one stream."""

    def __init__(self, rtt: float, stream_rate: float, node_cap: float) -> None:
        self.rtt = rtt
        self.stream_rate = stream_rate
        self.node_cap = node_cap
        self._lock = threading.Lock()
        self._node_free = 0.0  # when the node's link has moved everything asked of it so far

    def transfer(self, nbytes: int) -> None:
        """Block for as long as moving nbytes in one request takes."""
        now = time.monotonic()
        with self._lock:
            self._node_free = max(now, self._node_free) + nbytes / self.node_cap
            node_done = self._node_free
        done = max(now + self.rtt + nbytes / self.stream_rate, node_done)
        time.sleep(max(0.0, done - time.monotonic()))


class LatencySource(Source):
    """A Source whose reads cost what they would over `link`, in requests of request_size."""

    def __init__(self, root: Path, link: Link, request_size: int, **source_options: bool) -> None:
        super().__init__(root, **source_options)
        self.link = link
        self.request_size = request_size

    def read_exact(self, fd: int, buf: memoryview, offset: int, relpath: str, identity: Identity) -> None:
        for start in range(0, len(buf), self.request_size):
            self.link.transfer(min(self.request_size, len(buf) - start))
        super().read_exact(fd, buf, offset, relpath, identity)

    def copy_exact(self, fd: int, dev: int, dst_fd: int, offset: int, length: int, relpath: str,
                   identity: Identity) -> bool:
        """Never: a network source and a local cache are two filesystems, between which the
        kernel copies nothing (EXDEV since Linux 5.19): the fill reads, as from Lustre or NFS."""
        return False


def copy_once(source_dir: Path, names: list[str], cache: Path, link_shape: tuple[float, float, float],
              request: int, threads: int) -> tuple[float, int]:
    """The copy:N baseline: (seconds, bytes read from the source). The threads take the files'
    32 MiB blocks in file order from one queue, so one file is read by several at once."""
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    source = LatencySource(source_dir, Link(*link_shape), request)
    block = 32 * MiB
    files = {}
    for name in names:
        src = os.open(source_dir / name, os.O_RDONLY)
        files[name] = (src, os.open(cache / name, os.O_WRONLY | os.O_CREAT, 0o600), source.identity(os.fstat(src)))
    todo = [(name, offset) for name in names for offset in range(0, (source_dir / name).stat().st_size, block)]
    todo.reverse()
    lock = threading.Lock()

    def copy_blocks() -> None:
        buf = memoryview(bytearray(block))
        while True:
            with lock:
                if not todo:
                    return
                name, offset = todo.pop()
            src, dst, identity = files[name]
            view = buf[:min(block, identity.size - offset)]
            source.read_exact(src, view, offset, name, identity)
            os.pwrite(dst, view, offset)

    started = time.monotonic()
    workers = [threading.Thread(target=copy_blocks) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.monotonic() - started
    for src, dst, _identity in files.values():
        os.close(src)
        os.close(dst)
    shutil.rmtree(cache)
    return seconds, sum((source_dir / name).stat().st_size for name in names)


def fill_once(*args: object) -> tuple[float, int]:
    """One sample, in a process of its own: the engine keeps idle cache files open, which
    would hold the space of every earlier sample's (unlinked) cache."""
    with ProcessPoolExecutor(1) as pool:
        return pool.submit(trio.run, _fill, *args).result()


async def _fill(source_dir: Path, names: list[str], cache: Path, link_shape: tuple[float, float, float],
                request: int, options: list[str]) -> tuple[float, int]:
    """Prefetch every file into an empty cache; (seconds, bytes read from the source)."""
    link = Link(*link_shape)
    logging.basicConfig(level=logging.DEBUG if os.environ.get("FILLBENCH_DEBUG") else logging.WARNING,
                        format="    %(relativeCreated)6.0f ms %(name)s: %(message)s")
    logging.getLogger("fusecache.engine.fill").setLevel(logging.DEBUG if os.environ.get("FILLBENCH_DEBUG")
                                                        else logging.WARNING)
    shutil.rmtree(cache, ignore_errors=True)
    cfg = build_config(str(source_dir), "/nonexistent", ["readahead=off", *options], cache_dir=cache)
    store = CacheStore(cache, str(source_dir.resolve()))
    store.prepare()
    store.lock()
    metrics = Metrics()
    engine = Engine(cfg, LatencySource(source_dir, link, request), store, metrics, CacheBudget(1 << 62))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        started = time.monotonic()
        for name in names:
            engine.prefetch(name)
        while any(engine.stream_state(name)[0] for name in names):
            await trio.sleep(0.01)
        seconds = time.monotonic() - started
        errors = {name: engine.stream_state(name)[1] for name in names if engine.stream_state(name)[1]}
        if errors:
            raise SystemExit(f"prefetch failed: {errors}")
        nursery.cancel_scope.cancel()
    return seconds, metrics.bytes_from_source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--rtt-ms", type=float, default=1.0)
    parser.add_argument("--stream-rate", default="2G", help="bytes/s one stream moves")
    parser.add_argument("--node-cap", default="10G", help="bytes/s all streams move together")
    parser.add_argument("--request", default="1M", help="bytes of one request to the source")
    parser.add_argument("--variants", default="streams=2,fill_reads_max=2;streams=2",
                        help="mount options of each variant, variants separated by ';'")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--source-dir", type=Path, default=Path("/dev/shm/fill-src"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/dev/shm/fill-cache"))
    args = parser.parse_args()
    size = int(args.size_gb * GiB)
    paths = make_source(args.source_dir, size, args.files)
    names = [p.name for p in paths]
    link_shape = (args.rtt_ms / 1000, parse_size(args.stream_rate), parse_size(args.node_cap))
    request = parse_size(args.request)
    variants = args.variants.split(";")
    samples: dict[str, list[tuple[float, int]]] = {v: [] for v in variants}
    for _round in range(args.rounds):
        for variant in variants:
            if variant.startswith("copy:"):
                sample = copy_once(args.source_dir, names, args.cache_dir, link_shape, request,
                                   int(variant.removeprefix("copy:")))
            else:
                sample = fill_once(args.source_dir, names, args.cache_dir, link_shape, request,
                                   [variant] if variant else [])
            samples[variant].append(sample)
            print(f"  {variant}: {size / sample[0] / 1e9:.2f} GB/s", flush=True)
    shutil.rmtree(args.cache_dir, ignore_errors=True)
    print(f"{args.size_gb:g} GiB in {args.files} files from a source of {args.rtt_ms:g} ms a "
          f"{args.request} request, {args.stream_rate}/s a stream, {args.node_cap}/s a node; "
          f"{os.cpu_count()} CPUs; median of {args.rounds} alternating rounds")
    for variant in variants:
        seconds = statistics.median(s for s, _ in samples[variant])
        pulled = max(b for _, b in samples[variant])
        rate = size / seconds
        print(f"  {variant:<32} {rate / 1e9:6.2f} GB/s  {rate / link_shape[2]:6.1%} of the node cap  "
              f"source bytes {pulled / size:.3f}x  [{', '.join(f'{size / s / 1e9:.2f}' for s, _ in samples[variant])}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Counters the daemon keeps about itself, read by `fusecache status` and the tests.

Plain integers mutated on the trio thread, so no locking is needed, except the counters of
reads served, which the session's reader threads bump too (session/queues.py): those only
through `count_served` and `count_hits`, under a lock. Reader processes count in shared
memory of their own (session/processes.py), folded in (`fold`) at each snapshot and each
Prometheus collection. `snapshot()` turns them into a JSON-able dict for the control channel.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

log = logging.getLogger(__name__)


FETCH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class _Elsewhere:
    counts: Callable[[], tuple[int, int]]  # cumulative bytes served, chunk hits
    served: int = 0  # ... of which already in the counters
    hits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # two threads never fold the same bytes


@dataclass
class Metrics:
    bytes_from_source: int = 0  # read from SOURCE to fill the cache
    bytes_served: int = 0  # returned to readers through the mount
    bytes_served_from_cache: int = 0  # ... of which were already cached when asked for
    chunk_hits: int = 0  # chunks a read found ready
    chunk_misses: int = 0  # chunks a read had to wait for
    bytes_read_through: int = 0  # served straight from the source: no room in the cache
    bytes_served_direct: int = 0  # ... of which by the readers (threads or processes), from complete files
    fetch_errors: int = 0
    checksum_failures: int = 0
    files_streamed: int = 0
    files_evicted: int = 0
    passthrough_opens: int = 0  # opens the kernel serves from the cache file itself
    # the size of each file opened through passthrough, per open: the bytes those opens may
    # read from the cache without asking the daemon (the kernel's reads are not seen one by one)
    passthrough_bytes: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # fetch errors by kind (errno name)
    # fetch latency histogram: counts per upper bound in seconds (the last bucket is +Inf)
    fetch_seconds_buckets: list[int] = field(default_factory=lambda: [0] * (len(FETCH_BUCKETS) + 1))
    fetch_seconds_sum: float = 0.0
    # gauges, sampled from the engine once a second by the daemon
    cache_bytes: int = 0
    cache_limit_bytes: int = 0
    files_open: int = 0
    files_streaming: int = 0
    fill_reads: int = 0  # stream reads in flight
    fill_reads_limit: int = 0  # ... allowed now by the fill controller
    fill_buffer_bytes: int = 0  # memory their buffers hold
    passthrough_files: int = 0  # files with passthrough opens now
    inodes_held: int = 0  # inodes the kernel holds (looked up and not yet forgotten)
    pending_bytes: int = 0  # cache files unlinked while still open: freed at their last close
    started_at: float = field(default_factory=time.time)
    # (time, bytes_from_source) once a second over the last few seconds, for the current rate
    _samples: deque = field(default_factory=lambda: deque(maxlen=6), repr=False)
    _served_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # replies counted in other processes (the session's reader processes)
    _elsewhere: list[_Elsewhere] = field(default_factory=list, repr=False, compare=False)

    def count_elsewhere(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Fold what counts() says was served elsewhere (cumulative bytes and chunk hits, all
        from the cache, as direct replies) into the counters at each snapshot."""
        self._elsewhere.append(_Elsewhere(counts))

    def fold(self) -> None:
        """Bring the counters kept elsewhere in (any thread)."""
        for source in self._elsewhere:
            with source.lock:
                served, hits = source.counts()
                new_bytes, new_hits = served - source.served, hits - source.hits
                source.served, source.hits = served, hits
            self.count_served(new_bytes, from_cache=True, direct=True)
            self.count_hits(new_hits)

    def count_served(self, nbytes: int, from_cache: bool, read_through: bool = False, direct: bool = False) -> None:
        """A reply of nbytes went out (from any thread)."""
        with self._served_lock:
            self.bytes_served += nbytes
            if from_cache:
                self.bytes_served_from_cache += nbytes
            if read_through:
                self.bytes_read_through += nbytes
            if direct:
                self.bytes_served_direct += nbytes

    def count_hits(self, chunks: int) -> None:
        """A read found its chunks ready (from any thread)."""
        with self._served_lock:
            self.chunk_hits += chunks

    def observe_fetch(self, seconds: float) -> None:
        self.fetch_seconds_buckets[bisect.bisect_left(FETCH_BUCKETS, seconds)] += 1
        self.fetch_seconds_sum += seconds

    def count_error(self, kind: str) -> None:
        self.fetch_errors += 1
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def sample(self) -> None:
        self._samples.append((time.monotonic(), self.bytes_from_source))

    def source_rate(self) -> float:
        """Bytes per second read from the source over the last few seconds."""
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def hit_ratio(self) -> float | None:
        """The share of what readers got that the cache held when asked: bytes the daemon
        served from the cache, and the files opened through passthrough (a complete cache file
        the kernel reads itself: all of it from the cache), over both; None before any."""
        asked = self.bytes_served + self.passthrough_bytes
        return (self.bytes_served_from_cache + self.passthrough_bytes) / asked if asked else None

    def snapshot(self) -> dict:
        self.fold()
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        data["source_rate"] = self.source_rate()
        data["hit_ratio"] = self.hit_ratio()
        data["uptime_s"] = time.time() - self.started_at
        return data


class PrometheusCollector:
    """Exposes Metrics in the Prometheus format. Runs on prometheus_client's threads, so it
    only reads plain fields (copies of the dicts) and never touches the engine."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        m.fold()
        yield CounterMetricFamily("fusecache_source_bytes", "Bytes read from the source.", value=m.bytes_from_source)
        served = CounterMetricFamily("fusecache_served_bytes", "Bytes served to readers, by origin.", labels=["origin"])
        served.add_metric(["cache"], m.bytes_served_from_cache)
        served.add_metric(["fetched"], m.bytes_served - m.bytes_served_from_cache - m.bytes_read_through)
        served.add_metric(["read_through"], m.bytes_read_through)
        yield served
        lookups = CounterMetricFamily("fusecache_chunk_lookups", "Chunks looked up by reads.", labels=["result"])
        lookups.add_metric(["hit"], m.chunk_hits)
        lookups.add_metric(["miss"], m.chunk_misses)
        yield lookups
        errors = CounterMetricFamily("fusecache_errors", "Failed fetches by kind.", labels=["kind"])
        for kind, count in dict(m.errors).items():
            errors.add_metric([kind], count)
        yield errors
        yield CounterMetricFamily("fusecache_checksum_failures", "Cached chunks that failed their checksum.",
                                  value=m.checksum_failures)
        yield CounterMetricFamily("fusecache_evicted_files", "Files evicted from the cache.", value=m.files_evicted)
        yield CounterMetricFamily("fusecache_passthrough_opens", "Opens served by the kernel from the cache file.",
                                  value=m.passthrough_opens)
        yield CounterMetricFamily("fusecache_passthrough_bytes",
                                  "Size of each file opened through passthrough, per open (read by the kernel).",
                                  value=m.passthrough_bytes)
        counts = list(m.fetch_seconds_buckets)
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, FETCH_BUCKETS), "+Inf"], counts):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("fusecache_fetch_seconds", "Time to fetch a run of chunks from the source.",
                                    buckets=buckets, sum_value=m.fetch_seconds_sum)
        for name, doc, value in (
            ("fusecache_cache_bytes", "Bytes held in the cache.", m.cache_bytes),
            ("fusecache_cache_limit_bytes", "Cache size limit.", m.cache_limit_bytes),
            ("fusecache_files_open", "Files open or being fetched.", m.files_open),
            ("fusecache_files_streaming", "Files being streamed by readahead.", m.files_streaming),
            ("fusecache_fill_reads", "Stream reads in flight.", m.fill_reads),
            ("fusecache_fill_reads_limit", "Stream reads in flight allowed now.", m.fill_reads_limit),
            ("fusecache_fill_buffer_bytes", "Memory held by stream reads in flight.", m.fill_buffer_bytes),
            ("fusecache_passthrough_files", "Files with passthrough opens now.", m.passthrough_files),
            ("fusecache_inodes_held", "Inodes the kernel holds of the mount.", m.inodes_held),
            ("fusecache_pending_bytes", "Cache bytes unlinked but still open.", m.pending_bytes),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


def prometheus_registry(metrics: Metrics) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusCollector(metrics))
    return registry

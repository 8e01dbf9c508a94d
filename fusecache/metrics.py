"""Counters the daemon keeps about itself, read by `fusecache status` and the tests.

Plain integers mutated on the trio thread only, so no locking is needed; `snapshot()` turns
them into a JSON-able dict for the control channel.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Metrics:
    bytes_from_source: int = 0  # read from SOURCE to fill the cache
    bytes_served: int = 0  # returned to readers through the mount
    bytes_served_from_cache: int = 0  # ... of which were already cached when asked for
    chunk_hits: int = 0  # chunks a read found ready
    chunk_misses: int = 0  # chunks a read had to wait for
    fetch_errors: int = 0
    checksum_failures: int = 0
    files_streamed: int = 0
    started_at: float = field(default_factory=time.time)
    # (time, bytes_from_source) once a second over the last few seconds, for the current rate
    _samples: deque = field(default_factory=lambda: deque(maxlen=6), repr=False)

    def sample(self) -> None:
        self._samples.append((time.monotonic(), self.bytes_from_source))

    def source_rate(self) -> float:
        """Bytes per second read from the source over the last few seconds."""
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def snapshot(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        data["source_rate"] = self.source_rate()
        lookups = self.chunk_hits + self.chunk_misses
        data["hit_ratio"] = self.chunk_hits / lookups if lookups else None
        data["uptime_s"] = time.time() - self.started_at
        return data

"""How many stream reads run at once, node-wide, chosen by what the source delivers.

A network filesystem gives one sequential reader a fraction of what the node can pull (Lustre:
about 2 GiB/s a stream, 8.5 GiB/s with 32 per node; NFS with nconnect: 192 MB/s to 9 GB/s).
So streams keep several reads in flight, per file and across files, under one node-wide limit
(a trio.CapacityLimiter whose size this part tunes): it starts at `streams` or at half its
ceiling, whichever is more, doubles while the bytes the source delivers grow by a tenth or more
for it and reads are waiting for a slot, and goes back to the best size once they stop growing.
The window right after a change is not judged: reads started under the new limit land only a
read's time later, so a doubling takes a second, which a load of a few seconds cannot spare
(starting at `streams=2`, a cold load from the latency-bound source reached 62-64% of its cap,
starting at half the ceiling 75-80%: docs/benchmarks.md). Idle (nothing streaming), it starts
over: the next load may meet a source in another state. Demand reads do not take these slots.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import trio

log = logging.getLogger(__name__)

WINDOW = 0.5  # seconds over which the source's rate is measured between two decisions
GAIN = 1.10  # a larger limit is kept only if the rate grew by this much


@dataclass
class FillState:
    limit: int
    best_limit: int
    best_rate: float = 0.0
    growing: bool = True
    settling: bool = False  # the limit just changed: the next window is not judged


class FillController:
    def __init__(self, start: int, ceiling: int, source_bytes: Callable[[], int]) -> None:
        """start: the limit when idle; ceiling: the most reads ever in flight (the stream
        lane's threads and buffers); source_bytes: bytes read from the source so far."""
        self.start = max(1, min(start, ceiling))
        self.ceiling = ceiling
        self.slots = trio.CapacityLimiter(self.start)
        self._source_bytes = source_bytes
        self.state = FillState(self.start, self.start)

    @property
    def in_flight(self) -> int:
        return self.slots.borrowed_tokens

    async def run(self) -> None:
        """Tune the limit every WINDOW seconds, for the engine's lifetime."""
        last_bytes, last_time = self._source_bytes(), time.monotonic()
        while True:
            await trio.sleep(WINDOW)
            now_bytes, now = self._source_bytes(), time.monotonic()
            stats = self.slots.statistics()
            self.decide((now_bytes - last_bytes) / (now - last_time), stats.borrowed_tokens, stats.tasks_waiting)
            last_bytes, last_time = now_bytes, now

    def decide(self, rate: float, in_flight: int, waiting: int) -> None:
        """One decision, from the source's rate over the last window and how many reads are in
        flight and waiting for a slot now."""
        state = self.state
        if in_flight == 0 and waiting == 0:
            if state.limit != self.start or not state.growing:
                self.state = FillState(self.start, self.start)
                self._apply()
            return
        if state.settling:
            state.settling = False
            return
        if not state.growing or waiting == 0 or rate <= 0:
            # settled, or the limit does not bind, or no read landed in the window (reads
            # slower than a window): nothing to learn. A window of nothing was judged a limit
            # that gained nothing, and the limit stayed at its start until the next idle.
            return
        if rate > state.best_rate * GAIN:
            state.best_rate, state.best_limit = rate, state.limit
            if state.limit < self.ceiling:
                state.limit = min(self.ceiling, state.limit * 2)
                state.settling = True
            else:
                state.growing = False
        else:
            state.limit, state.growing = state.best_limit, False
            log.info("source delivers %.0f MB/s with %d stream reads in flight", state.best_rate / 1e6, state.limit)
        self._apply()

    def _apply(self) -> None:
        if self.slots.total_tokens != self.state.limit:
            log.debug("stream reads in flight: at most %d", self.state.limit)
        self.slots.total_tokens = self.state.limit

"""Single-flight fetching: make chunks of a file verified in the cache, each fetched once.

A *flight* fetches one run of contiguous chunks: it checks those an earlier daemon recorded
against their checksums, reads the missing ones from the source in one sequential read, and
stores them. While it runs its chunks are registered as in flight for their file, so whoever
needs one of them (a reader, a stream) waits for that flight instead of fetching again.

Flights run on *lanes*: a lane is a set of threads and a fixed pool of buffers (which bound the
daemon's memory). Demand reads have their own lane here, so a reader never queues behind
readahead; the stream scheduler brings its own. State changes only on the trio thread, with
one exception: a worker thread owns the chunks of the flight it runs and flips their state
when they are stored.
"""

from __future__ import annotations

import errno
import logging
import mmap
import time
from collections.abc import Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import trio

from ..budget import CacheBudget
from ..config import VERIFY_RUN_CHUNKS, VERIFY_THREADS, MountConfig
from ..logs import Throttle
from ..metrics import Metrics
from ..source import Source, SourceChanged
from .errors import CacheFull, ReadError, error_kind
from .evictor import Evictor
from .files import OpenFiles, TrackedFile
from .tasks import Tasks

log = logging.getLogger(__name__)
repeats = Throttle(log)  # warnings that can come with every read


@dataclass(frozen=True)
class FetcherConfig:
    """The demand lane's shape."""

    chunk_size: int
    # demand fetches run on threads of their own, so they never queue behind readahead
    fetch_threads: int

    @classmethod
    def from_mount(cls, cfg: MountConfig) -> FetcherConfig:
        return cls(chunk_size=cfg.chunk_size, fetch_threads=cfg.fetch_threads)


class Lane:
    """Threads and reusable buffers for one kind of fetch; buffers bound the daemon's memory.
    Buffers are anonymous mappings: their pages become resident only once a fetch uses them."""

    def __init__(self, threads: int, buffer_size: int, chunk_size: int) -> None:
        self.limiter = trio.CapacityLimiter(threads)
        self.threads = threads
        self.max_chunks = buffer_size // chunk_size
        self.flights = 0  # started and not finished: each holds or awaits one buffer
        self._send, self._receive = trio.open_memory_channel[memoryview](threads)
        for _ in range(threads):
            self._send.send_nowait(memoryview(mmap.mmap(-1, buffer_size)))

    @property
    def has_spare_thread(self) -> bool:
        """Whether a flight could start now with one thread still left for another."""
        return self.flights + 2 <= self.threads

    @asynccontextmanager
    async def buffer(self) -> AsyncIterator[memoryview]:
        buf = await self._receive.receive()
        try:
            yield buf
        finally:
            self._send.send_nowait(buf)


@dataclass(eq=False)
class Flight:
    """One fetch in progress for a run of chunks; waiters block on `done`."""

    chunks: range
    # fetched ahead of a sequential reader, not yet asked for: it yields to real demand (it
    # never waits for a buffer or evicts; if it cannot run at once it gives up)
    speculative: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


def contiguous_runs(indices: Iterable[int], max_len: int) -> list[range]:
    """Group sorted chunk indices into ranges of consecutive indices, each at most max_len long."""
    runs: list[range] = []
    start = prev = None
    for i in indices:
        if start is not None and i == prev + 1 and i - start < max_len:
            prev = i
            continue
        if start is not None:
            runs.append(range(start, prev + 1))
        start = prev = i
    if start is not None:
        runs.append(range(start, prev + 1))
    return runs


class Fetcher:
    """Flights for whoever needs chunks verified: readers (the demand lane, here), streams
    (their own lane), and speculative flights ahead of sequential readers."""

    def __init__(self, config: FetcherConfig, source: Source, files: OpenFiles, evictor: Evictor,
                 budget: CacheBudget, metrics: Metrics, tasks: Tasks, copies_take_turns: bool = False) -> None:
        """copies_take_turns: a cache in memory (tmpfs), where a kernel copy into a cache file
        is all memory work under the file's inode lock (CacheEntry.fill_run)."""
        self.source = source
        self.files = files
        self.evictor = evictor
        self.budget = budget
        self.metrics = metrics
        self.tasks = tasks
        self.copies_take_turns = copies_take_turns
        self.demand = Lane(config.fetch_threads, 2 * config.chunk_size, config.chunk_size)
        # Checking a whole file recorded by an earlier daemon before the kernel may read it
        # directly: CPU and memory bound (no source reads), so as wide as the machine.
        self.verify = Lane(VERIFY_THREADS, VERIFY_RUN_CHUNKS * config.chunk_size, config.chunk_size)
        self._inflight: dict[TrackedFile, dict[int, Flight]] = {}

    # ---- questions -------------------------------------------------------------------------

    def unclaimed(self, tracked: TrackedFile, chunks: range) -> list[int]:
        """The chunks that are neither verified nor being fetched by anyone."""
        inflight = self._inflight.get(tracked, {})
        return [i for i in tracked.entry.unverified(chunks) if i not in inflight]

    def flights_of(self, tracked: TrackedFile) -> list[Flight]:
        """The flights working on tracked's chunks now, each once."""
        return list(dict.fromkeys(self._inflight.get(tracked, {}).values()))

    def inflight_chunks(self, tracked: TrackedFile) -> int:
        return len(self._inflight.get(tracked, {}))

    @property
    def demand_limiter(self) -> trio.CapacityLimiter:
        """The demand lane's threads, which reads straight from the source use too."""
        return self.demand.limiter

    # ---- fetching --------------------------------------------------------------------------

    async def ensure(self, tracked: TrackedFile, chunks: range,
                     then: Callable[[], None] | None = None, lane: Lane | None = None) -> bool:
        """Wait until every chunk is verified in the cache; True if none had to be waited for.
        `then` is called once this call's own flights are started (fetching ahead goes after
        them); they run on `lane` (the demand lane unless given). Raises CacheFull, or
        ReadError(EIO) if a flight failed."""
        lane = lane or self.demand
        waited = False
        while True:
            inflight = self._inflight.get(tracked, {})
            flights: list[Flight] = []
            todo: list[int] = []
            for i in tracked.entry.unverified(chunks):
                flight = inflight.get(i)
                if flight is None:
                    todo.append(i)
                elif flight not in flights:
                    flights.append(flight)
            if (flights or todo) and not waited:
                self.metrics.chunk_misses += len(flights) + len(todo)
                waited = True
            for run in contiguous_runs(todo, lane.max_chunks):
                flights.append(self.start(tracked, run, lane))
            if then is not None:
                then()
                then = None
            if not flights:
                break
            for flight in flights:
                await flight.done.wait()
                if isinstance(flight.error, CacheFull):
                    raise flight.error
                if flight.error is not None:
                    raise ReadError(errno.EIO, f"{tracked.relpath}: {flight.error}")
        if not waited:
            self.metrics.count_hits(len(chunks))
        return not waited

    async def ensure_whole(self, tracked: TrackedFile, lane: Lane) -> None:
        """ensure() every chunk of tracked's file on lane, by as many tasks as the lane has
        threads, each a run at a time: one ensure() of a whole file started a flight and a
        task for every run at once (50,000 for a 400 GB single-file checkpoint). Raises as
        ensure() does, once the others stopped."""
        nchunks = tracked.entry.nchunks
        runs = iter(range(0, nchunks, lane.max_chunks))
        failed: list[Exception] = []

        async def take_runs(cancel: trio.CancelScope) -> None:
            try:
                for start in runs:
                    await self.ensure(tracked, range(start, min(nchunks, start + lane.max_chunks)), lane=lane)
            except (CacheFull, ReadError) as e:
                failed.append(e)
                cancel.cancel()

        async with trio.open_nursery() as nursery:
            for _ in range(lane.threads):
                nursery.start_soon(take_runs, nursery.cancel_scope)
        if failed:
            raise failed[0]

    def start_ahead(self, tracked: TrackedFile, window: range) -> None:
        """Start fetching the window's unclaimed chunks on the demand lane without waiting for
        them, as speculative flights: only with demand threads to spare (one is always left
        for real demand) and room in the cache without evicting anything (room for whole
        runs, cached or not: chunks that only need checking wait for a thread too)."""
        for run in contiguous_runs(self.unclaimed(tracked, window), self.demand.max_chunks):
            if not self.demand.has_spare_thread or not self.budget.fits(tracked.entry.run_extent(run)[1]):
                return
            self.start(tracked, run, self.demand, speculative=True)

    def start(self, tracked: TrackedFile, chunks: range, lane: Lane, speculative: bool = False) -> Flight:
        """Start a flight for chunks (none of them claimed) on lane; it runs in the background."""
        flight = Flight(chunks, speculative)
        lane.flights += 1
        inflight = self._inflight.setdefault(tracked, {})
        for i in chunks:
            inflight[i] = flight
        self.files.ref(tracked)
        self.tasks.start_soon(self._fly, tracked, flight, lane)
        return flight

    async def _fly(self, tracked: TrackedFile, flight: Flight, lane: Lane) -> None:
        entry = tracked.entry
        room = entry.missing_bytes(flight.chunks)
        reserved = 0
        started = time.monotonic()
        try:
            async with lane.buffer() as buf:  # room is reserved only once the fetch can run
                if flight.speculative and not self.budget.fits(room):
                    return  # nobody asked for these chunks yet: never evict for them
                await self.evictor.make_room(tracked.relpath, room)
                self.budget.reserved += room
                reserved = room
                take_turns = self.copies_take_turns and lane is not self.demand
                fetched, bad = await self.tasks.io(self._materialize, tracked, flight.chunks, buf, take_turns,
                                                   limiter=lane.limiter)
            self.metrics.bytes_from_source += fetched
            self.metrics.checksum_failures += bad
            self.metrics.observe_fetch(time.monotonic() - started)
        except CacheFull as e:
            flight.error = e
        except OSError as e:
            # no room on the cache filesystem, or in the address space to map its file: read through
            flight.error = CacheFull(str(e)) if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM) else e
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                await self.evictor.after_disk_full(tracked.relpath)
            self.metrics.count_error(error_kind(e))
            repeats.warning("fetching %s chunks %d-%d failed: %s", tracked.relpath,
                            flight.chunks.start, flight.chunks.stop - 1, e)
        except Exception as e:  # noqa: BLE001 - any failure becomes the readers' EIO, not a crash
            flight.error = e
            self.metrics.count_error(error_kind(e))
            log.exception("fetching %s chunks %d-%d failed", tracked.relpath, flight.chunks.start, flight.chunks.stop - 1)
        finally:
            lane.flights -= 1
            self.budget.reserved -= reserved
            inflight = self._inflight.get(tracked, {})
            for i in flight.chunks:
                if inflight.get(i) is flight:
                    del inflight[i]
            if not inflight:
                self._inflight.pop(tracked, None)
            flight.done.set()
            try:  # last: a cache filesystem failing its fstat must neither strand the waiters nor end the engine
                if self.files.is_current(tracked):
                    self.budget.set_cached(tracked.relpath, entry.cached_bytes(), entry.disk_bytes())
            except OSError as e:
                log.warning("cannot account the cache file of %s: %s", tracked.relpath, e)
            finally:
                self.files.unref(tracked)

    def _materialize(self, tracked: TrackedFile, chunks: range, buf: memoryview,
                     take_turns: bool) -> tuple[int, int]:
        """Worker thread: make chunks verified. Chunks recorded by an earlier run are checked
        against their checksum; the rest are copied from the source in one sequential copy
        per contiguous run, straight into the cache file (CacheEntry.fill_run: inside the
        kernel, or read into a mapping of it; buf only where the cache filesystem cannot
        reserve space). With take_turns (the streams' lanes, on a cache in memory) kernel copies
        into one file take turns; a reader's (the demand lane's) never waits behind them.
        Returns (bytes read from source, checksum failures)."""
        entry = tracked.entry
        bad = entry.verify_recorded(chunks, buf)
        fetched = 0
        for run in contiguous_runs(entry.missing(chunks), len(chunks)):
            start = entry.chunk_extent(run.start)[0]

            def read(target: memoryview, start: int = start) -> None:
                self.source.read_exact(tracked.src_fd, target, start, entry.relpath, entry.identity)

            def copy(data_fd: int, offset: int, length: int) -> bool:
                return self.source.copy_exact(tracked.src_fd, tracked.opened.st_dev, data_fd, offset, length,
                                              entry.relpath, entry.identity)

            length = entry.fill_run(run, read, buf, copy, take_turns)
            self.drop_source_pages(tracked, start, length)
            fetched += length
        return fetched, bad

    def drop_source_pages(self, tracked: TrackedFile, start: int, length: int) -> None:
        """Worker thread: the source's pages of a stored range may go (Source.drop_pages): the
        cache's copy is the one to keep in memory. A stream calls it for its whole file once
        complete, for what the kernel read ahead of the runs after their own pages went."""
        if tracked.entry.cacheable:
            self.source.drop_pages(tracked.src_fd, start, length)


async def await_flight(flight: Flight) -> None:
    """Wait for a flight someone else started; its failure raised as what a stream reports."""
    await flight.done.wait()
    if isinstance(flight.error, SourceChanged):
        raise flight.error
    if flight.error is not None:
        raise ReadError(errno.EIO, str(flight.error))

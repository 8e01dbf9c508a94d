"""The stream scheduler: whole files streamed into the cache, and fetching ahead of readers.

A *stream* walks one file block by block (`stream_read_size`) on the stream lane, fetching
every chunk nobody has claimed, with as many reads in flight as the fill controller allows
(fill.py: node-wide, tuned to what the source delivers), and ends only when the whole file is
verified, or with an error: then a waiting `fusecache prefetch` reports success or that error, never hangs. Streams
come from automatic readahead (the checkpoint policy says which files an open streams) and from
`prefetch`; `streams` workers take files off one queue. (Fetching ahead of one sequential
reader is window.py's.)
"""

from __future__ import annotations

import errno
import logging
import math
from dataclasses import dataclass

import trio

from ..config import MountConfig
from ..logs import Throttle
from ..metrics import Metrics
from ..source import Identity, SourceChanged
from .errors import ReadError, VersionReplaced
from .fetcher import Fetcher, Flight, Lane, await_flight, contiguous_runs
from .fill import FillController
from .files import OpenFiles, TrackedFile, seal
from .shards import CheckpointPolicy
from .tasks import Tasks

log = logging.getLogger(__name__)
repeats = Throttle(log)  # warnings that can come with every open

# How often a prefetched file may change in the source under its stream before it is given up.
MAX_STREAM_REPLACEMENTS = 3


@dataclass(frozen=True)
class StreamConfig:
    """What to stream, in what reads, and how many at once."""

    chunk_size: int
    streams: int  # files streamed at once
    stream_read_size: int  # bytes of one sequential read of a stream
    fill_reads_max: int  # most stream reads in flight node-wide

    @classmethod
    def from_mount(cls, cfg: MountConfig) -> StreamConfig:
        return cls(chunk_size=cfg.chunk_size, streams=cfg.streams, stream_read_size=cfg.stream_read_size,
                   fill_reads_max=cfg.stream_reads)


@dataclass
class StreamRecord:
    """Where one path stands with streaming."""

    auto: bool = False  # automatic readahead queued its current version: opens do not queue it again
    # the version its last stream ran on (None: none ran yet): an open of another one queues
    # it again, since retiring the version (version_gone) is not the only way a new one comes
    # (an idle file closed, then the source rewritten)
    streamed: Identity | None = None
    pending: bool = False  # a stream of it is queued or running
    explicit: bool = False  # a prefetch asked for it: retried if the file changes, its outcome kept
    replacements: int = 0  # times the file changed under the stream a prefetch asked for
    error: str | None = None  # how the last stream a prefetch asked for ended, if it failed

    @property
    def idle(self) -> bool:
        return not (self.auto or self.pending or self.explicit or self.error)


class StreamScheduler:
    """Queues files to stream, runs `streams` workers over the queue, and tells how each
    path's streams went."""

    def __init__(self, config: StreamConfig, files: OpenFiles, fetcher: Fetcher, policy: CheckpointPolicy,
                 metrics: Metrics, tasks: Tasks) -> None:
        self.config = config
        self.files = files
        self.fetcher = fetcher
        self.policy = policy
        self.metrics = metrics
        self.tasks = tasks
        self.lane = Lane(config.fill_reads_max, config.stream_read_size, config.chunk_size)
        self.fill = FillController(max(config.streams, config.fill_reads_max // 2), config.fill_reads_max,
                                   lambda: metrics.bytes_from_source)
        self._send, self._receive = trio.open_memory_channel[str](math.inf)
        self._records: dict[str, StreamRecord] = {}
        self._streaming: set[TrackedFile] = set()  # the versions being streamed now
        # finding sibling shards lists directories and parses indexes: on threads of its own,
        # so a slow listing never holds up lookups
        self._planning = trio.CapacityLimiter(2)

    def start_workers(self) -> None:
        for _ in range(self.config.streams):
            self.tasks.start_soon(self._worker)
        self.tasks.start_soon(self.fill.run)

    def _record(self, relpath: str) -> StreamRecord:
        return self._records.setdefault(relpath, StreamRecord())

    def _tidy(self, relpath: str) -> None:
        record = self._records.get(relpath)
        if record is not None and record.idle:
            del self._records[relpath]

    # ---- what asks for streams ---------------------------------------------------------------

    def opened(self, relpath: str, identity: Identity) -> None:
        """A version of a file was opened: stream it (and its siblings) if the checkpoint
        policy says so, unless automatic readahead queued or streamed that version already."""
        record = self._records.get(relpath)
        if record is not None and record.streamed not in (None, identity):
            record.auto = False  # it streamed another version
        if (record is None or not record.auto) and self.policy.streams_on_open(relpath, identity.size):
            self.tasks.start_soon(self._schedule_readahead, relpath)

    def version_gone(self, relpath: str) -> None:
        """relpath's version was retired or evicted: its next open streams it again."""
        record = self._records.get(relpath)
        if record is not None:
            record.auto = False
            self._tidy(relpath)

    async def _schedule_readahead(self, relpath: str) -> None:
        """Queue relpath and, if it is the first shard opened in its directory, all its sibling
        shards (the directory is listed once per mount, not once per open)."""
        self._enqueue_auto(relpath)
        if not self.policy.first_in_directory(relpath):
            return
        try:
            siblings = await self.tasks.io(self.policy.sibling_shards, relpath, limiter=self._planning)
        except Exception as e:  # noqa: BLE001 - readahead is an optimisation: never fatal
            log.warning("cannot list the siblings of %s: %s", relpath, e)
            self.policy.rescan_later(relpath)
            return
        for path in siblings:
            self._enqueue_auto(path)

    def _enqueue_auto(self, relpath: str) -> None:
        record = self._record(relpath)
        if not record.auto:
            record.auto = True
            self._queue(relpath)

    def prefetch(self, relpath: str) -> None:
        """Stream a file whole into the cache, whatever the readahead settings; the outcome is
        then told by state(). Cheap for a file already cached: its stream finds every chunk
        verified."""
        record = self._record(relpath)
        record.explicit = True
        record.error = None
        record.replacements = 0
        self._queue(relpath)

    def state(self, relpath: str) -> tuple[bool, str | None]:
        """(whether a stream of relpath is queued or running, the error the last one ended with)."""
        record = self._records.get(relpath)
        return (False, None) if record is None else (record.pending, record.error)

    def running(self) -> int:
        return len(self._streaming)

    def fill_state(self) -> tuple[int, int, int]:
        in_flight = self.fill.in_flight
        return in_flight, self.fill.state.limit, in_flight * self.config.stream_read_size

    def is_streaming(self, tracked: TrackedFile) -> bool:
        return tracked in self._streaming

    def _queue(self, relpath: str) -> None:
        record = self._record(relpath)
        if not record.pending:
            record.pending = True
            self._send.send_nowait(relpath)

    # ---- streaming --------------------------------------------------------------------------

    async def _worker(self) -> None:
        async for relpath in self._receive:
            record = self._record(relpath)
            try:
                await self._stream_file(relpath)
            except VersionReplaced:
                self._replaced(relpath, record)
            except Exception as e:  # noqa: BLE001 - one file's failure must not stop the streams
                self._failed(relpath, record, e)
            else:
                record.pending = record.explicit = False
                record.replacements = 0
            finally:
                self._tidy(relpath)

    def _replaced(self, relpath: str, record: StreamRecord) -> None:
        """The file changed in the source while streaming. A prefetch wants the file as it is
        now: stream the new version (a file that keeps changing ends in an error); automatic
        readahead waits for the next open of the new version."""
        record.pending = False
        if not record.explicit:
            log.info("%s changed in the source while being streamed", relpath)
            return
        record.replacements += 1
        if record.replacements > MAX_STREAM_REPLACEMENTS:
            self._failed(relpath, record, ReadError(errno.ESTALE, "it keeps changing in the source"))
            return
        log.info("%s changed in the source while being prefetched; fetching the new version", relpath)
        self._queue(relpath)

    def _failed(self, relpath: str, record: StreamRecord, error: Exception) -> None:
        if not isinstance(error, (OSError, ReadError)):
            log.error("readahead of %s failed", relpath, exc_info=error)
        repeats.warning("readahead of %s stopped: %s", relpath, error)
        record.pending = record.auto = False  # the next open tries again
        record.replacements = 0
        if record.explicit:
            record.explicit = False
            record.error = str(error)

    async def _stream_file(self, relpath: str) -> None:
        """Fetch every chunk of the file that is not verified, block by block, then wait for
        the flights others started. Returns once the whole file is verified in the cache;
        raises VersionReplaced if the file changed in the source meanwhile, or the error
        that kept a chunk from being fetched."""
        tracked = await self.files.acquire(relpath)
        self._record(relpath).streamed = tracked.entry.identity
        self._streaming.add(tracked)
        try:
            if not tracked.entry.cacheable:
                raise ReadError(errno.ENOSPC, "no space in the cache")
            # two passes: a chunk demoted for re-verification behind the first is checked by the second
            for _pass in range(2):
                await self._stream_pass(tracked)
                if tracked.entry.complete:
                    if not self.files.is_current(tracked):  # a retired version, complete: not the file
                        raise VersionReplaced(relpath)
                    self.metrics.files_streamed += 1
                    await seal(self.tasks, tracked)
                    # what the kernel read ahead of the runs, after each run's own pages went
                    await self.tasks.io(self.fetcher.drop_source_pages, tracked, 0, tracked.entry.size)
                    return
            raise ReadError(errno.EIO, f"{tracked.entry.unverified_count()} chunks could not be fetched")
        except Exception as e:
            replaced = not self.files.is_current(tracked) or isinstance(e, SourceChanged)
            if tracked.entry.cacheable and replaced and not isinstance(e, VersionReplaced):
                raise VersionReplaced(relpath) from e
            raise
        finally:
            self._streaming.discard(tracked)
            self.files.unref(tracked)

    async def _stream_pass(self, tracked: TrackedFile) -> None:
        """Start a flight for every run of chunks nobody has fetched, each once a fill slot is
        free, in file order; then wait for all of them, and for the flights demand reads
        started. The first failure stops new flights and is raised once the others landed."""
        per_block = self.lane.max_chunks
        failures: list[BaseException] = []
        async with trio.open_nursery() as landing:
            for block_start in range(0, tracked.entry.nchunks, per_block):
                if not self.files.is_current(tracked):
                    failures.append(VersionReplaced(tracked.relpath))
                block = range(block_start, min(block_start + per_block, tracked.entry.nchunks))
                # looked at again before each flight: demand reads may have started some meanwhile
                while not failures and self.fetcher.unclaimed(tracked, block):
                    slot = object()
                    await self.fill.slots.acquire_on_behalf_of(slot)
                    run = contiguous_runs(self.fetcher.unclaimed(tracked, block), per_block)
                    if not run:  # fetched by someone else while this waited for a slot
                        self.fill.slots.release_on_behalf_of(slot)
                        continue
                    landing.start_soon(self._land, self.fetcher.start(tracked, run[0], self.lane), slot, failures)
                if failures:
                    break
        if failures:
            raise failures[0]
        while flights := self.fetcher.flights_of(tracked):  # chunks that demand reads are fetching
            await await_flight(flights[0])

    async def _land(self, flight: Flight, slot: object, failures: list[BaseException]) -> None:
        try:
            await await_flight(flight)
        except Exception as e:  # noqa: BLE001 - told to the stream, which raises the first
            failures.append(e)
        finally:
            self.fill.slots.release_on_behalf_of(slot)

"""The readahead engine: turns reads of byte ranges into cached chunks, fetching each once.

Everything here runs on the trio thread except the bodies handed to worker threads
(`_materialize`, store and source calls). State is only mutated on the trio thread, with one
exception: a worker thread owns the chunks of the flight it runs (they are marked in flight,
so nothing else touches them) and flips their state byte when they are stored.

Two lanes feed the store:
- the demand lane fetches the chunks a reader is waiting for, on its own threads and buffers,
  so a read never queues behind readahead;
- the stream lane walks whole files (and their sibling shards) block by block, skipping
  chunks that are cached or already in flight.
Both register their work in the same per-file `inflight` map, so a chunk is fetched once,
whoever asked first, and everybody else waits for that one fetch (single-flight).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import mmap
import os
import re
import resource
import stat as stat_mod
import time
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, TypeVar

import trio

from . import acl
from .budget import CacheBudget
from .config import MountConfig
from .metrics import Metrics
from .source import Identity, Source, SourceChanged, is_under, is_valid_name
from .store import MISSING, ON_DISK, VERIFIED, CacheEntry, CacheStore

log = logging.getLogger(__name__)

T = TypeVar("T")

SHARD_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_INDEX_FILE_RE = re.compile(r".*\.index\.json$")
# Idle files (no handle open) whose fds and verified-chunk state are kept, so a loader that
# opens and closes shards repeatedly does not re-verify them each time.
MAX_IDLE_FILES = 256
FDS_PER_FILE = 3
# Descriptors never given to open files: lookups, directory reads, the control socket and the
# log need some even while every file a user could open is open.
FD_RESERVE = 128
REPLY_BUFFER_MIN = 1 << 20
# A checkpoint index (model.safetensors.index.json) is a few MiB even for the largest models;
# anything bigger is not one, and reading it whole would cost the daemon its memory.
MAX_INDEX_SIZE = 64 << 20
# How often a prefetched file may change in the source under its stream before it is given up.
MAX_STREAM_REPLACEMENTS = 3


class CacheFull(Exception):
    """No room in the cache for a fetch, even after evicting what may be evicted.
    Readers then get their bytes straight from the source (read-through)."""


class VersionReplaced(Exception):
    """The file changed in the source; the version being worked on is no longer served."""


class ReadError(Exception):
    """A read cannot be answered; errno is what the reader gets."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(eq=False)
class Flight:
    """One fetch in progress for a run of chunks; waiters block on `done`."""

    chunks: range
    # fetched ahead of a sequential reader, not yet asked for: it yields to real demand (it
    # never waits for a buffer or evicts; if it cannot run at once it gives up)
    speculative: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


@dataclass(eq=False)
class TrackedFile:
    """Engine state of one version of one file: its cache entry, source fd and flights."""

    relpath: str
    entry: CacheEntry
    src_fd: int
    users: int = 0  # open handles, running streams and flights
    inflight: dict[int, Flight] = field(default_factory=dict)
    streaming: bool = False
    closed: bool = False

    @property
    def identity(self) -> Identity:
        return self.entry.identity

    @property
    def fds(self) -> int:
        """Descriptors it holds: the source file's, and the cache entry's data and index."""
        return FDS_PER_FILE if self.entry.cacheable else 1

    def close_fds(self) -> None:
        """Blocking: close the cache entry and the source fd."""
        self.entry.close()
        os.close(self.src_fd)


@dataclass(eq=False)
class Handle:
    """One open() of a file through the mount."""

    tracked: TrackedFile
    keep_cache: bool
    next_offset: int | None = None  # where the last read ended: a read near it is sequential


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

    @asynccontextmanager
    async def buffer(self) -> AsyncIterator[memoryview]:
        buf = await self._receive.receive()
        try:
            yield buf
        finally:
            self._send.send_nowait(buf)


class KeyedLock:
    """One trio.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[trio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str, wait: bool = True) -> AsyncIterator[None]:
        """Hold key's lock; with wait=False raise trio.WouldBlock at once if it is taken."""
        lock, users = self._locks.get(key, (trio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            if wait:
                await lock.acquire()
            else:
                lock.acquire_nowait()
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


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


def is_shard(relpath: str) -> bool:
    return relpath.endswith(SHARD_SUFFIXES)


class Engine:
    def __init__(self, config: MountConfig, source: Source, store: CacheStore, metrics: Metrics,
                 budget: CacheBudget, serve_from_memory: bool = False) -> None:
        self.config = config
        self.source = source
        self.store = store
        self.metrics = metrics
        self.budget = budget
        self.pins: set[str] = set()
        # A cache in memory is served by mapping its files: the reply is copied straight from
        # the cache's pages to the kernel, with no thread round trip. On disk a mapped page may
        # have to be read back, which must not stall the event loop: there, worker threads read.
        self.serve_from_memory = serve_from_memory
        self._files: dict[str, TrackedFile] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()
        self._opening = KeyedLock()
        self._served_identity: dict[str, Identity] = {}
        self._reply_buffers: dict[object, bytearray] = {}
        self._metadata_limiter = trio.CapacityLimiter(16)
        # finding sibling shards lists directories and parses indexes: on threads of its own,
        # so a slow listing never holds up lookups
        self._planning_limiter = trio.CapacityLimiter(2)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._fd_budget = max(16, (soft if soft != resource.RLIM_INFINITY else 1 << 20) - FD_RESERVE)
        self._max_idle = min(MAX_IDLE_FILES, max(4, self._fd_budget // (4 * FDS_PER_FILE)))
        self._fds = 0  # held by tracked files and open directories
        self._serve_limiter = trio.CapacityLimiter(config.workers)
        self.demand = Lane(config.fetch_threads, 2 * config.chunk_size, config.chunk_size)
        self.stream = Lane(config.streams, config.block_size, config.chunk_size)
        self._stream_send, self._stream_receive = trio.open_memory_channel[str](math.inf)
        self._auto_streamed: set[str] = set()
        self._streams_pending: set[str] = set()
        self._explicit: set[str] = set()
        self._replacements: dict[str, int] = {}
        self._scanned_dirs: set[str] = set()
        self.stream_errors: dict[str, str] = {}
        self._nursery: trio.Nursery | None = None

    # ---- lifecycle -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load what the store holds, then own the background work (flights, streams)."""
        await self._io(self.store.prune_unusable)
        for entry in await self._io(self.store.entries):
            self.budget.set_cached(entry["path"], entry["cached"], entry["last_used"])
        self.pins = await self._io(self.store.load_pins)
        log.info("cache holds %d files, %d bytes (limit %d)", len(self.budget.files()),
                 self.budget.used, self.budget.limit)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for _ in range(self.config.streams):
                nursery.start_soon(self._stream_worker)
            task_status.started()
            await trio.sleep_forever()

    async def _io(self, fn: Callable[..., T], *args: object, limiter: trio.CapacityLimiter | None = None) -> T:
        """Run a blocking call on a worker thread. Out of descriptors, idle files give theirs
        back and the call is tried once more."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=limiter or self._metadata_limiter)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or not self._idle:
                raise
        await self._close_idle(len(self._idle))
        return await trio.to_thread.run_sync(fn, *args, limiter=limiter or self._metadata_limiter)

    async def _claim_fds(self, n: int, share: int = 0) -> None:
        """Count n more descriptors as held, closing idle files to make room. When files in
        use hold the whole budget, only the open asking fails (EMFILE), never other requests.
        `share`: how much of the reserve this claim may use (open directories may use half:
        files cannot starve them, and they cannot starve lookups)."""
        budget = self._fd_budget + share
        excess = self._fds + n - budget
        if excess > 0 and self._idle:
            await self._close_idle(-(-excess // FDS_PER_FILE))
        if self._fds + n > budget:
            log.warning("%d descriptors are held by files open through the mount: refusing one more open",
                        self._fds)
            raise OSError(errno.EMFILE, "too many files open through the mount")
        self._fds += n

    async def _close_idle(self, count: int) -> None:
        """Close the count least recently used idle files now (not in the background: the
        caller needs their descriptors)."""
        victims = []
        while self._idle and len(victims) < count:
            relpath, _ = self._idle.popitem(last=False)
            tracked = self._files.pop(relpath)
            tracked.closed = True
            self._fds -= tracked.fds
            victims.append(tracked)
        for tracked in victims:
            await trio.to_thread.run_sync(tracked.close_fds)

    # ---- metadata ----------------------------------------------------------------------

    async def lstat(self, relpath: str) -> os.stat_result:
        """lstat the source; a changed identity retires the cached version for new opens."""
        st = await self._io(self.source.lstat, relpath)
        tracked = self._files.get(relpath)
        # ctime alone is not enough: a network filesystem's cached attributes may lag the
        # open file's, and a full re-validation on the next open catches a real change anyway
        if tracked is not None and not self.source.identity(st).same_content(tracked.identity):
            log.info("%s changed in the source; its cached copy is dropped", relpath)
            self._retire(tracked)
        return st

    async def opendir(self, relpath: str) -> int:
        """A source descriptor to read the directory from, counted against the budget."""
        await self._claim_fds(1, share=FD_RESERVE // 2)
        try:
            return await self._io(self.source.opendir, relpath)
        except BaseException:
            self._fds -= 1
            raise

    async def readdir(self, fd: int, offset: int) -> list[tuple[str, int, os.stat_result]]:
        return await self._io(self.source.readdir, fd, offset)

    def closedir(self, fd: int) -> None:
        self._fds -= 1
        self._spawn(os.close, fd)

    async def fstat(self, handle: Handle) -> os.stat_result:
        """Attributes of the file a handle has open (its size and mtime may have moved on
        since: `handle.tracked.identity` has the version's). Referenced meanwhile, so a
        concurrent release cannot close the fd under the call."""
        self._ref(handle.tracked)
        try:
            return await self._io(os.fstat, handle.tracked.src_fd)
        finally:
            self._unref(handle.tracked)

    async def check_access(self, relpath: str, want: int, uid: int, gid: int, pid: int) -> None:
        """Refuse (EACCES) what the source's POSIX ACLs deny the requester: `want` (acl.R, X)
        on relpath, search on every directory above it. The kernel checked the mode bits."""
        if uid == 0 or not self.source.has_acls:
            return
        try:
            chain = await self._io(self.source.acl_chain, relpath)
        except acl.MalformedAcl as e:
            log.warning("denying access below a malformed ACL (%s): %s", relpath, e)
            raise OSError(errno.EACCES, "malformed ACL") from None
        if all(entry_acl is None for _st, entry_acl in chain):
            return
        groups = await self._io(acl.requester_groups, pid, gid)
        wants = [acl.X] * (len(chain) - 1) + [want]
        if not all(acl.check(entry_acl, st, uid, groups, bits) for (st, entry_acl), bits in zip(chain, wants)):
            raise OSError(errno.EACCES, f"denied by an ACL: {relpath}")

    async def readlink(self, relpath: str) -> str:
        return await self._io(self.source.readlink, relpath)

    async def statvfs(self) -> os.statvfs_result:
        return await self._io(self.source.statvfs)

    # ---- open / release ----------------------------------------------------------------

    async def open(self, relpath: str) -> Handle:
        """Open relpath, validating any cached copy against the source's current identity."""
        tracked = await self._acquire(relpath)
        identity = tracked.identity
        # The kernel may hold pages of an older version of this file: keep_cache only if the
        # version it last saw through this mount is this one.
        keep_cache = self._served_identity.get(relpath, identity) == identity
        self._served_identity[relpath] = identity
        now = time.time()
        self.budget.touch(relpath, now)
        if tracked.entry.cacheable:
            self._spawn(self.store.touch, relpath, now)
            if self.config.readahead != "off":
                self._nursery.start_soon(self._schedule_readahead, relpath, identity.size)
        return Handle(tracked, keep_cache)

    async def release(self, handle: Handle) -> None:
        self._unref(handle.tracked)

    async def _acquire(self, relpath: str) -> TrackedFile:
        """The current TrackedFile of relpath, with one more user; created or replaced as needed."""
        async with self._opening.hold(relpath):
            # claimed up front, for a file opened anew; given back if the file is tracked already
            await self._claim_fds(FDS_PER_FILE)
            try:
                src_fd, identity = await self._io(self.source.open, relpath)
            except BaseException:
                self._fds -= FDS_PER_FILE
                raise
            tracked = self._files.get(relpath)
            if tracked is not None and tracked.identity == identity:
                # referenced before anything awaits: an idle file may otherwise be closed meanwhile
                self._ref(tracked)
                self._fds -= FDS_PER_FILE
                self._spawn(os.close, src_fd)
                return tracked
            if tracked is not None:
                log.info("%s changed in the source; its cached copy is dropped", relpath)
                self._retire(tracked)
            try:
                entry = await self._open_entry(relpath, identity)
            except BaseException:
                self._fds -= FDS_PER_FILE
                os.close(src_fd)
                raise
            tracked = TrackedFile(relpath, entry, src_fd)
            self._fds -= FDS_PER_FILE - tracked.fds
            if entry.cacheable:  # an uncached stand-in is not kept: the next open retries
                self._files[relpath] = tracked
                self.budget.set_cached(relpath, entry.cached_bytes())
            self._ref(tracked)
            return tracked

    async def _open_entry(self, relpath: str, identity: Identity) -> CacheEntry:
        """The store's entry for this version; if the cache filesystem is full even after
        evicting, an uncached stand-in whose reads go straight to the source."""
        for attempt in range(2):
            try:
                return await self._io(self.store.open_entry, relpath, identity, self.config.chunk_size)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                self._count_error(e)
                if attempt == 0:
                    await self._evict_after_disk_full(relpath)
        log.warning("no space in the cache for %s; reading it straight from the source", relpath)
        return CacheEntry.uncached(relpath, identity, self.config.chunk_size)

    def _ref(self, tracked: TrackedFile) -> None:
        tracked.users += 1
        if tracked.users == 1 and self._files.get(tracked.relpath) is tracked:
            self._idle.pop(tracked.relpath, None)

    def _unref(self, tracked: TrackedFile) -> None:
        tracked.users -= 1
        if tracked.users:
            return
        if self._files.get(tracked.relpath) is tracked:
            self._idle[tracked.relpath] = None
            while len(self._idle) > self._max_idle:
                relpath, _ = self._idle.popitem(last=False)
                self._close(self._files.pop(relpath))
        else:
            self._close(tracked)

    def _retire(self, tracked: TrackedFile) -> None:
        """Stop handing out this version; its open handles keep reading it until released."""
        del self._files[tracked.relpath]
        self._auto_streamed.discard(tracked.relpath)
        if tracked.users == 0:
            self._idle.pop(tracked.relpath, None)
            self._close(tracked)

    def _close(self, tracked: TrackedFile) -> None:
        """Close a version's cache entry and source fd, once, off the trio thread."""
        if tracked.closed:
            return
        tracked.closed = True
        self._fds -= tracked.fds
        self._spawn(tracked.close_fds)

    def _spawn(self, fn: Callable[..., object], *args: object) -> None:
        """Run a blocking housekeeping call in the background; its failure is logged, never
        fatal (an exception escaping a task of the engine's nursery would stop the daemon)."""

        async def guarded() -> None:
            try:
                await self._io(fn, *args)
            except Exception:  # noqa: BLE001
                log.exception("background %s%r failed", getattr(fn, "__name__", fn), args)

        self._nursery.start_soon(guarded)

    # ---- reads -------------------------------------------------------------------------

    async def read(self, handle: Handle, offset: int, size: int) -> memoryview:
        tracked = handle.tracked
        entry = tracked.entry
        chunks = entry.chunks_for(offset, size)
        if not chunks:
            return memoryview(b"")
        length = min(size, entry.size - offset)
        ahead = 0
        if self._is_sequential(handle, offset) and self.config.readahead != "off":
            ahead = -(-self.config.fetch_ahead // entry.chunk_size)
        handle.next_offset = offset + length
        buf = self._reply_buffer(length)[:length]
        for _attempt in range(3):
            generation = entry.generation
            try:
                if not entry.cacheable:
                    raise CacheFull(entry.relpath)
                all_cached = await self._ensure(tracked, chunks, ahead)
                ahead = 0
            except CacheFull:
                return await self._read_through(tracked, buf, offset)
            reply = await self._from_cache(entry, buf, offset, generation)
            if reply is not None:
                self._account_served(len(reply), all_cached)
                return reply
        raise ReadError(errno.EIO, f"{entry.relpath}: its cache file keeps changing behind our back")

    async def _from_cache(self, entry: CacheEntry, buf: memoryview, offset: int, generation: int) -> memoryview | None:
        """The cached bytes of buf's range; None if the cache file changed behind our back."""
        if self.serve_from_memory:
            return entry.view(offset, len(buf), generation)
        # what the page cache holds is copied here and now; only the rest costs a thread
        n = entry.read_into(buf, offset, generation, nowait=True)
        if n is not None and n < len(buf):
            rest = await self._io(entry.read_into, buf[n:], offset + n, generation, limiter=self._serve_limiter)
            n = None if rest is None else n + rest
        return None if n is None else buf[:n]

    def _account_served(self, n: int, from_cache: bool) -> None:
        self.metrics.bytes_served += n
        if from_cache:
            self.metrics.bytes_served_from_cache += n

    async def _read_through(self, tracked: TrackedFile, buf: memoryview, offset: int) -> memoryview:
        """Serve a read straight from the source when the cache has no room for it."""
        entry = tracked.entry
        try:
            await self._io(self.source.read_exact, tracked.src_fd, buf, offset, entry.relpath, entry.identity,
                           limiter=self.demand.limiter)
        except OSError as e:
            self._count_error(e)
            raise ReadError(errno.EIO, f"{entry.relpath}: {e}") from None
        self.metrics.bytes_from_source += len(buf)
        self.metrics.bytes_read_through += len(buf)
        self.metrics.bytes_served += len(buf)
        return buf

    def _reply_buffer(self, size: int) -> memoryview:
        """A buffer owned by the calling FUSE worker task.

        pyfuse3 copies a read's reply to the kernel before the task that produced it takes its
        next request, and the daemon runs a fixed set of worker tasks, so one buffer per task
        can be reused for every reply: no allocation per request.
        """
        task = trio.lowlevel.current_task()
        buf = self._reply_buffers.get(task)
        if buf is None or len(buf) < size:
            buf = bytearray(max(size, REPLY_BUFFER_MIN))
            self._reply_buffers[task] = buf
        return memoryview(buf)

    async def _ensure(self, tracked: TrackedFile, chunks: range, ahead: int = 0) -> bool:
        """Wait until every chunk is verified in the cache; True if none had to be waited for.
        With `ahead`, also fetch that many chunks past them, once this read's own fetches are
        started (so that they come first)."""
        state = tracked.entry.state
        waited = False
        while True:
            flights: list[Flight] = []
            todo: list[int] = []
            for i in chunks:
                if state[i] == VERIFIED:
                    continue
                flight = tracked.inflight.get(i)
                if flight is None:
                    todo.append(i)
                elif flight not in flights:
                    flights.append(flight)
            if (flights or todo) and not waited:
                self.metrics.chunk_misses += len(flights) + len(todo)
                waited = True
            for run in contiguous_runs(todo, self.demand.max_chunks):
                flights.append(self._start_flight(tracked, run, self.demand))
            if ahead:
                self._fetch_ahead(tracked, chunks.stop, ahead)
                ahead = 0
            if not flights:
                break
            for flight in flights:
                await flight.done.wait()
                if isinstance(flight.error, CacheFull):
                    raise flight.error
                if flight.error is not None:
                    raise ReadError(errno.EIO, f"{tracked.relpath}: {flight.error}")
        if not waited:
            self.metrics.chunk_hits += len(chunks)
        return not waited

    def _is_sequential(self, handle: Handle, offset: int) -> bool:
        """Whether a read continues the handle's last one. Within a chunk of it, not exactly
        at it: the kernel's readahead has several requests of one reader in flight at once,
        and they may reach us out of order."""
        return handle.next_offset is not None and abs(offset - handle.next_offset) <= self.config.chunk_size

    def _fetch_ahead(self, tracked: TrackedFile, first: int, count: int) -> None:
        """A sequential reader will want the chunks after this read next: start fetching the
        `count` chunks that follow it, on the demand lane, without waiting for them, as
        speculative flights: only with demand threads to spare (one is always left for real
        demand) and room in the cache without evicting anything.
        This overlaps a reader's next fetch with the serving of its current chunk (the
        "sequential window" of a prefetcher), where it would otherwise stall once a chunk,
        whenever it runs ahead of the readahead stream of its file."""
        window = range(first, min(first + count, tracked.entry.nchunks))
        for run in contiguous_runs(self._unclaimed(tracked, window), self.demand.max_chunks):
            room = sum(tracked.entry.chunk_extent(i)[1] for i in run)
            if self.demand.flights + 2 > self.demand.threads or not self.budget.fits(room):
                return
            self._start_flight(tracked, run, self.demand, speculative=True)

    @staticmethod
    def _unclaimed(tracked: TrackedFile, chunks: range) -> list[int]:
        """The chunks that are neither verified nor being fetched by anyone."""
        state = tracked.entry.state
        return [i for i in chunks if state[i] != VERIFIED and i not in tracked.inflight]

    def _start_flight(self, tracked: TrackedFile, chunks: range, lane: Lane, speculative: bool = False) -> Flight:
        flight = Flight(chunks, speculative)
        lane.flights += 1
        for i in chunks:
            tracked.inflight[i] = flight
        self._ref(tracked)
        self._nursery.start_soon(self._fly, tracked, flight, lane)
        return flight

    async def _fly(self, tracked: TrackedFile, flight: Flight, lane: Lane) -> None:
        entry = tracked.entry
        room = sum(entry.chunk_extent(i)[1] for i in flight.chunks if entry.state[i] == MISSING)
        reserved = 0
        started = time.monotonic()
        try:
            async with lane.buffer() as buf:  # room is reserved only once the fetch can run
                if flight.speculative and not self.budget.fits(room):
                    return  # nobody asked for these chunks yet: never evict for them
                await self._make_room(tracked.relpath, room)
                self.budget.reserved += room
                reserved = room
                fetched, bad = await self._io(self._materialize, tracked, flight.chunks, buf, limiter=lane.limiter)
            self.metrics.bytes_from_source += fetched
            self.metrics.checksum_failures += bad
            self.metrics.observe_fetch(time.monotonic() - started)
        except CacheFull as e:
            flight.error = e
        except OSError as e:
            flight.error = CacheFull(str(e)) if e.errno in (errno.ENOSPC, errno.EDQUOT) else e
            if isinstance(flight.error, CacheFull):
                await self._evict_after_disk_full(tracked.relpath)
            self._count_error(e)
            log.warning("fetching %s chunks %d-%d failed: %s", tracked.relpath,
                        flight.chunks.start, flight.chunks.stop - 1, e)
        except Exception as e:  # noqa: BLE001 - any failure becomes the readers' EIO, not a crash
            flight.error = e
            self._count_error(e)
            log.exception("fetching %s chunks %d-%d failed", tracked.relpath, flight.chunks.start, flight.chunks.stop - 1)
        finally:
            lane.flights -= 1
            self.budget.reserved -= reserved
            if self._files.get(tracked.relpath) is tracked:
                self.budget.set_cached(tracked.relpath, entry.cached_bytes())
            for i in flight.chunks:
                if tracked.inflight.get(i) is flight:
                    del tracked.inflight[i]
            flight.done.set()
            self._unref(tracked)

    def _materialize(self, tracked: TrackedFile, chunks: range, buf: memoryview) -> tuple[int, int]:
        """Worker thread: make chunks VERIFIED. Chunks recorded by an earlier run are checked
        against their checksum; the rest are read from the source in one sequential read per
        contiguous run and stored. Returns (bytes read from source, checksum failures)."""
        entry = tracked.entry
        bad = 0
        for i in chunks:
            if entry.state[i] == ON_DISK and not entry.verify_chunk(i, buf):
                bad += 1
        missing = [i for i in chunks if entry.state[i] == MISSING]
        fetched = 0
        for run in contiguous_runs(missing, len(chunks)):
            start = entry.chunk_extent(run.start)[0]
            last_offset, last_length = entry.chunk_extent(run.stop - 1)
            view = buf[: last_offset + last_length - start]
            self.source.read_exact(tracked.src_fd, view, start, entry.relpath, entry.identity)
            for i in run:
                offset, length = entry.chunk_extent(i)
                entry.store_chunk(i, view[offset - start: offset - start + length])
            fetched += len(view)
        return fetched, bad

    def _count_error(self, error: BaseException) -> None:
        kind = errno.errorcode.get(error.errno, "OSError") if isinstance(error, OSError) else type(error).__name__
        self.metrics.count_error(kind)

    # ---- cache size: eviction and pins -----------------------------------------------------

    def is_pinned(self, relpath: str) -> bool:
        return any(is_under(relpath, pin) for pin in self.pins)

    def _evictable(self, relpath: str) -> bool:
        tracked = self._files.get(relpath)
        return (tracked is None or tracked.users == 0) and not self.is_pinned(relpath)

    async def _make_room(self, relpath: str, nbytes: int) -> None:
        """Evict least recently used files until nbytes more fit under the cache limit."""
        if self.budget.fits(nbytes):
            return
        victims = self.budget.victims(nbytes, lambda p: p != relpath and self._evictable(p))
        if victims is None:
            raise CacheFull(f"cache is full ({self.budget.used} of {self.budget.limit} bytes) "
                            "and everything in it is open or pinned")
        try:
            for victim in victims:
                await self.evict(victim)
        except OSError as e:
            self._count_error(e)
            raise CacheFull(f"evicting from the cache failed: {e}") from e
        if not self.budget.fits(nbytes):
            raise CacheFull("cache is full")

    async def _evict_after_disk_full(self, relpath: str) -> None:
        """The cache filesystem ran out of space below our limit: shrink the limit to what
        fits now, and evict a block's worth so the next fetches can proceed."""
        self.budget.limit = min(self.budget.limit, max(self.budget.used, 0))
        log.warning("cache filesystem is full; cache limit lowered to %d bytes", self.budget.limit)
        victims = self.budget.victims(self.config.block_size, lambda p: p != relpath and self._evictable(p)) or []
        try:
            for victim in victims:
                await self.evict(victim)
        except OSError as e:  # a sick cache filesystem: the caller falls back to read-through
            self._count_error(e)
            log.warning("evicting from the full cache failed: %s", e)

    async def evict(self, relpath: str) -> bool:
        """Drop relpath from the cache unless it is open, being opened, streaming or pinned.

        A file being opened right now is in use, so it is skipped rather than waited for:
        an open that ran out of disk space evicts while holding its own path's lock, and
        waiting here for another path's lock could close a cycle between two such opens."""
        try:
            async with self._opening.hold(relpath, wait=False):
                if not self._evictable(relpath):
                    return False
                tracked = self._files.pop(relpath, None)
                if tracked is not None:
                    self._idle.pop(relpath, None)
                    self._close(tracked)
                self.budget.forget(relpath)
                self._auto_streamed.discard(relpath)
                await self._io(self.store.remove, relpath)
        except trio.WouldBlock:
            return False
        self.metrics.files_evicted += 1
        log.info("evicted %s from the cache", relpath)
        return True

    async def set_pins(self, pins: set[str]) -> None:
        self.pins = pins
        await self._io(self.store.save_pins, pins)

    # ---- readahead streams -------------------------------------------------------------
    #
    # Three sets say where a file stands:
    # - _auto_streamed: automatic readahead already queued it for its current version (so
    #   each open does not queue it again); cleared when that version is retired or evicted,
    #   or its stream fails;
    # - _streams_pending: a stream of it is queued or running; cleared when the stream ends;
    # - _explicit: a prefetch asked for it; its stream is retried when the file changes
    #   under it, and its outcome is kept in stream_errors for the prefetch to report.

    async def _schedule_readahead(self, relpath: str, size: int) -> None:
        """Queue relpath for streaming and, if it is the first shard opened in its directory,
        all its sibling shards (the directory is listed once per mount, not once per open)."""
        if (relpath in self._auto_streamed or size < self.config.readahead_min_size
                or (self.config.readahead == "shards" and not is_shard(relpath))):
            return
        self._enqueue_auto(relpath)
        parent = relpath.rpartition("/")[0]
        if not is_shard(relpath) or parent in self._scanned_dirs:
            return
        self._scanned_dirs.add(parent)
        try:
            siblings = await self._io(self._sibling_shards, relpath, limiter=self._planning_limiter)
        except Exception as e:  # noqa: BLE001 - readahead is an optimisation: never fatal
            log.warning("cannot list the siblings of %s: %s", relpath, e)
            self._scanned_dirs.discard(parent)
            return
        for path in siblings:
            self._enqueue_auto(path)

    def _enqueue_auto(self, relpath: str) -> None:
        if relpath not in self._auto_streamed:
            self._auto_streamed.add(relpath)
            self._start_stream(relpath)

    def prefetch(self, relpath: str) -> None:
        """Stream a file whole into the cache, whatever the readahead settings; the outcome is
        then told by stream_state. Cheap for a file already cached: its stream finds every
        chunk verified."""
        self._explicit.add(relpath)
        self.stream_errors.pop(relpath, None)
        self._replacements.pop(relpath, None)
        self._start_stream(relpath)

    def stream_state(self, relpath: str) -> tuple[bool, str | None]:
        """(whether a stream of relpath is queued or running, the error the last one ended with)."""
        return relpath in self._streams_pending, self.stream_errors.get(relpath)

    def _start_stream(self, relpath: str) -> None:
        if relpath not in self._streams_pending:
            self._streams_pending.add(relpath)
            self._stream_send.send_nowait(relpath)

    def _sibling_shards(self, relpath: str) -> list[str]:
        """Worker thread: the other shards in relpath's directory, in checkpoint index order
        (model.safetensors.index.json and the like), then by name."""
        parent, _, _name = relpath.rpartition("/")
        entries = self.source.listdir(parent)
        shards = {
            self.source.child(parent, name)
            for name, st in entries
            if is_shard(name) and stat_mod.S_ISREG(st.st_mode) and st.st_size >= self.config.readahead_min_size
        }
        ordered: list[str] = []
        for name, _st in entries:
            if _INDEX_FILE_RE.match(name):
                ordered += [p for p in self._index_order(parent, name) if p in shards and p not in ordered]
        ordered += sorted(shards - set(ordered))
        return [p for p in ordered if p != relpath]

    def _index_order(self, parent: str, index_name: str) -> list[str]:
        try:
            weight_map = json.loads(self.source.read_small(self.source.child(parent, index_name),
                                                           MAX_INDEX_SIZE)).get("weight_map", {})
            if not isinstance(weight_map, dict):
                raise ValueError("its weight_map is not an object")
        except (OSError, ValueError, AttributeError) as e:
            log.info("ignoring checkpoint index %s: %s", index_name, e)
            return []
        # only names of files in the index's own directory
        names = dict.fromkeys(v for v in weight_map.values() if isinstance(v, str) and is_valid_name(v))
        return [self.source.child(parent, name) for name in names]

    async def _stream_worker(self) -> None:
        async for relpath in self._stream_receive:
            try:
                await self._stream_file(relpath)
            except VersionReplaced:
                self._stream_replaced(relpath)
            except Exception as e:  # noqa: BLE001 - one file's failure must not stop the streams
                self._stream_failed(relpath, e)
            else:
                self._streams_pending.discard(relpath)
                self._explicit.discard(relpath)
                self._replacements.pop(relpath, None)

    def _stream_replaced(self, relpath: str) -> None:
        """The file changed in the source while streaming. A prefetch wants the file as it is
        now: stream the new version (a file that keeps changing ends in an error); automatic
        readahead waits for the next open of the new version."""
        self._streams_pending.discard(relpath)
        if relpath not in self._explicit:
            log.info("%s changed in the source while being streamed", relpath)
            return
        tries = self._replacements[relpath] = self._replacements.get(relpath, 0) + 1
        if tries > MAX_STREAM_REPLACEMENTS:
            self._stream_failed(relpath, ReadError(errno.ESTALE, "it keeps changing in the source"))
            return
        log.info("%s changed in the source while being prefetched; fetching the new version", relpath)
        self._start_stream(relpath)

    def _stream_failed(self, relpath: str, error: Exception) -> None:
        if not isinstance(error, (OSError, ReadError)):
            log.error("readahead of %s failed", relpath, exc_info=error)
        log.warning("readahead of %s stopped: %s", relpath, error)
        self._streams_pending.discard(relpath)
        self._auto_streamed.discard(relpath)  # the next open tries again
        self._replacements.pop(relpath, None)
        if relpath in self._explicit:
            self._explicit.discard(relpath)
            self.stream_errors[relpath] = str(error)

    async def _stream_file(self, relpath: str) -> None:
        """Fetch every chunk of the file that is not verified, block by block, then wait for
        the flights others started. Returns once the whole file is verified in the cache;
        raises VersionReplaced if the file changed in the source meanwhile, or the error
        that kept a chunk from being fetched."""
        tracked = await self._acquire(relpath)
        tracked.streaming = True
        try:
            if not tracked.entry.cacheable:
                raise ReadError(errno.ENOSPC, "no space in the cache")
            # two passes: a chunk demoted for re-verification behind the first is checked by the second
            for _pass in range(2):
                await self._stream_pass(tracked)
                if all(state == VERIFIED for state in tracked.entry.state):
                    self.metrics.files_streamed += 1
                    return
            missing = sum(1 for state in tracked.entry.state if state != VERIFIED)
            raise ReadError(errno.EIO, f"{missing} chunks could not be fetched")
        except Exception as e:
            replaced = self._files.get(relpath) is not tracked or isinstance(e, SourceChanged)
            if tracked.entry.cacheable and replaced and not isinstance(e, VersionReplaced):
                raise VersionReplaced(relpath) from e
            raise
        finally:
            tracked.streaming = False
            self._unref(tracked)

    async def _stream_pass(self, tracked: TrackedFile) -> None:
        entry = tracked.entry
        per_block = self.stream.max_chunks
        for block_start in range(0, entry.nchunks, per_block):
            if self._files.get(tracked.relpath) is not tracked:
                raise VersionReplaced(tracked.relpath)
            block = range(block_start, min(block_start + per_block, entry.nchunks))
            # one flight per run of chunks nobody has fetched; looked at again after each
            # flight, as demand reads may have started fetching some meanwhile
            while todo := self._unclaimed(tracked, block):
                run = contiguous_runs(todo, per_block)[0]
                await self._await_flight(self._start_flight(tracked, run, self.stream))
        while tracked.inflight:  # chunks that demand reads are fetching
            await self._await_flight(next(iter(tracked.inflight.values())))

    @staticmethod
    async def _await_flight(flight: Flight) -> None:
        await flight.done.wait()
        if isinstance(flight.error, SourceChanged):
            raise flight.error
        if flight.error is not None:
            raise ReadError(errno.EIO, str(flight.error))

    # ---- introspection -----------------------------------------------------------------

    def cached_extent(self, relpath: str) -> tuple[int, int] | None:
        """(cached bytes, size) of the version of relpath this daemon tracks; None if none."""
        tracked = self._files.get(relpath)
        return None if tracked is None else (tracked.entry.cached_bytes(), tracked.entry.size)

    def activity(self) -> tuple[int, int]:
        """(files in use, files streaming)."""
        return (sum(1 for t in self._files.values() if t.users),
                sum(1 for t in self._files.values() if t.streaming))

    def open_files(self) -> list[dict]:
        """Per-file state of the files this daemon currently tracks."""
        return [
            {"path": t.relpath, "size": t.entry.size, "cached": t.entry.cached_bytes(),
             "users": t.users, "streaming": t.streaming, "inflight_chunks": len(t.inflight)}
            for t in self._files.values()
        ]

"""Serving one read of an open file: make its chunks verified, then reply from the cache.

With the cache on tmpfs the reply is a view of a read-only mapping of the cache file, which the
session writes straight to the kernel: no copy of our own. On disk
a mapped page might have to be read back, which must never stall the event loop: what the
page cache holds is copied inline (RWF_NOWAIT), only the rest on a worker thread; the pages
read are then dropped from the cache file's page cache, since the mount's own page cache holds
the reply (the model in memory once, not twice). If the
cache has no room for the read, it is served straight from the source (read-through).
"""

from __future__ import annotations

import errno
import logging
import os

import trio

from ..metrics import Metrics
from ..source import Identity, Source
from ..store import CacheEntry, drop_reply_pages
from .errors import CacheFull, ReadError, error_kind
from .fetcher import Fetcher
from .files import Handle, TrackedFile
from .tasks import Tasks
from .window import SequentialWindow

log = logging.getLogger(__name__)


class Reader:
    """Answers the reads of open handles."""

    def __init__(self, source: Source, fetcher: Fetcher, window: SequentialWindow, metrics: Metrics,
                 tasks: Tasks, workers: int, serve_from_memory: bool) -> None:
        self.source = source
        self.fetcher = fetcher
        self.window = window
        self.metrics = metrics
        self.tasks = tasks
        self.serve_from_memory = serve_from_memory
        self._serve_limiter = trio.CapacityLimiter(workers)

    async def read(self, handle: Handle, offset: int, size: int, buf: memoryview) -> memoryview:
        """Serve a read; buf (size bytes, the caller's) holds the reply unless it is a view of
        the cache's mapping."""
        tracked = handle.tracked
        entry = tracked.entry
        chunks = entry.chunks_for(offset, size)
        if not chunks:
            return memoryview(b"")
        length = min(size, entry.size - offset)
        window = self.window.after(handle, offset, length)
        buf = buf[:length]
        for _attempt in range(3):
            generation = entry.generation
            try:
                if not entry.cacheable:
                    raise CacheFull(entry.relpath)
                all_cached = await self.fetcher.ensure(
                    tracked, chunks, then=lambda: self.fetcher.start_ahead(tracked, window))
                window = range(0)
            except CacheFull:
                return await self._read_through(tracked, buf, offset)
            reply = await self._from_cache(entry, buf, offset, generation)
            if reply is not None:
                self.metrics.count_served(len(reply), from_cache=all_cached)
                return reply
        raise ReadError(errno.EIO, f"{entry.relpath}: its cache file keeps changing behind our back")

    async def _from_cache(self, entry: CacheEntry, buf: memoryview, offset: int, generation: int) -> memoryview | None:
        """The cached bytes of buf's range; None if the cache file changed behind our back."""
        if self.serve_from_memory:
            try:
                return entry.view(offset, len(buf), generation)
            except OSError as e:
                if e.errno != errno.ENOMEM:  # no address space left to map its file: copied instead
                    raise
        # what the page cache holds is copied here and now; only the rest costs a thread
        n = entry.read_into(buf, offset, generation, nowait=True)
        if n is not None and n < len(buf):
            rest = await self.tasks.io(entry.read_into, buf[n:], offset + n, generation, limiter=self._serve_limiter)
            n = None if rest is None else n + rest
        if n is None or n < len(buf):  # a data file cut short since it was checked: changed, never a short reply
            return None
        drop_reply_pages(entry, offset, n)  # the reply's copy goes to the mount's page cache: not kept twice
        return buf[:n]

    async def _read_through(self, tracked: TrackedFile, buf: memoryview, offset: int) -> memoryview:
        """Serve a read straight from the source when the cache has no room for it. Given up
        at an INTERRUPT (a killed reader is not held by a source that hangs), so the read
        uses what it owns alone, should it finish after: a duplicate of the source file's
        descriptor and a buffer of its own, copied into buf once read."""
        entry = tracked.entry
        try:
            fd = os.dup(tracked.src_fd)
            data = await self.tasks.abandonable(_read_exact_own, self.source, fd, len(buf), offset, entry.relpath,
                                                entry.identity, key=("read", entry.relpath),
                                                unused=lambda: os.close(fd), limiter=self.fetcher.demand_limiter)
        except OSError as e:
            self.metrics.count_error(error_kind(e))
            raise ReadError(errno.EIO, f"{entry.relpath}: {e}") from None
        buf[:] = data
        self.metrics.bytes_from_source += len(buf)
        self.metrics.count_served(len(buf), from_cache=False, read_through=True)
        return buf


def _read_exact_own(source: Source, fd: int, length: int, offset: int, relpath: str, identity: Identity) -> bytearray:
    """Worker thread: source.read_exact of length bytes at offset into a new buffer, through
    fd, which it closes."""
    data = bytearray(length)
    try:
        source.read_exact(fd, memoryview(data), offset, relpath, identity)
    finally:
        os.close(fd)
    return data

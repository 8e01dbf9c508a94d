"""A file complete and checked in the cache, as the session's reader threads serve it.

Reads of such a file need nothing of the engine's machinery (no fetch, no wait, no window):
the reply is the cache file's bytes at the offset. So the session's threads serve them
themselves (session/queues.py), outside the trio thread, from what this object fixed at open:
the entry and the generation at which every chunk was verified. Before each reply they ask
`unchanged()`, the same check the engine's own reads make (a foreign write into the cache file
demotes its chunks and moves the generation on): if it fails, the read goes the engine's way,
which checks the chunks again. So a byte served here is one the engine would have served.

On a disk cache each reply's pages are dropped from the cache file's page cache afterwards
(the mount's page cache holds them now). Reading a range in reads around it too, up to the
disk's read_ahead_kb past its end (8 MiB on the test machine's disk), and where the reply of
those bytes had already gone out (the threads answer out of order) its own drop came too
early: cache files were left up to 16% resident after a pass. So a reply also drops
everything below the lowest reply of that file still going out (`RepliesInFlight`, over all
its opens), all of the file once none is and it reached the end: what lies behind every
reader in flight is wanted by none of them, what lies ahead is their readahead. Reading each
range exactly instead (POSIX_FADV_RANDOM, into a buffer) cost a third of the throughput.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from dataclasses import dataclass

from .. import linux
from ..metrics import Metrics
from ..session.types import Ticket
from ..store import CacheEntry, drop_reply_pages
from .files import Handle


class RepliesInFlight:
    """The offsets of the replies going out now from each cache file, over all its opens
    (one per engine; any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_entry: weakref.WeakKeyDictionary[CacheEntry, Counter[int]] = weakref.WeakKeyDictionary()

    def start(self, entry: CacheEntry, offset: int) -> None:
        with self._lock:
            self._by_entry.setdefault(entry, Counter())[offset] += 1

    def end(self, entry: CacheEntry, offset: int) -> int | None:
        """One reply at offset went out; the lowest offset of those still going out, if any."""
        with self._lock:
            offsets = self._by_entry[entry]
            offsets[offset] -= 1
            if offsets[offset] <= 0:
                del offsets[offset]
            return min(offsets) if offsets else None


@dataclass(frozen=True)
class CompleteFile:
    """One open's view of its complete cache file (a session.types.DirectFile)."""

    entry: CacheEntry
    generation: int  # every chunk was verified at this generation
    metrics: Metrics
    drop_pages: bool  # a disk cache: the reply's pages are dropped from the cache file's page cache
    replies: RepliesInFlight

    @property
    def fd(self) -> int:
        return self.entry.data_fd

    @property
    def size(self) -> int:
        return self.entry.size

    def unchanged(self) -> bool:
        return self.entry.unchanged_since(self.generation)

    def ticket(self) -> Ticket | None:
        # the stamp first: a write before it is noticed by unchanged(), one after it moves the
        # file's stamp past it, which the reader process compares before every reply
        stamp = linux.stamp(self.entry.data_fd)
        return Ticket(self.entry.size, self.entry.chunk_size, stamp) if self.unchanged() else None

    def view(self, offset: int, length: int) -> memoryview | None:
        # asked right after unchanged() (session.types.DirectFile), so not checked again
        if self.drop_pages:
            return None
        try:
            return self.entry.mapped(offset, length)
        except OSError:  # no address space left to map its file (store.MAPPED_MAX): copied instead
            return None

    def serving(self, offset: int, length: int) -> None:
        self.metrics.count_served(length, from_cache=True, direct=True)
        self.metrics.count_hits(len(self.entry.chunks_for(offset, length)))
        if self.drop_pages and length:
            self.replies.start(self.entry, offset)

    def served(self, offset: int, length: int) -> None:
        if not (self.drop_pages and length):
            return
        lowest = self.replies.end(self.entry, offset)
        if lowest is None:  # nothing of this file going out: all up to this reply's end (all of it at the end)
            self.entry.drop(0, offset + length)
        else:  # its own range, and all below the lowest reply still going out
            drop_reply_pages(self.entry, offset, length)
            if lowest > 0:
                self.entry.drop(0, lowest)


def complete_file(handle: Handle, metrics: Metrics, drop_pages: bool, replies: RepliesInFlight) -> CompleteFile | None:
    """The CompleteFile of handle's version if every chunk of it is verified now, else None
    (its reads go through the engine, until it is asked again once the file completed)."""
    entry = handle.tracked.entry
    if not entry.cacheable:
        return None
    generation = entry.verified_generation()
    return None if generation is None else CompleteFile(entry, generation, metrics, drop_pages, replies)

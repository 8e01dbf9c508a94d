"""A file complete and checked in the cache, as the session's reader threads serve it.

Reads of such a file need nothing of the engine's machinery (no fetch, no wait, no window):
the reply is the cache file's bytes at the offset. So the session's threads serve them
themselves (session/queues.py), outside the trio thread, from what this object fixed at open:
the entry and the generation at which every chunk was verified. Before each reply they ask
`unchanged()`, the same check the engine's own reads make (a foreign write into the cache file
demotes its chunks and moves the generation on): if it fails, the read goes the engine's way,
which checks the chunks again. So a byte served here is one the engine would have served.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..metrics import Metrics
from ..store import CacheEntry
from .files import Handle


@dataclass(frozen=True)
class CompleteFile:
    """One open's view of its complete cache file (a session.types.DirectFile)."""

    entry: CacheEntry
    generation: int  # every chunk was verified at this generation
    metrics: Metrics
    drop_pages: bool  # a disk cache: the reply's pages are dropped from the cache file's page cache

    @property
    def fd(self) -> int:
        return self.entry.data_fd

    @property
    def size(self) -> int:
        return self.entry.size

    def unchanged(self) -> bool:
        return self.entry.unchanged_since(self.generation)

    def view(self, offset: int, length: int) -> memoryview | None:
        # asked right after unchanged() (session.types.DirectFile), so not checked again
        return None if self.drop_pages else self.entry.mapped(offset, length)

    def serving(self, offset: int, length: int) -> None:
        self.metrics.count_served(length, from_cache=True, direct=True)
        self.metrics.count_hits(len(self.entry.chunks_for(offset, length)))

    def served(self, offset: int, length: int) -> None:
        if self.drop_pages and length:
            self.entry.drop_pages(offset, length)


def complete_file(handle: Handle, metrics: Metrics, drop_pages: bool) -> CompleteFile | None:
    """The CompleteFile of handle's version if every chunk of it is verified now, else None
    (its reads go through the engine, until it is asked again once the file completed)."""
    entry = handle.tracked.entry
    if not entry.cacheable:
        return None
    generation = entry.verified_generation()
    return None if generation is None else CompleteFile(entry, generation, metrics, drop_pages)

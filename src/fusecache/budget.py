"""Cache size accounting and the choice of what to evict (least recently used first).

Pure bookkeeping, no I/O: the engine tells it how many bytes each file has cached, what they
take on the cache filesystem, and when it was last opened, reserves room before a fetch stores bytes, and asks which files to drop when
a fetch would go over the limit. Files the engine reports busy (open, streaming, fetching)
and pinned files are never chosen.

The limit is of what the cache takes on its filesystem, not of the bytes it holds: every
cached file also costs an index (a block at least) and whole blocks of data, so 5,000 files
of one byte take 40 MB, not 5 KB. Each file counts its allocated blocks (`disk`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class _Usage:
    cached: int  # bytes of the source file held (what `cache ls` shows)
    disk: int  # what the file's data and index take on the cache filesystem (allocated blocks)
    last_used: float


class CacheBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        # least recently used first: a use moves a file to the end, so victims() walks from the
        # front instead of sorting every file the cache holds, on the event loop, each fetch
        # (a full cache of 200,000 files took 0.1 s a fetch)
        self._files: dict[str, _Usage] = {}
        self._in_order = True  # False once files came with use times of their own (the store's, at start)
        self._disk_total = 0
        self.reserved = 0

    @property
    def used(self) -> int:
        """Bytes the cache takes on its filesystem plus bytes promised to fetches in progress."""
        return self._disk_total + self.reserved

    def set_cached(self, relpath: str, cached: int, disk: int, last_used: float | None = None) -> None:
        """relpath holds cached bytes taking disk bytes. last_used: when it was last used (the
        store's record, at start); a file new to the cache without one counts as used now: a
        file streamed by a prefetch is not older than those opened before it was filled."""
        usage = self._files.get(relpath)
        if usage is None:
            usage = self._files[relpath] = _Usage(0, 0, time.time() if last_used is None else last_used)
        if last_used is not None:
            usage.last_used = max(usage.last_used, last_used)
            self._in_order = False
        self._disk_total += disk - usage.disk
        usage.cached = cached
        usage.disk = disk

    def touch(self, relpath: str, when: float) -> None:
        """relpath was used (opened) at `when`: it becomes the most recently used."""
        usage = self._files.pop(relpath, None) or _Usage(0, 0, when)
        usage.last_used = when
        self._files[relpath] = usage

    def forget(self, relpath: str) -> None:
        usage = self._files.pop(relpath, None)
        if usage is not None:
            self._disk_total -= usage.disk

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.limit

    def victims(self, nbytes: int, evictable: Callable[[str], bool]) -> list[str] | None:
        """Least recently used evictable files whose removal makes nbytes fit, or None when
        even evicting all of them would not."""
        excess = self.used + nbytes - self.limit
        if excess <= 0:
            return []
        if not self._in_order:  # once, after the store's files came in the order it found them
            self._files = dict(sorted(self._files.items(), key=lambda item: item[1].last_used))
            self._in_order = True
        chosen = []
        for relpath, usage in self._files.items():
            if usage.disk and evictable(relpath):
                chosen.append(relpath)
                excess -= usage.disk
                if excess <= 0:
                    return chosen
        return None

    def files(self) -> dict[str, tuple[int, float]]:
        return {path: (u.cached, u.last_used) for path, u in self._files.items()}

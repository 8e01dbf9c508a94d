"""Cache size accounting and the choice of what to evict (least recently used first).

Pure bookkeeping, no I/O: the engine tells it how many bytes each file has cached and when it
was last opened, reserves room before a fetch stores bytes, and asks which files to drop when
a fetch would go over the limit. Files the engine reports busy (open, streaming, fetching)
and pinned files are never chosen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class _Usage:
    cached: int
    last_used: float


class CacheBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._files: dict[str, _Usage] = {}
        self._cached_total = 0
        self.reserved = 0

    @property
    def used(self) -> int:
        """Bytes cached plus bytes promised to fetches in progress."""
        return self._cached_total + self.reserved

    def set_cached(self, relpath: str, cached: int, last_used: float | None = None) -> None:
        usage = self._files.setdefault(relpath, _Usage(0, last_used or 0.0))
        self._cached_total += cached - usage.cached
        usage.cached = cached
        if last_used is not None:
            usage.last_used = max(usage.last_used, last_used)

    def touch(self, relpath: str, when: float) -> None:
        self._files.setdefault(relpath, _Usage(0, when)).last_used = when

    def forget(self, relpath: str) -> None:
        usage = self._files.pop(relpath, None)
        if usage is not None:
            self._cached_total -= usage.cached

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.limit

    def victims(self, nbytes: int, evictable: Callable[[str], bool]) -> list[str] | None:
        """Least recently used evictable files whose removal makes nbytes fit, or None when
        even evicting all of them would not."""
        excess = self.used + nbytes - self.limit
        if excess <= 0:
            return []
        chosen = []
        for relpath, usage in sorted(self._files.items(), key=lambda item: item[1].last_used):
            if usage.cached and evictable(relpath):
                chosen.append(relpath)
                excess -= usage.cached
                if excess <= 0:
                    return chosen
        return None

    def files(self) -> dict[str, tuple[int, float]]:
        return {path: (u.cached, u.last_used) for path, u in self._files.items()}

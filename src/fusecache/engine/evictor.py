"""What stays in the cache: the size limit (least recently used files go first), pins, and
what to do when the cache filesystem itself runs out of space.

The budget (budget.py) does the bookkeeping; this part decides and removes. Files in use (open,
streaming, being fetched) and pinned files are never evicted, and neither is a file being
opened at that moment: eviction skips it rather than wait for it, because an open that ran
out of disk space evicts while holding its own path's lock, and waiting here for another
path's lock could close a cycle between two such opens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from ..budget import CacheBudget
from ..config import MountConfig
from ..logs import Throttle
from ..metrics import Metrics
from ..source import is_under_any
from ..store import CacheStore
from .errors import CacheFull, error_kind
from .files import OpenFiles
from .tasks import Tasks

log = logging.getLogger(__name__)
repeats = Throttle(log)  # a full cache filesystem is met by every fetch
LIMIT_RECHECK = 60.0  # seconds between looks at the space free, while a full filesystem lowered the limit


@dataclass(frozen=True)
class EvictorConfig:
    """How much a full cache filesystem makes the evictor free."""

    # what a full cache filesystem makes room for at once: one stream read's worth
    disk_full_evict_bytes: int

    @classmethod
    def from_mount(cls, cfg: MountConfig) -> EvictorConfig:
        return cls(disk_full_evict_bytes=cfg.stream_read_size)


class Evictor:
    """Decides what leaves the cache and removes it (see the module docstring)."""

    def __init__(self, config: EvictorConfig, store: CacheStore, budget: CacheBudget, metrics: Metrics,
                 files: OpenFiles, tasks: Tasks) -> None:
        self.config = config
        self.store = store
        self.budget = budget
        self.metrics = metrics
        self.files = files
        self.tasks = tasks
        self.pins: set[str] = set()
        self._limit_before_full: int | None = None  # the limit a full cache filesystem lowered, while lowered
        self._saving = trio.Lock()  # pins are saved one at a time

    async def load(self) -> None:
        """What the store holds and which paths are pinned, at start."""
        for entry in await self.tasks.io(self.store.load):
            self.budget.set_cached(entry["path"], entry["cached"], entry["disk"], entry["last_used"])
        self.pins = await self.tasks.io(self.store.load_pins)
        log.info("cache holds %d files, %d bytes (limit %d)", len(self.budget.files()),
                 self.budget.used, self.budget.limit)

    def is_pinned(self, relpath: str) -> bool:
        return is_under_any(relpath, self.pins)

    async def set_pins(self, pins: set[str]) -> None:
        """Pin these paths (at once) and save them: one save at a time, each of the pins as
        they are when it starts, so the last one saved is the last set (concurrent requests
        saved through one temporary file, and the older set could be the one kept)."""
        # ValueError (more than a restart reads) before anything changes; off the event loop,
        # as the save (200,000 pins: a fifth of a second each)
        await self.tasks.io(self.store.encode_pins, pins)
        self.pins = pins
        async with self._saving:
            await self.tasks.io(self.store.save_pins, self.pins)

    def _evictable(self, relpath: str) -> bool:
        return not self.files.in_use(relpath) and not self.is_pinned(relpath)

    def _victims(self, nbytes: int, sparing: str) -> list[str] | None:
        """Least recently used evictable files (never `sparing`) that free nbytes; None if
        even all of them would not."""
        return self.budget.victims(nbytes, lambda p: p != sparing and self._evictable(p))

    async def _evict_all(self, victims: list[str]) -> OSError | None:
        """Evict each victim; the error that stopped it (counted), if any."""
        try:
            for victim in victims:
                await self.evict(victim)
        except OSError as e:
            self.metrics.count_error(error_kind(e))
            return e
        return None

    async def make_room(self, relpath: str, nbytes: int) -> None:
        """Evict least recently used files until nbytes more fit under the cache limit, as
        the blocks they will take on the cache filesystem (one byte takes a block)."""
        nbytes = self.store.allocation(nbytes)
        if self.budget.fits(nbytes):
            return
        victims = self._victims(nbytes, sparing=relpath)
        if victims is None:
            raise CacheFull(f"cache is full ({self.budget.used} of {self.budget.limit} bytes) "
                            "and everything in it is open or pinned")
        error = await self._evict_all(victims)
        if error is not None:
            raise CacheFull(f"evicting from the cache failed: {error}") from error
        if not self.budget.fits(nbytes):
            raise CacheFull("cache is full")

    async def after_disk_full(self, relpath: str) -> None:
        """The cache filesystem ran out of space below our limit: shrink the limit to what
        fits now, and evict some so the next fetches can proceed. Never raises: a sick cache
        filesystem makes its callers read through."""
        if self._limit_before_full is None:
            self._limit_before_full = self.budget.limit
            self.tasks.start_soon(self._regain_limit)
        self.budget.limit = min(self.budget.limit, max(self.budget.used, 0))
        repeats.warning("cache filesystem is full; cache limit lowered to %d bytes", self.budget.limit)
        error = await self._evict_all(self._victims(self.config.disk_full_evict_bytes, sparing=relpath) or [])
        if error is not None:
            repeats.warning("evicting from the full cache failed: %s", error)

    async def _regain_limit(self) -> None:
        """Raise a limit a full cache filesystem lowered as space comes back (another tenant of
        the filesystem freed it), up to the limit it had: a passing ENOSPC used to shrink the
        cache for the rest of the daemon's life. Half of what is free is taken at each look,
        so that the cache does not run straight into ENOSPC again."""
        assert self._limit_before_full is not None
        while self.budget.limit < self._limit_before_full:
            await trio.sleep(LIMIT_RECHECK)
            try:
                free = await self.tasks.io(self.store.free_bytes)
            except OSError as e:
                repeats.warning("cannot tell the space free for the cache: %s", e)
                continue
            regained = min(self._limit_before_full, max(self.budget.limit, self.budget.used + free // 2))
            if regained > self.budget.limit:
                self.budget.limit = regained
                log.info("space came back on the cache filesystem: cache limit raised to %d bytes", regained)
        self._limit_before_full = None

    async def evict(self, relpath: str) -> bool:
        """Drop relpath from the cache unless it is in use, being opened or pinned."""
        try:
            async with self.files.opening.hold(relpath, wait=False):
                if not self._evictable(relpath):
                    return False
                self.files.drop(relpath)
                # finished whatever cancels the caller (an INTERRUPT of the open that evicts for
                # room): forgotten by the budget with its files left, it was never chosen again
                # and the cache outgrew its limit. A removal that fails leaves it counted.
                with trio.CancelScope(shield=True):
                    await self.tasks.io(self.store.remove, relpath)
                self.budget.forget(relpath)
        except trio.WouldBlock:
            return False
        self.metrics.files_evicted += 1
        log.info("evicted %s from the cache", relpath)
        return True

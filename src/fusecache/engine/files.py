"""The open-file table: the source files the daemon has open, one per current version of a path.

A TrackedFile holds a version's cache entry and source descriptor. It is referenced by every
handle open on it, and by the streams and flights working on it; at zero it stays open as
*idle* (up to a bound), so a loader that reopens shards neither reopens nor re-verifies them.
When the source shows a new version, the old one is *retired*: new opens get the new version,
handles on the old one keep reading it until they close.

Descriptors are budgeted: each tracked file holds three (source, cache data, cache index),
each open directory one, and a reserve is kept for everything else (lookups, the control
socket, the log). When files in use hold the whole budget, the open that asks for more fails
with EMFILE, and only it; and the files one uid holds open may hold at most half of it
(shares.py), so that one user cannot make everyone else's opens fail.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio

from ..budget import CacheBudget
from ..logs import Throttle
from ..metrics import Metrics
from ..source import Identity, Source
from ..store import CacheEntry, CacheStore, StoreError, in_place, uncached_entry
from .errors import error_kind
from .keyed_lock import KeyedLock
from .shares import UidShares
from .tasks import Tasks

log = logging.getLogger(__name__)
repeats = Throttle(log)  # warnings that can come with every open

# Idle files (no handle open) whose fds and verified-chunk state are kept, so a loader that
# opens and closes shards repeatedly does not re-verify them each time.
MAX_IDLE_FILES = 256
FDS_PER_FILE = 3
# The most chunks a file may have: 4 MB of states and 32 MB of sums for it (16 TiB in 4 MiB
# chunks, what ext4 holds in one file)
MAX_CHUNKS = 1 << 22
# Descriptors never given to open files: lookups, directory reads, the control socket and the
# log need some even while every file a user could open is open.
FD_RESERVE = 128


@dataclass(eq=False)
class TrackedFile:
    """One version of one file: its cache entry and source descriptor."""

    relpath: str
    entry: CacheEntry
    src_fd: int
    opened: os.stat_result  # the source file's attributes when opened: its version's
    users: int = 0  # open handles, running streams and flights
    closed: bool = False

    @property
    def identity(self) -> Identity:
        return self.entry.identity

    @property
    def fds(self) -> int:
        return FDS_PER_FILE if self.entry.cacheable else 1

    def close_fds(self) -> None:
        """Blocking: close the cache entry and the source fd."""
        self.entry.close()
        os.close(self.src_fd)


async def seal(tasks: Tasks, tracked: TrackedFile) -> None:
    """Seal a complete file (CacheEntry.seal: made durable, then marked), so that a restart
    serves it without reading it. Safe while the entry is closed meanwhile (the seal works on
    duplicates of its descriptors, and marks nothing once closed). A failure only costs the
    next restart a check of its chunks."""
    if tracked.entry.sealed or not tracked.entry.cacheable:
        return
    try:
        await tasks.io(tracked.entry.seal)
    except OSError as e:
        log.warning("sealing the cache file of %s failed (a restart checks it instead): %s", tracked.relpath, e)
    except Exception:  # noqa: BLE001 - never fatal: it runs beside the requests, in the engine's nursery
        log.exception("sealing the cache file of %s failed (a restart checks it instead)", tracked.relpath)


@dataclass(eq=False)
class Handle:
    """One open() of a file through the mount: what the adapter holds and asks about. The
    TrackedFile behind it (`tracked`) is the engine's own: nothing outside engine/ names it,
    so the adapter depends only on the questions below."""

    tracked: TrackedFile
    uid: int  # who opened it: its descriptors count against that uid's share (shares.py)
    next_offset: int | None = None  # where the last read ended (window.SequentialWindow's)

    @property
    def path(self) -> str:
        return self.tracked.relpath

    @property
    def identity(self) -> Identity:
        """The version this handle reads, whatever the source holds now."""
        return self.tracked.entry.identity

    @property
    def cacheable(self) -> bool:
        """Whether its bytes go through a cache file (False: a stand-in for a full cache)."""
        return self.tracked.entry.cacheable

    @property
    def complete(self) -> bool:
        """Whether every chunk is verified in the cache file (in this daemon's life)."""
        return self.tracked.entry.complete

    def open_cache_file(self) -> int:
        """A new read-only descriptor of the cache file, for the kernel to read directly
        (passthrough); the caller closes it. Read-only: whoever it is handed to cannot write
        into the cache through it."""
        return os.open(f"/proc/self/fd/{self.tracked.entry.data_fd}", os.O_RDONLY | os.O_CLOEXEC)


class OpenFiles:
    """The table of TrackedFiles by path (see the module docstring)."""

    def __init__(self, source: Source, store: CacheStore, budget: CacheBudget, metrics: Metrics, tasks: Tasks,
                 chunk_size: int, on_disk_full: Callable[[str], Awaitable[None]],
                 on_version_gone: Callable[[str], None]) -> None:
        """on_disk_full(relpath): called when the cache filesystem has no room for a new
        entry of relpath, to make some (the evictor), before the one retry.
        on_version_gone(relpath): the version of relpath the daemon knew is retired or
        evicted (readahead done for it is then to be done again)."""
        self.source = source
        self.store = store
        self.budget = budget
        self.metrics = metrics
        self.tasks = tasks
        self.chunk_size = chunk_size
        self.on_disk_full = on_disk_full
        self.on_version_gone = on_version_gone
        self.opening = KeyedLock()  # held while a path is opened, and while it is evicted
        self._files: dict[str, TrackedFile] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()
        # retired versions still open: their cache files are unlinked, their space not yet free
        self._retired: set[TrackedFile] = set()
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._fd_budget = max(16, (soft if soft != resource.RLIM_INFINITY else 1 << 20) - FD_RESERVE)
        self._max_idle = min(MAX_IDLE_FILES, max(4, self._fd_budget // (4 * FDS_PER_FILE)))
        self._fds = 0  # held by tracked files and open directories
        self.shares = UidShares(self._fd_budget // 2)
        # open directories may use half the reserve: files cannot starve them, nor they lookups
        self.dir_share = FD_RESERVE // 2
        tasks.on_out_of_fds = self._shed_idle

    # ---- lookup ------------------------------------------------------------------------

    def get(self, relpath: str) -> TrackedFile | None:
        return self._files.get(relpath)

    def is_current(self, tracked: TrackedFile) -> bool:
        """Whether tracked is still the version new opens of its path get."""
        return self._files.get(tracked.relpath) is tracked

    def in_use(self, relpath: str) -> bool:
        tracked = self._files.get(relpath)
        return tracked is not None and tracked.users > 0

    def all(self) -> list[TrackedFile]:
        return list(self._files.values())

    # ---- open, reference, close ------------------------------------------------------------

    async def open(self, relpath: str, uid: int) -> Handle:
        """A handle on the current version of relpath (opened, validated, or replaced), for
        uid; EMFILE if uid's open files already hold its share of the descriptors."""
        tracked = await self.acquire(relpath)
        try:
            self.shares.add(uid, tracked, tracked.fds)
        except OSError:
            self.unref(tracked)
            raise
        if tracked.entry.cacheable:  # a stand-in has nothing cached to keep fresh
            now = time.time()
            self.budget.touch(relpath, now)
            self.tasks.spawn(self.store.touch, relpath, now)
        return Handle(tracked, uid)

    def close(self, handle: Handle) -> None:
        """The handle's open ended."""
        self.shares.remove(handle.uid, handle.tracked, handle.tracked.fds)
        self.unref(handle.tracked)

    async def acquire(self, relpath: str) -> TrackedFile:
        """The current TrackedFile of relpath, with one more user; created or replaced as needed."""
        async with self.opening.hold(relpath):
            # claimed up front, for a file opened anew; given back if the file is tracked already
            await self.claim_fds(FDS_PER_FILE)
            try:
                # given up at an INTERRUPT: a killed opener is not held by a source that hangs
                src_fd, opened = await self.tasks.out_of_fds_retried(lambda: self.tasks.abandonable(
                    self.source.open, relpath, key=("open", relpath), discard=lambda result: os.close(result[0])))
            except BaseException:
                self._fds -= FDS_PER_FILE
                raise
            identity = self.source.identity(opened)
            tracked = self._files.get(relpath)
            if tracked is not None and tracked.identity == identity:
                # referenced before anything awaits: an idle file may otherwise be closed meanwhile
                self.ref(tracked)
                self._fds -= FDS_PER_FILE
                self.tasks.spawn(os.close, src_fd)
                return tracked
            if tracked is not None:
                self.retire(tracked)
            else:
                tracked = self._revive(relpath, identity)
                if tracked is not None:
                    self._fds -= FDS_PER_FILE
                    self.tasks.spawn(os.close, src_fd)
                    return tracked
            try:
                entry = await self._open_entry(relpath, identity)
            except BaseException:
                self._fds -= FDS_PER_FILE
                os.close(src_fd)
                raise
            tracked = TrackedFile(relpath, entry, src_fd, opened)
            self._fds -= FDS_PER_FILE - tracked.fds
            self.ref(tracked)
            if entry.cacheable:  # an uncached stand-in is not kept: the next open retries
                self._files[relpath] = tracked
                try:
                    self.budget.set_cached(relpath, entry.cached_bytes(), entry.disk_bytes())
                except OSError:
                    self.unref(tracked)  # tracked and unreferenced: closed once idle, as any other
                    raise
            return tracked

    async def _open_entry(self, relpath: str, identity: Identity) -> CacheEntry:
        """The store's entry for this version; if the cache filesystem is full even after
        evicting, or the cache dir is no longer trusted (a directory above it made writable
        by others since the mount), or the file is larger than it takes, an uncached stand-in
        whose reads go straight to the source. EFBIG for a file of more than MAX_CHUNKS
        chunks: its chunk states alone would take gigabytes (a sparse file of petabytes costs
        its writer nothing)."""
        if -(-identity.size // self.chunk_size) > MAX_CHUNKS:
            raise OSError(errno.EFBIG, f"{identity.size} bytes: more than {MAX_CHUNKS} chunks of "
                                       f"{self.chunk_size} bytes, beyond what fusecache serves", relpath)
        for attempt in range(2):
            try:
                return await self.tasks.io(self.store.open_entry, relpath, identity, self.chunk_size)
            except StoreError as e:  # the cache dir is no longer ours alone: write nothing there
                repeats.warning("%s; reading %s straight from the source", e, relpath)
                return uncached_entry(relpath, identity, self.chunk_size)
            except OSError as e:
                if e.errno in (errno.EFBIG, errno.EOVERFLOW):
                    repeats.warning("%s is too large for the cache filesystem (%s); reading it straight from "
                                    "the source", relpath, e.strerror)
                    return uncached_entry(relpath, identity, self.chunk_size)
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                self.metrics.count_error(error_kind(e))
                if attempt == 0:
                    await self.on_disk_full(relpath)
        repeats.warning("no space in the cache for %s; reading it straight from the source", relpath)
        return uncached_entry(relpath, identity, self.chunk_size)

    def ref(self, tracked: TrackedFile) -> None:
        tracked.users += 1
        if tracked.users == 1 and self.is_current(tracked):
            self._idle.pop(tracked.relpath, None)

    def unref(self, tracked: TrackedFile) -> None:
        tracked.users -= 1
        if tracked.users:
            return
        if self.is_current(tracked):
            self._idle[tracked.relpath] = None
            while len(self._idle) > self._max_idle:
                relpath, _ = self._idle.popitem(last=False)
                self._close(self._files.pop(relpath))
        else:
            self._close(tracked)

    def retire(self, tracked: TrackedFile) -> None:
        """The source holds another version now: stop handing this one out; its open handles
        keep reading it until released."""
        log.info("%s changed in the source; its cached copy is dropped", tracked.relpath)
        del self._files[tracked.relpath]
        self.on_version_gone(tracked.relpath)
        if tracked.users == 0:
            self._idle.pop(tracked.relpath, None)
            self._close(tracked)
        elif tracked.entry.cacheable:
            self._retired.add(tracked)

    def _revive(self, relpath: str, identity: Identity) -> TrackedFile | None:
        """A retired version of relpath that the source holds after all, its cache files still
        in place, made current again (with one more user): the lookup that retired it saw
        attributes a network filesystem's cache kept from before. Loaded a second time
        instead, two live entries would write one pair of cache files, each fetching again
        what the other holds and taking the other's writes for foreign ones."""
        for tracked in self._retired:
            if tracked.relpath == relpath and tracked.identity == identity and in_place(tracked.entry):
                self._retired.discard(tracked)
                self._files[relpath] = tracked
                self.ref(tracked)
                log.info("%s is unchanged in the source after all; its cached copy is kept", relpath)
                return tracked
        return None

    def pending_bytes(self) -> int:
        """Cache bytes of retired versions still open (unlinked; freed at their last close)."""
        return sum(t.entry.cached_bytes() for t in self._retired)

    def drop(self, relpath: str) -> None:
        """Forget relpath's version, which nobody uses (the evictor removes its cache files)."""
        self.on_version_gone(relpath)
        tracked = self._files.pop(relpath, None)
        if tracked is not None:
            assert tracked.users == 0, relpath
            self._idle.pop(relpath, None)
            self._close(tracked)

    def _close(self, tracked: TrackedFile) -> None:
        """Close a version's cache entry and source fd, once, off the trio thread."""
        if tracked.closed:
            return
        tracked.closed = True
        self._retired.discard(tracked)
        self._fds -= tracked.fds
        self.tasks.spawn(tracked.close_fds)

    # ---- descriptors ---------------------------------------------------------------------

    async def claim_fds(self, n: int, share: int = 0) -> None:
        """Count n more descriptors as held, closing idle files to make room. When files in
        use hold the whole budget, only the open asking fails (EMFILE), never other requests.
        `share`: how much of the reserve this claim may use (dir_share for directories)."""
        budget = self._fd_budget + share
        excess = self._fds + n - budget
        if excess > 0 and self._idle:
            await self._close_idle(-(-excess // FDS_PER_FILE))
        if self._fds + n > budget:
            repeats.warning("%d descriptors are held by files open through the mount: refusing one more open",
                        self._fds)
            raise OSError(errno.EMFILE, "too many files open through the mount")
        self._fds += n

    def release_fds(self, n: int) -> None:
        self._fds -= n

    def count_dir(self, uid: int, fd: int) -> None:
        """Attribute an open directory (its descriptor) to uid's share; EMFILE at the share."""
        self.shares.add(uid, ("dir", fd), 1)

    def uncount_dir(self, uid: int, fd: int) -> None:
        self.shares.remove(uid, ("dir", fd), 1)

    async def _shed_idle(self) -> bool:
        count = len(self._idle)
        await self._close_idle(count)
        return count > 0

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

        def close_all() -> None:
            for tracked in victims:
                try:
                    tracked.close_fds()
                except OSError as e:
                    log.warning("closing %s failed: %s", tracked.relpath, e)

        with trio.CancelScope(shield=True):  # counted as closed: they must be
            await trio.to_thread.run_sync(close_all)

"""The engine as the FUSE adapter sees it: one object, one call per operation."""

from __future__ import annotations

import errno
import logging
import os

import trio

from .. import acl
from ..budget import CacheBudget
from ..config import MountConfig
from ..metrics import Metrics
from ..source import UNREACHABLE, Source
from ..store import CacheStore
from .direct import CompleteFile, RepliesInFlight, complete_file
from .errors import CacheFull, ReadError
from .evictor import Evictor, EvictorConfig
from .fetcher import Fetcher, FetcherConfig
from .files import Handle, OpenFiles, TrackedFile, seal
from .reader import Reader
from .shards import CheckpointPolicy
from .streams import StreamConfig, StreamScheduler
from .tasks import Tasks
from .window import SequentialWindow

log = logging.getLogger(__name__)

PASSTHROUGH_POLL = 0.02  # how often an open waiting for its file checks whether it is complete
STREAM_START_GRACE = 0.5  # how long a queued stream may take to start for the open that queued it


class Engine:
    """Wires the parts (see the package docstring) and answers the adapter's calls."""

    def __init__(self, config: MountConfig, source: Source, store: CacheStore, metrics: Metrics,
                 budget: CacheBudget, cache_in_memory: bool = False) -> None:
        self.source = source
        self.metrics = metrics
        self.budget = budget
        self.tasks = Tasks()
        self.files = OpenFiles(source, store, budget, metrics, self.tasks, config.chunk_size,
                               on_disk_full=lambda relpath: self.evictor.after_disk_full(relpath),
                               on_version_gone=lambda relpath: self.streams.version_gone(relpath))
        self.evictor = Evictor(EvictorConfig.from_mount(config), store, budget, metrics, self.files, self.tasks)
        self.fetcher = Fetcher(FetcherConfig.from_mount(config), source, self.files, self.evictor, budget,
                               metrics, self.tasks, copies_take_turns=cache_in_memory)
        policy = CheckpointPolicy(source, config.readahead, config.readahead_min_size)
        self.streams = StreamScheduler(StreamConfig.from_mount(config), self.files, self.fetcher, policy,
                                       metrics, self.tasks)
        self.reader = Reader(source, self.fetcher, SequentialWindow.from_mount(config), metrics, self.tasks,
                             config.workers, serve_from_memory=cache_in_memory)
        self._replies = RepliesInFlight()  # the reader threads' replies from each cache file (direct)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load what the store holds, then own the background work (flights, streams)."""
        await self.evictor.load()
        async with trio.open_nursery() as nursery:
            self.tasks.nursery = nursery
            self.streams.start_workers()
            task_status.started()
            await trio.sleep_forever()

    # ---- metadata ----------------------------------------------------------------------

    async def lstat(self, relpath: str) -> os.stat_result:
        """lstat the source; a changed identity retires the cached version for new opens."""
        st = await self.tasks.io(self.source.lstat, relpath)
        tracked = self.files.get(relpath)
        # ctime alone is not enough: a network filesystem's cached attributes may lag the
        # open file's, and a full re-validation on the next open catches a real change anyway
        if tracked is not None and not self.source.identity(st).same_content(tracked.identity):
            self.files.retire(tracked)
        return st

    async def opendir(self, relpath: str, uid: int = 0) -> int:
        """A source descriptor to read the directory from, counted against the budget and
        against uid's share of it (shares.py: one user's listings must not leave the others'
        opens no descriptor); EMFILE for uid alone once its share is held."""
        await self.files.claim_fds(1, share=self.files.dir_share)
        try:
            fd = await self.tasks.io(self.source.opendir, relpath)
            try:
                self.files.count_dir(uid, fd)
            except OSError:
                os.close(fd)
                raise
        except BaseException:
            self.files.release_fds(1)
            raise
        return fd

    async def readdir(self, fd: int, offset: int, batch_bytes: int) -> list[tuple[str, int, os.stat_result]]:
        return await self.tasks.io(self.source.readdir, fd, offset, batch_bytes)

    def closedir(self, fd: int, uid: int = 0) -> None:
        self.files.uncount_dir(uid, fd)
        self.files.release_fds(1)
        self.tasks.spawn(os.close, fd)

    async def fstat(self, handle: Handle) -> os.stat_result:
        """Attributes of the file a handle has open (its size and mtime may have moved on
        since: `handle.identity` has the version's); while the source cannot be reached, those
        it had when opened. Referenced meanwhile, so a concurrent release cannot close the fd
        under the call."""
        self.files.ref(handle.tracked)
        try:
            return await self.tasks.io(os.fstat, handle.tracked.src_fd)
        except OSError as e:
            if e.errno not in UNREACHABLE:
                raise
            return handle.tracked.opened
        finally:
            self.files.unref(handle.tracked)

    async def check_access(self, relpath: str, want: int, uid: int, gid: int, pid: int) -> None:
        """Refuse (EACCES) what the source's POSIX ACLs deny the requester: `want` (acl.R, X)
        on relpath, search on every directory above it. The kernel checked the mode bits."""
        if uid == 0 or not self.source.has_acls:
            return
        try:
            # given up at an INTERRUPT of the open asking
            chain = await self.tasks.abandonable(self.source.acl_chain, relpath, key=("acl", relpath))
        except acl.MalformedAcl as e:
            log.warning("denying access below a malformed ACL (%s): %s", relpath, e)
            raise OSError(errno.EACCES, "malformed ACL") from None
        if all(entry_acl is None for _st, entry_acl in chain):
            return
        groups = await self.tasks.io(acl.requester_groups, pid, gid)
        wants = [acl.X] * (len(chain) - 1) + [want]
        if not all(acl.check(entry_acl, st, uid, groups, bits) for (st, entry_acl), bits in zip(chain, wants)):
            raise OSError(errno.EACCES, f"denied by an ACL: {relpath}")

    async def readlink(self, relpath: str) -> str:
        return await self.tasks.io(self.source.readlink, relpath)

    async def statvfs(self) -> os.statvfs_result:
        return await self.tasks.io(self.source.statvfs)

    # ---- data --------------------------------------------------------------------------

    async def open(self, relpath: str, uid: int = 0) -> Handle:
        """Open relpath for uid (whose share of the descriptors it counts against),
        validating any cached copy against the source's current identity."""
        handle = await self.files.open(relpath, uid)
        if handle.tracked.entry.cacheable:
            self.streams.opened(relpath, handle.tracked.entry.identity)
        return handle

    def direct(self, handle: Handle) -> CompleteFile | None:
        """What the session's threads may serve handle's reads from, if its file is complete
        and checked now (engine/direct.py); None: every read comes here."""
        return complete_file(handle, self.metrics, drop_pages=not self.reader.serve_from_memory,
                             replies=self._replies)

    async def read(self, handle: Handle, offset: int, size: int, buf: memoryview) -> memoryview:
        """The bytes at offset; buf (the caller's, size bytes) may be where they are put."""
        return await self.reader.read(handle, offset, size, buf)

    async def wait_verified_whole(self, handle: Handle, wait: float) -> bool:
        """Whether handle's file is complete and verified in this daemon's life, so that its
        cache file may be read directly (by the kernel, under passthrough), bypassing the
        engine's per-read checks. A file a stream is filling is waited for, up to `wait`
        seconds; chunks an earlier daemon recorded are checked (in parallel flights)."""
        tracked = handle.tracked
        entry = tracked.entry
        everything = range(entry.nchunks)
        await self.tasks.io(entry.recheck)
        started = trio.current_time()
        with trio.move_on_after(wait):
            while (entry.missing_bytes(everything) and self.files.is_current(tracked)
                   and self._filling(tracked, started)):
                await trio.sleep(PASSTHROUGH_POLL)
        if entry.complete:
            self._seal_in_background(tracked)  # filled by reads, not a stream: sealed on its first passthrough open
            return True
        if entry.missing_bytes(everything):
            return False  # not all here: served by us, demand reads first
        try:  # all here, some recorded by an earlier daemon: checked on every core (with any stream)
            await self.fetcher.ensure_whole(tracked, self.fetcher.verify)
        except (CacheFull, ReadError) as e:
            log.info("%s is not served by passthrough: %s", tracked.relpath, e)
            return False
        self._seal_in_background(tracked)  # checked whole: the next restart need not check it again
        return entry.complete

    def _seal_in_background(self, tracked: TrackedFile) -> None:
        """Seal tracked's file (an fdatasync of all of it, seconds on a disk) beside the open
        that completed it, not in its way: an open waits for nothing it cannot be interrupted
        in. The entry may be closed meanwhile (CacheEntry.seal then does nothing)."""
        if not tracked.entry.sealed and tracked.entry.cacheable:
            self.tasks.start_soon(seal, self.tasks, tracked)

    async def release(self, handle: Handle) -> None:
        self.files.close(handle)

    def _filling(self, tracked: TrackedFile, since: float) -> bool:
        """Whether a stream is filling tracked now; one queued counts for a moment after the
        open (the open itself queues it), not while it waits behind other files."""
        queued = self.streams.state(tracked.relpath)[0]
        return self.streams.is_streaming(tracked) or (queued and trio.current_time() - since < STREAM_START_GRACE)

    # ---- cache control -----------------------------------------------------------------

    @property
    def pins(self) -> set[str]:
        return self.evictor.pins

    def is_pinned(self, relpath: str) -> bool:
        return self.evictor.is_pinned(relpath)

    async def set_pins(self, pins: set[str]) -> None:
        await self.evictor.set_pins(pins)

    async def evict(self, relpath: str) -> bool:
        return await self.evictor.evict(relpath)

    def prefetch(self, relpath: str) -> None:
        self.streams.prefetch(relpath)

    def stream_state(self, relpath: str) -> tuple[bool, str | None]:
        return self.streams.state(relpath)

    # ---- introspection -----------------------------------------------------------------

    def cached_extent(self, relpath: str) -> tuple[int, int] | None:
        """(cached bytes, size) of the version of relpath this daemon tracks; None if none."""
        tracked = self.files.get(relpath)
        return None if tracked is None else (tracked.entry.cached_bytes(), tracked.entry.size)

    def fill(self) -> tuple[int, int, int]:
        """(stream reads in flight, how many are allowed now, bytes their buffers hold)."""
        return self.streams.fill_state()

    def activity(self) -> tuple[int, int]:
        """(files in use, files streaming)."""
        return sum(1 for t in self.files.all() if t.users), self.streams.running()

    def open_files(self) -> list[dict]:
        """Per-file state of the files this daemon currently tracks."""
        return [
            {"path": t.relpath, "size": t.entry.size, "cached": t.entry.cached_bytes(), "users": t.users,
             "streaming": self.streams.is_streaming(t), "inflight_chunks": self.fetcher.inflight_chunks(t)}
            for t in self.files.all()
        ]

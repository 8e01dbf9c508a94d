"""Which opens the kernel serves itself from the cache file (passthrough), and which come to us.

Once a file is complete and verified in the cache, an open answered FOPEN_PASSTHROUGH with the
cache file as backing file makes the kernel read (and mmap) that file directly: no request
reaches the daemon, and with a tmpfs cache the mount's pages are the cache file's own pages.

The kernel's rule (fs/fuse/iomode.c): an inode is either in cached mode (opens served by us)
or in passthrough mode, never both; a passthrough open while a cached one exists fails with
ETXTBSY, and every open while a passthrough one exists must be passthrough on the same backing
file. So per inode we count both kinds and keep one backing id while passthrough opens exist.
A file that completes while cached opens hold its inode is served by us on that inode, and the
choice tells the adapter to give later lookups a new inode (`IOMode.new_inode`), whose opens get
passthrough; the old opens keep theirs. An open is never refused for its mode: an unchanged file
always opens.

An open of a file being filled (a stream or prefetch) waits for it up to `wait` seconds:
reading it through the FUSE path would go no faster than the fill, and afterwards the kernel
serves it at memory speed.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .engine import Engine, Handle
from .livestate import Backing
from .session.types import BackingFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IOMode:
    """How one open is served."""

    backing_id: int | None = None  # the kernel reads this backing file; None: served by us
    # the file is complete but its inode is held in cached mode: later lookups of its path
    # should give a new inode, whose opens can be passthrough
    new_inode: bool = False


@dataclass
class InodeIO:
    """The opens of one inode the kernel holds, by I/O mode."""

    cached: int = 0
    passthrough: int = 0
    waiting: int = 0  # opens deciding, while they wait for the file to complete
    backing_id: int = 0
    # the kernel would not take the inode's cache file as backing: a new inode would not help
    refused: bool = False
    # the backing id came from the journal after a crash: the kernel may hold passthrough opens
    # on it that the journal missed (opened after its last write), so counting ours to zero
    # proves nothing. Kept registered until unmount, and every passthrough open of the inode
    # gets it: the kernel refuses an open with another id while it holds this one (EIO).
    kept: bool = False
    unjournaled: bool = False  # registered, and no journal write naming it begun yet (journal())
    journaling: trio.Event | None = None  # set once the journal write naming it is over
    closing: trio.Event | None = None  # set once its last release has written the ids and closed it


class Passthrough:
    """Chooses each open's I/O mode (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.backing: BackingFiles | None = None
        self.wait = 0.0
        self.off_reason = "not enabled"
        self._inodes: dict[int, InodeIO] = {}

    def enable(self, backing: BackingFiles, wait: float) -> None:
        self.backing = backing
        self.wait = wait
        self.off_reason = ""

    @property
    def enabled(self) -> bool:
        return self.backing is not None

    async def choose(self, inode: int, handle: Handle, latest: bool) -> IOMode:
        """How to serve this open of inode: on the inode's mode, never refused. latest: inode
        is what a lookup of its path gives now (a new inode is asked for only then)."""
        while True:
            while (io := self._inodes.get(inode)) is not None and io.closing is not None:
                await io.closing.wait()  # its id goes: this open gets a new one, written before it is answered
            io = self._inodes.setdefault(inode, InodeIO())
            io.waiting += 1
            try:
                mode = await self._choose(io, handle, latest)
            except BaseException:  # interrupted, or its file could not be checked: no entry left behind
                io.waiting -= 1
                self._tidy(inode, io)
                raise
            io.waiting -= 1
            if io.closing is None:
                break
            # the inode's last passthrough release began closing its id while this open waited
            # for its file: given that id, it would be open on one the journal leaves out
            self._tidy(inode, io)
        if mode.backing_id is None:
            io.cached += 1
        else:
            io.passthrough += 1
            self.engine.metrics.passthrough_opens += 1
            self.engine.metrics.passthrough_bytes += handle.identity.size
        self._tidy(inode, io)
        return mode

    async def _choose(self, io: InodeIO, handle: Handle, latest: bool) -> IOMode:
        if io.passthrough or (io.kept and not io.cached):  # the kernel wants every open on its backing file
            return IOMode(io.backing_id)
        if self.backing is None or not handle.cacheable:
            return IOMode()
        if io.cached:
            return IOMode(new_inode=latest and handle.complete and not io.refused)
        complete = await self.engine.wait_verified_whole(handle, self.wait)
        if io.passthrough:  # another open of the inode registered it while we waited: on it, whatever
            return IOMode(io.backing_id)
        if not complete or io.cached:
            return IOMode()
        try:
            io.backing_id = self._register(handle)
            io.unjournaled = True
        except OSError as e:
            log.warning("passthrough refused for %s, served by fusecache: %s", handle.path, e)
            io.refused = True
            return IOMode()
        return IOMode(io.backing_id)

    async def journal(self, inode: int, persist: Callable[[], Awaitable[bool]]) -> None:
        """Before an open given a backing id is answered, the journal names the id: the kernel
        holds one backing file per inode, and after a crash a journal without it would have
        the next daemon register another, which the kernel refuses while it holds this one.
        The first open after the registration writes the journal (persist); the inode's other
        opens meanwhile wait for that write rather than be answered before it."""
        io = self._inodes.get(inode)
        if io is None:
            return
        if io.journaling is not None:
            await io.journaling.wait()
        elif io.unjournaled:
            io.unjournaled, io.journaling = False, trio.Event()
            try:
                await persist()
            finally:
                io.journaling.set()
                io.journaling = None

    def _register(self, handle: Handle) -> int:
        """A backing id for the cache file, given to the kernel read-only."""
        assert self.backing is not None
        fd = handle.open_cache_file()
        try:
            return self.backing.open(fd)
        finally:
            os.close(fd)

    async def release(self, inode: int, passthrough: bool, persist: Callable[[], Awaitable[bool]]) -> None:
        """released(), the journal written first (persist) where this closes the inode's
        backing id (its last passthrough open, on an id not kept), so that no journal names a
        closed id. An open of the inode meanwhile waits for the close and gets a new id:
        given this one, it would be open on an id the write just left out."""
        io = self._inodes.get(inode)
        if not (passthrough and io is not None and io.passthrough == 1 and self.backing is not None
                and not io.kept):
            self.released(inode, passthrough)
            return
        io.closing = trio.Event()
        try:
            await persist()
        finally:
            self.released(inode, passthrough)
            io.closing.set()
            io.closing = None

    def released(self, inode: int, passthrough: bool) -> None:
        io = self._inodes.get(inode)
        if io is None:
            return
        if not passthrough:
            io.cached -= 1
        else:
            io.passthrough -= 1
            if io.passthrough == 0 and self.backing is not None and not io.kept:
                try:
                    self.backing.close(io.backing_id)
                except OSError as e:
                    log.warning("closing backing id %d failed: %s", io.backing_id, e)
                io.backing_id = 0
        self._tidy(inode, io)

    def export_state(self, passthrough_inodes: set[int]) -> list[Backing]:
        """The backing ids the next daemon must know (the ids belong to the connection, not
        to this process): those of the inodes with passthrough handles open (given, without
        the handle being released now: its id is closed next), and the kept ones. So a
        state's id on an inode with no passthrough handle in it is a kept one, and is kept
        by the next daemon too."""
        return [Backing(inode, io.backing_id, io.kept) for inode, io in self._inodes.items()
                if io.kept or (io.passthrough and inode in passthrough_inodes)]

    def import_state(self, backing: list[Backing], opens: list[tuple[int, bool]], after_crash: bool = False) -> None:
        """Take over another daemon's export_state(), with the (inode, passthrough) of every
        handle the kernel has open, restored or not: each is released here some day.
        after_crash: the state is a journal's, which may miss opens: its backing ids are kept
        (InodeIO.kept), as is any id the state marks kept or whose inode has no passthrough
        handle in it (how format 1 said kept: livestate.READS)."""
        for inode, passthrough in opens:
            io = self._inodes.setdefault(inode, InodeIO())
            if passthrough:
                io.passthrough += 1
            else:
                io.cached += 1
        for b in backing:
            io = self._inodes.setdefault(b.inode, InodeIO())
            io.backing_id = b.backing_id
            io.kept = after_crash or b.kept or not io.passthrough
        if any(io.passthrough and not io.backing_id for io in self._inodes.values()):
            raise ValueError("a passthrough open without its backing id")

    def _tidy(self, inode: int, io: InodeIO) -> None:
        if not io.cached and not io.passthrough and not io.waiting and not io.kept:
            self._inodes.pop(inode, None)


def probe(backing: BackingFiles, cache_fd: int) -> str | None:
    """Register a file of the cache filesystem as a backing file and let it go: None if the
    kernel takes it, else why passthrough stays off."""
    fd = os.open(f"/proc/self/fd/{cache_fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        backing.close(backing.open(fd))
    except OSError as e:
        if e.errno == errno.EPERM:
            return "registering backing files needs CAP_SYS_ADMIN (run the daemon as root)"
        if e.errno == errno.ELOOP:
            return "the cache filesystem is itself stacked (overlayfs or FUSE); the kernel refuses it as backing"
        return f"the kernel refuses the cache filesystem as backing: {e.strerror or e}"
    finally:
        os.close(fd)
    return None

"""What the FUSE adapter (fs.py) and a FUSE session say to each other, whichever session it is.

The adapter offers `Operations` and answers with these types; a `Session` (the kernel
protocol's own, kernel.py, or pyfuse3's, pyfuse3_session.py) turns them into replies. Neither
side knows how the other is built.

Errors: the adapter raises what it meets (OSError from the source or the cache, the engine's
ReadError, which carries an errno, or FuseError for an answer of its own) and the session turns
it into the reply's errno in one place, `reply_errno`. Anything else is a bug in one request:
logged once with the operation's name and answered EIO, never passed on to the session's loop.
"""

from __future__ import annotations

import errno as errno_codes
import logging
import os
from dataclasses import dataclass
from typing import Callable, Protocol

log = logging.getLogger(__name__)

# The kernel takes a reply's error only below this (fs/fuse/dev.c refuses -512 and lower,
# which are its own internal codes): a reply it refuses leaves the caller waiting for good.
MAX_ERRNO = 512


class FuseError(Exception):
    """Answer the request with this errno."""

    def __init__(self, errno: int) -> None:
        super().__init__(errno)
        self.errno = errno


@dataclass(frozen=True)
class Context:
    """Who made a request."""

    uid: int
    gid: int
    pid: int


@dataclass
class Attributes:
    """A node's attributes as the kernel gets them, with how long it may cache them."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    entry_timeout: float
    attr_timeout: float
    generation: int = 0


class DirectFile(Protocol):
    """A file complete and checked in the cache (when it was opened, or since), as the
    session's reader threads may serve its reads themselves, without the adapter
    (session/queues.py): the cache file's descriptor and the version's size, fixed for the
    open's life. Every method is safe from any thread."""

    fd: int  # the cache data file: read-only use, valid until the open is released
    size: int

    def unchanged(self) -> bool:
        """Whether every byte is still as checked (no foreign write into the cache file
        since): False sends the read to the adapter, which checks the chunks again."""

    def view(self, offset: int, length: int) -> memoryview | None:
        """The range as a view of a mapping the cache keeps, where the cache is in memory
        (tmpfs: no copy of our own, no mapping per reply); None where it is not. Asked right
        after `unchanged()` answered True, which it does not repeat."""

    def serving(self, offset: int, length: int) -> None:
        """A reply of the range is about to go out: counted first, so that a reader whose read
        has returned finds it in the metrics (as the trio path counts before it replies)."""

    def served(self, offset: int, length: int) -> None:
        """A reply of the range went out: on a disk cache the cache file's pages of it
        dropped (the mount's page cache holds them now)."""

    def ticket(self) -> Ticket | None:
        """What a reader process needs to serve the open's reads without asking again
        (session/processes.py); None if the cache file changed since it was checked."""


@dataclass(frozen=True)
class Ticket:
    """An open's complete file as a reader process holds it (session/processes.py), besides
    the cache file's descriptor: the version's size and chunk size (to count hits), and the
    cache file's stamp (store.Stamp) while its bytes are as checked. A reply goes out only
    while the stamp is unchanged (store.same_content): any write into the file moves it."""

    size: int
    chunk_size: int
    stamp: tuple[int, int, int, int]


@dataclass(frozen=True)
class OpenReply:
    """An open's answer: the handle, whether the kernel may keep the pages it holds of the
    inode, for a passthrough open the backing id the kernel reads from instead of us, and for
    a file complete in the cache the `DirectFile` its reads may be served from."""

    fh: int
    keep_cache: bool
    backing_id: int | None = None
    direct: DirectFile | None = None


# readdir's sink: add(name, attributes, offset of the next entry) -> False once the reply is full
DirentSink = Callable[[bytes, Attributes, int], bool]


class BackingFiles(Protocol):
    """Registers files the kernel serves passthrough opens from (kernel session only)."""

    def open(self, fd: int) -> int:
        """A backing id for the file fd refers to; OSError if the kernel refuses."""

    def close(self, backing_id: int) -> None:
        """The kernel stops handing out backing_id; files opened with it keep it."""


class Operations(Protocol):
    """What the adapter (fs.FuseOperations) offers a session: one method per FUSE request it
    serves. Each raises as `reply_errno` reads (see the module docstring)."""

    async def lookup(self, parent_inode: int, name: bytes, ctx: Context) -> Attributes: ...

    async def getattr(self, inode: int, ctx: Context) -> Attributes: ...

    async def readlink(self, inode: int, ctx: Context) -> bytes: ...

    async def opendir(self, inode: int, ctx: Context) -> int: ...

    async def readdir(self, fh: int, offset: int, add: DirentSink, counts_lookups: bool = True) -> None:
        """Entries from offset on, given to add() until it says the reply is full;
        counts_lookups: each entry given counts as a lookup (READDIRPLUS)."""

    async def releasedir(self, fh: int) -> None: ...

    async def statfs(self, ctx: Context) -> os.statvfs_result: ...

    async def getxattr(self, inode: int, name: bytes, ctx: Context) -> bytes: ...

    async def listxattr(self, inode: int, ctx: Context) -> list[bytes]: ...

    async def access(self, inode: int, mode: int, ctx: Context) -> None: ...

    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        """The kernel dropped nlookup references to each (inode, nlookup); FORGET has no reply."""

    async def open(self, inode: int, flags: int, ctx: Context) -> OpenReply: ...

    async def read(self, fh: int, offset: int, size: int, buf: memoryview, inode: int = 0) -> memoryview | bytes:
        """Up to size bytes at offset; buf (size bytes, the session's) may hold the reply,
        which the session sends before it reuses buf."""

    def direct_file(self, fh: int) -> DirectFile | None:
        """The DirectFile of an open FUSE-path handle whose file is complete and checked now
        (one that completed after it was opened); None otherwise, or once it was released."""

    async def release(self, fh: int) -> None: ...


class Session(Protocol):
    """One mount served to the kernel, whichever session serves it."""

    backing: BackingFiles | None  # set once the kernel agreed to passthrough (kernel session only)

    def mount(self) -> None:
        """Mount; OSError if it cannot be made."""

    async def serve(self) -> None:
        """Answer requests until the mount goes away or terminate() is called."""

    def terminate(self) -> None:
        """Make serve() return (a signal)."""

    def close(self) -> None:
        """Unmount the mount this session made, if it is still there, and let go of it."""


def reply_errno(error: Exception, operation: str) -> int:
    """The errno a request that failed with `error` is answered with (see the module docstring):
    the error's own errno if it carries one, else EIO, and an unexpected error is logged."""
    code = getattr(error, "errno", None)
    if isinstance(code, int) and 0 < code < MAX_ERRNO:
        return code
    if isinstance(code, int) and code > 0:  # a kernel-internal code a network filesystem let out (NFS's 524)
        log.warning("answering %s with EIO for errno %d, which the kernel would refuse as a reply", operation, code)
    if not isinstance(error, OSError):  # an OSError without an errno is no bug of ours
        log.error("unexpected error answering %s", operation, exc_info=error)
    return errno_codes.EIO

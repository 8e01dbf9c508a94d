"""What the FUSE adapter (fs.py) and a FUSE session say to each other, whichever session it is.

The adapter answers with these types and raises FuseError; a session (the kernel protocol's own,
kernel.py, or pyfuse3's, pyfuse3_session.py) turns them into replies. Neither side knows how
the other is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol


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


@dataclass(frozen=True)
class OpenReply:
    """An open's answer: the handle, whether the kernel may keep the pages it holds of the
    inode, and for a passthrough open the backing id the kernel reads from instead of us."""

    fh: int
    keep_cache: bool
    backing_id: int | None = None


# readdir's sink: add(name, attributes, offset of the next entry) -> False once the reply is full
DirentSink = Callable[[bytes, Attributes, int], bool]


class BackingFiles(Protocol):
    """Registers files the kernel serves passthrough opens from (kernel session only)."""

    def open(self, fd: int) -> int:
        """A backing id for the file fd refers to; OSError if the kernel refuses."""

    def close(self, backing_id: int) -> None:
        """The kernel stops handing out backing_id; files opened with it keep it."""

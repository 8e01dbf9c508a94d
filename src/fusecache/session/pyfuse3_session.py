"""The fallback session: libfuse through pyfuse3 (`-o session=pyfuse3`).

For platforms where our own session cannot run. It has no passthrough (pyfuse3 offers none)
and answers from a fixed set of worker tasks, which copy each reply in the trio thread.
"""

from __future__ import annotations

import builtins
import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pyfuse3
import trio

from ..config import MAX_REQUEST
from ..fairness import requester
from .mount import MountIdentity, MountSpec, identify, mount_options, unmount_own
from .protocol import WRITE_OPS
from .types import Attributes, Context, Operations, reply_errno

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable])


def _replying(fn: F) -> F:
    """pyfuse3 answers a request with the errno of its own FUSEError, and passes anything else
    up to its main loop, which ends: every error becomes a FUSEError here (reply_errno)."""
    operation = fn.__name__.upper()

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except Exception as e:
            raise pyfuse3.FUSEError(reply_errno(e, operation)) from None

    return wrapper  # type: ignore[return-value]


def _entry(attr: Attributes) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    for ours, theirs in (("ino", "st_ino"), ("mode", "st_mode"), ("nlink", "st_nlink"), ("uid", "st_uid"),
                         ("gid", "st_gid"), ("rdev", "st_rdev"), ("size", "st_size"), ("blocks", "st_blocks"),
                         ("blksize", "st_blksize"), ("atime_ns", "st_atime_ns"), ("mtime_ns", "st_mtime_ns"),
                         ("ctime_ns", "st_ctime_ns"), ("entry_timeout", "entry_timeout"),
                         ("attr_timeout", "attr_timeout"), ("generation", "generation")):
        setattr(entry, theirs, getattr(attr, ours))
    return entry


def _context(ctx: pyfuse3.RequestContext) -> Context:
    """The request's Context; also its requester for the fair sharing of the metadata threads
    (fairness.requester). pyfuse3 gives no context to read, readdir or release: those count as
    the worker task's previous requester."""
    requester.set(ctx.uid)
    return Context(ctx.uid, ctx.gid, ctx.pid)


class _Operations(pyfuse3.Operations):
    """pyfuse3's calling convention over the adapter's."""

    def __init__(self, adapter: Operations) -> None:
        super().__init__()
        self.adapter = adapter
        self._buffers: dict[object, bytearray] = {}

    @_replying
    async def lookup(self, parent_inode, name, ctx=None):
        return _entry(await self.adapter.lookup(parent_inode, name, _context(ctx)))

    @_replying
    async def getattr(self, inode, ctx=None):
        return _entry(await self.adapter.getattr(inode, _context(ctx)))

    @_replying
    async def readlink(self, inode, ctx):
        return await self.adapter.readlink(inode, _context(ctx))

    @_replying
    async def opendir(self, inode, ctx):
        return await self.adapter.opendir(inode, _context(ctx))

    @_replying
    async def readdir(self, fh, start_id, token):
        await self.adapter.readdir(fh, start_id, lambda name, attr, next_offset: pyfuse3.readdir_reply(
            token, name, _entry(attr), next_offset))

    @_replying
    async def releasedir(self, fh):
        await self.adapter.releasedir(fh)

    @_replying
    async def statfs(self, ctx):
        vfs = await self.adapter.statfs(_context(ctx))
        data = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                     "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(data, attr, getattr(vfs, attr))
        return data

    @_replying
    async def getxattr(self, inode, name, ctx):
        return await self.adapter.getxattr(inode, name, _context(ctx))

    @_replying
    async def listxattr(self, inode, ctx):
        return await self.adapter.listxattr(inode, _context(ctx))

    @_replying
    async def access(self, inode, mode, ctx):
        await self.adapter.access(inode, mode, _context(ctx))
        return True

    async def forget(self, inode_list):
        """No reply: a failure is only logged."""
        try:
            self.adapter.forget(inode_list)
        except Exception as e:
            reply_errno(e, "FORGET")

    @_replying
    async def open(self, inode, flags, ctx):
        reply = await self.adapter.open(inode, flags, _context(ctx))
        return pyfuse3.FileInfo(fh=reply.fh, keep_cache=reply.keep_cache)

    @_replying
    async def read(self, fh, off, size):
        return await self.adapter.read(fh, off, size, self._buffer(size))

    def _buffer(self, size: int) -> memoryview:
        """A reply buffer owned by the calling worker task. pyfuse3 copies a reply to the
        kernel before its task takes the next request, and runs a fixed set of tasks."""
        task = trio.lowlevel.current_task()
        buf = self._buffers.get(task)
        if buf is None or len(buf) < size:
            buf = self._buffers[task] = bytearray(max(size, MAX_REQUEST))
        return memoryview(buf)[:size]

    @_replying
    async def release(self, fh):
        await self.adapter.release(fh)


async def _read_only(self, *args, **kwargs):
    raise pyfuse3.FUSEError(errno.EROFS)


# pyfuse3 calls the method named as the request: those that write are answered EROFS, as our
# session answers protocol.WRITE_OPS (the rest of them pyfuse3 answers ENOSYS itself).
for _op in WRITE_OPS:
    if hasattr(pyfuse3.Operations, _op.name.lower()):
        builtins.setattr(_Operations, _op.name.lower(), _read_only)


class Pyfuse3Session:
    """The same life cycle as KernelSession, through pyfuse3."""

    backing = None

    def __init__(self, operations: Operations, spec: MountSpec, workers: int) -> None:
        self.operations = _Operations(operations)
        self.spec = spec
        self.workers = workers
        self._initialized = False
        self._made: MountIdentity | None = None  # which mount is ours, for close()

    def mount(self) -> None:
        try:
            pyfuse3.init(self.operations, self.spec.mountpoint, set(mount_options(self.spec)))
        except RuntimeError as e:
            raise OSError(str(e)) from None
        self._initialized = True
        self._made = identify(self.spec.mountpoint)

    async def serve(self) -> None:
        await pyfuse3.main(min_tasks=self.workers, max_tasks=self.workers)

    def terminate(self) -> None:
        pyfuse3.terminate()

    def close(self) -> None:
        """Unmount our mount if it is still there, as KernelSession.close. libfuse would unmount
        whatever the path holds unless the kernel closed our connection, and leave a mount
        whose connection was aborted in place: it unmounts only where the mount id cannot
        tell our mount from another (before Linux 6.8)."""
        if self._initialized:
            self._initialized = False
            if self._made is not None and self._made.unique_id is not None:
                pyfuse3.close(unmount=False)
                unmount_own(self.spec.mountpoint, self._made, connected=False)
            else:
                pyfuse3.close(unmount=True)

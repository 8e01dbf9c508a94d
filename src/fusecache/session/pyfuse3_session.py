"""The fallback session: libfuse through pyfuse3 (`-o session=pyfuse3`).

For platforms where our own session cannot run. It has no passthrough (pyfuse3 offers none)
and answers from a fixed set of worker tasks, which copy each reply in the trio thread.
"""

from __future__ import annotations

import errno
import logging
import os

import pyfuse3
import trio

from ..config import MAX_REQUEST
from ..mounts import find_mount
from .mount import MountSpec, _escape, unmount
from .types import Attributes, Context, FuseError

log = logging.getLogger(__name__)


def _converted(fn):
    """pyfuse3 wants its own error type."""

    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except FuseError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    return wrapper


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
    return Context(ctx.uid, ctx.gid, ctx.pid)


class _Operations(pyfuse3.Operations):
    """pyfuse3's calling convention over the adapter's."""

    def __init__(self, adapter) -> None:
        super().__init__()
        self.adapter = adapter
        self._buffers: dict[object, bytearray] = {}

    @_converted
    async def lookup(self, parent_inode, name, ctx=None):
        return _entry(await self.adapter.lookup(parent_inode, name, _context(ctx)))

    @_converted
    async def getattr(self, inode, ctx=None):
        return _entry(await self.adapter.getattr(inode, _context(ctx)))

    @_converted
    async def readlink(self, inode, ctx):
        return await self.adapter.readlink(inode, _context(ctx))

    @_converted
    async def opendir(self, inode, ctx):
        return await self.adapter.opendir(inode, _context(ctx))

    @_converted
    async def readdir(self, fh, start_id, token):
        await self.adapter.readdir(fh, start_id, lambda name, attr, next_offset: pyfuse3.readdir_reply(
            token, name, _entry(attr), next_offset))

    async def releasedir(self, fh):
        await self.adapter.releasedir(fh)

    @_converted
    async def statfs(self, ctx):
        vfs = await self.adapter.statfs(_context(ctx))
        data = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                     "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(data, attr, getattr(vfs, attr))
        return data

    @_converted
    async def getxattr(self, inode, name, ctx):
        return await self.adapter.getxattr(inode, name, _context(ctx))

    @_converted
    async def listxattr(self, inode, ctx):
        return await self.adapter.listxattr(inode, _context(ctx))

    @_converted
    async def access(self, inode, mode, ctx):
        await self.adapter.access(inode, mode, _context(ctx))
        return True

    async def forget(self, inode_list):
        self.adapter.forget(inode_list)

    @_converted
    async def open(self, inode, flags, ctx):
        reply = await self.adapter.open(inode, flags, _context(ctx))
        return pyfuse3.FileInfo(fh=reply.fh, keep_cache=reply.keep_cache)

    @_converted
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

    async def release(self, fh):
        await self.adapter.release(fh)

    async def _read_only(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only
    create = write = setxattr = removexattr = _read_only


class Pyfuse3Session:
    """The same life cycle as KernelSession, through pyfuse3."""

    passthrough = False
    backing = None

    def __init__(self, operations, spec: MountSpec, workers: int) -> None:
        self.operations = _Operations(operations)
        self.spec = spec
        self.workers = workers
        self._initialized = False
        self._device: tuple[int, int] | None = None  # the mount's st_dev, from the mount table

    def mount(self) -> None:
        options = set(self.spec.options) | {"ro", f"fsname={_escape(self.spec.fsname)}", f"subtype={self.spec.subtype}"}
        if self.spec.allow_other:
            options.add("allow_other")
        try:
            pyfuse3.init(self.operations, self.spec.mountpoint, options)
        except RuntimeError as e:
            raise OSError(str(e)) from None
        self._initialized = True
        info = find_mount(self.spec.mountpoint)  # the table, not a stat: nobody serves the mount yet
        self._device = (info.major, info.minor) if info is not None else None

    async def serve(self) -> None:
        await pyfuse3.main(min_tasks=self.workers, max_tasks=self.workers)

    def terminate(self) -> None:
        pyfuse3.terminate()

    def close(self) -> None:
        if self._initialized:
            self._initialized = False
            pyfuse3.close(unmount=True)
            # libfuse leaves a mount whose connection was aborted in place (its device reports an
            # error, and it takes that for "already unmounted"): detach it, as our session does.
            info = find_mount(self.spec.mountpoint)
            if info is not None and (info.major, info.minor) == self._device:
                try:
                    unmount(self.spec.mountpoint)
                except OSError as e:
                    log.warning("unmounting %s failed: %s", self.spec.mountpoint, e)

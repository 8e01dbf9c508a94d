"""The FUSE adapter: translates pyfuse3 requests into engine calls, and nothing more.

It owns the one thing that is purely FUSE's: inode numbers. Each version of a path gets a
number the first time the kernel sees it, kept for the whole mount so inode numbers are stable.
A version is the relative path plus the source's inode number and, for a regular file, its
size, mtime and ctime: a file replaced in the source (new source inode) or modified in place
gets a new number, even when the rewrite kept its size and restored its mtime. The kernel keeps one page cache per inode, so handles opened on the old version keep
their own pages and never see bytes of the new one, and new opens never see the old pages.
Errors become FUSEError with the source's errno; a failure in one request never escapes to
the main loop.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat as stat_mod
from typing import Awaitable, Callable, TypeVar

import pyfuse3

from . import acl
from .engine import Engine, Handle, ReadError
from .source import Identity

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable])


def fuse_errors(fn: F) -> F:
    """Map OSError/ReadError to FUSEError; log and answer EIO for anything unexpected."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ReadError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


Version = tuple[int, ...]


def version_of(st: os.stat_result, identity: Identity) -> Version:
    """What tells two versions of a path apart (see the module docstring); identity is the
    source's Identity of st (which leaves out inode numbers the source does not keep)."""
    if stat_mod.S_ISREG(st.st_mode):
        return version_of_file(identity)
    return (identity.ino,)


def version_of_file(identity: Identity) -> Version:
    return (identity.ino, identity.size, identity.mtime_ns, identity.ctime_ns)


class InodeTable:
    """Bidirectional map between inode numbers and (relative path, version) pairs.
    The root ('') is always ROOT_INODE, whatever the source says, and has no version.

    The latest version seen of each path keeps its number for the whole mount (stable
    inode numbers). An outdated version is dropped once the kernel has forgotten it (its
    lookup count, raised by lookup and readdirplus replies and lowered by forget, is zero),
    so a file that changes often does not grow the table without bound."""

    def __init__(self) -> None:
        self._versions: dict[int, tuple[str, Version | None]] = {pyfuse3.ROOT_INODE: ("", None)}
        self._inodes: dict[tuple[str, Version], int] = {}
        self._latest: dict[str, int] = {}
        self._lookups: dict[int, int] = {}
        self._next = pyfuse3.ROOT_INODE + 1

    def version(self, inode: int) -> tuple[str, Version | None]:
        try:
            return self._versions[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def path(self, inode: int) -> str:
        return self.version(inode)[0]

    def inode(self, relpath: str, version: Version) -> int:
        """The number of this version of relpath, now its latest."""
        if relpath == "":
            return pyfuse3.ROOT_INODE
        key = (relpath, version)
        inode = self._inodes.get(key)
        if inode is None:
            inode = self._inodes[key] = self._next
            self._versions[inode] = key
            self._next += 1
        previous = self._latest.get(relpath)
        self._latest[relpath] = inode
        if previous is not None and previous != inode and not self._lookups.get(previous):
            self._drop(previous)
        return inode

    def looked_up(self, inode: int) -> None:
        """The kernel got inode in a lookup or readdirplus reply."""
        if inode != pyfuse3.ROOT_INODE:
            self._lookups[inode] = self._lookups.get(inode, 0) + 1

    def forget(self, inode: int, nlookup: int) -> None:
        remaining = self._lookups.get(inode, 0) - nlookup
        if remaining > 0:
            self._lookups[inode] = remaining
            return
        self._lookups.pop(inode, None)
        relpath = self._versions.get(inode, ("", None))[0]
        if relpath and self._latest.get(relpath) != inode:
            self._drop(inode)

    def _drop(self, inode: int) -> None:
        key = self._versions.pop(inode, None)
        if key is not None:
            self._inodes.pop(key, None)


class FuseOperations(pyfuse3.Operations):
    """Read-only mirror of the source tree, data served through the engine's cache."""

    def __init__(self, engine: Engine, attr_timeout: float) -> None:
        super().__init__()
        self.engine = engine
        self.attr_timeout = attr_timeout
        self.inodes = InodeTable()
        self._handles: dict[int, tuple[int, Handle]] = {}  # fh -> (inode, handle)
        self._dirs: dict[int, tuple[str, int]] = {}  # fh -> (relpath, source descriptor)
        self._next_fh = 1

    def _entry(self, relpath: str, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Attributes of relpath under the inode number of the version st describes."""
        return self._attributes(self.inodes.inode(relpath, self._version(st)), st)

    def _version(self, st: os.stat_result) -> Version:
        return version_of(st, self.engine.source.identity(st))

    def _attributes(self, inode: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = self.attr_timeout
        attr.attr_timeout = self.attr_timeout
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = 1 << 20
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # ---- metadata ----------------------------------------------------------------------

    async def _check_access(self, relpath: str, want: int, ctx: pyfuse3.RequestContext) -> None:
        """The source's POSIX ACLs, which default_permissions leaves unchecked."""
        await self.engine.check_access(relpath, want, ctx.uid, ctx.gid, ctx.pid)

    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self.inodes.path(parent_inode)
        await self._check_access(parent, acl.X, ctx)
        relpath = self.engine.source.child(parent, os.fsdecode(name))
        attr = self._entry(relpath, await self.engine.lstat(relpath))
        self.inodes.looked_up(attr.st_ino)
        return attr

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        relpath, version = self.inodes.version(inode)
        try:
            st: os.stat_result | None = await self.engine.lstat(relpath)
        except FileNotFoundError:
            st = None
        if st is not None and (version is None or self._version(st) == version):
            return self._attributes(inode, st)
        # The path was removed or now holds another version: an fstat of an open handle wants
        # the version that handle has open (whose bytes it reads, whatever the source did since).
        handle = next((h for i, h in self._handles.values() if i == inode), None)
        if handle is None:
            if st is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attributes(inode, st)  # a stat through a stale dentry: what is there now
        attr = self._attributes(inode, await self.engine.fstat(handle))
        attr.st_size = handle.tracked.identity.size
        attr.st_mtime_ns = handle.tracked.identity.mtime_ns
        return attr

    @fuse_errors
    async def readlink(self, inode, ctx):
        relpath = self.inodes.path(inode)
        await self._check_access(relpath.rpartition("/")[0], acl.X, ctx)
        return os.fsencode(await self.engine.readlink(relpath))

    @fuse_errors
    async def opendir(self, inode, ctx):
        relpath = self.inodes.path(inode)
        await self._check_access(relpath, acl.R, ctx)
        fd = await self.engine.opendir(relpath)
        fh = self._new_fh()
        self._dirs[fh] = (relpath, fd)
        return fh

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        # Streamed from the source directory: offsets are the source's own position cookies,
        # so nothing of the listing is held between calls, whatever the directory's size.
        relpath, fd = self._dirs[fh]
        offset = start_id
        while batch := await self.engine.readdir(fd, offset):
            for name, next_offset, st in batch:
                attr = self._entry(self.engine.source.child(relpath, name), st)
                if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, next_offset):
                    return
                self.inodes.looked_up(attr.st_ino)
                offset = next_offset

    async def releasedir(self, fh):
        entry = self._dirs.pop(fh, None)
        if entry is not None:
            self.engine.closedir(entry[1])

    @fuse_errors
    async def statfs(self, ctx):
        vfs = await self.engine.statvfs()
        data = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                     "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(data, attr, getattr(vfs, attr))
        return data

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode, ctx):
        return []

    @fuse_errors
    async def access(self, inode, mode, ctx):
        # With default_permissions the kernel answers access(2) from the mode bits itself and
        # never asks; answered anyway for a kernel that does: no writing, and the ACLs.
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        await self._check_access(self.inodes.path(inode), mode & (acl.R | acl.X), ctx)
        return True

    async def forget(self, inode_list):
        for inode, nlookup in inode_list:
            self.inodes.forget(inode, nlookup)

    # ---- data --------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode, flags, ctx):
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        relpath, version = self.inodes.version(inode)
        await self._check_access(relpath, acl.R, ctx)
        handle = await self.engine.open(relpath)
        if version_of_file(handle.tracked.identity) != version:
            # the kernel's dentry still names the previous version: ESTALE makes it look the
            # path up again (LOOKUP_REVAL) and open the new inode instead
            await self.engine.release(handle)
            raise pyfuse3.FUSEError(errno.ESTALE)
        fh = self._new_fh()
        self._handles[fh] = (inode, handle)
        return pyfuse3.FileInfo(fh=fh, keep_cache=handle.keep_cache)

    @fuse_errors
    async def read(self, fh, off, size):
        return await self.engine.read(self._handles[fh][1], off, size)

    async def release(self, fh):
        inode_and_handle = self._handles.pop(fh, None)
        if inode_and_handle is not None:
            await self.engine.release(inode_and_handle[1])

    # ---- everything that writes --------------------------------------------------------

    async def _read_only(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only
    create = write = setxattr = removexattr = _read_only


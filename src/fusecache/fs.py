"""The FUSE adapter: translates a FUSE session's requests into engine calls, and nothing more.

It owns the one thing that is purely FUSE's: inode numbers. Each version of a path gets a
number the first time the kernel sees it, kept for the whole mount so inode numbers are stable.
A version is the relative path plus the source's inode number and, for a regular file, its
size, mtime and ctime: a file replaced in the source (new source inode) or modified in place
gets a new number, even when the rewrite kept its size and restored its mtime. The kernel keeps one page cache per inode, so handles opened on the old version keep
their own pages and never see bytes of the new one, and new opens never see the old pages.
Errors are raised as they come (OSError, the engine's ReadError, or FuseError for an answer of
its own): the session turns them into the reply's errno (session/types.py). Which session delivers the requests (session/kernel.py or pyfuse3's) is not
this module's business: it speaks session/types.py.

A file's version also carries an *epoch*: a file that becomes complete in the cache while
opens through the FUSE path hold its inode cannot get passthrough opens on that inode (the
kernel keeps one I/O mode per inode), so its epoch moves on and later lookups give a new
inode, whose opens do (see passthrough.py). An open of an unchanged file is never refused:
one through an inode of an older epoch is served on that inode, as its opens allow; only an
open of an inode whose version the source no longer holds is answered ESTALE.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
from collections.abc import Awaitable, Callable

import trio

from . import acl
from .engine import Engine, Handle
from .passthrough import Passthrough
from .session.types import Attributes, Context, DirectFile, DirentSink, FuseError, OpenReply
from .inodes import InodeTable, Version
from .livestate import AdapterState, Backing, OpenDir, OpenFile
from .source import Identity, readdir_batches

log = logging.getLogger(__name__)


def version_of(st: os.stat_result, identity: Identity) -> Version:
    """What tells two versions of a path apart (see the module docstring); identity is the
    source's Identity of st (which leaves out inode numbers the source does not keep)."""
    if stat_mod.S_ISREG(st.st_mode):
        return version_of_file(identity)
    return (identity.ino,)


def version_of_file(identity: Identity) -> Version:
    return (identity.ino, identity.size, identity.mtime_ns, identity.ctime_ns)


def attributes_of(timeout: float, inode: int, st: os.stat_result) -> Attributes:
    """st as the kernel is told it under inode, valid for timeout seconds."""
    return Attributes(ino=inode, mode=st.st_mode, nlink=st.st_nlink, uid=st.st_uid, gid=st.st_gid,
                      rdev=st.st_rdev, size=st.st_size, blocks=st.st_blocks, blksize=1 << 20,
                      atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
                      entry_timeout=timeout, attr_timeout=timeout)


class KeepCache:
    """FOPEN_KEEP_CACHE, per path: the kernel may keep the pages it holds of a file only if
    the version it last opened through this mount is the one opened now (else they may be an
    older version's). Known only for paths the kernel holds an inode of: once it has forgotten
    them all, it holds no pages of the path either, and the entry goes (so this stays as small
    as the inode table)."""

    def __init__(self, inodes: InodeTable) -> None:
        self.inodes = inodes
        self._served: dict[str, Identity] = {}

    def opened(self, relpath: str, identity: Identity) -> bool:
        """Record an open of this version of relpath; whether it may keep the kernel's pages."""
        keep = self._served.get(relpath, identity) == identity
        if self.inodes.holds(relpath):
            self._served[relpath] = identity
        return keep

    def forgotten(self, relpath: str) -> None:
        """The kernel forgot an inode of relpath: drop it once it holds none."""
        if not self.inodes.holds(relpath):
            self._served.pop(relpath, None)

    def __len__(self) -> int:
        return len(self._served)


class FuseOperations:
    """Read-only mirror of the source tree, data served through the engine's cache, or by
    the kernel from the cache file itself (passthrough) once a file is complete."""

    def __init__(self, engine: Engine, attr_timeout: float) -> None:
        self.engine = engine
        self.attr_timeout = attr_timeout
        self.inodes = InodeTable()
        self.keep_cache = KeepCache(self.inodes)
        self.passthrough = Passthrough(engine)  # off until the daemon enables it
        self._handles: dict[int, tuple[int, Handle, bool]] = {}  # fh -> (inode, handle, passthrough)
        # handles a restart could not restore (their version is gone): read EIO until released
        self._lost: dict[int, tuple[int, bool]] = {}  # fh -> (inode, passthrough)
        self._dirs: dict[int, tuple[str, int, int]] = {}  # fh -> (relpath, source descriptor, uid)
        self._next_fh = 1
        self._imported_next_fh = 0  # handles below it may have been opened by a process before us
        # called whenever the tables a crash's successor needs change (journal.Journal.changed)
        self.changed: Callable[[], None] = lambda: None
        # writes the backing ids now (journal.Journal.flush_backing): a passthrough inode's
        # first open, or its last release
        self.persist_backing: Callable[[], Awaitable[bool]] = _nothing

    def _entry(self, relpath: str, st: os.stat_result) -> Attributes:
        """Attributes of relpath, looked up: under the inode number of the version st
        describes, which the kernel holds from now until it forgets it."""
        self.changed()
        return attributes_of(self.attr_timeout, self.inodes.hold(relpath, self._version(relpath, st)), st)

    def _version(self, relpath: str, st: os.stat_result) -> Version:
        version = version_of(st, self.engine.source.identity(st))
        return version + (self.inodes.epoch(relpath),) if stat_mod.S_ISREG(st.st_mode) else version

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # ---- metadata ----------------------------------------------------------------------

    async def _check_access(self, relpath: str, want: int, ctx: Context) -> None:
        """The source's POSIX ACLs, which default_permissions leaves unchecked."""
        await self.engine.check_access(relpath, want, ctx.uid, ctx.gid, ctx.pid)

    async def _directory(self, inode: int, want: int, ctx: Context) -> str:
        """The path of directory inode, if the requester may `want` it and it still names the
        directory the kernel holds: not another put in its place (`mv new live`), whose mode
        bits the kernel has not checked (ESTALE: the kernel looks the path up again)."""
        relpath, version = self.inodes.version(inode)
        if version is not None and self._version(relpath, await self.engine.lstat(relpath)) != version:
            raise FuseError(errno.ESTALE)
        await self._check_access(relpath, want, ctx)
        return relpath

    async def lookup(self, parent_inode: int, name: bytes, ctx: Context) -> Attributes:
        relpath = self.engine.source.child(await self._directory(parent_inode, acl.X, ctx), os.fsdecode(name))
        return self._entry(relpath, await self.engine.lstat(relpath))

    async def getattr(self, inode: int, ctx: Context) -> Attributes:
        relpath, version = self.inodes.version(inode)
        try:
            st: os.stat_result | None = await self.engine.lstat(relpath)
        except OSError as e:
            # Gone, or its path leads nowhere now (a directory above swapped for a link, ENOTDIR,
            # ELOOP), or the source cannot be reached: a file open through the mount still reads
            # its version, and the kernel may ask for its attributes before each read (libfuse
            # negotiates AUTO_INVAL_DATA): answer the version's.
            if not isinstance(e, FileNotFoundError) and self._handle_of(inode) is None:
                raise
            st = None
        # the same version, maybe under an older epoch (as open takes it): the same bytes
        if st is not None and (version is None or self._version(relpath, st)[:4] == version[:4]):
            return attributes_of(self.attr_timeout, inode, st)
        # The path was removed or holds another version, or the source cannot be reached: an
        # fstat of an open handle wants the version it has open (whose bytes it reads).
        handle = self._handle_of(inode)
        if handle is None:  # a stale dentry (or an open directory): what the path holds now is
            # another inode's; under this one the kernel would cache it (of another type, it
            # marks the inode bad: EIO). ESTALE has a stat by path look the path up again.
            raise FuseError(errno.ENOENT if st is None else errno.ESTALE)
        attr = attributes_of(self.attr_timeout, inode, await self.engine.fstat(handle))
        attr.size = handle.identity.size
        attr.mtime_ns = handle.identity.mtime_ns
        return attr

    def _handle_of(self, inode: int) -> Handle | None:
        """One handle open on inode, if any (a scan: asked only when the source disappoints)."""
        return next((h for i, h, _ in self._handles.values() if i == inode), None)

    async def readlink(self, inode: int, ctx: Context) -> bytes:
        relpath = self.inodes.path(inode)
        await self._check_access(relpath.rpartition("/")[0], acl.X, ctx)
        return os.fsencode(await self.engine.readlink(relpath))

    async def opendir(self, inode: int, ctx: Context) -> int:
        relpath = await self._directory(inode, acl.R, ctx)
        fd = await self.engine.opendir(relpath, ctx.uid)
        fh = self._new_fh()
        self._dirs[fh] = (relpath, fd, ctx.uid)
        self.changed()
        return fh

    async def readdir(self, fh: int, offset: int, add: DirentSink, counts_lookups: bool = True) -> None:
        """Entries from offset on, given to add() until it is full. Streamed from the source
        directory: offsets are the source's own position cookies, so nothing of the listing
        is held between calls, whatever the directory's size. counts_lookups: each entry
        given counts as a lookup (READDIRPLUS)."""
        opened = self._dirs.get(fh)
        if opened is None:  # a restart could not open it again (import_state)
            raise FuseError(errno.EIO)
        relpath, fd, _uid = opened
        for batch_bytes in readdir_batches():
            if not (batch := await self.engine.readdir(fd, offset, batch_bytes)):
                return
            for name, next_offset, st in batch:
                child = self.engine.source.child(relpath, name)
                version = self._version(child, st)
                attr = attributes_of(self.attr_timeout, self.inodes.inode(child, version), st)
                if not add(os.fsencode(name), attr, next_offset):
                    return
                if counts_lookups:
                    self.inodes.hold(child, version)
                    self.changed()
                offset = next_offset

    async def releasedir(self, fh: int) -> None:
        if (entry := self._dirs.pop(fh, None)) is not None:
            self.changed()
            self.engine.closedir(entry[1], entry[2])

    async def statfs(self, ctx: Context) -> os.statvfs_result:
        return await self.engine.statvfs()

    async def getxattr(self, inode: int, name: bytes, ctx: Context) -> bytes:
        raise FuseError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: Context) -> list[bytes]:
        return []

    async def access(self, inode: int, mode: int, ctx: Context) -> None:
        # With default_permissions the kernel answers access(2) from the mode bits itself and
        # never asks; answered anyway for a kernel that does: no writing, and the ACLs.
        if mode & os.W_OK:
            raise FuseError(errno.EROFS)
        await self._check_access(self.inodes.path(inode), mode & (acl.R | acl.X), ctx)

    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            if not self.inodes.is_held(inode):
                continue  # nothing to forget
            relpath = self.inodes.path(inode)
            self.inodes.forget(inode, nlookup)
            self.changed()
            self.keep_cache.forgotten(relpath)

    # ---- data --------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Context) -> OpenReply:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FuseError(errno.EROFS)
        relpath, version = self.inodes.version(inode)
        await self._check_access(relpath, acl.R, ctx)
        handle = await self.engine.open(relpath, ctx.uid)
        try:
            if version is None or version[:-1] != version_of_file(handle.identity):
                # another version than the kernel's dentry names: ESTALE has it look up again
                raise FuseError(errno.ESTALE)
            # the same version, maybe under an older epoch: served on this inode, never refused
            current = self.inodes.is_latest(inode) and version[-1] == self.inodes.epoch(relpath)
            mode = await self.passthrough.choose(inode, handle, latest=current)
            if mode.new_inode:
                self.inodes.next_epoch(relpath)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.engine.release(handle)
            raise
        fh = self._new_fh()
        self._handles[fh] = (inode, handle, mode.backing_id is not None)
        self.changed()
        if mode.backing_id is not None:  # the journal names the inode's backing file before the answer
            with trio.CancelScope(shield=True):  # the handle is made: answered, never dropped by an interrupt
                await self.passthrough.journal(inode, self.persist_backing)
        return OpenReply(fh=fh, keep_cache=self.keep_cache.opened(relpath, handle.identity),
                         backing_id=mode.backing_id,
                         direct=None if mode.backing_id is not None else self.engine.direct(handle))

    async def read(self, fh: int, offset: int, size: int, buf: memoryview, inode: int = 0) -> memoryview:
        """Up to size bytes at offset; buf (size bytes, the session's) may hold the reply.
        inode: the one the kernel reads fh on (0 where the session does not say)."""
        opened = self._handles.get(fh)
        if opened is None:
            opened = await self._unjournaled(fh, inode)
        elif inode and opened[0] != inode:  # a number given out twice (crashes): never another file's bytes
            raise FuseError(errno.EIO)
        return await self.engine.read(opened[1], offset, size, buf)

    async def _unjournaled(self, fh: int, inode: int) -> tuple[int, Handle, bool]:
        """A handle the kernel reads that this process never opened. Below the imported next
        fh and not lost, it was opened by a process that crashed after its last journal write
        (journal.py): opened again here on the version its inode names, if the inode is known.
        Otherwise (lost in a restart, an unknown inode, a version gone) EIO: never another
        version's bytes."""
        if not inode or fh >= self._imported_next_fh or fh in self._lost or not self.inodes.is_held(inode):
            raise FuseError(errno.EIO)
        handle = await self._reopen(inode)
        if handle is None:
            raise FuseError(errno.EIO)
        if (opened := self._handles.get(fh)) is not None:  # another read got there first
            await self.engine.release(handle)
            return opened
        self._handles[fh] = (inode, handle, False)  # read through the daemon: not passthrough
        self.passthrough.import_state([], [(inode, False)])
        self.changed()
        return self._handles[fh]

    async def release(self, fh: int) -> None:
        self.changed()
        if (opened := self._handles.pop(fh, None)) is not None:
            inode, handle, passthrough = opened
            await self.passthrough.release(inode, passthrough, self.persist_backing)
            await self.engine.release(handle)
        elif (lost := self._lost.pop(fh, None)) is not None:
            await self.passthrough.release(*lost, self.persist_backing)

    def passthrough_opens(self) -> dict[str, int]:
        """Open passthrough handles per path."""
        counts: dict[str, int] = {}
        for _inode, handle, passthrough in self._handles.values():
            if passthrough:
                counts[handle.path] = counts.get(handle.path, 0) + 1
        return counts

    # ---- a restart's hand-over (livestate.py, handover.py) ------------------------------

    def export_state(self) -> AdapterState:
        """Inodes, handles and backing ids, for the daemon that takes the connection over.
        Called with no request in flight (the session drained them)."""
        held, paths = self.inodes.export_state()
        dirs = [OpenDir(fh, relpath) for fh, (relpath, _fd, _uid) in self._dirs.items()]
        return AdapterState(held, paths, self._open_files(), dirs, self.export_backing(), self._next_fh)

    def export_backing(self) -> list[Backing]:
        """export_state()'s backing ids alone: written on their own (journal.py) as they change."""
        return self.passthrough.export_state({f.inode for f in self._open_files() if f.passthrough})

    def _open_files(self) -> list[OpenFile]:
        """The handles to hand on. Not one on an inode the kernel forgot, which no file open
        holds: one a crashed daemon's lagging journal kept after its release."""
        opened = [(fh, inode, pt) for fh, (inode, _h, pt) in self._handles.items()] + [
            (fh, inode, pt) for fh, (inode, pt) in self._lost.items()]
        return [OpenFile(fh, inode, pt) for fh, inode, pt in opened if self.inodes.is_held(inode)]

    async def import_state(self, state: AdapterState, after_crash: bool = False) -> int:
        """Take over another daemon's export_state() (after_crash: its journal's), before
        serving a request. Each handle is opened again, through the engine, on the version its
        inode names; one whose version the source no longer has is kept as lost (its reads
        fail with EIO) rather than given other bytes. Returns how many handles were lost.
        ValueError if the state does not hold together."""
        self.inodes.import_state(state.inodes, state.paths)
        self._next_fh = self._imported_next_fh = state.next_fh
        for f in state.files:
            if f.fh >= state.next_fh or f.fh in self._handles or f.fh in self._lost:
                raise ValueError(f"handle {f.fh} is invalid")
            if not self.inodes.is_held(f.inode):  # the kernel holds every inode it has open
                raise ValueError(f"handle {f.fh} is on inode {f.inode}, which the kernel does not hold")
            handle = await self._reopen(f.inode)
            if handle is None:
                self._lost[f.fh] = (f.inode, f.passthrough)
            else:
                self._handles[f.fh] = (f.inode, handle, f.passthrough)
        for d in state.dirs:
            try:
                self._dirs[d.fh] = (d.relpath, await self.engine.opendir(d.relpath), 0)  # ours, not a user's
            except OSError as e:
                log.warning("directory %r open before the restart cannot be read: %s", d.relpath, e)
        self.passthrough.import_state(state.backing, [(f.inode, f.passthrough) for f in state.files], after_crash)
        return len(self._lost)

    def direct_files(self) -> dict[int, DirectFile]:
        """The DirectFile of each open FUSE-path handle whose file is complete now: after
        import_state, so that the reads of handles opened before a restart go to the session's
        reader threads as before it."""
        return {fh: file for fh in self._handles if (file := self.direct_file(fh)) is not None}

    def direct_file(self, fh: int) -> DirectFile | None:
        opened = self._handles.get(fh)  # (inode, handle, passthrough: read by the kernel itself)
        return None if opened is None or opened[2] else self.engine.direct(opened[1])

    async def _reopen(self, inode: int) -> Handle | None:
        """A handle on the version inode names, or None if the source no longer has it."""
        relpath, version = self.inodes.version(inode)
        try:
            handle = await self.engine.open(relpath)
        except OSError as e:
            log.warning("%r, open before the restart, cannot be opened again: %s", relpath, e)
            return None
        if version is None or version_of_file(handle.identity) != version[:-1]:
            log.warning("%r changed in the source before the restart: its open handles read EIO", relpath)
            await self.engine.release(handle)
            return None
        return handle


async def _nothing() -> bool:
    """persist() of an adapter without a journal."""
    return True

"""Access to the source tree (the network filesystem). Blocking calls: run them off the trio thread.

Everything in the source is input from whoever can write there, so nothing is reached by
joining path strings. The daemon holds a descriptor of the source root, taken before the
mount exists, and resolves every relative path beneath it with openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS), or, where the kernel lacks openat2, one openat(O_NOFOLLOW) per
component: a symlink in any component, or a directory swapped for one while a path is being
resolved, makes the call fail instead of leading outside SOURCE. A path longer than PATH_MAX
is resolved the same way a stretch at a time, each beneath the directory the stretch before
opened. Symlinks are reported as links and never followed. Files are opened with O_NONBLOCK
(a FIFO must not hang a thread) and must be regular files; a directory is read from a
descriptor, a batch at a time.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Iterator

from . import acl, kernelcopy, linux, mounts

log = logging.getLogger(__name__)

_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
# getdents64 buffers of the batches of one readdir reply, each entry of which is stat'ed:
# small first (a 4 KiB READDIRPLUS reply holds some twenty entries: 8 KiB batches stat'ed six
# entries for each one sent), doubling for a kernel that asks for 1 MiB at once (Linux 6.x)
READDIR_FIRST_BATCH = 1024
READDIR_LAST_BATCH = 64 << 10
# The longest relative path given to one open: PATH_MAX (4096, its NUL included) less a margin
_PATH_STRETCH = 4000


# What a source answers while it cannot be reached: its mount died (ENOTCONN), its server
# does not answer (a soft NFS mount: ETIMEDOUT, EIO), its network is down. A file open
# through the mount still has a version to describe then (fs.FuseOperations.getattr).
UNREACHABLE = frozenset({errno.ENOTCONN, errno.ETIMEDOUT, errno.EIO, errno.ESHUTDOWN, errno.EHOSTDOWN,
                         errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH, errno.ECONNREFUSED,
                         errno.ECONNRESET, errno.ECONNABORTED})


@dataclass(frozen=True)
class Identity:
    """What makes cached bytes valid: if any field differs, the source file changed.

    `ino` is 0 for sources whose inode numbers are not stable (see Source.stable_inodes).
    ctime is part of it: a rewrite in place that keeps the size and restores the mtime still
    moves the ctime, which no user can set."""

    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int

    @property
    def content_key(self) -> tuple[int, int, int]:
        """What two stats of the same bytes share for certain. ctime is left out: it also
        moves when an open file is unlinked or renamed over, which leaves its bytes as they
        were (Source.read_exact tells that from a change in place)."""
        return (self.ino, self.size, self.mtime_ns)

    def same_content(self, other: Identity) -> bool:
        return self.content_key == other.content_key


class SourceChanged(OSError):
    """The source file changed while we were reading it; the bytes read must not be cached."""

    def __init__(self, relpath: str) -> None:
        super().__init__(errno.ESTALE, f"source file changed while reading: {relpath}")


def _stretches(parts: list[str]) -> list[list[str]]:
    """parts cut into runs whose joined path the kernel takes in one call (under PATH_MAX,
    4096 bytes with its NUL); one name is at most NAME_MAX (255) bytes, the kernel says so."""
    stretches: list[list[str]] = [[]]
    length = 0
    for part in parts:
        size = len(os.fsencode(part)) + 1  # the name and its "/" (or the NUL of the last)
        if stretches[-1] and length + size > _PATH_STRETCH:
            stretches.append([])
            length = 0
        stretches[-1].append(part)
        length += size
    return stretches


def is_valid_name(name: str) -> bool:
    """Whether name is one plain component of a path: nothing that could escape the tree."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def check_name(name: str) -> None:
    """Reject names that could escape the tree; the kernel never sends them, a bug might."""
    if not is_valid_name(name):
        raise OSError(errno.EINVAL, f"invalid name {name!r}")


def components(relpath: str) -> list[str]:
    """relpath's names, each checked (check_name); none for the root ("")."""
    parts = relpath.split("/") if relpath else []
    for part in parts:
        check_name(part)
    return parts


def is_under_any(relpath: str, prefixes: AbstractSet[str]) -> bool:
    """Whether relpath is one of prefixes or inside one ('' is the root, containing
    everything), in the time of relpath's depth: by each of its ancestors, not by each prefix
    (a request of 100,000 paths against as many cached files took minutes of the event loop)."""
    if "" in prefixes:
        return True
    while relpath:
        if relpath in prefixes:
            return True
        relpath = relpath.rpartition("/")[0]
    return False


# The position of a directory descriptor is shared by every listing of it: two at once (a
# READDIR the kernel sent again while the first is still answered) would interleave their
# seeks and reads and skip entries. A lock per descriptor number, striped.
_POSITIONS = [threading.Lock() for _ in range(64)]


def _getdents_at(fd: int, offset: int, size: int) -> list[tuple[bytes, int, int]]:
    """getdents64 of size bytes of fd's entries from offset."""
    with _POSITIONS[fd % len(_POSITIONS)]:
        os.lseek(fd, offset, os.SEEK_SET)
        return linux.getdents64(fd, size)


def readdir_batches() -> Iterator[int]:
    """batch_bytes of the Source.readdir() calls that fill one reply, in turn."""
    size = READDIR_FIRST_BATCH
    while True:
        yield size
        size = min(2 * size, READDIR_LAST_BATCH)


class Source:
    """The source directory tree, addressed by relative paths ('' is the root).

    stable_inodes: whether the source's inode numbers name files for good. Where they do not
    (sshfs without use_ino renumbers a file once the kernel forgets it), an inode number that
    moved says nothing, so it is left out of every Identity: size, mtime and ctime decide.
    """

    def __init__(self, root: Path, stable_inodes: bool = True) -> None:
        self.root = os.path.realpath(root)
        self.stable_inodes = stable_inodes
        self._root_fd = os.open(self.root, _DIR_PATH)
        self._openat2 = linux.has_openat2(self._root_fd)
        # checked where the root or a filesystem mounted beneath it has them (_notice)
        self._acls_probed = {os.fstat(self._root_fd).st_dev}  # the filesystems asked
        self.has_acls = acl.source_has_acls(f"/proc/self/fd/{self._root_fd}") or self._mounts_with_acls()
        self._copier = kernelcopy.KernelCopy()

    def _mounts_with_acls(self) -> bool:
        """Whether a filesystem mounted in the source tree now has POSIX ACLs (below a root of
        "/", every mount is: asked of none, taken for yes)."""
        if self.root == "/":
            return True
        below = [m for m in mounts.mount_table()  # an automount trigger is asked nothing (it would mount)
                 if m.mountpoint.startswith(self.root + "/") and m.fstype != "autofs"]
        self._acls_probed.update(os.makedev(m.major, m.minor) for m in below)
        return any(acl.supports_acls(m.mountpoint) for m in below)

    def _notice(self, st: os.stat_result, dir_fd: int, name: str | bytes) -> os.stat_result:
        """A file's lstat (name in dir_fd), seen on its way to the mount: one on a filesystem
        not asked yet (a mount in the source tree since the start) that has POSIX ACLs turns
        their checks on for good. They were off below a root without ACLs, so such a mount
        was read past its ACLs. A link cannot tell (its own xattrs are not the filesystem's)."""
        if (not self.has_acls and st.st_dev not in self._acls_probed
                and (stat_mod.S_ISDIR(st.st_mode) or stat_mod.S_ISREG(st.st_mode))):
            self._acls_probed.add(st.st_dev)
            if acl.supports_acls(os.path.join(os.fsencode(f"/proc/self/fd/{dir_fd}"), os.fsencode(name)), follow=False):
                self.has_acls = True
                log.info("a filesystem with POSIX ACLs is mounted in the source tree: they are checked")
        return st

    def close(self) -> None:
        os.close(self._root_fd)

    def identity(self, st: os.stat_result) -> Identity:
        return Identity(st.st_size, st.st_mtime_ns, st.st_ino if self.stable_inodes else 0, st.st_ctime_ns)

    def child(self, relpath: str, name: str) -> str:
        check_name(name)
        return f"{relpath}/{name}" if relpath else name

    # ---- resolution ----------------------------------------------------------------------

    def _open(self, relpath: str, flags: int) -> int:
        """Open relpath beneath the root, following no symlink in any component.

        A path longer than the kernel takes in one call (PATH_MAX) is resolved a stretch at
        a time, each beneath the directory the stretch before it opened, under the same
        restrictions: the source serves such paths, so the mount must too."""
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        if not relpath:
            return os.open(".", flags & ~os.O_NOFOLLOW, dir_fd=self._root_fd)
        parts = components(relpath)
        stretches = _stretches(parts)
        fd = self._root_fd
        try:
            for stretch in stretches[:-1]:
                parent, fd = fd, self._open_beneath(fd, stretch, _DIR_PATH | os.O_NOFOLLOW)
                if parent != self._root_fd:
                    os.close(parent)
            return self._open_beneath(fd, stretches[-1], flags)
        finally:
            if fd != self._root_fd:
                os.close(fd)

    def _open_beneath(self, dir_fd: int, parts: list[str], flags: int) -> int:
        """Open the path of parts (shorter than PATH_MAX) beneath dir_fd, no symlink followed:
        with one openat2, or one openat(O_NOFOLLOW) per component where there is none."""
        if self._openat2:
            return linux.openat2(dir_fd, "/".join(parts), flags)
        fd = dir_fd
        try:
            for part in parts[:-1]:
                parent, fd = fd, os.open(part, _DIR_PATH | os.O_NOFOLLOW, dir_fd=fd)
                if parent != dir_fd:
                    os.close(parent)
            return os.open(parts[-1], flags, dir_fd=fd)
        finally:
            if fd != dir_fd:
                os.close(fd)

    @contextmanager
    def _parent(self, relpath: str) -> Iterator[tuple[int, str]]:
        """(descriptor of relpath's directory, relpath's last name), for the *at calls."""
        if not components(relpath):  # each name checked: rpartition alone would take "a/../b"
            raise OSError(errno.EINVAL, "invalid name ''")
        parent, _, name = relpath.rpartition("/")
        if not parent:
            yield self._root_fd, name
            return
        fd = self._open(parent, _DIR_PATH)
        try:
            yield fd, name
        finally:
            os.close(fd)

    # ---- metadata ------------------------------------------------------------------------

    def lstat(self, relpath: str) -> os.stat_result:
        if not relpath:
            return os.stat(self._root_fd)
        with self._parent(relpath) as (fd, name):
            return self._notice(os.stat(name, dir_fd=fd, follow_symlinks=False), fd, name)

    def readlink(self, relpath: str) -> str:
        with self._parent(relpath) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self._root_fd)

    def acl_chain(self, relpath: str) -> list[tuple[os.stat_result, acl.Acl | None]]:
        """(lstat, access ACL) of the root, of each directory below it down to relpath, and of
        relpath: what decides whether someone may reach and use relpath. MalformedAcl if any
        is malformed."""
        parts = components(relpath)
        # a component at a time, each beneath the last: each prefix opened from the root
        # walked depth² components (a lookup took a second 1,500 directories down)
        chain, fd = [], self._open("", os.O_PATH)
        try:
            for depth in range(len(parts) + 1):
                if depth:
                    parent, fd = fd, self._open_beneath(fd, [parts[depth - 1]], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
                    os.close(parent)
                chain.append((os.fstat(fd), acl.read_access_acl(fd)))
        finally:
            os.close(fd)
        return chain

    # ---- directories ---------------------------------------------------------------------

    def opendir(self, relpath: str) -> int:
        """A descriptor to read the directory from (readdir); close it with os.close."""
        return self._open(relpath, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK)

    def readdir(self, fd: int, offset: int, batch_bytes: int = READDIR_FIRST_BATCH) -> list[tuple[str, int, os.stat_result]]:
        """The next batch of entries of an opened directory from offset (0: the start), of
        batch_bytes of getdents64 (readdir_batches): [(name, offset of the entry after it,
        lstat)]. Empty at the end. Entries removed before they could be stat'ed are left out.
        Nothing of the directory is kept: an open directory costs one descriptor, whatever
        its size."""
        while True:
            # what does not fit the kernel's reply is read and stat'ed again by the next
            if not (batch := _getdents_at(fd, offset, batch_bytes)):
                return []
            offset = batch[-1][1]
            entries = []
            for raw_name, next_offset, _type in batch:
                if raw_name in (b".", b".."):
                    continue
                try:
                    st = self._notice(os.stat(raw_name, dir_fd=fd, follow_symlinks=False), fd, raw_name)
                except FileNotFoundError:
                    continue
                entries.append((os.fsdecode(raw_name), next_offset, st))
            if entries:
                return entries

    def listdir(self, relpath: str, limit: int) -> list[tuple[str, os.stat_result]] | None:
        """Names and lstat results of a whole directory, sorted: for the daemon's own use
        (finding sibling shards), not for serving readdir; None if it holds more than limit."""
        fd = self.opendir(relpath)
        try:
            entries = []
            with os.scandir(fd) as it:
                for entry in it:
                    if len(entries) == limit:
                        return None
                    try:
                        entries.append((entry.name, entry.stat(follow_symlinks=False)))
                    except FileNotFoundError:
                        continue  # removed between readdir and stat
        finally:
            os.close(fd)
        entries.sort(key=lambda item: item[0])
        return entries

    # ---- files ---------------------------------------------------------------------------

    def open(self, relpath: str) -> tuple[int, os.stat_result]:
        """Open a regular file for reading; returns the fd and its attributes when opened
        (identity() of them is the version opened). Its type is checked on an O_PATH
        descriptor first, which opens nothing: an open of a FIFO lets a writer waiting on it
        through, and one of a device node can act (a tape rewinds at close, a tty becomes the
        daemon's controlling terminal). The file itself is then opened through that
        descriptor (/proc/self/fd), the inode it checked, whatever its path names by then."""
        path_fd = self._open(relpath, os.O_PATH)  # with O_NOFOLLOW: a link itself, not ELOOP
        try:
            mode = os.fstat(path_fd).st_mode
            if stat_mod.S_ISLNK(mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), relpath)
            if not stat_mod.S_ISREG(mode):
                raise OSError(errno.EINVAL, f"not a regular file: {relpath}")
            fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
        finally:
            os.close(path_fd)
        try:
            return fd, os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise

    def read_small(self, relpath: str, limit: int) -> bytes:
        """The whole content of a small regular file (a checkpoint index); EFBIG past limit."""
        fd, st = self.open(relpath)
        try:
            if st.st_size > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes")
            chunks, total = [], 0
            while data := os.read(fd, min(1 << 20, limit + 1 - total)):
                chunks.append(data)
                total += len(data)
                if total > limit:
                    raise OSError(errno.EFBIG, f"larger than {limit} bytes")
            return b"".join(chunks)
        finally:
            os.close(fd)

    def read_exact(self, fd: int, buf: memoryview, offset: int, relpath: str, identity: Identity) -> None:
        """Fill buf from offset, then check the file did not change underneath the read. A
        short read means the file shrank; a changed fstat means it was modified in place.
        Either way the bytes are from a different version of the file and must not be cached."""
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n == 0:
                raise SourceChanged(relpath)
            done += n
        if self._changed_since(fd, relpath, identity):
            raise SourceChanged(relpath)

    def copy_exact(self, fd: int, dev: int, dst_fd: int, offset: int, length: int, relpath: str,
                   identity: Identity) -> bool:
        """read_exact's copy of fd (on dev) into dst_fd, inside the kernel (kernelcopy.py);
        False where the kernel does not copy between the two: the caller reads instead."""
        try:
            copied = self._copier.copy(fd, dev, dst_fd, offset, length)
        except kernelcopy.Unsupported:
            return False
        if copied < length or self._changed_since(fd, relpath, identity):
            raise SourceChanged(relpath)
        return True

    def _changed_since(self, fd: int, relpath: str, identity: Identity) -> bool:
        """Whether the file open at fd may hold other bytes than at `identity`.

        Its inode, size or mtime moved: yes. Its ctime alone moved: a rewrite in place that
        put the mtime back moves only the ctime, and so does an unlink of the file or a rename
        over it, which leave its bytes as they were (a reader of the old version must keep
        reading them). They are told apart by its path: while the path still names the open
        file, the change was made to the file in place (a chmod too, which no stat tells from
        such a rewrite); once the path names another file or nothing, the ctime moved with
        the unlink. Not seen: a write, with the size kept and the mtime put back, into a file
        after it was unlinked or renamed away, by a process that holds it open."""
        st = os.fstat(fd)
        now = self.identity(st)
        if not now.same_content(identity):
            return True
        return now.ctime_ns != identity.ctime_ns and self._path_names(relpath, st)

    def _path_names(self, relpath: str, st: os.stat_result) -> bool:
        """Whether relpath names the file whose fstat is st. Where inode numbers are not
        stable, a file that looks the same (size, mtime, ctime) counts as the same."""
        if st.st_nlink == 0:
            return False
        try:
            named = self.lstat(relpath)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # ELOOP: now through a symlink
                return False
            raise
        if self.stable_inodes:
            return (named.st_dev, named.st_ino) == (st.st_dev, st.st_ino)
        return self.identity(named) == self.identity(st)

    @staticmethod
    def drop_pages(fd: int, offset: int, length: int) -> None:
        """Let the kernel drop the source's pages of a range the cache now holds: left in the
        page cache, a buffered source (Lustre, NFS, a local disk) keeps a second copy of the
        checkpoint in memory beside the cache until memory runs short. Advice only: a source
        that ignores it (tmpfs, where the pages are the file) loses nothing."""
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def regular_files(source: Source, relpath: str) -> list[tuple[str, int]]:
    """(relpath, size) of every regular file in the directory tree at relpath of source (or
    of relpath itself), in name order. Every directory is opened as source.opendir opens it:
    beneath the root, no symlink followed, O_DIRECTORY (a FIFO swapped in fails, never
    blocks). os.fwalk told directories apart by following links, and opened them without
    O_NOFOLLOW: a link planted in the source walked the daemon out of it, or hung it on a
    FIFO. A directory swapped for anything else since it was listed is left out."""
    st = source.lstat(relpath)
    if stat_mod.S_ISREG(st.st_mode):
        return [(relpath, st.st_size)]
    if not stat_mod.S_ISDIR(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file or directory")
    found: list[tuple[str, int]] = []
    pending = [relpath]  # directories to list, the next one last
    while pending:
        directory = pending.pop()
        try:
            fd = source.opendir(directory)
        except OSError as e:
            if directory == relpath or e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            continue
        try:
            with os.scandir(fd) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
            subdirectories = []
            for entry in entries:
                child = source.child(directory, entry.name)
                try:
                    child_st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat_mod.S_ISREG(child_st.st_mode):
                    found.append((child, child_st.st_size))
                elif stat_mod.S_ISDIR(child_st.st_mode):
                    subdirectories.append(child)
            pending.extend(reversed(subdirectories))
        finally:
            os.close(fd)
    return found

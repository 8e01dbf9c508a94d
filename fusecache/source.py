"""Access to the source tree (the network filesystem). Blocking calls: run them off the trio thread.

Paths inside the mount are handled as relative paths made of names the kernel gave us. Each
name is checked here so that nothing ('..', '/', NUL) can point outside SOURCE, and the final
component is opened with O_NOFOLLOW: symlinks are reported as links, never followed by the
daemon to read data.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """What makes cached bytes valid: if any field differs, the source file changed."""

    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)

    @property
    def content_key(self) -> tuple[int, int, int]:
        """What two stats of the same bytes share. ctime is left out: it also moves when an
        open file is unlinked or renamed over, which leaves its bytes as they were."""
        return (self.ino, self.size, self.mtime_ns)

    def same_content(self, other: Identity) -> bool:
        return self.content_key == other.content_key


class SourceChanged(OSError):
    """The source file changed while we were reading it; the bytes read must not be cached."""

    def __init__(self, relpath: str) -> None:
        super().__init__(errno.ESTALE, f"source file changed while reading: {relpath}")


def is_valid_name(name: str) -> bool:
    """Whether name is one plain component of a path: nothing that could escape the tree."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def check_name(name: str) -> None:
    """Reject names that could escape the tree; the kernel never sends them, a bug might."""
    if not is_valid_name(name):
        raise OSError(errno.EINVAL, f"invalid name {name!r}")


def is_under(relpath: str, prefix: str) -> bool:
    """Whether relpath is prefix itself or inside it ('' is the root, containing everything)."""
    return prefix == "" or relpath == prefix or relpath.startswith(prefix + "/")


class Source:
    """The source directory tree, addressed by relative paths ('' is the root)."""

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)

    def path(self, relpath: str) -> str:
        return os.path.join(self.root, relpath) if relpath else self.root

    def child(self, relpath: str, name: str) -> str:
        check_name(name)
        return f"{relpath}/{name}" if relpath else name

    def lstat(self, relpath: str) -> os.stat_result:
        return os.lstat(self.path(relpath))

    def listdir(self, relpath: str) -> list[tuple[str, os.stat_result]]:
        """Names and lstat results of a directory, sorted so listings are stable."""
        entries = []
        with os.scandir(self.path(relpath)) as it:
            for entry in it:
                try:
                    entries.append((entry.name, entry.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    continue  # removed between readdir and stat
        entries.sort(key=lambda item: item[0])
        return entries

    def readlink(self, relpath: str) -> str:
        return os.readlink(self.path(relpath))

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.root)

    def open(self, relpath: str) -> tuple[int, Identity]:
        """Open a regular file for reading; returns the fd and the identity it was opened at."""
        fd = os.open(self.path(relpath), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"not a regular file: {relpath}")
            return fd, Identity.of(st)
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def read_exact(fd: int, buf: memoryview, offset: int, relpath: str, identity: Identity) -> None:
        """Fill buf from offset, then check the file did not change underneath the read.

        A short read means the file shrank; a changed fstat means it was modified in place.
        Either way the bytes are from a different version of the file and must not be cached.
        """
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n == 0:
                raise SourceChanged(relpath)
            done += n
        if not Identity.of(os.fstat(fd)).same_content(identity):
            raise SourceChanged(relpath)

"""Directories and files that only the daemon's own user may change: the cache dir, the store
inside it, and the runtime dir of the control sockets.

Whoever can write into a directory can plant what the daemon then trusts there: a cache
entry served to every user as a source file's bytes, or a symlink that makes a root daemon
write where it points. So such a directory must be the daemon user's own and writable by
nobody else, and so must be every directory above it (root's, or sticky like /tmp, where
others cannot rename what is ours). Files are created with O_EXCL/O_NOFOLLOW, never through
a symlink, and readable by their owner alone: their names and contents say which files
users read, in directories others may not be able to list.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat as stat_mod
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


class UntrustedPath(Exception):
    """A path the daemon must not use; the message is the one-line error shown to the user."""


def refusal(path: Path, st: os.stat_result, owner_ok: tuple[int, ...], sticky_ok: bool = True) -> str | None:
    """Why a directory cannot be trusted, or None. sticky_ok: a sticky directory others can
    write is trusted (they cannot rename or remove what is ours in it)."""
    if stat_mod.S_ISLNK(st.st_mode):
        return f"{path} is a symlink"
    if not stat_mod.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid not in owner_ok:
        return f"{path} is owned by uid {st.st_uid}, not {' or '.join(map(str, sorted(set(owner_ok))))}"
    if st.st_mode & 0o022 and not (sticky_ok and st.st_mode & stat_mod.S_ISVTX):
        return f"{path} is writable by group or others"
    return None


def check_ancestors(path: Path) -> None:
    """path, where it exists, and every directory above it must be root's or ours, and
    writable by nobody else unless sticky (like /tmp, or a tmpfs mounted as the cache dir):
    there others cannot rename or remove what is ours. Symlinks among them are resolved:
    the check is of where they lead."""
    euid = os.geteuid()
    real = Path(os.path.realpath(path))
    for ancestor in [*reversed(real.parents), real]:
        try:
            st = os.lstat(ancestor)
        except FileNotFoundError:
            return
        reason = refusal(ancestor, st, (0, euid))
        if reason:
            raise UntrustedPath(f"refusing to use {path}: {reason}")


def ensure_dir(path: Path) -> None:
    """Create path (mode 0700) or check that it is already ours and writable by nobody else.
    The parent must have been checked (ensure_dir or check_ancestors) first."""
    try:
        os.mkdir(path, PRIVATE_DIR_MODE)
        return
    except FileExistsError:
        pass
    st = os.lstat(path)
    reason = refusal(path, st, (os.geteuid(),), sticky_ok=False)
    if reason:
        raise UntrustedPath(f"refusing to use {path}: {reason} (it must belong to uid {os.geteuid()}"
                            " and be writable by nobody else)")


def ensure_tree(top: Path, below: Path) -> None:
    """Create top (0700) if missing and check it and what lies above it (check_ancestors);
    then ensure_dir every directory below it down to below, a path inside top."""
    os.makedirs(top, mode=PRIVATE_DIR_MODE, exist_ok=True)
    check_ancestors(top)
    current = top
    for part in below.relative_to(top).parts:
        current = current / part
        ensure_dir(current)


def open_file(path: Path, flags: int, mode: int = PRIVATE_FILE_MODE) -> int:
    """os.open that never follows a symlink; a file it creates is readable by its owner only,
    and an existing one is brought down to that mode (older versions made some 0644)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        if st.st_mode & 0o777 & ~mode:
            os.fchmod(fd, stat_mod.S_IMODE(st.st_mode) & mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_file(path: Path, data: bytes, durable: bool = False) -> None:
    """Replace path's content atomically: a new file (O_EXCL: never through a planted
    link), written whole, renamed over it. A write that fails (a full disk writes part, then
    ENOSPC) leaves path as it was. durable: the bytes are synced before the rename, and the
    rename after it, so that a power cut leaves the old content or the new one, never an
    empty file (what a file that outlives its daemon wants, pins; not the journal, which
    serves a connection that a power cut ends anyway)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")  # its own: writers may race
    fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def read_file(path: Path, limit: int) -> bytes:
    """The content of one of our small files, read without following a symlink."""
    fd = open_file(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)

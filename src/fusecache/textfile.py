"""The node-exporter textfile (`metrics_textfile=`), rewritten every few seconds.

The daemon usually runs as root and the textfile's directory is named by the operator, so
what it writes there must never be steered elsewhere by another local user. A predictable
temporary name (prometheus_client's `PATH.<pid>.<thread>`) opened with a plain open follows a
symlink planted under it, and the rename then moves that link over PATH: root writes any file
it is pointed at. Here the directory must be trusted as the cache dir is (root's or ours,
and every directory above it too, writable by nobody else unless sticky), it is opened once
per write without following a symlink, and the new content goes to a random name created
O_EXCL|O_NOFOLLOW beside PATH, renamed over it within that directory.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from . import mounts, private

TEXTFILE_MODE = 0o644  # node_exporter runs as its own user: it must be able to read the file


class TextfileError(Exception):
    """The textfile cannot be written where it was asked for; the message is one line."""


KERNEL_FILESYSTEMS = frozenset({"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "bpf",
                                "devpts", "configfs", "pstore", "efivarfs", "fusectl"})


def check(path: Path) -> None:
    """Whether the daemon may write path: its directory exists and is trusted. Raised
    before mounting, so that an unusable textfile fails the mount as metrics_addr does."""
    directory = Path(os.path.abspath(path)).parent
    if not directory.is_dir():
        raise TextfileError(f"metrics_textfile {path}: directory {directory} does not exist")
    fstype = mounts.fstype_of(str(directory))
    if fstype in KERNEL_FILESYSTEMS:  # /proc/self/... passes every other check, and takes no file
        raise TextfileError(f"metrics_textfile {path}: {directory} is on {fstype}, not a filesystem of files")
    try:
        private.check_ancestors(directory)
    except private.UntrustedPath as e:
        raise TextfileError(f"metrics_textfile {path}: {e}") from None


def write(path: Path, data: bytes) -> None:
    """Replace path's content with data atomically (blocking; see the module docstring)."""
    path = Path(os.path.abspath(path))
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        reason = private.refusal(path.parent, os.fstat(directory), (0, os.geteuid()))
        if reason:
            raise TextfileError(f"refusing to write {path}: {reason}")
        tmp = f".{path.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, TEXTFILE_MODE,
                     dir_fd=directory)
        try:
            try:
                os.fchmod(fd, TEXTFILE_MODE)  # not narrowed by the daemon's umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=directory)
            except OSError:
                pass
            raise
    finally:
        os.close(directory)

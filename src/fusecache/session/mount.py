"""Getting a /dev/fuse descriptor connected to a mountpoint, and letting it go.

As root the daemon opens /dev/fuse and calls mount(2) itself. Otherwise fusermount3 (setuid
root, from the fuse3 package) mounts for it and hands the descriptor back over a socketpair
(SCM_RIGHTS; the protocol is libfuse's: the socket's fd number in _FUSE_COMMFD).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import socket
import stat as stat_mod
import subprocess
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@dataclass(frozen=True)
class MountSpec:
    """What is mounted where, and how: fsname shows in the mount table as the source."""

    mountpoint: str
    fsname: str
    subtype: str = "fusecache"
    allow_other: bool = False
    options: tuple[str, ...] = field(default=("default_permissions",))


def _escape(value: str) -> str:
    """Commas separate mount options: escaped, as fusermount3 and the kernel unescape them."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def mount(spec: MountSpec) -> int:
    """A /dev/fuse descriptor for a new mount of spec (nonblocking, close-on-exec)."""
    fd = _mount_as_root(spec) if os.geteuid() == 0 else _mount_with_fusermount(spec)
    os.set_blocking(fd, False)
    return fd


def _mount_as_root(spec: MountSpec) -> int:
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        st = os.stat(spec.mountpoint)
        options = [f"fd={fd}", f"rootmode={stat_mod.S_IFMT(st.st_mode):o}", f"user_id={os.getuid()}",
                   f"group_id={os.getgid()}", *spec.options]
        if spec.allow_other:
            options.append("allow_other")
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV
        if _libc.mount(os.fsencode(spec.fsname), os.fsencode(spec.mountpoint),
                       f"fuse.{spec.subtype}".encode(), flags, ",".join(options).encode()) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount: {os.strerror(err)}", spec.mountpoint)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mount_with_fusermount(spec: MountSpec) -> int:
    tool = shutil.which("fusermount3")
    if tool is None:
        raise OSError(f"fusermount3 not found: install the fuse3 package to mount as a user")
    options = ["ro", "nosuid", "nodev", f"fsname={_escape(spec.fsname)}", f"subtype={spec.subtype}", *spec.options]
    if spec.allow_other:
        options.append("allow_other")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        result = subprocess.run([tool, "-o", ",".join(options), "--", spec.mountpoint],
                                env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())},
                                pass_fds=(theirs.fileno(),), capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(result.stderr.strip() or f"fusermount3 failed with status {result.returncode}")
        theirs.close()
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise OSError("fusermount3 mounted but passed no descriptor")
    os.set_inheritable(fds[0], False)
    return fds[0]


def unmount(mountpoint: str) -> None:
    """Detach the mount (lazily: a process still inside it keeps what it has)."""
    if os.geteuid() == 0:
        if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), mountpoint)
        return
    result = subprocess.run(["fusermount3", "-u", "-z", "--", mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(result.stderr.strip() or f"fusermount3 -u failed with status {result.returncode}")

"""Getting a /dev/fuse descriptor connected to a mountpoint, and letting go of that mount only.

As root the daemon opens /dev/fuse and calls mount(2) itself. Otherwise fusermount3 (setuid
root, from the fuse3 package) mounts for it and hands the descriptor back over a socketpair
(SCM_RIGHTS; the protocol is libfuse's: the socket's fd number in _FUSE_COMMFD). pyfuse3's
session mounts through libfuse with the same options (mount_options).

A session unmounts only the mount it made (MountIdentity, unmount_own): a daemon that exits
late, after `fusecache umount` and a new mount at the same path, must leave that new mount
alone. Device numbers and mount ids are handed out again once a mount is gone, so only the
never-reused mount id of Linux 6.8+ names a mount for good; without it, the device number
names our mount only while our connection is open (our superblock then still holds it).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import socket
import stat as stat_mod
import subprocess
from dataclasses import dataclass, field

from .. import linux, mounts

log = logging.getLogger(__name__)

# The mount flags every fusecache mount gets, under the names fusermount3 and libfuse know.
MOUNT_FLAGS = {"ro": linux.MS_RDONLY, "nosuid": linux.MS_NOSUID, "nodev": linux.MS_NODEV}


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


def _filesystem_options(spec: MountSpec) -> list[str]:
    """The options the FUSE filesystem itself takes (mount(2)'s data)."""
    return [*spec.options, *(["allow_other"] if spec.allow_other else [])]


def mount_options(spec: MountSpec) -> list[str]:
    """Every option of a mount of spec, as fusermount3 and libfuse take them."""
    return [*MOUNT_FLAGS, f"fsname={_escape(spec.fsname)}", f"subtype={spec.subtype}", *_filesystem_options(spec)]


def mount(spec: MountSpec) -> int:
    """A /dev/fuse descriptor for a new mount of spec (nonblocking, close-on-exec)."""
    fd = _mount_as_root(spec) if os.geteuid() == 0 else _mount_with_fusermount(spec)
    os.set_blocking(fd, False)
    return fd


def _mount_as_root(spec: MountSpec) -> int:
    """mount(2) onto the directory spec.mountpoint (a resolved path) named when it was
    checked: through a descriptor of it, held across the call. By its path, a user who owns a
    directory on the way could make it a symlink meanwhile (the store loads for seconds in
    between), and root would mount the source over /etc."""
    target = os.open(spec.mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    fd = -1
    try:
        now = os.readlink(f"/proc/self/fd/{target}")
        if now != spec.mountpoint:
            raise OSError(errno.ELOOP, f"mount refused: the mountpoint leads to {now} now", spec.mountpoint)
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = [f"fd={fd}", f"rootmode={stat_mod.S_IFMT(os.fstat(target).st_mode):o}", f"user_id={os.getuid()}",
                   f"group_id={os.getgid()}", *_filesystem_options(spec)]
        flags = 0
        for flag in MOUNT_FLAGS.values():
            flags |= flag
        try:
            linux.mount(spec.fsname, f"/proc/self/fd/{target}", f"fuse.{spec.subtype}", flags, ",".join(options))
        except OSError as e:
            raise OSError(e.errno, f"mount: {e.strerror}", spec.mountpoint) from None
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    finally:
        os.close(target)
    return fd


def _mount_with_fusermount(spec: MountSpec) -> int:
    tool = shutil.which("fusermount3")
    if tool is None:
        raise OSError("fusermount3 not found: install the fuse3 package to mount as a user")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        result = subprocess.run([tool, "-o", ",".join(mount_options(spec)), "--", spec.mountpoint],
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


@dataclass(frozen=True)
class MountIdentity:
    """Which mount sits at a path: its device number and, on Linux 6.8+, its mount id."""

    device: int
    unique_id: int | None

    def is_ours(self, now: MountIdentity, connected: bool) -> bool:
        """Whether `now` (what the path holds) is the mount self was taken of. Without ids, the
        device decides only while our connection is open: once the kernel closed it (the mount
        was unmounted), the device number may already belong to the next mount there."""
        if self.unique_id is not None and now.unique_id is not None:
            return self.unique_id == now.unique_id
        return connected and self.device == now.device


def _open_mount_root(mountpoint: str) -> int:
    """An O_PATH descriptor of what the path holds: reaching a mount's root sends no request
    to its daemon (which may be ourselves, not serving, or one that does not answer)."""
    return os.open(mountpoint, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)


def identify(mountpoint: str) -> MountIdentity | None:
    """The identity of the mount at mountpoint (taken right after mounting); None if the kernel
    cannot say, and then nothing is ever unmounted by unmount_own."""
    try:
        fd = _open_mount_root(mountpoint)
        try:
            return MountIdentity(*linux.mount_of(fd))
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("cannot tell which mount %s is (%s): it will not be unmounted on exit", mountpoint, e.strerror)
        return None


def unmount_own(mountpoint: str, made: MountIdentity | None, connected: bool) -> None:
    """Detach (lazily) the mount at mountpoint if it is the one `made` identifies; leave any
    other alone. connected: our connection is still open (see MountIdentity.is_ours). As root,
    the mount unmounted is the very one checked (through its descriptor); fusermount3 takes a
    path, and a mount made at it between the check and the call would be detached instead."""
    if made is None:
        return
    try:
        fd = _open_mount_root(mountpoint)
    except OSError:
        return  # the mountpoint is gone: nothing of ours is there
    try:
        now = MountIdentity(*linux.mount_of(fd))
        if not made.is_ours(now, connected):
            log.info("%s holds another mount now (ours was unmounted); left alone", mountpoint)
            return
        if os.geteuid() == 0:
            linux.umount2(f"/proc/self/fd/{fd}", linux.MNT_DETACH)
        else:
            mounts.unmount(mountpoint, lazy=True)
    except OSError as e:
        log.warning("unmounting %s failed: %s", mountpoint, e.strerror or e)
    finally:
        os.close(fd)


def connected(fd: int) -> bool:
    """Whether the kernel still holds the connection on /dev/fuse descriptor fd open (POLLERR
    once it closed it: the mount was unmounted, or the connection aborted)."""
    poller = select.poll()
    poller.register(fd, 0)
    return not any(events & (select.POLLERR | select.POLLNVAL) for _fd, events in poller.poll(0))

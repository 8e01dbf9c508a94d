"""What a mount request must pass before anything is mounted, each failure a one-line reason.

Run by `fusecache mount` in the foreground process, before the daemon detaches, so that the
user sees why a mount cannot be made instead of finding it in daemon.log.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat as stat_mod
from pathlib import Path

from . import control, mounts, textfile
from .config import MountConfig
from .store import CacheStore

log = logging.getLogger(__name__)

FUSECACHE_FSTYPE = "fuse.fusecache"
FUSE_DEVICE = "/dev/fuse"


class MountError(Exception):
    """The mount cannot be made; the message is the one-line error shown to the user."""


class OtherRelease(MountError):
    """The mount is another release's to serve (its journal is of another state format)."""


def check_request(cfg: MountConfig) -> CacheStore:
    """Everything that can be checked before mounting, with a clear message for each failure.
    Returns the store, locked for this process."""
    try:
        fuse_device = os.stat(FUSE_DEVICE)
    except OSError:
        fuse_device = None
    if fuse_device is None or not stat_mod.S_ISCHR(fuse_device.st_mode) or not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        raise MountError(f"{FUSE_DEVICE} is missing or not accessible: load the fuse module (modprobe fuse)")
    source = cfg.source
    try:
        source_st = os.stat(source)
    except FileNotFoundError:
        raise MountError(f"source {source} does not exist") from None
    except OSError as e:  # EACCES (root squashed on NFS), ENOTCONN (a dead sshfs), ESTALE
        raise MountError(f"source {source} cannot be used: {e.strerror}") from None
    if not stat_mod.S_ISDIR(source_st.st_mode):
        raise MountError(f"source {source} is not a directory")
    if not os.access(source, os.R_OK | os.X_OK):
        raise MountError(f"source {source} is not readable")
    _refuse_a_live_mount(cfg.mountpoint)  # first: the other checks touch the mountpoint
    _claim_mountpoint(cfg.mountpoint)
    _check_overlap(cfg)
    _check_mountpoint(cfg.mountpoint)
    if cfg.metrics_textfile is not None:
        try:
            textfile.check(cfg.metrics_textfile)
        except textfile.TextfileError as e:
            raise MountError(str(e)) from None
    store = store_for(cfg)
    try:
        store.lock()
    except Exception as e:  # StoreError carries the one-line message
        raise MountError(str(e)) from None
    return store


def store_for(cfg: MountConfig) -> CacheStore:
    """The store of cfg's source in its cache dir, prepared, not locked."""
    store = CacheStore(cfg.cache_dir, os.path.realpath(cfg.source), trust_seals=cfg.verify == "sealed")
    try:
        store.prepare()
    except Exception as e:  # StoreError carries the one-line message
        raise MountError(str(e)) from None
    return store


def _check_overlap(cfg: MountConfig) -> None:
    """Source, mountpoint and cache dir must not contain one another. A mountpoint inside the
    source makes the daemon read its own mount (it deadlocks on its own requests); a source
    inside the mountpoint is hidden by the mount; a cache dir inside the mountpoint too (the
    daemon blocks on its own mount and never comes up); a cache dir inside the source is shown
    through the mount. Compared as real paths (the cache dir may not exist yet: realpath()
    resolves what exists of it) by whole components: /a/bc is not inside /a/b."""
    source, mountpoint, cache = (Path(os.path.realpath(p)) for p in (cfg.source, cfg.mountpoint, cfg.cache_dir))
    if mountpoint == source:
        raise MountError("source and mountpoint must differ")
    if mountpoint.is_relative_to(source):
        raise MountError(f"mountpoint {cfg.mountpoint} must be outside the source {cfg.source}")
    if source.is_relative_to(mountpoint):
        raise MountError(f"source {cfg.source} must be outside the mountpoint {cfg.mountpoint}")
    if cache.is_relative_to(mountpoint):
        raise MountError(f"cache dir {cfg.cache_dir} must be outside the mountpoint {cfg.mountpoint}")
    if cache.is_relative_to(source):
        raise MountError(f"cache dir {cfg.cache_dir} must be outside the source {cfg.source}")


_claims: dict[str, int] = {}  # mountpoint -> a descriptor of its directory, locked until the mount is up


def _claim_mountpoint(mountpoint: Path) -> None:
    """Lock the mountpoint's directory (flock) until the mount is in the mount table
    (release_claims): two `fusecache mount`s of one path at once both passed the mount-table
    check and stacked two mounts, whose daemons took each other's control socket. The lock
    is on the directory itself, the one thing every mount of the path shares (a lock file
    beside the control socket was another file for another user, or another runtime dir).
    Taken once nothing is mounted there (opening a mount's root asks its daemon), and the
    mount table asked again under it."""
    path = os.path.abspath(mountpoint)
    if path in _claims:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return  # not a directory one can open: _check_mountpoint says why
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MountError(f"mountpoint {mountpoint} is already mounted, or being mounted, by fusecache") from None
    except OSError as e:  # a filesystem without flock: the mount-table check alone
        os.close(fd)
        log.debug("cannot lock mountpoint %s: %s", mountpoint, e)
        return
    _claims[path] = fd
    if mounts.find_mount(mounts.resolve_mountpoint(path)) is not None:  # mounted before the lock was ours
        release_claims()
        raise MountError(f"mountpoint {mountpoint} is already mounted")


def release_claims() -> None:
    """Let go of the mountpoints this process claimed: once the mount is up (the mount table
    refuses the next one), and in every process forked before, whose copy would keep the
    lock for the daemon's life (and refuse a mount at the path after a lazy unmount)."""
    while _claims:
        os.close(_claims.popitem()[1])


def _refuse_a_live_mount(mountpoint: Path) -> None:
    """Refuse a mountpoint the mount table lists, or clean it away if its daemon died. Such a
    path is never touched itself (stat, statfs, realpath): that is a request to its daemon,
    which never returns while the daemon is stopped or hung, and the mount must then fail
    with "already mounted", not block."""
    path = mounts.resolve_mountpoint(str(mountpoint))
    info = mounts.find_mount(path)
    if info is None:
        return
    try:
        with mounts.pinned(path) as pinned_path:  # what is probed and unmounted: the mount checked
            if not _is_stale(path, pinned_path, info):
                raise MountError(f"mountpoint {mountpoint} is already mounted")
            log.warning("%s is a stale mount left by a crashed daemon; unmounting it", path)
            mounts.unmount(path, lazy=True, pinned_path=pinned_path)
    except OSError as e:
        raise MountError(f"mountpoint {mountpoint} is a stale mount and could not be cleaned: {e.strerror}") from None


def _check_mountpoint(mountpoint: Path) -> None:
    """An existing, empty directory with nothing mounted on it."""
    path = str(mountpoint)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as e:
        raise MountError(f"mountpoint {mountpoint} cannot be used: {e.strerror}") from None
    if not stat_mod.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if mounts.find_mount(os.path.realpath(path)) is not None:  # reached through a symlink
        raise MountError(f"mountpoint {mountpoint} is already mounted")
    try:
        empty = not os.listdir(path)
    except OSError as e:
        raise MountError(f"mountpoint {mountpoint} cannot be used: {e.strerror}") from None
    if not empty:
        raise MountError(f"mountpoint {mountpoint} is not empty")


def _is_stale(path: str, pinned_path: str, info: mounts.MountInfo) -> bool:
    """Whether the mount at path is a FUSE mount whose connection ended, so that unmounting
    it loses nothing. Only on proof: the kernel answers ENOTCONN (mounts.is_stale). A
    fusecache mount whose control socket (or its supervisor's) listens is alive without
    asking; one whose socket is gone is not taken for dead on that alone: logind removes
    /run/user/UID at logout, tmpfiles ages /tmp, and unmounting a live mount loses it.
    pinned_path: the same mount through its parent's descriptor (mounts.pinned), probed."""
    if info.fstype == FUSECACHE_FSTYPE and info.owner_uid is not None and control.is_listening(path, info.owner_uid):
        return False
    return mounts.is_stale(path, probe_path=pinned_path)

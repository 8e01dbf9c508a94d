"""Facts about mounts from /proc and /sys, the kernel knobs fusecache turns after mounting, and
unmounting (for the CLI, the stale-mount cleanup and the sessions: session/mount.py).

Nothing here may stat the mountpoint of our own filesystem from inside the daemon before its
main loop runs: that would send a request to ourselves and hang. Everything is therefore read
from /proc/self/mountinfo.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Iterator
from pathlib import Path

from . import linux

log = logging.getLogger(__name__)


STALE_PROBE_WAIT = 2.0  # a dead connection answers statfs at once; silence this long is a live, stuck daemon

@dataclass(frozen=True)
class MountInfo:
    major: int
    minor: int
    mountpoint: str
    fstype: str
    source: str
    super_options: str

    @property
    def owner_uid(self) -> int | None:
        """The uid that mounted a FUSE filesystem (its user_id= option)."""
        for option in self.super_options.split(","):
            if option.startswith("user_id="):
                return int(option[len("user_id="):])
        return None


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table() -> list[MountInfo]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [parse_mountinfo(line) for line in f]


def parse_mountinfo(line: str) -> MountInfo:
    """One line of /proc/self/mountinfo. Its fields are split at single spaces, the only
    separator: the kernel escapes space, tab, newline and backslash in paths, and nothing
    else (a path may hold a no-break space, which str.split() would also split at)."""
    fields = line.rstrip("\n").split(" ")
    sep = fields.index("-")
    major, minor = fields[2].split(":")
    return MountInfo(int(major), int(minor), _unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2]),
                     fields[sep + 3])


def find_mount(mountpoint: str) -> MountInfo | None:
    """The topmost mount at exactly this path, if any."""
    target = os.path.abspath(mountpoint)
    found = None
    for info in mount_table():
        if info.mountpoint == target:
            found = info
    return found


def resolve_mountpoint(path: str) -> str:
    """The path mountinfo lists for the mount at `path`, found without touching the mountpoint
    itself: a stat, lstat or realpath() of it is a request to its daemon, which never returns
    while the daemon is stopped or hung. Only the parent is resolved (it belongs to another
    filesystem), as fusermount does; a daemon lists the same path, its realpath() before mounting."""
    absolute = os.path.abspath(path)
    if find_mount(absolute) is not None:
        return absolute
    parent, name = os.path.split(absolute)
    return os.path.join(os.path.realpath(parent), name)


def fstype_of(path: str) -> str | None:
    """Filesystem type of the mount holding path (the longest mountpoint prefix)."""
    target = os.path.realpath(path)
    best: MountInfo | None = None
    for info in mount_table():
        prefix = info.mountpoint.rstrip("/") + "/"
        if (target == info.mountpoint or target.startswith(prefix)) and (
                best is None or len(info.mountpoint) >= len(best.mountpoint)):
            best = info
    return best.fstype if best else None


def is_stale(mountpoint: str, wait: float = STALE_PROBE_WAIT, probe_path: str | None = None) -> bool:
    """A FUSE mount whose connection ended (its daemon died, no one holds it): the kernel
    answers ENOTCONN to every request, at once. Asked with statfs, which always reaches the
    daemon (a stat may be answered from attributes the kernel cached, dead connection or
    not), on a thread given `wait` seconds: a stopped or hung daemon never answers, and its
    mount is alive, not stale (the thread is left to its wait, which ends with the process).
    probe_path: where statfs reaches the mount (pinned()), if not at mountpoint."""
    info = find_mount(os.path.abspath(mountpoint))
    if info is None or not info.fstype.startswith("fuse"):
        return False
    answer: list[int] = []  # the errno statfs failed with, or 0

    def probe() -> None:
        try:
            os.statvfs(probe_path or mountpoint)
            answer.append(0)
        except OSError as e:
            answer.append(e.errno or 0)

    prober = threading.Thread(target=probe, name="stale-mount-probe", daemon=True)
    prober.start()
    prober.join(wait)
    return answer == [errno.ENOTCONN]


@contextmanager
def pinned(mountpoint: str) -> Iterator[str]:
    """mountpoint (a path resolve_mountpoint gave) reached through a descriptor of its parent
    directory, held for the block: root's unmount through it acts on the mount in the very
    directory that was checked. By its path, the owner of a directory on the way could move
    the directory (their mount moves with it) and put a link in its place once the checks
    were made, while their daemon was asked for its pid: root unmounted what the link led to.
    OSError if the parent is not at its path (moved meanwhile)."""
    parent, name = os.path.split(mountpoint)
    fd = os.open(parent or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if os.readlink(f"/proc/self/fd/{fd}") != (parent or "/"):
            raise OSError(errno.ESTALE, f"{parent} moved while it was being checked")
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def unmount(mountpoint: str, lazy: bool = False, pinned_path: str | None = None) -> None:
    """Unmount what is mounted at mountpoint: umount2(2) as root (through pinned_path, where
    given: pinned()), else fusermount3 (setuid), which lets a user unmount only the FUSE
    mounts they made. lazy: detach it at once, while processes inside keep what they hold
    (otherwise a busy mount fails with EBUSY)."""
    if os.geteuid() == 0:
        linux.umount2(pinned_path or mountpoint, linux.UMOUNT_NOFOLLOW | (linux.MNT_DETACH if lazy else 0))
        return
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise OSError(errno.ENOENT, "fusermount3 not found: install the fuse3 package")
    result = subprocess.run([tool, "-u", *(["-z"] if lazy else []), "--", mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise OSError(errno.EINVAL, message[-1] if message else f"{tool} -u failed")


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until process pid has exited; False if it is still running after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(pid):
            return True
        time.sleep(0.02)
    return False


def is_running(pid: int) -> bool:
    """Whether any thread of process pid has yet to exit. An exited daemon stays a zombie until
    its parent (init, once `fusecache mount` has returned) reaps it, which may take a second or
    more; once every thread has exited, its descriptors (the /dev/fuse connection, the cache
    dir's lock) are closed. The main thread alone turns zombie while others still run."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    return any(_thread_runs(f"/proc/{pid}/task/{tid}/stat") for tid in threads)


def _thread_runs(stat_path: str) -> bool:
    try:
        with open(stat_path, "rb") as stat:
            return thread_runs(stat)
    except FileNotFoundError:  # exited since the listing, and gone
        return False


def thread_runs(stat: BinaryIO) -> bool:
    """Whether the thread whose /proc stat file is open has yet to exit. A dying process's
    threads exit one by one while they are looked at: one that exits after its file was
    opened fails the read with ESRCH, and has exited as surely as one that reads "Z"."""
    try:
        fields = stat.read()
    except ProcessLookupError:
        return False
    return fields.rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")


def tune_fuse_mount(mountpoint: str, read_ahead_kb: int, max_background: int) -> None:
    """Raise the mount's readahead and background-request limits.

    The kernel sends FUSE reads of at most read_ahead_kb (128 KiB by default); from 1 MiB up it
    sends 1 MiB requests, which measured 2-3x the cold throughput of a Python daemon.
    max_background bounds the readahead requests in flight (12 by default), which limits how
    many chunk fetches concurrent readers can overlap. Both are best effort: without /sys
    write access the mount still works, only slower.
    """
    info = find_mount(mountpoint)
    if info is None:
        log.warning("cannot find %s in mountinfo; kernel readahead left at its default", mountpoint)
        return
    _write_knob(Path(f"/sys/class/bdi/{info.major}:{info.minor}/read_ahead_kb"), read_ahead_kb)
    _mount_fusectl()
    connection = connection_dir(info)
    if not connection.is_dir():
        log.info("no %s: the connection's request limits are left at their defaults", connection)
        return
    _write_knob(connection / "max_background", max_background)
    _write_knob(connection / "congestion_threshold", max(1, max_background * 3 // 4))


def connection_dir(info: MountInfo) -> Path:
    """A FUSE mount's directory in fusectl, named after the kernel's own device number
    (major << 20 | minor), which glibc's makedev (st_dev) writes otherwise from minor 256 on."""
    return Path(f"/sys/fs/fuse/connections/{info.major << 20 | info.minor}")


def _mount_fusectl() -> None:
    """The per-connection FUSE knobs live in the fusectl filesystem, often not mounted."""
    connections = "/sys/fs/fuse/connections"
    if os.geteuid() != 0 or not os.path.isdir(connections) or find_mount(connections) is not None:
        return
    result = subprocess.run(["mount", "-t", "fusectl", "fusectl", connections], capture_output=True, text=True)
    if result.returncode != 0:
        log.info("could not mount fusectl on %s: %s", connections, result.stderr.strip())


def _write_knob(path: Path, value: int) -> None:
    try:
        path.write_text(f"{value}\n")
        log.debug("set %s = %d", path, value)
    except OSError as e:
        log.info("could not set %s to %d: %s", path, value, e.strerror)

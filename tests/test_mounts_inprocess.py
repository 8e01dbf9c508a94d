"""The mount table and processes (fusecache.mounts), in process: mountinfo is parsed into the
mounts this process sees, a path that is no mount is told apart without touching it, and a
process counts as gone once every thread of it has exited."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fusecache import mounts


def test_mountinfo_fields_split_at_spaces_alone():
    """The kernel escapes space, tab, newline and backslash, nothing else: a mountpoint with a
    no-break space is one field (str.split() cut it, so the mount was never found, and a
    user's mountpoint named to look like fields could pass for root's fusecache mount)."""
    name = "/tmp/a\u00a0o\u00a0-\u00a0fuse.fusecache\u00a0src\u00a0user_id=0"
    line = f"36 35 0:42 / {name} rw,nosuid - fuse.sshfs me@host:/x rw,user_id=1000,group_id=1000\n"
    info = mounts.parse_mountinfo(line)
    assert (info.mountpoint, info.fstype, info.source) == (name, "fuse.sshfs", "me@host:/x")
    assert info.owner_uid == 1000
    escaped = mounts.parse_mountinfo("36 35 0:42 / /tmp/with\\040space rw - fuse.fusecache /s\\011t rw,user_id=0\n")
    assert (escaped.mountpoint, escaped.source) == ("/tmp/with space", "/s\tt")


def test_mountinfo_lists_the_mounts_this_process_sees(tmp_path):
    table = mounts.mount_table()
    root = mounts.find_mount("/")
    assert root is not None and root in table and root.fstype
    if os.path.ismount("/proc"):
        assert mounts.find_mount("/proc").fstype == "proc"
        assert mounts.fstype_of("/proc/self/status") == "proc"
    assert mounts.find_mount(str(tmp_path)) is None
    assert mounts.fstype_of(str(tmp_path)) == mounts.fstype_of(str(tmp_path.parent))
    # a path that is no mount is resolved through its parent only
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert mounts.resolve_mountpoint(str(tmp_path / "alias" / "mnt")) == os.path.realpath(tmp_path / "real") + "/mnt"
    assert mounts.resolve_mountpoint("/") == "/"
    assert not mounts.is_stale(str(tmp_path)) and not mounts.is_stale(str(tmp_path / "missing"))
    info = mounts.MountInfo(0, 42, "/mnt", "fuse.fusecache", "/src", "rw,user_id=1000,group_id=1000")
    assert info.owner_uid == 1000
    assert mounts.MountInfo(0, 42, "/mnt", "ext4", "/dev/x", "rw").owner_uid is None
    mounts.tune_fuse_mount(str(tmp_path), 4096, 64)  # not mounted: a warning, nothing written
    with pytest.raises(OSError):
        mounts.unmount(str(tmp_path))  # not mounted: a one-line error


def test_a_connections_fusectl_directory_is_named_by_the_kernels_device_number():
    """fusectl names a connection's directory major << 20 | minor; glibc's makedev, which it
    was named by, differs from minor 256 on (a host with a few hundred mounts: containers),
    and the request limits were then never set. (Found by review.)"""
    for minor, name in ((42, "42"), (341, "341"), (1 << 12, "4096")):
        info = mounts.MountInfo(0, minor, "/mnt", "fuse.fusecache", "/src", "rw")
        assert mounts.connection_dir(info) == Path("/sys/fs/fuse/connections") / name
    assert mounts.connection_dir(mounts.MountInfo(1, 2, "/m", "fuse", "/s", "rw")).name == str((1 << 20) + 2)


def test_wait_for_exit():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert mounts.wait_for_exit(child.pid, 5.0)
    assert not mounts.wait_for_exit(os.getpid(), 0.05)


def test_an_exited_process_not_yet_reaped_counts_as_gone():
    """umount waits for the daemon to exit; once exited it is a zombie until init reaps it,
    which must not keep umount waiting."""
    release_read, release_write = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", "import ctypes, os, threading; "
                              f"threading.Thread(target=os.read, args=({release_read}, 1)).start(); "
                              "ctypes.CDLL(None).pthread_exit(None)"], pass_fds=(release_read,))
    os.close(release_read)
    deadline = time.monotonic() + 30
    # until its main thread has exited (a zombie) while another waits: descriptors still open
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert mounts.is_running(child.pid)
    os.close(release_write)  # the other thread ends, and with it the process
    assert mounts.wait_for_exit(child.pid, 10)
    assert Path(f"/proc/{child.pid}").exists()  # a zombie: exited, not reaped (we never waited)
    assert not mounts.wait_for_exit(os.getpid(), 0.05)
    child.wait()
    assert not mounts.is_running(child.pid)


def test_a_thread_that_exits_while_its_state_is_read_counts_as_gone():
    """umount and the tests wait on a process that a kill -9 is ending: a thread that exits
    between the open of its stat file and the read fails the read with ESRCH. It has exited;
    the wait must not fail (ProcessLookupError ended a crash test so, once in ten runs)."""
    go = threading.Event()
    thread = threading.Thread(target=go.wait)
    thread.start()
    with open(f"/proc/self/task/{thread.native_id}/stat", "rb") as stat:
        go.set()
        thread.join()
        while str(thread.native_id) in os.listdir("/proc/self/task"):  # until the kernel let it go
            time.sleep(0.01)
        assert not mounts.thread_runs(stat)
    with open(f"/proc/self/task/{threading.get_native_id()}/stat", "rb") as stat:
        assert mounts.thread_runs(stat)

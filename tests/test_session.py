"""The FUSE sessions on real mounts: what a reader and the next mount see of how a session talks
to the kernel. The in-process side (crafted requests) is in test_session_inprocess.py.

What it proves:
- a reader using O_DIRECT whose read waits on a source that does not answer dies at once
  when killed (the kernel sends INTERRUPT for its read: no FUSE_ASYNC_DIO; our session only,
  libfuse asks for async direct I/O);
- a daemon that exits late (stopped while `fusecache umount` unmounted it, then resumed once
  another daemon mounted the same path) leaves the new mount alone, on both sessions;
- so does a daemon that adopts a connection unmounted before it was adopted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from fusecache.livestate import Negotiated
from fusecache.session.kernel import KernelSession, SessionConfig
from fusecache.session.mount import MountSpec

from .conftest import Mount, file_bytes, force_unmount, is_mounted, wait_gone
from .helpers import DIRECT_READER, wait_until, waits_in_fuse

pytestmark = pytest.mark.fuse

WAIT = 30.0  # how long a step may take before the test calls it stuck (the source's delay is far longer)


@pytest.mark.parametrize("queues", [1, 4])  # read by the trio thread, or by a reader thread
def test_a_killed_o_direct_reader_dies_while_the_source_does_not_answer(tmp_path, counting_source, make_mount,
                                                                        queues):
    (counting_source.real / "big").write_bytes(os.urandom(4 << 20))
    counting_source.start()
    counting_source.set_faults({"big": {"delay": 3600}})  # the source answers no read of it
    # pyfuse3's session cannot: docs/semantics.md
    m = make_mount(counting_source.path, ["session=kernel", f"queues={queues}"])
    reader = subprocess.Popen([sys.executable, "-c", DIRECT_READER, str(m.mountpoint / "big")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "open\n"
        wait_until(lambda: waits_in_fuse(reader.pid), "the reader never waited in its read", WAIT)
        reader.kill()
        reader.wait(timeout=WAIT)  # without the INTERRUPT: in D state until the source answers
        assert counting_source.counts().get("big", 0) == 0  # it died before the source answered
    finally:
        reader.kill()
        counting_source.stop()  # the daemon's read of the source fails now, and it can exit
    reader.wait()
    m.unmount()


@pytest.mark.parametrize("session", ["kernel", "pyfuse3"])
def test_a_daemon_that_exits_late_leaves_the_next_mount_alone(tmp_path, make_mount, session):
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_bytes(b"served by the second daemon")
    first = make_mount(source, [f"session={session}"])
    second = Mount(source, first.mountpoint, tmp_path / "cache-2", [f"session={session}"])
    os.kill(first.pid, signal.SIGSTOP)
    try:
        # what `fusecache umount` does once the daemon has not answered for 10 s (test_cli)
        force_unmount(first.mountpoint)
        assert not is_mounted(first.mountpoint)
        second.mount()
        os.kill(first.pid, signal.SIGTERM)  # delivered as it resumes: it unmounts on its way out
    finally:
        os.kill(first.pid, signal.SIGCONT)
    wait_gone(first.pid)
    first.pid = None
    try:
        assert is_mounted(second.mountpoint)
        assert file_bytes(second.mountpoint / "f") == b"served by the second daemon"
    finally:
        force_unmount(second.mountpoint)
        if second.pid:
            wait_gone(second.pid)


def test_a_connection_adopted_after_its_unmount_leaves_the_mount_now_at_the_path_alone(tmp_path):
    """A daemon recovering a mount adopts the connection seconds after its supervisor saw it
    alive (it loads the store first). Unmounted and mounted anew at the same path meanwhile,
    the path holds another mount: it was taken for ours, and detached as the recovering
    daemon found its connection ended. (Found by review.)"""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "the-next-mount", str(mountpoint)], check=True)
    try:
        session = KernelSession(None, MountSpec(mountpoint=str(mountpoint), fsname="test"),
                                SessionConfig(workers=1, max_background=1, passthrough=False))
        session.adopt(os.open("/dev/fuse", os.O_RDWR), Negotiated(minor=41, flags=0))  # a connection ended
        session.close()
        assert is_mounted(mountpoint)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)

"""`fusecache restart` on real mounts: readers that hold open files and mappings and keep
reopening see a pause, never an error or a wrong byte, and nothing cached is fetched again;
a restart that cannot be done leaves the mount with the daemon serving it."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import pytest

from fusecache import control
from fusecache.livestate import FORMAT

from .conftest import SESSION, file_bytes, run_cli, wait_gone
from .helpers import fill
from .readers import FILES, Readers

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(SESSION != "kernel", reason="only fusecache's own session hands over")]

MiB = 1 << 20


@pytest.mark.parametrize("passthrough", ["on", "off"])
def test_readers_see_no_error_through_restarts(tmp_path, make_mount, passthrough):
    src = tmp_path / "src"
    contents = fill(src, FILES)
    m = make_mount(src, options=["session=kernel", f"passthrough={passthrough}"])
    for name, data in contents.items():  # the first fill
        assert file_bytes(m.mountpoint / name) == data
    old_pids = []
    with Readers(m.mountpoint, contents) as readers:
        readers.wait_for_passes(2)
        for _ in range(2):
            old_pids.append(m.pid)
            run_cli("restart", m.mountpoint)
            m.pid = m.status()["pid"]
            assert m.pid != old_pids[-1]
            wait_gone(old_pids[-1])
            readers.wait_for_passes(2)
    assert readers.errors == []
    status = m.status()
    assert status["metrics"]["bytes_from_source"] == 0  # nothing cached was fetched again
    assert status["passthrough"] == ("on" if passthrough == "on" else "turned off (passthrough=off)")
    assert (m.mountpoint / "ckpt").is_dir() and sorted(os.listdir(m.mountpoint / "ckpt")) == sorted(
        Path(name).name for name in FILES)
    m.unmount()


def test_an_open_handle_on_a_changed_file_reads_eio_after_a_restart(tmp_path, make_mount):
    """The new daemon opens each handle again on the version its inode names: a file the
    source replaced meanwhile cannot be, and its old handle fails rather than read new bytes."""
    src = tmp_path / "src"
    contents = fill(src, {"w.bin": 2 * MiB})
    m = make_mount(src)  # the FUSE path: every read reaches the daemon
    with open(m.mountpoint / "w.bin", "rb") as f:
        assert f.read() == contents["w.bin"]
        replacement = bytes(reversed(contents["w.bin"]))
        (src / "w.bin.new").write_bytes(replacement)
        os.replace(src / "w.bin.new", src / "w.bin")
        run_cli("restart", m.mountpoint)
        m.pid = m.status()["pid"]
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(OSError) as failed:
            os.pread(f.fileno(), 4096, 0)
        assert failed.value.errno == errno.EIO
    assert file_bytes(m.mountpoint / "w.bin") == replacement  # a new open gets the new version
    m.unmount()


def test_a_handover_of_another_format_is_refused_and_the_daemon_serves_on(tmp_path, make_mount):
    src = tmp_path / "src"
    contents = fill(src, {"a.bin": 1 * MiB})
    m = make_mount(src)
    with pytest.raises(control.ControlError) as refused:
        control.call(str(m.mountpoint), {"command": "handover", "format": FORMAT + 1})
    assert "restart refused" in str(refused.value) and "\n" not in str(refused.value)
    assert m.status()["pid"] == m.pid
    assert file_bytes(m.mountpoint / "a.bin") == contents["a.bin"]
    m.unmount()


def test_a_new_daemon_that_does_not_confirm_leaves_the_old_one_serving(tmp_path, make_mount):
    """The new daemon refuses a state (or dies) after the old one paused: without its word
    the old daemon reads requests again, and keeps the connection."""
    src = tmp_path / "src"
    contents = fill(src, {"a.bin": 1 * MiB})
    m = make_mount(src)
    with open(m.mountpoint / "a.bin", "rb") as f:
        assert f.read() == contents["a.bin"]
        path = control.socket_of(str(m.mountpoint))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.sendall(json.dumps({"command": "handover", "format": FORMAT}).encode() + b"\n")
            data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 4)
            assert len(fds) == 1 and data.strip()
            for fd in fds:
                os.close(fd)
        # closed without "ok": the old daemon serves again
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(f.fileno(), len(contents["a.bin"]), 0) == contents["a.bin"]
    assert m.status()["pid"] == m.pid
    assert file_bytes(m.mountpoint / "a.bin") == contents["a.bin"]
    m.unmount()


def test_restart_of_a_path_that_is_no_mount_is_one_line(tmp_path):
    result = run_cli("restart", tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "not a fusecache mount" in result.stderr

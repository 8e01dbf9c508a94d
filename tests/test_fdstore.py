"""systemd's fd store keeping a mount's FUSE connection through a kill -9 of its daemon, on
real mounts, with the test in systemd's place (no systemd needed): it listens on
NOTIFY_SOCKET, keeps the descriptor the daemon sends with FDSTORE=1, and starts the daemon
again with that descriptor at fd 3 (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES), as the
fusecache@ service's Restart=on-failure does. Readers that hold open files and mappings and
keep reopening see a pause, never an error or a wrong byte; a kept connection that cannot
be served (a journal refused, a mount gone) is dropped from the store, and the mount ends
or is made anew."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusecache import control, journal, mounts

from .conftest import SESSION, file_bytes, force_unmount, is_mounted, run_cli
from .helpers import fill
from .readers import FILES, WAIT, Readers, wait_for_the_journal

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(SESSION != "kernel", reason="only fusecache's own session keeps its connection")]

FUSE_FD_NAME = "fuse"


_AS_SYSTEMD_STARTS = f"""
import os, sys
kept = int(sys.argv[1])
if kept != 3:
    os.dup2(kept, 3)
    os.close(kept)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="{FUSE_FD_NAME}")
os.execvp(sys.argv[2], sys.argv[2:])
"""


class FakeSystemd:
    """The service manager's side of a Type=notify service with FileDescriptorStoreMax=1."""

    def __init__(self, directory: Path) -> None:
        self.address = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.sock.settimeout(WAIT)  # a failure bound only
        self.stored: dict[str, int] = {}
        self.started: list[subprocess.Popen] = []

    def start(self, command: list[str], log: Path) -> subprocess.Popen:
        """Start the service; what the store keeps goes along at fd 3 (systemd sets LISTEN_PID
        between its fork and exec: here a small Python step does, then execs the service)."""
        env = os.environ | {"NOTIFY_SOCKET": self.address}
        kept = self.stored.get(FUSE_FD_NAME)
        if kept is not None:
            command = [sys.executable, "-c", _AS_SYSTEMD_STARTS, str(kept), *command]
        with open(log, "ab") as stderr:
            process = subprocess.Popen(command, env=env, stderr=stderr, pass_fds=[kept] if kept is not None else [])
        self.started.append(process)
        return process

    def wait_for(self, key: str) -> dict[str, str]:
        """Take messages (keeping and dropping descriptors as systemd does) until one sets key."""
        while True:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 8)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    if name in self.stored:
                        os.close(fd)  # the same connection again (systemd keeps one copy)
                    else:
                        self.stored[name] = fd
            if fields.get("FDSTOREREMOVE") == "1" and name in self.stored:
                os.close(self.stored.pop(name))
            if key in fields:
                return fields

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
                process.wait()
        for fd in self.stored.values():
            os.close(fd)
        self.stored.clear()
        self.sock.close()


@contextlib.contextmanager
def _aborted_on_failure(mountpoint: Path) -> Iterator[None]:
    """On a failure, abort the connection: the readers' requests would otherwise wait for a
    daemon that never comes (the store keeps the connection open), and they are joined."""
    try:
        yield
    except BaseException:
        info = mounts.find_mount(str(mountpoint))
        if info is not None:
            (mounts.connection_dir(info) / "abort").write_text("1")
        raise


@pytest.fixture
def service(tmp_path):
    """A fusecache@-like service of tmp_path/src at tmp_path/mnt, and the manager that runs it."""
    (tmp_path / "mnt").mkdir()
    manager = FakeSystemd(tmp_path)
    yield manager
    manager.close()
    force_unmount(tmp_path / "mnt")


def _command(tmp_path: Path, passthrough: str = "off") -> list[str]:
    return [sys.executable, "-m", "fusecache", "mount", str(tmp_path / "src"), str(tmp_path / "mnt"), "--foreground",
            "--cache-dir", str(tmp_path / "cache"), "-o", "session=kernel", "-o", f"passthrough={passthrough}"]


def _status(mountpoint: Path) -> dict:
    return control.call(str(mountpoint), {"command": "status"})


def _journal_of(mountpoint: Path) -> Path:
    return Path(_status(mountpoint)["cache"]) / journal.NAME


def _kill9(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


@pytest.mark.parametrize("passthrough", ["on", "off"])
def test_readers_see_no_error_through_a_kill9_of_a_daemon_whose_connection_is_in_the_fd_store(
        tmp_path, service, passthrough):
    contents = fill(tmp_path / "src", FILES)
    mountpoint, log = tmp_path / "mnt", tmp_path / "service.log"
    first = service.start(_command(tmp_path, passthrough), log)
    service.wait_for("READY")
    assert FUSE_FD_NAME in service.stored  # the daemon stored its connection before it was ready
    for name, data in contents.items():  # the first fill
        assert file_bytes(mountpoint / name) == data
    with Readers(mountpoint, contents) as readers, _aborted_on_failure(mountpoint):
        readers.wait_for_passes(2)
        readers.wait_for_the_journal(_journal_of(mountpoint), first.pid)
        _kill9(first)
        assert is_mounted(mountpoint)  # the store holds the connection: the mount lives on
        second = service.start(_command(tmp_path, passthrough), log)
        service.wait_for("READY")
        readers.wait_for_passes(2)
    assert readers.errors == []
    status = _status(mountpoint)
    assert status["pid"] == second.pid
    assert status["metrics"]["bytes_from_source"] == 0  # nothing cached was fetched again
    assert "the fd store kept the connection of" in log.read_text()
    second.send_signal(signal.SIGTERM)  # systemctl stop: unmount, and the store is emptied
    service.wait_for("FDSTOREREMOVE")
    assert second.wait(WAIT) == 0
    assert service.stored == {} and not is_mounted(mountpoint)


@pytest.mark.parametrize("passthrough", ["on", "off"])
def test_a_restart_of_a_daemon_systemd_runs_execs_in_place_under_readers(tmp_path, service, passthrough):
    """`fusecache restart` (the unit's ExecReload): the daemon systemd watches cannot hand over
    to another process, so it stops serving, writes its journal and execs the fusecache
    installed now in the same process, which serves the kept connection from the journal.
    Readers see a pause; nothing cached is fetched again."""
    contents = fill(tmp_path / "src", FILES)
    mountpoint, log = tmp_path / "mnt", tmp_path / "service.log"
    process = service.start(_command(tmp_path, passthrough), log)
    service.wait_for("READY")
    for name, data in contents.items():  # the first fill
        assert file_bytes(mountpoint / name) == data
    with Readers(mountpoint, contents) as readers, _aborted_on_failure(mountpoint):
        readers.wait_for_passes(2)
        for _ in range(2):
            run_cli("restart", mountpoint)
            service.wait_for("READY")  # from the new program
            readers.wait_for_passes(2)
    assert readers.errors == []
    status = _status(mountpoint)
    assert status["pid"] == process.pid and process.poll() is None  # the pid systemd watches
    assert status["metrics"]["bytes_from_source"] == 0  # nothing cached was fetched again
    assert log.read_text().count("restarting in place") == 2
    process.send_signal(signal.SIGTERM)  # systemctl stop: unmount, and the store is emptied
    service.wait_for("FDSTOREREMOVE")
    assert process.wait(WAIT) == 0 and not is_mounted(mountpoint)


def test_a_refused_journal_drops_the_kept_connection_and_the_next_start_mounts_anew(tmp_path, service):
    contents = fill(tmp_path / "src", {"a.bin": 1 << 20})
    mountpoint, log = tmp_path / "mnt", tmp_path / "service.log"
    first = service.start(_command(tmp_path), log)
    service.wait_for("READY")
    assert file_bytes(mountpoint / "a.bin") == contents["a.bin"]
    cache = Path(_status(mountpoint)["cache"])
    wait_for_the_journal(_journal_of(mountpoint), first.pid, contents)
    _kill9(first)
    (cache / journal.NAME).write_bytes(b"{not json")
    second = service.start(_command(tmp_path), log)
    service.wait_for("FDSTOREREMOVE")
    assert second.wait(WAIT) == 1
    assert service.stored == {}
    assert len([line for line in log.read_text().splitlines() if "journal refused" in line]) == 1
    with pytest.raises(OSError) as info:
        os.listdir(mountpoint)
    assert info.value.errno == errno.ENOTCONN  # the mount ended: nothing is served from a guess
    service.start(_command(tmp_path), log)  # systemd's next restart: the stale mount is cleaned, a new one made
    service.wait_for("READY")
    assert file_bytes(mountpoint / "a.bin") == contents["a.bin"]


def test_a_kept_connection_whose_mount_is_gone_is_dropped_and_the_mount_made_anew(tmp_path, service):
    contents = fill(tmp_path / "src", {"a.bin": 1 << 20})
    mountpoint, log = tmp_path / "mnt", tmp_path / "service.log"
    first = service.start(_command(tmp_path), log)
    service.wait_for("READY")
    assert file_bytes(mountpoint / "a.bin") == contents["a.bin"]
    wait_for_the_journal(_journal_of(mountpoint), first.pid, contents)
    _kill9(first)
    force_unmount(mountpoint)  # unmounted by hand while the service was down
    assert not is_mounted(mountpoint) and FUSE_FD_NAME in service.stored
    service.start(_command(tmp_path), log)
    service.wait_for("READY")
    assert "has ended: mounting anew" in log.read_text()
    assert FUSE_FD_NAME in service.stored  # the new connection, the old one dropped
    assert file_bytes(mountpoint / "a.bin") == contents["a.bin"]

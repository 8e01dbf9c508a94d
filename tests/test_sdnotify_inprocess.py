"""systemd's service protocol (fusecache.sdnotify), in process, with a test in systemd's
place: what it receives (READY=1; FDSTORE=1 with a duplicate of the descriptor and its
name; FDSTOREREMOVE=1), and the descriptors a restarted service is handed (LISTEN_FDS from
fd 3, named by LISTEN_FDNAMES, only for the pid LISTEN_PID names)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from fusecache import sdnotify


@pytest.fixture
def manager(tmp_path, monkeypatch):
    """A datagram socket where systemd's notify socket would be, named in NOTIFY_SOCKET."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(10)  # a failure bound only: the message is already queued
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        yield sock


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    message, fds, _flags, _addr = socket.recv_fds(sock, 4096, 8)
    return message, fds


def test_systemd_hears_ready(manager, monkeypatch):
    assert sdnotify.available()
    assert sdnotify.notify("READY=1")
    assert _receive(manager) == (b"READY=1", [])
    manager.close()
    assert not sdnotify.notify("READY=1")  # nobody listens any more: a warning, no error
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sdnotify.available() and not sdnotify.notify("READY=1")  # not under systemd: nothing


def test_an_abstract_notify_socket_is_reached(monkeypatch):
    name = f"fusecache-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert sock.recv(64) == b"READY=1"


def test_the_fd_store_receives_a_duplicate_of_the_descriptor_and_its_name(manager, tmp_path):
    path = tmp_path / "kept"
    path.write_bytes(b"x")
    with open(path, "rb") as f:
        assert sdnotify.store_fd(f.fileno(), "fuse")
        message, fds = _receive(manager)
        assert message.split(b"\n") == [b"FDSTORE=1", b"FDNAME=fuse"]
        assert len(fds) == 1 and fds[0] != f.fileno()
        kept = os.fstat(fds[0])
        assert (kept.st_dev, kept.st_ino) == (os.fstat(f.fileno()).st_dev, os.fstat(f.fileno()).st_ino)
        os.close(fds[0])
    assert sdnotify.remove_fd("fuse")
    assert _receive(manager) == (b"FDSTOREREMOVE=1\nFDNAME=fuse", [])


_SHOW = """
import json, os
from fusecache import sdnotify
passed = sdnotify.passed_fds()
print(json.dumps({"passed": passed, "left": [v for v in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if v in os.environ],
                  "inheritable": [os.get_inheritable(fd) for fds in passed.values() for fd in fds]}))
"""


def _started_with_fds(tmp_path, pid: str, names: str) -> dict:
    """Run _SHOW as systemd starts a service: two descriptors at 3 and 4, LISTEN_* set."""
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    script = f'export LISTEN_PID={pid} LISTEN_FDS=2 LISTEN_FDNAMES={names}; exec "$@" 3<a 4<b'
    result = subprocess.run(["sh", "-c", script, "sh", sys.executable, "-c", _SHOW], cwd=tmp_path,
                            capture_output=True, text=True, check=True, timeout=60)
    return json.loads(result.stdout)


def test_a_restarted_service_finds_its_descriptors_by_name(tmp_path):
    shown = _started_with_fds(tmp_path, "$$", "fuse:other")  # $$: the shell, which execs the service
    assert shown == {"passed": {"fuse": [3], "other": [4]}, "left": [], "inheritable": [False, False]}


def test_descriptors_without_names_are_unknown(tmp_path):
    assert _started_with_fds(tmp_path, "$$", "")["passed"] == {"unknown": [3, 4]}


def test_descriptors_meant_for_another_process_are_not_taken(tmp_path):
    shown = _started_with_fds(tmp_path, "1", "fuse:other")  # LISTEN_PID names another process
    assert shown == {"passed": {}, "left": [], "inheritable": []}

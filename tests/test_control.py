"""The control channel in process (no mount, no root): a long request is kept alive by
heartbeats, a silent daemon is a one-line ControlError, never a TimeoutError."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import trio

from fusecache.control import ControlError, ControlServer, ControlTimeout, send_request


async def slow(request: dict) -> dict:
    await trio.sleep(request["seconds"])
    return {"slept": request["seconds"]}


def exchange(path: Path, request: dict, heartbeat: float, timeout: float) -> dict:
    """Serve the control socket at path in this process while a thread sends one request."""

    async def main() -> dict:
        server = ControlServer(path, {"slow": slow}, owner_uid=os.getuid(), heartbeat=heartbeat)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            try:
                return await trio.to_thread.run_sync(send_request, path, request, timeout, "/mnt")
            finally:
                nursery.cancel_scope.cancel()

    return trio.run(main)


def test_a_long_request_outlives_the_timeout(tmp_path):
    """A prefetch of a tree whose walk took longer than the client's timeout used to end in a
    TimeoutError traceback: the timeout now counts silence, which heartbeats break."""
    assert exchange(tmp_path / "c.sock", {"command": "slow", "seconds": 1.5}, heartbeat=0.1, timeout=0.5) == {
        "slept": 1.5}


def test_a_silent_daemon_is_a_one_line_error(tmp_path):
    with pytest.raises(ControlTimeout) as info:
        exchange(tmp_path / "c.sock", {"command": "slow", "seconds": 1.0}, heartbeat=5.0, timeout=0.3)
    assert str(info.value) == "the daemon of /mnt did not answer within 0.3s"


def test_a_daemon_that_never_reads_is_a_one_line_error(tmp_path):
    """A stopped daemon: the kernel queues the connection, nobody ever answers."""
    path = tmp_path / "stopped.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        with pytest.raises(ControlTimeout, match="did not answer within 0.2s"):
            send_request(path, {"command": "status"}, 0.2, "/mnt")


def test_socket_errors_are_control_errors(tmp_path):
    with pytest.raises(ControlError, match="^/mnt is not served by a running fusecache daemon$"):
        send_request(tmp_path / "missing.sock", {"command": "status"}, 1.0, "/mnt")
    path = tmp_path / "dying.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()

        def die_with_the_request_unread() -> None:
            conn = listener.accept()[0]
            time.sleep(0.2)
            conn.close()  # unread data: the client's receive fails (ECONNRESET)

        thread = threading.Thread(target=die_with_the_request_unread)
        thread.start()
        try:
            with pytest.raises(ControlError, match="^cannot talk to the daemon of /mnt: Connection reset by peer$"):
                send_request(path, {"command": "status"}, 5.0, "/mnt")
        finally:
            thread.join()


def test_a_runtime_dir_others_made_or_can_write_is_refused(tmp_path):
    """/tmp/fusecache-<uid> can be made by anyone before the daemon: whoever owns it could
    put a socket there that answers in the daemon's name."""
    from fusecache.private import UntrustedPath

    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(UntrustedPath, match="writable by group or others"):
        ControlServer(open_dir / "c.sock", {}, owner_uid=os.getuid()).prepare()
    fresh = tmp_path / "fresh" / "fusecache"
    ControlServer(fresh / "c.sock", {}, owner_uid=os.getuid()).prepare()
    assert fresh.stat().st_mode & 0o777 == 0o700
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(UntrustedPath, match="owned by uid 65534"):
            ControlServer(theirs / "c.sock", {}, owner_uid=0).prepare()

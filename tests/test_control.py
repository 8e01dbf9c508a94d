"""The control channel (fusecache.control) in process, no mount, no root: a long request is
kept alive by heartbeats, a silent daemon is a one-line ControlError, never a TimeoutError;
unknown, malformed, oversized and failing requests get a one-line error and the server keeps
serving; only root and the user who mounted may use it; a daemon that died is told from a
stopped one by its socket alone."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import outcome
import pytest
import trio
import trio.testing

from fusecache.config import runtime_dirs
from fusecache import control, supervisor
from fusecache.mounts import MountInfo
from fusecache.control import MAX_REQUEST, ControlError, ControlTimeout, call, is_listening, send_request, socket_path
from fusecache.controlserver import ControlServer


async def slow(request: dict) -> dict:
    await trio.sleep(request["seconds"])
    return {"slept": request["seconds"]}


def exchange(path: Path, request: dict, heartbeat: float, timeout: float) -> dict:
    """Serve the control socket at path in this process while a thread sends one request."""

    async def main() -> outcome.Outcome:
        server = ControlServer(path, {"slow": slow}, owner_uid=os.getuid(), heartbeat=heartbeat)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            result = await trio.to_thread.run_sync(outcome.capture, send_request, path, request, timeout, "/mnt")
            nursery.cancel_scope.cancel()
        return result

    # the client's error is raised here, as itself: raised inside the nursery, a trio with
    # strict exception groups would hand it on wrapped in an ExceptionGroup
    return trio.run(main).unwrap()


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


async def test_the_control_channel_answers_bad_requests_with_one_line_errors(tmp_path):
    async def echo(request: dict) -> dict:
        return {"echo": request["value"]}

    async def broken(request: dict) -> dict:
        raise RuntimeError("boom")

    async def refuses(request: dict) -> dict:
        raise ControlError("no such file in the cache")

    path = tmp_path / "c.sock"
    server = ControlServer(path, {"echo": echo, "broken": broken, "refuses": refuses}, owner_uid=os.getuid())

    def exchange(request) -> dict:
        return send_request(path, request, 5.0, "/mnt")

    def raw(data: bytes) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return json.loads(sock.makefile("rb").read())

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        assert path.stat().st_mode & 0o777 == 0o600
        assert await trio.to_thread.run_sync(exchange, {"command": "echo", "value": [1, "x"]}) == {"echo": [1, "x"]}
        for request, message in (({"command": "nope"}, "unknown command 'nope'"),
                                 ({"command": "broken"}, "internal error: boom"),
                                 ({"command": "refuses"}, "no such file in the cache")):
            with pytest.raises(ControlError) as info:
                await trio.to_thread.run_sync(exchange, request)
            assert str(info.value) == message
        for data in (b"not json\n", b'{"no": "command"}\n', b"[1, 2]\n", b""):
            assert await trio.to_thread.run_sync(raw, data) == {"error": "malformed request"}
        assert await trio.to_thread.run_sync(raw, b"x" * (MAX_REQUEST + 10)) == {"error": "request too large"}
        # still serving after all that
        assert await trio.to_thread.run_sync(exchange, {"command": "echo", "value": 1}) == {"echo": 1}
        nursery.cancel_scope.cancel()
    assert not path.exists()  # the socket goes with the server


def _status_as(uid: int, path: Path) -> str:
    """The outcome of a status request sent by a process running as uid (forked; as root)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            if uid != os.getuid():
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            outcome_ = json.dumps(send_request(path, {"command": "status"}, 5.0, "/mnt"))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            outcome_ = f"{type(e).__name__}: {e}"
        os.write(write_end, outcome_.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    return text


async def test_only_root_and_the_owner_may_use_the_control_channel(tmp_path):
    async def status(request: dict) -> dict:
        return {"ok": True}

    owner, other = 4242, 4343
    if os.getuid() != 0:
        owner, other = os.getuid(), os.getuid() + 1
    reachable = Path(tempfile.mkdtemp(dir="/tmp"))  # not below pytest's private directories
    reachable.chmod(0o755)
    path = reachable / "c.sock"
    server = ControlServer(path, {"status": status}, owner_uid=owner)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        os.chmod(path, 0o666)  # the socket's mode is not what keeps others out
        for uid, answer in [(0, '{"ok": true}'), (owner, '{"ok": true}'),
                            (other, "ControlError: permission denied: only root or the user who mounted")]:
            if os.getuid() in (0, uid):
                assert (await trio.to_thread.run_sync(_status_as, uid, path)).startswith(answer), uid
        nursery.cancel_scope.cancel()
    reachable.rmdir()


async def test_a_client_refuses_a_socket_served_by_another_uid_than_the_mounts(tmp_path):
    """The owner of a user mount controls its runtime directory, and could put another
    socket there (a symlink to root's mount's): root's `cache clear` of the user's mount then
    emptied root's own cache. The client checks who serves the socket. (Found by review.)"""
    async def status(request: dict) -> dict:
        return {"ok": True}

    path = tmp_path / "c.sock"
    server = ControlServer(path, {"status": status}, owner_uid=os.getuid())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        with pytest.raises(ControlError, match=f"served by uid {os.getuid()}, the mount is uid {os.getuid() + 1}'s"):
            await trio.to_thread.run_sync(lambda: send_request(path, {"command": "status"}, 5.0, "/mnt",
                                                               peer_uid=os.getuid() + 1))
        nursery.cancel_scope.cancel()


def test_a_control_socket_that_is_not_the_owners_socket_is_refused(tmp_path, monkeypatch):
    """A symlink (or any file) where a mount's control socket belongs is refused before it is
    connected to. (Found by review.)"""
    mount = MountInfo(0, 99, "/mnt/user", "fuse.fusecache", "fusecache",
                      f"rw,user_id={os.getuid()},group_id=0")
    monkeypatch.setattr(control, "resolve_mountpoint", lambda path: path)
    monkeypatch.setattr(control, "find_mount", lambda path: mount if path == "/mnt/user" else None)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setattr(control, "runtime_dirs", lambda uid: [run])
    elsewhere = tmp_path / "roots.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(elsewhere))
        listener.listen(1)
        socket_path("/mnt/user", os.getuid()).symlink_to(elsewhere)
        with pytest.raises(ControlError, match="refusing to use the control socket of /mnt/user: .* is not a socket"):
            call("/mnt/user", {"command": "status"})


async def test_a_server_that_stops_late_leaves_the_next_servers_socket(tmp_path):
    """A daemon that exits after the next mount at its path started (a stopped daemon that
    `umount` gave up on) used to unlink that mount's socket, leaving `status` unable to reach it."""
    async def who(request: dict) -> dict:
        return {"server": request["command"]}

    path = tmp_path / "c.sock"
    old, new = (ControlServer(path, {name: who}, owner_uid=os.getuid()) for name in ("old", "new"))
    async with trio.open_nursery() as outer:
        old_scope = trio.CancelScope()

        async def serve_old(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with old_scope:
                await old.serve(task_status=task_status)

        await outer.start(serve_old)
        await outer.start(new.serve)  # binds anew over the old one's path
        old_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert path.exists()
        assert await trio.to_thread.run_sync(send_request, path, {"command": "new"}, 5.0, "/mnt") == {"server": "new"}
        outer.cancel_scope.cancel()
    assert not path.exists()


def test_socket_paths_and_unmounted_paths(tmp_path):
    a = socket_path("/mnt/a", 0)
    assert a == socket_path("/mnt/a", 0) != socket_path("/mnt/b", 0)
    assert [a.parent] == runtime_dirs(0) == [Path("/run/fusecache")] and a.suffix == ".sock"
    assert socket_path("/mnt/a", 4242).parent == runtime_dirs(4242)[0]
    with pytest.raises(ControlError, match="is not served by a running fusecache daemon"):
        call(str(tmp_path), {"command": "status"})


def test_a_users_socket_is_found_where_it_was_bound_once_the_runtime_dir_appears(tmp_path, monkeypatch):
    """A user's mount made without /run/user/UID (from cron) binds its socket under /tmp. A
    login then makes /run/user/UID: clients looked only there, so the live mount was "not
    served", and a new mount at its path unmounted it as stale."""
    run_user, tmp = tmp_path / "run-user", tmp_path / "tmp"
    tmp.mkdir()
    dirs = [tmp]
    monkeypatch.setattr("fusecache.control.runtime_dirs", lambda uid: list(dirs))
    path = socket_path("/mnt/x", 4242)
    assert path.parent == tmp
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        run_user.mkdir()
        dirs.insert(0, run_user)  # the login
        assert socket_path("/mnt/x", 4242) == path and is_listening("/mnt/x", 4242)
    assert socket_path("/mnt/y", 4242).parent == run_user  # a new mount binds where it is preferred
    assert runtime_dirs(4242)[-1] == Path("/tmp/fusecache-4242")  # always a place to look, the last


def test_a_dead_daemon_is_told_from_a_stopped_one_by_its_socket(tmp_path, monkeypatch):
    """`fusecache mount` over a mount must not touch the mountpoint (a stopped daemon never
    answers): a socket still listening is a live daemon, answering or not; one that refuses
    connections, or is gone, is a dead one's."""
    monkeypatch.setattr("fusecache.control.runtime_dirs", lambda uid: [tmp_path])
    path = socket_path("/mnt/x", os.getuid())
    assert not is_listening("/mnt/x", os.getuid())  # no socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        assert not is_listening("/mnt/x", os.getuid())  # bound, not listening: refused
        listener.listen(1)
        assert is_listening("/mnt/x", os.getuid())  # nobody accepts: a stopped daemon
        assert is_listening("/mnt/x", os.getuid())
        assert is_listening("/mnt/x", os.getuid())  # its queue is full: still listening
    assert path.exists() and not is_listening("/mnt/x", os.getuid())  # closed by a dead daemon


def test_a_mount_whose_supervisor_listens_is_not_stale_while_its_daemon_is_replaced(tmp_path, monkeypatch):
    """After a kill -9 the supervisor starts the next daemon, which binds its control socket
    only once it has loaded the store: meanwhile the old socket refuses connections. Taken for
    a dead mount, a `fusecache mount` on it unmounted the live mount. The supervisor's socket,
    beside it, says the mount lives on. (Found by review.)"""
    monkeypatch.setattr("fusecache.control.runtime_dirs", lambda uid: [tmp_path])
    path = socket_path("/mnt/x", os.getuid())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # the dead daemon's: refuses
        assert not is_listening("/mnt/x", os.getuid())
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as keeper:
            keeper.bind(str(supervisor.socket_for(path)))
            keeper.listen(1)
            assert is_listening("/mnt/x", os.getuid())

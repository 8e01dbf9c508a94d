"""The local control channel: a unix socket per mount, one JSON request and reply per line.

The socket lives in the runtime dir under a name derived from the mountpoint, so a client
finds it from the mountpoint alone. It is created mode 0600, and every connection's peer
credentials (SO_PEERCRED) are checked: only root and the user who mounted may use it, since
prefetch and eviction spend the node's network and disk.

A client gives up on a daemon that stays silent (stopped, hung), never on one that is busy:
while a request is worked on, the daemon sends a heartbeat.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Awaitable, Callable, Protocol

import trio

from . import private
from .config import runtime_dir
from .mounts import find_mount, resolve_mountpoint

log = logging.getLogger(__name__)



class StreamReply(Protocol):
    """A reply that is more than one JSON line (a restart's hand-over sends a descriptor and
    waits for the new daemon's word): it is given the connection to deliver itself."""

    async def deliver(self, stream: trio.SocketStream) -> None: ...


Handler = Callable[[dict], Awaitable["dict | StreamReply"]]
MAX_REQUEST = 1 << 20
TIMEOUT = 30.0  # seconds of silence after which a client gives up on the daemon
HEARTBEAT = 2.0  # seconds between the daemon's heartbeats, well within any client's TIMEOUT
_PEERCRED = struct.Struct("3i")


class ControlError(Exception):
    """A control request failed; the message is shown to the user as is."""


class ControlTimeout(ControlError):
    """The daemon went silent: it is stopped or hung (a busy one sends heartbeats)."""


def socket_path(mountpoint: str, owner_uid: int) -> Path:
    """The socket of the mount at `mountpoint`, spelled as mountinfo lists it. Not resolved
    here: resolving a mountpoint is a request to its daemon (see mounts.resolve_mountpoint)."""
    key = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]
    return runtime_dir(owner_uid) / f"{key}.sock"


class ControlServer:
    """Answers one request per connection. While it is worked on, one space is sent every
    `heartbeat` seconds ahead of the reply, so that a long request (a prefetch walking a large
    tree) never looks like a hung daemon; JSON allows leading whitespace, so the reply is
    still one JSON line."""

    def __init__(self, path: Path, handlers: dict[str, Handler], owner_uid: int,
                 heartbeat: float = HEARTBEAT) -> None:
        self.path = path
        self.handlers = handlers
        self.owner_uid = owner_uid
        self.heartbeat = heartbeat

    def prepare(self) -> None:
        """Create the runtime dir, or check that the one there is the daemon user's alone:
        in /tmp anyone could have made it first, and then answer for us."""
        private.ensure_tree(self.path.parent.parent, self.path.parent)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.path.unlink(missing_ok=True)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        bound = os.stat(self.path)
        sock.listen(16)
        try:
            await trio.serve_listeners(self._serve_one, [trio.SocketListener(sock)], task_status=task_status)
        finally:
            self._remove_own_socket(bound)

    def _remove_own_socket(self, bound: os.stat_result) -> None:
        """Unlink the socket this server bound, and only it: a daemon that exits late (after a
        `umount` gave up waiting for it) must not remove the socket of the next mount there."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return
        if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
            self.path.unlink(missing_ok=True)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        async with stream:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_heartbeats, stream)
                reply = await self._reply(stream)
                nursery.cancel_scope.cancel()  # before the reply: one sender at a time
            if not isinstance(reply, dict):
                await reply.deliver(stream)
                return
            try:
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            except trio.BrokenResourceError:
                pass

    async def _send_heartbeats(self, stream: trio.SocketStream) -> None:
        while True:
            await trio.sleep(self.heartbeat)
            try:
                await stream.send_all(b" ")
            except trio.BrokenResourceError:
                return  # the client left; the request still runs to its end

    async def _reply(self, stream: trio.SocketStream) -> dict | StreamReply:
        try:
            return await self._answer(stream)
        except ControlError as e:
            return {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - a bad request must not stop the daemon
            log.exception("control request failed")
            return {"error": f"internal error: {e}"}

    async def _answer(self, stream: trio.SocketStream) -> dict | StreamReply:
        # The request is read before anything is refused: closing a unix socket with unread
        # data makes the peer's read fail (ECONNRESET) instead of showing it our answer.
        request = await self._read_request(stream)
        _pid, uid, _gid = _PEERCRED.unpack(
            stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid not in (0, self.owner_uid):
            raise ControlError("permission denied: only root or the user who mounted may control this mount")
        handler = self.handlers.get(request["command"])
        if handler is None:
            raise ControlError(f"unknown command {request['command']!r}")
        return await handler(request)

    async def _read_request(self, stream: trio.SocketStream) -> dict:
        data = b""
        while not data.endswith(b"\n"):
            more = await stream.receive_some(65536)
            if not more:
                break
            data += more
            if len(data) > MAX_REQUEST:
                raise ControlError("request too large")
        try:
            request = json.loads(data)
            request["command"]
        except (ValueError, KeyError, TypeError):
            raise ControlError("malformed request") from None
        return request


def call(mountpoint: str, request: dict, timeout: float = TIMEOUT) -> dict:
    """Send one request to the daemon serving mountpoint; raise ControlError on failure,
    ControlTimeout if the daemon stays silent for `timeout` seconds."""
    return send_request(socket_of(mountpoint), request, timeout, mountpoint)


def socket_of(mountpoint: str) -> Path:
    """The control socket of the daemon serving mountpoint, checked (see call)."""
    path = resolve_mountpoint(mountpoint)
    info = find_mount(path)
    if info is None or info.owner_uid is None:
        raise ControlError(f"{mountpoint} is not served by a running fusecache daemon")
    sock_path = socket_path(path, info.owner_uid)
    try:
        reason = private.refusal(sock_path.parent, os.lstat(sock_path.parent), (0, info.owner_uid))
    except FileNotFoundError:
        raise ControlError(f"{mountpoint} is not served by a running fusecache daemon") from None
    if reason:  # a socket someone else could have put there would answer in the daemon's name
        raise ControlError(f"refusing to use the control socket of {mountpoint}: {reason}")
    return sock_path


def is_listening(mountpoint: str, owner_uid: int) -> bool:
    """Whether a daemon still listens on the control socket of the mount at mountpoint,
    answering or not: a stopped or hung daemon's socket still takes connections (the kernel
    queues them), a dead daemon's refuses them or is gone. Asks nothing, so it never waits
    for the daemon; a socket this user may not reach counts as listening."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            sock.connect(str(socket_path(mountpoint, owner_uid)))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError:  # EAGAIN (its queue is full), EACCES (another user's)
            return True
    return True


def send_request(path: Path, request: dict, timeout: float, mountpoint: str) -> dict:
    """One exchange over the control socket at path; `mountpoint` names the mount in messages."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)  # per receive: each heartbeat starts a new wait
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                more = sock.recv(1 << 20)
                if not more:
                    break
                data += more
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"{mountpoint} is not served by a running fusecache daemon") from None
        except PermissionError:
            raise ControlError(f"permission denied: cannot use the control socket of {mountpoint}") from None
        except TimeoutError:
            raise ControlTimeout(f"the daemon of {mountpoint} did not answer within {timeout:g}s") from None
        except OSError as e:
            raise ControlError(f"cannot talk to the daemon of {mountpoint}: {e.strerror or e}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError("the daemon closed the control connection without answering") from None
    if "error" in reply:
        raise ControlError(reply["error"])
    return reply

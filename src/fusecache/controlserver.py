"""The daemon's side of the control channel (see control.py): it answers one request per
connection, from the peers control.py's rules admit."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Awaitable, Callable, Protocol

import trio

from . import linux, private
from .control import HEARTBEAT, MAX_REQUEST, ControlError

log = logging.getLogger(__name__)



class StreamReply(Protocol):
    """A reply that is more than one JSON line (a restart's hand-over sends a descriptor and
    waits for the new daemon's word): it is given the connection to deliver itself."""

    async def deliver(self, stream: trio.SocketStream) -> None: ...


Handler = Callable[[dict], Awaitable["dict | StreamReply"]]


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
        _pid, uid, _gid = linux.peer_credentials(stream.socket)
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

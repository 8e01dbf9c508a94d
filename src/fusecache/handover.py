"""A live restart: one daemon hands its FUSE connection, and what it knows of it, to the next.

The new daemon (`fusecache restart`, from the fusecache installed now) asks the serving one
over the control socket (`handover`, with the state formats it reads). The serving daemon
refuses an asker that does not read the format it writes, and otherwise stops reading
requests, waits until every request it has read is answered (session/gate.py), and sends
the state (livestate.py) with the /dev/fuse descriptor (SCM_RIGHTS). The new daemon checks
the state and says "ok"; only then does the old one end, without unmounting. Without that
word (the new daemon refused the state or died) the old one reads requests again: a failed
restart costs a pause.
An "ok" too late finds the old daemon's socket shut for reading, fails to send, and the new
daemon gives up: the two never serve at once.

A daemon that systemd runs (in the foreground, its connection in the service's fd store) has
no second process to hand over to: systemd watches its pid. It restarts in place instead
(`restart_in_place`, what `fusecache restart` and the unit's ExecReload ask of it): it stops
reading requests and waits for those it has read as for a hand-over, writes its journal,
leaves the connection alone and execs the fusecache installed now, in the same process, with
the connection at descriptor 3 as systemd's fd store passes it after a crash
(cli.exec_in_place); the new program serves it from the journal (daemon.stored_connection).

The kernel queues requests meanwhile: readers see a pause, not an error. Backing ids belong
to the connection, so passthrough opens keep theirs. The store lock passes when the old
daemon exits (the new one waits for it, CacheStore.lock), and the control socket is bound
anew by the new daemon (the old one unlinks only its own socket).
"""

from __future__ import annotations

import array
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .control import ControlError, socket_of
from .controlserver import Handler
from .livestate import FORMAT, AdapterState, LiveState, StateError, asker_reads, encode, formats_read, from_json
from .session.kernel import KernelSession

log = logging.getLogger(__name__)

ACK = b"ok\n"
DRAIN_TIMEOUT = 10.0  # how long readers may be held up by requests the old daemon still answers
ACK_TIMEOUT = 30.0  # how long the old daemon waits for the new one's word before serving again
REPLY_TIMEOUT = 60.0  # seconds of silence after which the new daemon gives up (a drain sends heartbeats)
MAX_STATE = 1 << 30


@dataclass(frozen=True)
class MountArguments:
    """What a new daemon is started with to serve the same mount: the command line's own terms."""

    source: str
    options: list[str]
    cache_dir: str
    log_level: str
    foreground: bool


class HandoverServer:
    """The serving daemon's side: the `mount_args` and `handover` control commands."""

    def __init__(self, session: KernelSession | None, export: Callable[[], AdapterState],
                 arguments: MountArguments, journal: Callable[[], Awaitable[bool]] | None = None,
                 in_place: bool = False) -> None:
        """session: None where the session cannot hand over (pyfuse3's). journal: writes the
        journal now, where there is one. in_place: systemd's fd store keeps the connection,
        so this daemon restarts in place (with a journal to serve from)."""
        self.session = session
        self.export = export
        self.arguments = arguments
        self.journal = journal
        self.in_place = in_place and journal is not None
        self._busy = False
        self.taken = False  # the connection was handed over: this daemon ends without unmounting
        self.exec_fd: int | None = None  # restarting in place: the connection, for the new program

    def table(self) -> dict[str, Handler]:
        return {"mount_args": self.mount_args, "handover": self.handover, "restart_in_place": self.restart_in_place}

    async def mount_args(self, request: dict) -> dict:
        if self.arguments.foreground and not self.in_place:
            raise ControlError("this daemon runs in the foreground without systemd's fd store: restart it by hand")
        return {"source": self.arguments.source, "options": self.arguments.options,
                "cache_dir": self.arguments.cache_dir, "log_level": self.arguments.log_level,
                "in_place": self.in_place}

    async def restart_in_place(self, request: dict) -> _InPlace:
        """Stop serving without unmounting, the journal current, for an exec of the fusecache
        installed now in this process (see the module docstring); the reply goes out first."""
        if self.session is None or self.journal is None or not self.in_place:
            raise ControlError("only a daemon whose connection systemd's fd store keeps restarts in place")
        self._same_format(request)  # the program it execs serves from this one's journal
        await self._pause("restart in place")
        try:
            if not await self.journal():  # the new program serves from it: never a stale one
                raise ControlError(f"the journal could not be written (the log says why): restart refused, "
                                   f"the mount stays with pid {os.getpid()}")
            self.exec_fd = os.dup(self.session.fd)  # the session closes its own at the end
        except BaseException:
            self._resume()
            raise
        return _InPlace(self)

    def _resume(self) -> None:
        """Serve again after a pause whose restart did not go ahead."""
        assert self.session is not None
        self._busy = False
        self.session.gate.resume()

    async def _pause(self, what: str) -> None:
        """Stop reading requests and wait until those read are answered; refused if it takes
        longer than DRAIN_TIMEOUT (the mount stays as it was)."""
        assert self.session is not None
        if self._busy:
            raise ControlError("a restart of this mount is already under way")
        self._busy = True
        log.info("%s asked for: pausing", what)
        try:
            drained = await self.session.gate.pause(DRAIN_TIMEOUT)
        except BaseException:
            self._busy = False
            raise
        if not drained:
            self._busy = False
            raise ControlError(f"requests in flight did not finish within {DRAIN_TIMEOUT:g}s (a slow source?): "
                               f"restart refused, the mount stays with pid {os.getpid()}")

    @staticmethod
    def _same_format(request: dict) -> None:
        if not asker_reads(request):
            read = request.get("formats", request.get("format"))
            raise ControlError(f"the new daemon reads state formats {read!r}, this one writes "
                               f"format {FORMAT}: restart refused, the mount stays with pid {os.getpid()}")

    async def handover(self, request: dict) -> dict | _Delivery:
        self._same_format(request)
        if self.session is None:
            raise ControlError("the pyfuse3 session cannot hand its connection over: unmount and mount instead")
        await self._pause("restart")
        try:
            # the journal is the state handed over: should the new daemon die before it writes
            # its own, its supervisor recovers the mount from it (not from one seconds older)
            if self.journal is not None:
                await self.journal()
            state = encode(LiveState(FORMAT, os.getpid(), self.session.negotiated(), self.export()))
        except BaseException:  # the restart is refused: the mount must not stay paused
            self._resume()
            raise
        return _Delivery(self, state)

    def finished(self, taken: bool) -> None:
        assert self.session is not None
        self.taken = taken
        if taken:
            self._busy = False
            log.info("the new daemon took the connection over; exiting without unmounting")
            self.session.handed_over()
        else:
            log.warning("the new daemon did not take the connection over; serving again")
            self._resume()


@dataclass
class _Delivery:
    server: HandoverServer
    state: bytes

    async def deliver(self, stream: trio.SocketStream) -> None:
        """Send the state with the descriptor, then wait for the new daemon's word."""
        assert self.server.session is not None
        sock = stream.socket
        taken = False
        try:
            fds = array.array("i", [self.server.session.fd])
            data = self.state + b"\n"
            sent = await sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            await stream.send_all(data[sent:])
            answer = bytearray()
            with trio.move_on_after(ACK_TIMEOUT):
                await _ack(stream, answer)
            if len(answer) < len(ACK):
                # No word in time: from this shutdown on, the new daemon's ACK fails to send
                # (EPIPE) and it gives up; one it sent before is in the buffer, read below.
                # Either way both sides agree on who serves: never the two of them at once.
                sock.shutdown(socket.SHUT_RD)
                await _ack(stream, answer)
            taken = answer == ACK
        except (OSError, trio.BrokenResourceError) as e:
            log.warning("handing the connection over failed: %s", e)
        finally:
            self.server.finished(taken)


async def _ack(stream: trio.SocketStream, answer: bytearray) -> None:
    """Add to answer what the new daemon sends, up to ACK's length or its end (in place: what
    was read before a cancellation is kept)."""
    while len(answer) < len(ACK) and (more := await stream.receive_some(len(ACK) - len(answer))):
        answer += more


@dataclass
class _InPlace:
    server: HandoverServer

    async def deliver(self, stream: trio.SocketStream) -> None:
        """Answer, then end serving: the exec follows once the daemon has wound down."""
        assert self.server.session is not None
        try:
            await stream.send_all(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        except (OSError, trio.BrokenResourceError):
            pass  # the client left; the restart goes on
        self.server.taken = True
        log.info("restarting in place: the fusecache installed now serves the connection next")
        self.server.session.handed_over()


@dataclass
class Received:
    """What the new daemon got: the state and the connection's descriptor."""

    state: LiveState
    fd: int


def request(mountpoint: str, before_ack: Callable[[int], None] = lambda fd: None) -> Received:
    """The new daemon's side (blocking): ask the serving daemon for its connection; ControlError
    (one line) if it refuses or fails, and then it keeps serving. before_ack(fd) runs once the
    state is taken, before the old daemon is told to go (the supervisor's registration)."""
    path = socket_of(mountpoint)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REPLY_TIMEOUT)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps({"command": "handover", **formats_read()}).encode() + b"\n")
            data, fds = _receive(sock)
        except OSError as e:
            raise ControlError(f"cannot talk to the daemon of {mountpoint}: {e.strerror or e}") from None
        try:
            state = _parse(data, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        try:
            before_ack(fds[0])
            sock.sendall(ACK)
        except OSError as e:
            os.close(fds[0])
            raise ControlError(f"the daemon of {mountpoint} went away during the restart: {e.strerror or e}") from None
    return Received(state, fds[0])


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One reply line, and the descriptors that came with it."""
    data = b""
    fds: list[int] = []
    while not data.endswith(b"\n"):
        more, got, _flags, _addr = socket.recv_fds(sock, 1 << 20, 4)
        fds += got
        if not more:
            break
        data += more
        if len(data) > MAX_STATE:
            break
    return data, fds


def _parse(data: bytes, fds: list[int]) -> LiveState:
    try:
        raw = json.loads(data)
    except ValueError:
        raise ControlError("the daemon closed the connection without handing it over") from None
    if isinstance(raw, dict) and "error" in raw:
        raise ControlError(raw["error"])
    try:
        state = from_json(raw)
    except StateError as e:
        raise ControlError(f"restart refused: {e}; the mount stays with the daemon serving it") from None
    if len(fds) != 1:
        raise ControlError(f"the daemon sent {len(fds)} descriptors with its state, not the connection's one")
    return state

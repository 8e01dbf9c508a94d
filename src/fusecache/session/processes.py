"""Reader processes: the daemon's side of session/reader_process.py.

Where the cache is in memory, the session reads the connection with `count` processes
instead of threads (why: session/reader_process.py). This side starts them for each period
of reading (run), tells them which opens they may answer (a watcher of the session's
Routes), takes in the requests they forward and hands each to the trio thread as the reader
threads do (`deliver`), and adds up what they served for the metrics (`counts`).

A pause (a restart's hand-over) sends each STOP and returns once each reported STOPPED:
its forwarded requests come before that report on the same socket, so by then the trio
thread has counted every request they read (session/gate.py), as with the threads. The
processes then exit; the next run starts new ones and routes every open again.

A process that dies unasked (killed, or a bug) took the requests it had read with it: the
kernel holds them as read and not answered. Where the kernel can (FUSE_HAS_RESEND) they
are sent again (`resend`), and a new process takes the dead one's place; a process that
keeps dying ends the session, as a failed reader thread does.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import math
import mmap
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .queues import Deliver
from .reader_process import (CONTROL_MESSAGE, COUNTS, FORWARD, LOG, LOG_LEVEL, OP_ROUTE, OP_STOP, OP_UNROUTE,
                             OVER, ROUTE, STOPPED, UNROUTE)
from .routes import Routes
from .types import DirectFile

log = logging.getLogger(__name__)

# deaths of reader processes survived within REPLACEMENT_WINDOW seconds (each: a new process,
# the requests sent again); one more there ends the session: they die as fast as they start
REPLACEMENTS = 8
REPLACEMENT_WINDOW = 60.0
# seconds a process has to report STOPPED (it answers one request at most first); then killed
STOP_WAIT = 10.0
# the package the daemon runs, copied for its reader processes (_snapshot_code)
_PACKAGE = Path(__file__).resolve().parent.parent
_SNAPSHOT_PREFIX = "fusecache-readers-"  # then the daemon's pid


@dataclass
class _Process:
    slot: int
    popen: subprocess.Popen
    control: socket.socket  # our end: nonblocking
    listening: trio.CancelScope = field(default_factory=lambda: trio.CancelScope(shield=True))
    # messages that found its socket full, in order (a ROUTE with the route it tells of, whose
    # descriptor is taken when it goes), and how many of them are not sent yet
    outbox: tuple[trio.MemorySendChannel, trio.MemoryReceiveChannel] = field(
        default_factory=lambda: trio.open_memory_channel(math.inf))
    backlog: int = 0


class ReaderProcesses:
    """The reader processes of one session (see the module docstring)."""

    def __init__(self, master_fd: int, count: int, routes: Routes, resend: Callable[[], bool]) -> None:
        self.master_fd = master_fd
        self.count = count
        self.routes = routes
        self.resend = resend  # have the kernel send again the requests read and not answered
        routes.watch(self)
        self._processes: list[_Process] = []
        self._counters: mmap.mmap | None = None
        self._counters_fd = -1
        self._counts_lock = threading.Lock()  # counts() may be asked from another thread
        self._retired = (0, 0)  # what processes that ended served: bytes, chunk hits
        self._deaths: collections.deque[float] = collections.deque(maxlen=REPLACEMENTS)
        self._stopping = False  # STOP was sent: no process is started any more this run
        self._code, self._code_lock = _snapshot_code()  # what every process of this daemon's life runs

    # ---- what they served ------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """Bytes served and chunk hits by every reader process so far (any thread)."""
        with self._counts_lock:
            served, hits = self._retired
            if self._counters is not None:
                for slot in range(self.count):
                    b, h = COUNTS.unpack_from(self._counters, slot * COUNTS.size)
                    served, hits = served + b, hits + h
            return served, hits

    def _retire(self, slot: int) -> None:
        """Keep what slot's process served, and clear the slot for a new one."""
        with self._counts_lock:
            assert self._counters is not None
            b, h = COUNTS.unpack_from(self._counters, slot * COUNTS.size)
            self._retired = (self._retired[0] + b, self._retired[1] + h)
            COUNTS.pack_into(self._counters, slot * COUNTS.size, 0, 0)

    # ---- routes (Routes' watcher; the trio thread) ------------------------------------------

    def added(self, fh: int, file: DirectFile) -> None:
        message = _route(fh, file)
        if message is not None:
            for process in self._processes:
                self._tell(process, message, (fh, file))

    def removed(self, fh: int) -> None:
        for process in self._processes:
            self._tell(process, UNROUTE.pack(OP_UNROUTE, fh))

    def _tell(self, process: _Process, message: bytes, route: tuple[int, DirectFile] | None = None) -> None:
        """Send a message to process now (a ROUTE before the open's reply, so that it knows
        the open by its first READ), or, behind others or where its socket is full, queue it
        for its listener to send in order (`_send_out`). A queued ROUTE takes no descriptor of
        its own (a burst of every route to every new process would take thousands): its
        route's descriptor goes with it, if the route is still there then; if not, the open
        was released, its number may be another file's, and the ROUTE is dropped (its UNROUTE
        is behind it)."""
        if not process.backlog:
            try:
                socket.send_fds(process.control, [message], [] if route is None else [route[1].fd])
                return
            except BlockingIOError:
                pass
            except OSError as e:  # it died: its listener finds out
                log.debug("reader process %d: %s", process.popen.pid, e)
                return
        try:
            process.outbox[0].send_nowait((message, route))
            process.backlog += 1
        except trio.ClosedResourceError:  # it stopped or died: nothing more goes to it
            pass

    async def _send_out(self, process: _Process) -> None:
        """Hand process its messages, waiting for room in its socket: a burst (every route,
        sent to a new process) can be larger than the socket holds, and none may be dropped
        but the ROUTE of an open released meanwhile (see _tell)."""
        try:
            async for message, route in process.outbox[1]:
                try:
                    while True:
                        fds = [] if route is None else self._descriptor_of(route)
                        if fds is None:
                            break
                        try:
                            socket.send_fds(process.control, [message], fds)
                            break
                        except BlockingIOError:
                            await trio.lowlevel.wait_writable(process.control)
                except OSError as e:  # it died: its listener finds out
                    log.debug("reader process %d: %s", process.popen.pid, e)
                finally:
                    process.backlog -= 1
        finally:
            process.outbox[0].close()

    def _descriptor_of(self, route: tuple[int, DirectFile]) -> list[int] | None:
        """The descriptor a ROUTE goes with, looked up as it goes (the wait for room may be
        long): None if its open was released since."""
        fh, file = route
        return [file.fd] if self.routes.get(fh) is file else None

    # ---- life cycle --------------------------------------------------------------------------

    async def run(self, deliver: Deliver) -> bool:
        """Read with the processes until the session is over (True); a cancel (a pause) stops
        them, and returns once each has answered or handed over what it read."""
        self._counters_fd = os.memfd_create("fusecache-readers", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._counters_fd, self.count * COUNTS.size)
            self._counters = mmap.mmap(self._counters_fd, self.count * COUNTS.size)
        except OSError:
            os.close(self._counters_fd)
            raise
        self._deaths.clear()
        self._stopping = False
        over = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                try:  # a process that cannot start (fork: EAGAIN) ends the run: those started stop
                    for slot in range(self.count):
                        nursery.start_soon(self._listen, self._start(slot), deliver, over)
                    await over.wait()
                finally:
                    self._stopping = True
                    for process in self._processes:
                        self._tell(process, OP_STOP)
                        process.listening.deadline = trio.current_time() + STOP_WAIT
            return True
        finally:
            for process in self._processes:
                process.popen.kill()  # all stopped or gone already; none is left behind
                process.control.close()
            with trio.CancelScope(shield=True):
                for process in self._processes:
                    await trio.to_thread.run_sync(process.popen.wait)
            self._processes = []
            for slot in range(self.count):
                self._retire(slot)
            with self._counts_lock:
                self._counters.close()
                self._counters = None
            os.close(self._counters_fd)

    def close(self) -> None:
        """Nothing is left running once run() returned: only the code copied for them to go."""
        shutil.rmtree(self._code, ignore_errors=True)
        os.close(self._code_lock)

    def _start(self, slot: int) -> _Process:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            # room for a forwarded request in one message (net.core.wmem_max may cap it)
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * CONTROL_MESSAGE)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [self._code, os.environ.get("PYTHONPATH")])))
            try:
                popen = subprocess.Popen(  # -P: no module from the working directory
                    [sys.executable, "-P", "-m", "fusecache.session.reader_process", str(self.master_fd),
                     str(theirs.fileno()), str(self._counters_fd), str(slot), str(os.getpid())],
                    pass_fds=(self.master_fd, theirs.fileno(), self._counters_fd), env=env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except BaseException:
                ours.close()
                raise
        ours.setblocking(False)
        process = _Process(slot, popen, ours)
        self._processes.append(process)
        for fh, file in self.routes:
            try:
                message = _route(fh, file)
            except OSError as e:  # as Routes.add: its reads go to the trio thread
                log.warning("the cache file of open %d cannot be looked at (%s): its reads go to the daemon", fh, e)
                continue
            if message is not None:
                self._tell(process, message, (fh, file))
        return process

    async def _listen(self, process: _Process, deliver: Deliver, over: trio.Event) -> None:
        """Take in what one process says until it stopped; shielded, so that a pause cannot
        leave a request it forwarded unread."""
        while process is not None:
            process = await self._take_in(process, deliver, over)

    async def _take_in(self, process: _Process, deliver: Deliver, over: trio.Event) -> _Process | None:
        """Send one process its messages and take in what it says until it stopped (None),
        or died and was replaced (the new one)."""
        with process.listening:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_out, process)
                stopped = await self._hear(process, deliver, over)
                nursery.cancel_scope.cancel()
            return None if stopped else self._replace(process, over)
        log.error("reader process %d did not stop: killed", process.popen.pid)
        process.popen.kill()
        # dead first: a request it was taking off the device at the kill is the kernel's to
        # send again only once the process let go of it (as _replace waits)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(process.popen.wait)
        self._resend()
        return None

    async def _hear(self, process: _Process, deliver: Deliver, over: trio.Event) -> bool:
        """Take in what one process says: True once it stopped (STOPPED, or OVER: the
        connection ended), False if it died unasked."""
        while True:
            await trio.lowlevel.wait_readable(process.control)
            try:
                message = process.control.recv(CONTROL_MESSAGE)
            except (BlockingIOError, ConnectionResetError):
                # ECONNRESET: it exited with a message of ours unread (a ROUTE sent during a
                # drain); what it sent before (FORWARDs, STOPPED) is still queued, then the end
                continue
            except OSError:
                message = b""
            tag = message[:1]
            if tag == FORWARD:
                if not deliver(self.master_fd, message[1:]):
                    over.set()
            elif tag == LOG:
                level = LOG_LEVEL.unpack_from(message)[1]
                log.log(level, "reader process %d: %s", process.popen.pid, message[LOG_LEVEL.size:].decode("utf-8", "replace"))
            elif tag in (STOPPED, OVER):
                if tag == OVER:
                    over.set()
                return True
            else:
                return False

    def _resend(self) -> bool:
        """Have the kernel send again what a process that died had read; False if it cannot."""
        try:
            return self.resend()
        except OSError as e:  # the connection ended meanwhile
            log.debug("NOTIFY_RESEND: %s", e)
            return False

    def _replace(self, dead: _Process, over: trio.Event) -> _Process | None:
        """A new process in the place of one that died unasked; None if the run ends instead."""
        dead.popen.kill()  # its socket failed: it is gone, or going
        code = dead.popen.wait()
        dead.control.close()
        self._processes.remove(dead)
        self._retire(dead.slot)
        resent = self._resend()
        if over.is_set() or self._stopping:
            return None
        now = trio.current_time()
        if len(self._deaths) == REPLACEMENTS and now - self._deaths[0] < REPLACEMENT_WINDOW:
            log.error("reader process %d died (status %d), the %dth within %.0f s: the session ends",
                      dead.popen.pid, code, REPLACEMENTS + 1, REPLACEMENT_WINDOW)
            over.set()
            return None
        self._deaths.append(now)
        log.error("reader process %d died (status %d); %s", dead.popen.pid, code,
                  "the requests it held were sent again" if resent else
                  "the requests it held get no answer (the kernel cannot send them again, Linux < 6.9)")
        try:
            return self._start(dead.slot)
        except OSError as e:
            if not self._processes:
                log.error("a new reader process could not be started (%s): none is left, the session ends", e)
                over.set()
            else:
                log.error("a new reader process could not be started (%s): %d read on", e, len(self._processes))
            return None


def _route(fh: int, file: DirectFile) -> bytes | None:
    """The ROUTE of an open (its descriptor goes with it); None if the file changed since it
    was checked: its reads go to the engine."""
    ticket = file.ticket()
    if ticket is None:
        return None
    return ROUTE.pack(OP_ROUTE, fh, ticket.size, ticket.chunk_size, *ticket.stamp)


def _snapshot_code() -> tuple[str, int]:
    """A private copy of the fusecache package as the daemon starts, for its reader processes
    to import (the import root: a directory holding `fusecache`), and a descriptor holding it
    locked (flock) for the daemon's life. They are started at every period of reading and to
    replace one that died, months into the daemon's life: from the package installed then, an
    upgrade's new reader code would meet this daemon's messages, crash on them, and its deaths
    end the mount. A copy in a directory only the daemon's user may write (mkdtemp: 0700). The
    lock keeps it from a daemon in another pid namespace sharing /tmp, which cannot see this
    one's pid, and from systemd-tmpfiles' aging of /tmp, which skips a directory so locked."""
    _remove_stale_snapshots()
    root = tempfile.mkdtemp(prefix=f"{_SNAPSHOT_PREFIX}{os.getpid()}-")
    lock = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.copytree(_PACKAGE, os.path.join(root, "fusecache"), ignore=shutil.ignore_patterns("__pycache__"))
    except BaseException:
        os.close(lock)
        raise
    return root, lock


def _remove_stale_snapshots() -> None:
    """Remove the copies of daemons of this user that are gone (a kill -9 leaves its copy):
    neither locked (by a daemon of this release, wherever its pid is seen) nor of a pid alive."""
    top = Path(tempfile.gettempdir())
    for stale in top.glob(f"{_SNAPSHOT_PREFIX}*-*"):
        pid = stale.name[len(_SNAPSHOT_PREFIX):].partition("-")[0]
        try:
            if not pid.isdigit() or stale.lstat().st_uid != os.getuid() or Path(f"/proc/{pid}").exists():
                continue
            held = os.open(stale, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its daemon lives
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            continue
        finally:
            os.close(held)

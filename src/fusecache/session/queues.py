"""Several threads reading the FUSE connection, each through its own duplicate of the /dev/fuse
descriptor.

One trio thread reading every request, and answering each through a task, tops out well
below what the kernel can take (issue 22): every 1 MiB reply costs a task, a thread hop and
two copies. Here `count` threads read requests, each from its own duplicate (dup(2)) of the
descriptor. Not a clone (FUSE_DEV_IOC_CLONE), as libfuse's clone_fd makes: a clone has a
queue of its own for the requests read from it, and when the process holding it dies the
kernel ends those with ECONNABORTED; they are lost to the reader, where requests read
through the one shared descriptor stay in flight while the supervisor (or systemd's fd
store) holds it, for the next daemon to have replayed (NOTIFY_RESEND: a kill -9 under FUSE-
path readers is survived, tests/test_crash.py). libfuse measured clones some 10% faster on
read() (docs/benchmarks.md, issue 22); surviving a crash comes first. A READ of an
open whose file was complete and checked when it was opened, or became so since (a
`DirectFile` in `routes`, added by the trio thread after one of its replies), is
answered by the thread itself, from the cache file (session/direct.py), as long as the file
is unchanged; the thread holds the GIL only to parse the request and look the handle up, the
copy runs in the kernel's writev, from the mapping a cache in memory keeps of the file, or
from a mapping of the reply's range of a cache file on disk. The two system calls of a request
that never wait (the nonblocking read of it, the cache file's stamp) are made holding the GIL
(linux.read_nowait, linux.stamp): so a reply costs a thread one wait for the GIL, after its
writev, not three or more. Every other request is handed to the trio thread
(`TrioToken.run_sync_soon`: a queue append and a wakeup, no waiting), which answers it as if
it had read it, on the descriptor it came from: state changes stay on that one thread.

The threads read nonblocking and, when there is nothing to read, wait in epoll on their
descriptor (EPOLLEXCLUSIVE: one thread woken per request, not all) and on an eventfd that
`stop` writes. So a pause (a restart's hand-over) stops them within one request each: every
request a thread read is answered by it or handed over before it reports itself stopped, and
the hand-overs go through the same queue as the report, so once every thread reported, the
trio thread has counted every request they read (session/gate.py) and can drain them.

The duplicates live as long as the session (closed by `close()`): a request handed to the
trio thread may be answered after its thread stopped, and its answer goes to its descriptor.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .. import linux
from . import protocol as p
from .direct import DataReplier, next_request, read_request, reply_length, send
from .routes import Routes

log = logging.getLogger(__name__)

# Hands a request (the descriptor it came from, its bytes) to the trio thread; returns False once
# the session is over (DESTROY). Called on the trio thread.
Deliver = Callable[[int, bytes], bool]


def duplicate(master_fd: int) -> int:
    """A thread's descriptor of master_fd's connection: the same open file, nonblocking as
    the session's own (see the module docstring for why not a clone)."""
    fd = os.dup(master_fd)
    os.set_blocking(fd, False)
    return fd


@dataclass
class _Run:
    """One period of reading: from start to stop (a pause, or the session's end)."""

    token: trio.lowlevel.TrioToken
    stop: threading.Event
    wake: int  # eventfd: written by stop, to end the threads' waits
    running: int
    over: trio.Event  # a thread met the connection's end, or the trio thread a DESTROY
    stopped: trio.Event  # every thread reported itself stopped


class RequestThreads:
    """The reader threads of one session (see the module docstring)."""

    def __init__(self, master_fd: int, count: int, routes: Routes) -> None:
        self.master_fd = master_fd
        self.count = count
        self.routes = routes  # fh -> its DirectFile: written on the trio thread, only read here
        self._fds: list[int] = []

    def close(self) -> None:
        """Let go of the duplicates (after serving: no request is in flight)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    async def run(self, deliver: Deliver) -> bool:
        """Read with the threads until the session is over (True); a cancel (a pause) stops
        them, and returns once each has answered or handed over what it read."""
        if not self._fds:
            self._fds = [duplicate(self.master_fd) for _ in range(self.count)]
        run = _Run(trio.lowlevel.current_trio_token(), threading.Event(),
                   os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), 0, trio.Event(), trio.Event())

        def handed(fd: int, data: bytes) -> None:  # on the trio thread
            if not deliver(fd, data):
                run.over.set()

        try:
            for fd in self._fds:
                # counted as started: one that cannot start (no thread left under the cgroup's
                # pids.max) ends the run with its error, once those started have stopped
                threading.Thread(target=self._read, args=(fd, run, handed), name=f"fuse-queue-{fd}",
                                 daemon=True).start()
                run.running += 1
            await run.over.wait()
            return True
        finally:
            run.stop.set()
            os.eventfd_write(run.wake, 1)
            if run.running:
                with trio.CancelScope(shield=True):
                    await run.stopped.wait()
            os.close(run.wake)

    def _read(self, fd: int, run: _Run, handed: Callable[[int, bytes], None]) -> None:
        """One thread: read, answer or hand over, until stopped or the connection ends."""
        over = False
        replier = DataReplier(fd)
        poller = select.epoll()
        # read_nowait holds the GIL: a blocking read would stop every thread of the daemon.
        # O_NONBLOCK belongs to the connection's open file, which other processes share (a
        # new daemon in a refused hand-over): set again at each start, never assumed.
        os.set_blocking(fd, False)
        buf = bytearray(p.READ_BUFFER)
        raw = (ctypes.c_char * len(buf)).from_buffer(buf)
        view = memoryview(buf)
        try:
            poller.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
            poller.register(run.wake, select.EPOLLIN)
            while not run.stop.is_set():
                n = next_request(lambda: linux.read_nowait(fd, raw), poller)
                if n is None:
                    over = True
                    break
                if not n:
                    continue
                try:
                    answered = self._answer(replier, view[:n])
                except Exception:  # a bug in one request: the trio thread answers it instead
                    log.exception("answering a request on a reader thread failed")
                    answered = False
                if not answered:
                    run.token.run_sync_soon(handed, fd, bytes(view[:n]))
        except Exception:
            log.exception("a FUSE reader thread failed: the session ends")
            over = True
        finally:
            poller.close()
            run.token.run_sync_soon(self._stopped, run, over)

    def _answer(self, replier: DataReplier, data: memoryview) -> bool:
        """Answer a READ of a complete, unchanged file here; False: the trio thread answers."""
        read = read_request(data)
        if read is None:
            return False
        unique, fh, offset, size = read
        file = self.routes.get(fh)
        if file is None or not file.unchanged():
            return False
        length = reply_length(size, offset, file.size)
        view = file.view(offset, length) if length else None
        if view is not None:
            file.serving(offset, length)
            send(replier.dev_fd, unique, 0, view)
            del view  # before the mapping could be closed (at the open's release)
        elif not replier.reply(unique, file.fd, offset, length, before=lambda: file.serving(offset, length)):
            return False
        try:
            file.served(offset, length)
        except OSError as e:  # answered: only the page cache keeps the pages
            log.warning("after a reply from the cache file: %s", e)
        return True

    @staticmethod
    def _stopped(run: _Run, over: bool) -> None:  # on the trio thread
        if over:
            run.over.set()
        run.running -= 1
        if not run.running:
            run.stopped.set()

"""A reader process: reads requests from the FUSE connection and answers the READs of
complete files itself, with an interpreter (and a GIL) of its own.

Why processes: reader threads (session/queues.py) each give up the GIL for their reply's
writev, in which the kernel copies the data, and must take it back after. On the 16-core
device 8 of them spent most of their time asleep waiting for it, with the GIL held a third
of the time: handing it over costs a wakeup of the next waiter, per reply, and the threads
topped out at half of libfuse's C (docs/benchmarks.md, issue 22). A process per queue waits
for nobody. The session starts them where the cache is in memory; a disk cache keeps the
threads, whose replies drop the cache file's pages together (engine/direct.RepliesInFlight).

The process holds a duplicate of the connection's descriptor (not a clone, for the reason
session/queues.py gives) and a SOCK_SEQPACKET socket to the daemon (session/processes.py),
over which:

- the daemon sends ROUTE (an open's handle, its `Ticket`, and the cache file's descriptor
  with it), UNROUTE (the handle was released) and STOP;
- the process sends FORWARD (a request it does not answer: the daemon answers it as if it
  had read it, on its own descriptor of the same connection), STOPPED (after STOP, once
  everything it read was answered or forwarded) and OVER (the connection ended).

A READ is answered here only if its handle is routed and the cache file's stamp is what the
ticket says (store.same_content, asked before every reply: any write into the file moves
it), else it is forwarded and the daemon's engine checks the chunks again. The control
socket is looked at before every request, so a ROUTE sent before an open's reply is known
by the time its first READ comes, as a rule (one that is not, or that came without its
descriptor, only has its reads forwarded). Handles are never reused within a daemon
(fs.py), so a route that outlived its handle (its UNROUTE not read yet) is never asked for.

What it served is counted in its slot of a shared memory file (COUNTS), before the reply
goes out, which the daemon folds into its metrics. It dies with the daemon (PDEATHSIG):
requests it held stay in the kernel's queue of the shared descriptor, which a restarted
daemon has replayed (NOTIFY_RESEND), as after a crash of the daemon with its threads.
"""

from __future__ import annotations

import array
import errno
import logging
import mmap
import os
import select
import signal
import socket
import struct
import sys
from dataclasses import dataclass

from .. import linux
from ..store import Stamp, same_content
from . import protocol as p
from .direct import SplicingReplier, next_request, read_request, reply_length, send, spanned

log = logging.getLogger(__name__)

# daemon -> process: op, handle, the ticket's size, chunk size and stamp (+ the cache file's fd)
ROUTE = struct.Struct("<cQQQqqqq")
UNROUTE = struct.Struct("<cQ")
OP_ROUTE, OP_UNROUTE, OP_STOP = b"R", b"U", b"X"
# process -> daemon: FORWARD is followed by the request's bytes, LOG by a level and a line
FORWARD, STOPPED, OVER, LOG = b"F", b"S", b"O", b"L"
LOG_LEVEL = struct.Struct("<cB")
# each process's slot of the shared counters: bytes served, chunk hits (cumulative)
COUNTS = struct.Struct("<QQ")
# what one control message can hold: a forwarded request, the largest the kernel sends
CONTROL_MESSAGE = p.READ_BUFFER + 1
_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)  # room for the one descriptor a ROUTE carries


def split_batch_forget(request: memoryview) -> list[bytes]:
    """A BATCH_FORGET request as two, each with half of its inodes (each header's length its
    own); none for one of fewer than two."""
    count = p.BATCH_FORGET_IN.unpack_from(request, p.IN_HEADER.size)[0]
    if count < 2:
        return []
    header = list(p.IN_HEADER.unpack_from(request))
    entries = p.IN_HEADER.size + p.BATCH_FORGET_IN.size
    halves = []
    for start, end in ((0, count // 2), (count // 2, count)):
        body = request[entries + start * p.FORGET_ONE.size:entries + end * p.FORGET_ONE.size]
        header[0] = entries + len(body)
        halves.append(p.IN_HEADER.pack(*header) + p.BATCH_FORGET_IN.pack(end - start, 0) + bytes(body))
    return halves


@dataclass(frozen=True)
class Route:
    """An open this process answers: its cache file (this process's descriptor of it), the
    version's size and chunk size, and the stamp the file had when it was verified."""

    fd: int
    size: int
    chunk_size: int
    stamp: Stamp


class Reader:
    """One reader process's loop (see the module docstring)."""

    def __init__(self, dev_fd: int, control: socket.socket, counts: memoryview) -> None:
        self.dev_fd = dev_fd
        self.control = control
        self.counts = counts
        self.served = 0
        self.hits = 0
        self.routes: dict[int, Route] = {}
        self._routes_refused = False  # a ROUTE came without its descriptor (logged once)
        self._stopped = False  # STOP came
        self.replier = SplicingReplier(dev_fd)

    def run(self) -> None:
        """Read and answer or forward until STOP (then STOPPED) or the connection's end (OVER)."""
        # O_NONBLOCK belongs to the connection's open file, which other processes share (a new
        # daemon in a refused hand-over): set again at each start, never assumed
        os.set_blocking(self.dev_fd, False)
        poller = select.epoll()
        poller.register(self.dev_fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        poller.register(self.control, select.EPOLLIN)
        buf = bytearray(p.READ_BUFFER)
        view = memoryview(buf)
        try:
            while self._take_control():
                n = next_request(lambda: os.readv(self.dev_fd, [buf]), poller)
                if n is None:
                    self.control.send(OVER)
                    return
                if not n:
                    continue
                try:
                    answered = self._answer(view[:n])
                except Exception:  # a bug in one request: the daemon answers it instead
                    log.exception("answering a request in a reader process failed")
                    answered = False
                if not answered:
                    self._forward(view[:n])
            self.control.send(STOPPED)
        finally:
            poller.close()
            for route in self.routes.values():
                os.close(route.fd)
            self.routes.clear()
            self.replier.close()

    def _take_control(self) -> bool:
        """Apply the daemon's messages waiting now; False once one was STOP."""
        while not self._stopped:
            try:
                # (socket.recv_fds would drop the flags before Python 3.12)
                data, ancillary, flags, _addr = self.control.recvmsg(ROUTE.size, _FD_SPACE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            fds = [fd for level, kind, payload in ancillary if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                   for fd in array.array("i", payload[:len(payload) - len(payload) % 4])]
            if not data:
                raise ConnectionError("the daemon closed the control socket")
            op = data[:1]
            if op == OP_ROUTE and fds:
                _op, fh, size, chunk_size, *stamp = ROUTE.unpack(data)
                stale = self.routes.pop(fh, None)
                if stale is not None:
                    os.close(stale.fd)
                self.routes[fh] = Route(fds[0], size, chunk_size, Stamp(*stamp))
            elif op == OP_ROUTE:  # its descriptor did not come (this process has no room for one):
                if not self._routes_refused:  # the open's reads are forwarded
                    log.warning("a route came without its cache file (%s): its reads go through the daemon",
                                "descriptors exhausted" if flags & socket.MSG_CTRUNC else "none sent")
                self._routes_refused = True
            elif op == OP_UNROUTE:
                route = self.routes.pop(UNROUTE.unpack(data)[1], None)
                if route is not None:
                    os.close(route.fd)
            elif op == OP_STOP:
                self._stopped = True
            for fd in fds[1:] if op == OP_ROUTE else fds:  # none else is ever sent; never kept
                os.close(fd)
        return False

    def _forward(self, request: memoryview) -> None:
        try:
            self.control.sendmsg([FORWARD, request])
        except OSError as e:
            if e.errno != errno.EMSGSIZE:
                raise
            # larger than the socket takes at once (its send buffer was cut below CONTROL_MESSAGE
            # by net.core.wmem_max): a BATCH_FORGET of many inodes (no reply is ever sent to
            # one: it goes in halves), or a WRITE, which a read-only mount never gets
            header = p.InHeader.parse(request)
            if header.opcode == p.Op.BATCH_FORGET and (halves := split_batch_forget(request)):
                for half in halves:
                    self._forward(memoryview(half))
            elif header.opcode in (p.Op.FORGET, p.Op.BATCH_FORGET, p.Op.INTERRUPT):  # answered by none
                log.error("a request of %d bytes could not be handed to the daemon: dropped", len(request))
            elif header.opcode in p.WRITE_OPS:  # what the daemon answers them: a read-only mount
                send(self.dev_fd, header.unique, errno.EROFS)
            else:
                log.error("a request of %d bytes could not be handed to the daemon: answered EIO", len(request))
                send(self.dev_fd, header.unique, errno.EIO)

    def _answer(self, data: memoryview) -> bool:
        """Answer a READ of a routed, unchanged file here; False: forward it."""
        read = read_request(data)
        if read is None:
            return False
        unique, fh, offset, size = read
        route = self.routes.get(fh)
        if route is None:  # its ROUTE, sent before the open's reply, may have come since the loop looked
            self._take_control()
            route = self.routes.get(fh)
        if route is None or not same_content(Stamp(*linux.stamp(route.fd)), route.stamp):
            return False
        length = reply_length(size, offset, route.size)
        return self.replier.reply(unique, route.fd, offset, length, before=lambda: self._count(route, offset, length))

    def _count(self, route: Route, offset: int, length: int) -> None:
        self.served += length
        if length:
            self.hits += spanned(offset, length, route.chunk_size)
        COUNTS.pack_into(self.counts, 0, self.served, self.hits)


def main(argv: list[str]) -> int:
    """argv: the connection's fd, the control socket's fd, the counters' fd, this process's
    slot in them, and the daemon's pid."""
    dev_fd, control_fd, counters_fd, slot, daemon = (int(a) for a in argv)
    linux.die_with_parent()
    if os.getppid() != daemon:  # it died before the line above
        return 1
    # the daemon decides when its readers stop (STOP, or its own death): a signal to the
    # whole group (Ctrl-C, systemd's stop) must not leave requests unanswered before it does
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a terminal's hangup: the daemon stops cleanly
    control = socket.socket(fileno=control_fd)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[_ToDaemon(control)])
    counters = mmap.mmap(counters_fd, 0)  # lives as long as the process
    os.close(counters_fd)
    counts = memoryview(counters)[slot * COUNTS.size:(slot + 1) * COUNTS.size]
    try:
        Reader(dev_fd, control, counts).run()
    except Exception:
        log.exception("a reader process failed")
        return 1
    return 0


class _ToDaemon(logging.Handler):
    """Logs through the daemon, which has the mount's log (a process has no stdio of its own)."""

    def __init__(self, control: socket.socket) -> None:
        super().__init__()
        self.control = control

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode("utf-8", "replace")[:CONTROL_MESSAGE - LOG_LEVEL.size]
            self.control.sendmsg([LOG_LEVEL.pack(LOG, min(record.levelno, 255)), line])
        except OSError:
            pass  # the daemon is gone


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

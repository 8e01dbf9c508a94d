"""A FUSE session of our own: reads requests from /dev/fuse, answers them through the adapter.

Why not libfuse: passthrough needs libfuse >= 3.16 and a binding that exposes backing ids,
which pyfuse3 does not; the kernel protocol itself is stable and small for a read-only server.

Concurrency: with `queues` > 1, reader threads read the requests, each through its own duplicate of
the descriptor, answer the reads of files complete in the cache themselves and hand every
other request to the trio thread (session/queues.py; where the cache is in memory, reader
processes do the same, session/processes.py); with one queue, the trio thread reads
them itself (nonblocking descriptor, woken by poll). Either way the trio thread runs one task
per request it answers, so all state changes stay on that thread. Its data replies are
written from worker threads: the kernel copies a reply into the reader's pages inside that
write, and 1 MiB copies in parallel are what lets several readers go faster than one core's
memcpy. Reads are limited to `workers` at a time, which bounds the reply buffers.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ..config import MAX_REQUEST
from ..fairness import requester
from ..livestate import Negotiated
from . import protocol as p
from .answers import MetadataAnswers, context_of
from .direct import LOOK_AGAIN, MAX_READ_PAGES, request_pages, send
from .gate import ReadGate
from .inflight import InFlight
from .mount import MountIdentity, MountSpec, connected, identify, mount, unmount_own
from .processes import ReaderProcesses
from .queues import RequestThreads
from .routes import Routes
from .types import Operations, reply_errno

log = logging.getLogger(__name__)

# Requests an INTERRUPT cancels: those that may wait long (for the source, or for a file to be
# filled); their handlers release what they hold when cancelled. The kernel sends INTERRUPT
# only for requests a task waits on itself, never for background ones: hence no FUSE_ASYNC_DIO
# in INIT, which would turn an O_DIRECT read into background requests its reader waits for
# unkillably (see docs/semantics.md, "Interrupted and killed readers").
INTERRUPTIBLE = frozenset({p.Op.READ, p.Op.OPEN})
# Replies this long or longer are written from a worker thread; shorter ones inline.
THREAD_REPLY_BYTES = 64 * 1024


# A request's handler: replies, or raises what reply_errno turns into the reply.
Handler = Callable[[p.InHeader, memoryview], Awaitable[None]]


class SessionError(Exception):
    """The kernel and we cannot talk (no common protocol version)."""


@dataclass(frozen=True)
class SessionConfig:
    workers: int  # reads served at once
    max_background: int
    passthrough: bool  # ask the kernel for passthrough if it offers it
    queues: int = 1  # threads reading the connection (session/queues.py); 1: the trio thread reads
    # processes read it instead of threads (session/processes.py): "always", "never", or
    # "auto": where the kernel sends again what a process that died had read
    processes: str = "never"

    def reads_by_processes(self, flags: int) -> bool:
        """Whether reader processes read the connection (with one queue the trio thread does),
        given the INIT flags. "auto" not without FUSE_HAS_RESEND (Linux < 6.9): the requests a
        process that died had read would never be answered, and the programs waiting on them
        hang, unkillable, until the connection ends; a thread dies only with the daemon."""
        if self.queues <= 1 or self.processes == "never":
            return False
        return self.processes == "always" or bool(flags & p.HAS_RESEND)


class DeviceBacking:
    """Backing files registered on the /dev/fuse descriptor (needs CAP_SYS_ADMIN)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def open(self, fd: int) -> int:
        return fcntl.ioctl(self._fd, p.DEV_IOC_BACKING_OPEN, bytearray(p.BACKING_MAP.pack(fd, 0, 0)))

    def close(self, backing_id: int) -> None:
        fcntl.ioctl(self._fd, p.DEV_IOC_BACKING_CLOSE, bytearray(backing_id.to_bytes(4, "little")))


class KernelSession:
    """One mount, served over the kernel protocol (see the module docstring)."""

    def __init__(self, operations: Operations, spec: MountSpec, config: SessionConfig) -> None:
        self.operations = operations
        self.spec = spec
        self.config = config
        self.fd = -1
        self.minor = 0
        self.flags = 0  # the INIT flags we answered
        self.backing: DeviceBacking | None = None  # once passthrough was negotiated in INIT
        self._mounted = False
        self._handed_over = False  # another process serves the connection now: never unmount
        self.gate = ReadGate()  # pause() and resume() for a restart's hand-over
        self._made: MountIdentity | None = None  # which mount is ours, for close()
        self._in_flight = InFlight()  # the interruptible requests being answered
        # fh -> the complete file its reads are served from by the reader threads or processes
        self.direct = Routes()
        self._readers: RequestThreads | ReaderProcesses | None = None
        # requests a reader thread read, while answered: unique -> the descriptor it read them from
        self._origin: dict[int, int] = {}
        self._reads = trio.CapacityLimiter(config.workers)
        self._buffers: list[bytearray] = []
        self._cancel: trio.CancelScope | None = None
        meta = MetadataAnswers(operations, self._send)
        self._handlers: dict[int, Handler] = {
            p.Op.LOOKUP: meta.lookup, p.Op.GETATTR: meta.getattr, p.Op.READLINK: meta.readlink,
            p.Op.OPEN: self._open, p.Op.READ: self._read, p.Op.RELEASE: self._release,
            p.Op.STATFS: meta.statfs, p.Op.OPENDIR: meta.opendir, p.Op.READDIR: meta.readdir,
            p.Op.READDIRPLUS: meta.readdir, p.Op.RELEASEDIR: meta.releasedir,
            p.Op.GETXATTR: meta.getxattr, p.Op.LISTXATTR: meta.listxattr, p.Op.ACCESS: meta.access,
            p.Op.FLUSH: meta.ok, p.Op.FSYNC: meta.ok, p.Op.FSYNCDIR: meta.ok,
        }

    # ---- life cycle ------------------------------------------------------------------------

    def mount(self) -> None:
        self.fd = mount(self.spec)
        self._mounted = True
        self._made = identify(self.spec.mountpoint)

    def adopt(self, fd: int, negotiated: Negotiated) -> None:
        """Serve a connection another daemon set up (a restart): INIT is over, so the kernel's
        requests are answered from the first one on, with what INIT negotiated then."""
        os.set_blocking(fd, False)
        self.fd = fd
        self.minor = negotiated.minor
        self.flags = negotiated.flags
        if negotiated.flags & p.PASSTHROUGH:
            self.backing = DeviceBacking(fd)
        self._mounted = True
        # taken while the connection is alive, or not at all: one unmounted before it was
        # adopted (a recovery loads the store first) leaves the path to whatever is there now,
        # which close() would otherwise detach as ours
        made = identify(self.spec.mountpoint)
        self._made = made if connected(fd) else None

    def resend(self) -> bool:
        """After taking over from a process that died: have the kernel send again the requests
        it had read and not answered (NOTIFY_RESEND); False where the kernel cannot."""
        if not self.flags & p.HAS_RESEND:
            return False
        os.write(self.fd, p.pack_notify(p.NOTIFY_RESEND))
        return True

    def served_by_processes(self) -> tuple[int, int]:
        """Bytes served and chunk hits by the reader processes (any thread), for the metrics."""
        readers = self._readers
        return readers.counts() if isinstance(readers, ReaderProcesses) else (0, 0)

    def negotiated(self) -> Negotiated:
        return Negotiated(self.minor, self.flags)

    def handed_over(self) -> None:
        """Another process took the connection over: end serve() and leave the mount alone."""
        self._handed_over = True
        self.terminate()

    def terminate(self) -> None:
        """Stop serving (a signal): serve() returns; close() unmounts."""
        if self._cancel is not None:
            self._cancel.cancel()

    def close(self) -> None:
        """Unmount our mount if still there (not one made at the path since); let go of the device."""
        if self._mounted and not self._handed_over:
            self._mounted = False
            unmount_own(self.spec.mountpoint, self._made, connected=connected(self.fd))
        if self._readers is not None:
            self._readers.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def serve(self) -> None:
        """Answer requests until the filesystem is unmounted, the connection aborted, or
        terminate(). A pause (self.gate) stops the reading and lets the requests in flight finish."""
        buf = bytearray(p.READ_BUFFER)
        with trio.CancelScope() as self._cancel:
            async with trio.open_nursery() as nursery:
                while True:
                    with self.gate.reading():
                        if await self._receive(nursery, buf):
                            break
                    await self.gate.hold()  # paused
                nursery.cancel_scope.cancel()
        self.gate.closed()

    async def _receive(self, nursery: trio.Nursery, buf: bytearray) -> bool:
        """Take requests in until the session is over (True) or a pause cancels it: read here,
        or, with several queues, once INIT is answered, by the reader threads."""
        if self.config.queues <= 1:
            return await self._read_requests(nursery, buf)
        if not self.minor and await self._read_requests(nursery, buf, until_init=True):
            return True
        if self._readers is None:
            by_processes = self.config.reads_by_processes(self.flags)
            self._readers = (ReaderProcesses(self.fd, self.config.queues, self.direct, self.resend) if by_processes
                             else RequestThreads(self.fd, self.config.queues, self.direct))
            log.info("%d %s read requests%s", self.config.queues, "processes" if by_processes else "threads",
                     "" if by_processes or self.config.processes != "auto" else
                     " (not processes: Linux < 6.9 cannot send again what one that died had read)")

        def deliver(fd: int, data: bytes) -> bool:  # a request a thread hands over
            try:
                return self._dispatch(nursery, memoryview(data), fd)
            except Exception:  # a bug in one request: never the end of the trio run
                log.exception("dispatching a request failed")
                return True

        return await self._readers.run(deliver)

    async def _read_requests(self, nursery: trio.Nursery, buf: bytearray, until_init: bool = False) -> bool:
        """Read and dispatch requests until the session is over (True), INIT is answered if
        until_init (False), or the reading is cancelled (pause). Cancelled only while waiting,
        never between reading a request and dispatching it."""
        view = memoryview(buf)
        while True:
            try:
                n = os.readv(self.fd, [buf])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)
                continue
            except OSError as e:
                if e.errno in LOOK_AGAIN:
                    continue
                if e.errno == errno.ENODEV:  # unmounted, or the connection was aborted
                    log.info("the kernel closed the connection")
                    return True
                raise
            if not self._dispatch(nursery, view[:n]):
                return True
            if until_init and self.minor:
                return False
            await trio.lowlevel.checkpoint()

    # ---- requests --------------------------------------------------------------------------

    def _dispatch(self, nursery: trio.Nursery, data: memoryview, fd: int | None = None) -> bool:
        """Start answering one request, read from fd (where its reply goes; None: the served
        descriptor); False once the session is over (DESTROY)."""
        fd = self.fd if fd is None else fd
        header = p.InHeader.parse(data)
        args = memoryview(bytes(data[p.IN_HEADER.size:header.length - header.extlen]))
        op = header.opcode
        if op == p.Op.INIT:
            self._init(header, args)
        elif op == p.Op.FORGET:
            self._forget([(header.nodeid, p.FORGET_IN.unpack_from(args)[0])])
        elif op == p.Op.BATCH_FORGET:
            count = p.BATCH_FORGET_IN.unpack_from(args)[0]
            self._forget([p.FORGET_ONE.unpack_from(args, p.BATCH_FORGET_IN.size + i * p.FORGET_ONE.size)
                          for i in range(count)])
        elif op == p.Op.INTERRUPT:
            self._in_flight.interrupt(p.INTERRUPT_IN.unpack_from(args)[0])
        elif op == p.Op.DESTROY:
            send(fd, header.unique, 0)
            return False
        elif op == p.Op.NOTIFY_REPLY:
            pass  # we never ask the kernel for its pages
        elif op in p.WRITE_OPS:
            send(fd, header.unique, errno.EROFS)
        elif op in self._handlers:
            # interruptible: a scope now, not once its task runs (the INTERRUPT may be next in
            # line); None: sent again while its first copy is answered (inflight.py)
            scope = (self._in_flight.begin(header.unique, data[:header.length], fd, nursery)
                     if op in INTERRUPTIBLE else trio.CancelScope())
            if scope is None:
                return True
            if fd != self.fd:
                self._origin[header.unique] = fd
            self.gate.started()
            nursery.start_soon(self._answer, self._handlers[op], header, args, scope)
        else:
            send(fd, header.unique, errno.ENOSYS)
        return True

    def _forget(self, items: list[tuple[int, int]]) -> None:
        """FORGET has no reply: a failure is only logged, and never ends the loop."""
        try:
            self.operations.forget(items)
        except Exception as e:
            reply_errno(e, "FORGET")

    async def _answer(self, handler: Handler, header: p.InHeader, args: memoryview, scope: trio.CancelScope) -> None:
        """Run one handler in scope; its error becomes the reply (reply_errno), an INTERRUPT
        EINTR. Its blocking calls are queued as its requester's (fairness.requester)."""
        requester.set(header.uid)
        try:
            with scope:
                try:
                    await handler(header, args)
                    return
                except Exception as e:
                    error = reply_errno(e, _op_name(header.opcode))
            self._send(header.unique, errno.EINTR if scope.cancelled_caught else error)
        finally:
            again = self._in_flight.end(header.unique)
            self._origin.pop(header.unique, None)
            self.gate.finished()
            if again is not None:  # the kernel waits on the copy it sent again: answered now
                self._dispatch(again.nursery, memoryview(again.data), again.fd)

    def _send(self, unique: int, error: int, *payload: bytes | memoryview) -> bool:
        """Write one reply (on the trio thread); whether the kernel took it."""
        taken = self._write_reply(unique, error, *payload)
        self._in_flight.replied(unique, taken)
        return taken

    def _write_reply(self, unique: int, error: int, *payload: bytes | memoryview) -> bool:
        """Write one reply, to the descriptor its request came from (direct.send); any thread."""
        return send(self._origin.get(unique, self.fd), unique, error, *payload)

    def _init(self, header: p.InHeader, args: memoryview) -> None:
        init = p.InitIn.parse(args)
        if init.major > p.KERNEL_VERSION:  # the kernel asks again with our major
            self._send(header.unique, 0, p.InitOut(p.KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0, 0).pack()[:8])
            return
        if init.major < p.KERNEL_VERSION or init.minor < p.MIN_MINOR:
            self._send(header.unique, errno.EPROTO)
            raise SessionError(f"the kernel speaks FUSE {init.major}.{init.minor}; "
                               f"fusecache needs {p.KERNEL_VERSION}.{p.MIN_MINOR} or newer (or session=pyfuse3)")
        self.minor = min(init.minor, p.KERNEL_MINOR_VERSION)
        wanted = p.ASYNC_READ | p.PARALLEL_DIROPS | p.DO_READDIRPLUS | p.MAX_PAGES | p.ATOMIC_O_TRUNC | p.BIG_WRITES
        wanted |= p.INIT_EXT | p.HAS_RESEND | (p.PASSTHROUGH if self.config.passthrough else 0)
        self.flags = wanted & init.flags
        if self.flags & p.PASSTHROUGH:
            self.backing = DeviceBacking(self.fd)
        pages = request_pages() if self.config.reads_by_processes(self.flags) else MAX_READ_PAGES  # the sizes they splice
        self._send(header.unique, 0, _init_reply(self.minor, self.flags, init, self.config, pages).pack())
        log.info("FUSE protocol %d.%d (kernel %d.%d), passthrough %s", p.KERNEL_VERSION, self.minor,
                 init.major, init.minor, "offered" if init.flags & p.PASSTHROUGH else "not offered")

    # ---- handlers: each replies, or raises (see reply_errno) ------------------------------------

    async def _open(self, header: p.InHeader, args: memoryview) -> None:
        flags, _open_flags = p.OPEN_IN.unpack_from(args)
        reply = await self.operations.open(header.nodeid, flags, context_of(header))
        # NOFLUSH: nothing is ever written, so a close need not ask us anything
        if reply.backing_id is not None:  # the kernel refuses KEEP_CACHE beside it (EIO)
            open_flags = p.FOPEN_PASSTHROUGH | p.FOPEN_NOFLUSH
        else:
            open_flags = p.FOPEN_NOFLUSH | (p.FOPEN_KEEP_CACHE if reply.keep_cache else 0)
        if reply.direct is not None:  # before the reply: its first READ may come right after
            self.direct.add(reply.fh, reply.direct)
        if not self._send(header.unique, 0, p.OPEN_OUT.pack(reply.fh, open_flags, reply.backing_id or 0)):
            self.direct.remove(reply.fh)
            with trio.CancelScope(shield=True):  # its task may be cancelled (an INTERRUPT) by now
                await self.operations.release(reply.fh)  # interrupted: nobody will ever release it

    async def _read(self, header: p.InHeader, args: memoryview) -> None:
        fh, offset, size = p.READ_IN.unpack_from(args)[:3]
        async with self._reads:
            buf = self._buffers.pop() if self._buffers else bytearray(MAX_REQUEST)
            try:
                data = await self.operations.read(fh, offset, size, memoryview(buf)[:size], header.nodeid)
                if len(data) >= THREAD_REPLY_BYTES:
                    taken = await trio.to_thread.run_sync(self._write_reply, header.unique, 0, data)
                    self._in_flight.replied(header.unique, taken)
                else:
                    self._send(header.unique, 0, data)
                del data  # a view of buf or of a cache mapping: released before buf is reused
            finally:
                self._buffers.append(buf)
        if self._readers is not None and fh not in self.direct:
            # a file that completed after it was opened: the readers take its next reads.
            # A RELEASE handled meanwhile has removed the handle before its first await, so
            # direct_file says None; nothing awaits between its answer and the route.
            direct = self.operations.direct_file(fh)
            if direct is not None:
                self.direct.add(fh, direct)

    async def _release(self, header: p.InHeader, args: memoryview) -> None:
        fh = p.RELEASE_IN.unpack_from(args)[0]
        self.direct.remove(fh)  # the kernel sends no READ of fh after its RELEASE
        await self.operations.release(fh)
        self._send(header.unique, 0)



def _init_reply(minor: int, flags: int, init: p.InitIn, config: SessionConfig, max_pages: int) -> p.InitOut:
    return p.InitOut(minor=minor, max_readahead=init.max_readahead, flags=flags,
                     max_background=config.max_background, congestion_threshold=config.max_background * 3 // 4,
                     max_write=p.MAX_WRITE, max_pages=max_pages, max_stack_depth=1 if flags & p.PASSTHROUGH else 0)


def _op_name(opcode: int) -> str:
    try:
        return p.Op(opcode).name
    except ValueError:
        return f"opcode {opcode}"

"""Replies to reads of complete files, written by a reader thread (session/queues.py) or a
reader process (session/reader_process.py).

The kernel wants a reply whole, in one write (or one splice) into /dev/fuse, and copies its
data into the reader's pages inside that call. Three ways to hand it the cache file's bytes
were measured for 1 MiB replies (docs/benchmarks.md, issue 22):

- **map** (the threads' way, `DataReplier`): map the range of the cache file (`MAP_POPULATE`:
  its pages are read in, from a disk cache, here on the thread, not on a fault in the
  kernel's copy), write the header and the mapping with one `writev`, unmap. One copy, page
  cache to reader. (A cache in memory needs no mapping per reply: the thread writes from the
  one its cache entry keeps, `DirectFile.view`.) Afterwards the range is unmapped, so dropping
  its pages from the cache file's page cache (DirectFile.served, on a disk cache) is not
  refused for pages in use.
- **splice** (the processes' way, `SplicingReplier`), as libfuse's fuse_send_data_iov does:
  header and file range into a pipe, the pipe into /dev/fuse. One copy, page to page, and
  no page tables to fill and empty: the cheapest in a process of its own (16 processes on
  the device: 16.3-16.7 GB/s against 10.5-12.7 mapping). The pipe must hold the header's slot
  and one per page, 257 for 1 MiB: past `/proc/sys/fs/pipe-max-size` (1 MiB, 256 pages) for a
  daemon without CAP_SYS_RESOURCE (root in a container often lacks it); there the kernel is
  asked for 512 KiB reads instead (`request_pages`), whose replies fit.
- **copy**: `preadv` into a buffer, then `writev`: two copies. A reader process's fallback
  (14.3-14.9 GB/s with 16 of them), a thread's for a cache filesystem that cannot be mapped
  (then for the thread's life).

A range that cannot be read whole (the cache file is shorter than checked: truncated behind
our back) sends nothing: the caller hands the request to the trio thread, whose engine
answers it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import select
import struct
from pathlib import Path
from collections.abc import Callable
from typing import NamedTuple

from ..config import MAX_REQUEST
from . import protocol as p

log = logging.getLogger(__name__)

# The most pages one READ asks for: what a buffer of MAX_REQUEST holds.
MAX_READ_PAGES = MAX_REQUEST // mmap.PAGESIZE

# The header's opcode and unique, then READ_IN's fh, offset and size: one unpack per request.
_READ = struct.Struct("<4xIQ" + f"{p.IN_HEADER.size - 16}x" + "QQI" + f"{p.READ_IN.size - 20}x")
_OP_READ = int(p.Op.READ)


class ReadRequest(NamedTuple):
    unique: int
    fh: int
    offset: int
    size: int


# A read of the connection that failed this way took no request: read again. ENOENT: the
# request was interrupted first; ECONNABORTED: the connection was being aborted (an unmount)
# as it was taken, and the next read says ENODEV. (Not so where FUSE_ABORT_ERROR was agreed:
# every read after an abort would then say ECONNABORTED. fusecache never asks for it.)
LOOK_AGAIN = (errno.ENOENT, errno.EINTR, errno.ECONNABORTED)


def next_request(read: Callable[[], int], poller: select.epoll) -> int | None:
    """The length of one request, read with `read` (a nonblocking read of the connection into
    the reader's buffer); 0 if there was none (then after waiting in poller, for a request or
    for whatever else it watches) or it was interrupted before it was read: look again; None
    once the connection ended (unmounted, or aborted)."""
    try:
        return read()
    except BlockingIOError:
        poller.poll()
        return 0
    except OSError as e:
        if e.errno in LOOK_AGAIN:
            return 0
        if e.errno == errno.ENODEV:
            return None
        raise


def read_request(data: memoryview) -> ReadRequest | None:
    """The READ request data holds, or None for any other request (and for a READ too short
    to be one: the trio thread's parser then answers it as it would)."""
    if len(data) < _READ.size:
        return None
    opcode, unique, fh, offset, size = _READ.unpack_from(data)
    if opcode != _OP_READ:
        return None
    return ReadRequest(unique, fh, offset, size)


def reply_length(size: int, offset: int, file_size: int) -> int:
    """How many bytes a read of size at offset gets of a file of file_size (0 at or past its end)."""
    return max(0, min(size, file_size - offset))


class DataReplier:
    """One reader thread's writer of data replies to its /dev/fuse descriptor."""

    def __init__(self, dev_fd: int, mapping: bool = True) -> None:
        self.dev_fd = dev_fd
        self.mapping = mapping  # False: copied (also once the cache filesystem refused a mapping)
        self._buffer = bytearray(MAX_REQUEST)

    def reply(self, unique: int, src_fd: int, offset: int, length: int,
              before: Callable[[], None] = lambda: None) -> bool:
        """Send the reply to `unique`: length bytes of src_fd at offset, calling `before` just
        before it goes out. False if nothing was sent (the range could not be read whole:
        someone else must answer)."""
        if self.mapping and length:
            sent = self._map(unique, src_fd, offset, length, before)
            if sent is not None:
                return sent
        return self._copy(unique, src_fd, offset, length, before)

    def _map(self, unique: int, src_fd: int, offset: int, length: int,
             before: Callable[[], None]) -> bool | None:
        """None: mapping is refused here, the caller copies instead (nothing was sent)."""
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(src_fd, offset - start + length, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                               prot=mmap.PROT_READ, offset=start)
        except ValueError:  # the file is shorter than the range (mmap checks its size)
            return False
        except OSError as e:
            log.info("the cache file cannot be mapped (%s): replies are copied", e)
            self.mapping = False
            return None
        try:
            before()
            with memoryview(mapped) as view:
                send(self.dev_fd, unique, 0, view[offset - start:])
        finally:
            mapped.close()
        return True

    def _copy(self, unique: int, src_fd: int, offset: int, length: int, before: Callable[[], None]) -> bool:
        view = memoryview(self._buffer)[:length]
        done = 0
        try:
            while done < length:
                n = os.preadv(src_fd, [view[done:]], offset + done)
                if n == 0:
                    return False
                done += n
        except OSError:
            return False
        before()
        send(self.dev_fd, unique, 0, view)
        return True


class SplicingReplier:
    """A reader process's writer of data replies: the header and the cache file's pages into a
    pipe, the pipe into /dev/fuse (splice(2), as libfuse's fuse_send_data_iov does). The
    kernel makes the one copy, page to page, with no mapping to set up or tear down: on the
    16-core device, 16 processes served 16.3-16.7 GB/s to read() this way at 6-7 CPU-seconds
    per 16 GiB, against 14.3-14.9 (8-10 s) copying through a buffer and 10.5-12.7 (12-17 s)
    from a mapping (docs/benchmarks.md, issue 22). The kernel wants the whole reply in the
    pipe before it takes it, a slot per page and one for the header (the kernel is asked for
    reads no larger than a pipe here holds that way: request_pages): a reply the pipe cannot
    hold, or a cache file that cannot be spliced, is copied instead (DataReplier)."""

    def __init__(self, dev_fd: int) -> None:
        self.dev_fd = dev_fd
        self.copier = DataReplier(dev_fd, mapping=False)  # a process copies faster than it maps (above)
        self.splicing = True  # False once the cache filesystem refused a splice
        self._pipe = _reply_pipe()
        self._room = _pipe_pages(self._pipe[1])  # slots: one per page, one for the header
        self._told = False  # that a reply was copied for want of room (logged once)

    def close(self) -> None:
        for fd in self._pipe:
            os.close(fd)

    def reply(self, unique: int, src_fd: int, offset: int, length: int,
              before: Callable[[], None] = lambda: None) -> bool:
        """As DataReplier.reply."""
        if self.splicing and length:
            if spanned(offset, length, mmap.PAGESIZE) < self._room:
                sent = self._splice(unique, src_fd, offset, length, before)
                if sent is not None:
                    return sent
            elif not self._told:  # a pipe that stayed small, or reads a mount from before a restart asks for
                self._told = True
                log.info("replies of %d KiB are copied: this reader's pipe holds %d KiB (fs.pipe-max-size, "
                         "fs.pipe-user-pages-soft: docs/operations.md)", length >> 10, self._room * mmap.PAGESIZE >> 10)
        return self.copier.reply(unique, src_fd, offset, length, before)

    def _splice(self, unique: int, src_fd: int, offset: int, length: int,
                before: Callable[[], None]) -> bool | None:
        """None: splicing is refused here, the caller copies instead (nothing was sent)."""
        pipe_out, pipe_in = self._pipe
        try:
            os.write(pipe_in, p.pack_out_header(length, 0, unique))
            done = 0
            while done < length:
                n = os.splice(src_fd, pipe_in, length - done, offset_src=offset + done)
                if n == 0:  # the file is shorter than checked
                    self._empty()
                    return False
                done += n
        except OSError as e:  # (EAGAIN: the pipe is fuller than its room said; never waited for)
            self._empty()
            if e.errno != errno.EINVAL:
                return False
            log.info("the cache file cannot be spliced (%s): replies are copied", e)
            self.splicing = False
            return None
        before()
        total = p.OUT_HEADER.size + length
        try:
            while total:  # the kernel takes the whole reply at once; the loop is only for form
                total -= os.splice(pipe_out, self.dev_fd, total)
        except OSError as e:
            # some refusals leave the reply in the pipe, where it would prefix the next one
            self._empty()
            if e.errno not in (errno.ENOENT, errno.ENODEV):  # not: nobody waits for it any more
                log.error("the kernel refused a reply (%s): answering EIO instead", e)
                send(self.dev_fd, unique, errno.EIO)
        return True

    def _empty(self) -> None:
        """Read away what a reply that failed left in the pipe, where it would prefix the next
        reply (the kernel would take the old header's request and its bytes, or stale bytes as
        the next request's). The pipe is nonblocking: read until it is empty. Emptied, not
        replaced: making a pipe can fail (EMFILE), and the old one would then be used again."""
        while True:
            try:
                if not os.read(self._pipe[0], MAX_REQUEST + p.OUT_HEADER.size):
                    return
            except BlockingIOError:
                return


def _reply_pipe() -> tuple[int, int]:
    """A pipe that holds a whole reply of MAX_REQUEST bytes where the system allows one that
    large (fs.pipe-max-size, 1 MiB by default, binds a process without CAP_SYS_RESOURCE)."""
    pipe_out, pipe_in = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)  # never waited on: see _splice
    for size in (2 * MAX_REQUEST, _pipe_max_size()):
        try:
            fcntl.fcntl(pipe_in, fcntl.F_SETPIPE_SZ, size)
            break
        except OSError:  # past fs.pipe-max-size, or the user's pipe pages: replies it cannot hold are copied
            continue
    return pipe_out, pipe_in


def request_pages() -> int:
    """The most pages the kernel is to ask for in one READ (INIT's max_pages) where reader
    processes splice the replies: MAX_READ_PAGES where a pipe here holds such a reply whole;
    half of that where only half does. That is the default fs.pipe-max-size (1 MiB) for a
    daemon without CAP_SYS_RESOURCE, and there 512 KiB reads, spliced, beat 1 MiB reads
    copied: on the 2-core test machine 1.13-1.27x on read() and 1.08-1.15x on mmap at a third
    less daemon CPU, and within 7% of 1 MiB reads spliced (docs/benchmarks.md, issue 22).
    Smaller reads were not measured: a pipe that holds less gets MAX_READ_PAGES, copied. The
    mount's log says which. Decided once, at INIT: a live restart keeps the mount's size."""
    pipe = _reply_pipe()
    try:
        room = _pipe_pages(pipe[1])
    finally:
        for fd in pipe:
            os.close(fd)
    pages = pages_spliced_whole(room)
    if pages is None:
        log.info("replies are copied, not spliced: a pipe holds no more than %d KiB here (fs.pipe-max-size of "
                 "2 MiB lets them be spliced, docs/operations.md)", room * mmap.PAGESIZE >> 10)
        return MAX_READ_PAGES
    if pages < MAX_READ_PAGES:
        log.info("reads of %d KiB asked for, whose replies a pipe here holds whole (fs.pipe-max-size of 2 MiB "
                 "lets reads of %d KiB be spliced, docs/operations.md)", pages * mmap.PAGESIZE >> 10, MAX_REQUEST >> 10)
    return pages


def pages_spliced_whole(room: int) -> int | None:
    """MAX_READ_PAGES, or half of it, whichever is the larger whose reply a pipe of `room`
    slots holds whole, even one that starts mid-page (a slot per page it spans, one for the
    header); None if neither."""
    for pages in (MAX_READ_PAGES, MAX_READ_PAGES // 2):
        if pages + 1 < room:
            return pages
    return None


def _pipe_max_size() -> int:
    try:
        return int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except (OSError, ValueError):
        return MAX_REQUEST  # the kernel's default


def _pipe_pages(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) // mmap.PAGESIZE


def spanned(offset: int, length: int, unit: int) -> int:
    """How many units (pages, chunks) a non-empty range spans."""
    return (offset + length - 1) // unit - offset // unit + 1


def send(fd: int, unique: int, error: int, *payload: bytes | memoryview) -> bool:
    """Write one reply; False if nobody waits for it any more (the request was interrupted
    or the connection aborted: ENOENT, ENODEV)."""
    parts = [p.pack_out_header(sum(len(part) for part in payload), error, unique), *payload]
    try:
        os.writev(fd, parts)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENODEV):
            return False
        log.error("the kernel refused a reply (%s): answering EIO instead", e)
        if payload:  # a malformed reply must not leave the requester waiting forever
            send(fd, unique, errno.EIO)
        return False
    return True

"""Replies to reads of complete files, written by a reader thread (session/queues.py).

The kernel wants a reply whole, in one write or one splice into /dev/fuse
(fs/fuse/dev.c: fuse_dev_splice_write takes `len` bytes from the pipe and fails with EINVAL if
the pipe holds fewer). Two ways to write one:

- **splice** (libfuse's fuse_send_data_iov does the same): the reply header is written into a
  pipe of the thread's own, then the cache file's range is spliced behind it (page
  references, no copy), then the whole pipe into /dev/fuse, where the kernel copies the pages
  into the reader's: one copy of the data in all. The pipe must hold the header's slot and a
  slot per page of the range: 2 MiB for a 1 MiB reply, past `/proc/sys/fs/pipe-max-size`
  (1 MiB) for a daemon without CAP_SYS_RESOURCE, which then splices only what fits.
- **copy**: `preadv` into the thread's buffer, then `writev` of header and buffer: two copies.
  The fallback for replies the pipe cannot hold, and for a cache filesystem or kernel that
  refuses to splice (then for the thread's life).

docs/benchmarks.md (issue 22) has the two measured against each other. A read that cannot be
served from the cache file (short: the file was truncated behind our back, or an I/O error)
sends nothing: the caller hands the request to the trio thread, whose engine answers it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from dataclasses import dataclass

from ..config import MAX_REQUEST
from . import protocol as p

log = logging.getLogger(__name__)

PAGE = 4096
PIPE_BYTES = 2 * MAX_REQUEST  # a power of two of pages: the kernel rounds up to one anyway
_READ = p.IN_HEADER.size + p.READ_IN.size


@dataclass(frozen=True)
class ReadRequest:
    unique: int
    fh: int
    offset: int
    size: int


def read_request(data: memoryview) -> ReadRequest | None:
    """The READ request data holds, or None for any other request (and for a READ too short
    to be one: the trio thread's parser then answers it as it would)."""
    if len(data) < _READ or p.IN_HEADER.unpack_from(data)[1] != p.Op.READ:
        return None
    unique = p.IN_HEADER.unpack_from(data)[2]
    fh, offset, size = p.READ_IN.unpack_from(data, p.IN_HEADER.size)[:3]
    return ReadRequest(unique, fh, offset, size)


def reply_length(size: int, offset: int, file_size: int) -> int:
    """How many bytes a read of size at offset gets of a file of file_size (0 at or past its end)."""
    return max(0, min(size, file_size - offset))


class DataReplier:
    """One reader thread's writer of data replies to its /dev/fuse descriptor."""

    def __init__(self, dev_fd: int, splice: bool = True) -> None:
        self.dev_fd = dev_fd
        self._buffer = bytearray(MAX_REQUEST)
        self._pipe: tuple[int, int] | None = None
        self._slots = 0  # pages the pipe holds
        self.splicing = splice and self._open_pipe()

    def _open_pipe(self) -> bool:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        self._pipe = (read_end, write_end)
        try:
            self._slots = fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES) // PAGE
        except OSError:  # past pipe-max-size without CAP_SYS_RESOURCE: what it allows
            try:
                self._slots = fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, MAX_REQUEST) // PAGE
            except OSError:
                self._slots = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ) // PAGE
        return True

    def close(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe[0])
            os.close(self._pipe[1])
            self._pipe = None

    def fits(self, offset: int, length: int) -> bool:
        """Whether the pipe holds a reply of this range: the header's slot and one per page."""
        pages = -(-(offset % PAGE + length) // PAGE)
        return 1 + pages <= self._slots

    def reply(self, unique: int, src_fd: int, offset: int, length: int) -> bool:
        """Send the reply to `unique`: length bytes of src_fd at offset. False if nothing was
        sent (the range could not be read whole: someone else must answer)."""
        if self.splicing and self.fits(offset, length):
            sent = self._splice(unique, src_fd, offset, length)
            if sent is not None:
                return sent
        return self._copy(unique, src_fd, offset, length)

    def _splice(self, unique: int, src_fd: int, offset: int, length: int) -> bool | None:
        """False: the range could not be read whole; None: splicing is refused here, the
        caller copies instead (nothing was sent)."""
        assert self._pipe is not None
        read_end, write_end = self._pipe
        header = p.pack_out_header(length, 0, unique)
        os.write(write_end, header)
        done = 0
        try:
            while done < length:
                n = os.splice(src_fd, write_end, length - done, offset_src=offset + done)
                if n == 0:  # the cache file is shorter than checked: the engine looks again
                    self._reset_pipe()
                    return False
                done += n
        except OSError as e:
            self._reset_pipe()
            if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                log.info("the cache filesystem refuses splice (%s): replies are copied", e)
                self.splicing = False
                return None
            return False
        try:
            os.splice(read_end, self.dev_fd, len(header) + length)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENODEV):  # interrupted, or the connection is gone
                return True
            self._reset_pipe()
            log.warning("the kernel refused a spliced reply (%s): replies are copied", e)
            self.splicing = False
            return None
        return True

    def _reset_pipe(self) -> None:
        """A pipe left holding part of a reply is thrown away: the next reply starts clean."""
        self.close()
        self._open_pipe()

    def _copy(self, unique: int, src_fd: int, offset: int, length: int) -> bool:
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
        send(self.dev_fd, unique, 0, view)
        return True


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

"""Replies to reads of complete files, written by a reader thread (session/queues.py).

The kernel wants a reply whole, in one write (or one splice) into /dev/fuse, and copies its
data into the reader's pages inside that call. Three ways to hand it the cache file's bytes
were measured for 1 MiB replies (docs/benchmarks.md, issue 22):

- **map** (what we do): map the range of the cache file (`MAP_POPULATE`: its pages are
  read in, from a disk cache, here on the thread, not on a fault in the kernel's copy), write
  the header and the mapping with one `writev`, unmap. One copy, page cache to reader. (A
  cache in memory needs no mapping per reply: the thread writes from the one its cache entry
  keeps, `DirectFile.view`.)
- **splice**, as libfuse's fuse_send_data_iov does: header and file range into a pipe, the
  pipe into /dev/fuse. Also one copy, but the pipe must hold the header's slot and one per
  page, 257 for 1 MiB: past `/proc/sys/fs/pipe-max-size` (1 MiB, 256 pages) for a daemon
  without CAP_SYS_RESOURCE (root in a container often lacks it), so 1 MiB replies cannot be
  spliced there at all; where they could (512 KiB replies) it cost the daemon more CPU than map.
- **copy**: `preadv` into the thread's buffer, then `writev`: two copies, the most CPU. The
  fallback, for a cache filesystem that cannot be mapped (then for the thread's life).

Afterwards the range is unmapped, so dropping its pages from the cache file's page cache
(DirectFile.served, on a disk cache) is not refused for pages in use. A range that cannot be
read whole (the cache file is shorter than checked: truncated behind our back) sends nothing:
the caller hands the request to the trio thread, whose engine answers it.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
from collections.abc import Callable
from typing import NamedTuple

from ..config import MAX_REQUEST
from . import protocol as p

log = logging.getLogger(__name__)

# The header's opcode and unique, then READ_IN's fh, offset and size: one unpack per request.
_READ = struct.Struct("<4xIQ" + f"{p.IN_HEADER.size - 16}x" + "QQI" + f"{p.READ_IN.size - 20}x")
_OP_READ = int(p.Op.READ)


class ReadRequest(NamedTuple):
    unique: int
    fh: int
    offset: int
    size: int


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

    def __init__(self, dev_fd: int) -> None:
        self.dev_fd = dev_fd
        self.mapping = True  # False once the cache filesystem refused a mapping: copied then
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

"""Copying a range of a source file into its cache file inside the kernel, where the kernel
can: the fill's cheapest copy (issue 20).

Reading the source into a shared mapping of the cache file is one copy too, but each page of
the cache file is new there: the kernel zeroes it before the read fills it, a second pass over
the memory. A write into the page cache, which copy_file_range(2) ends in, takes a fresh page
without zeroing it when the write covers it whole, and a reflink (XFS, Btrfs) or a server-side
copy (NFS 4.2) copies nothing at all. On the 16-core device, tmpfs to tmpfs with the checksum
included, copy_file_range filled at 17 GB/s and 0.9 CPU-s per GB against about 12 GB/s and
1.27 for the mapping (docs/benchmarks.md, issue 20).

So this is the way for a source and a cache on one filesystem, and it is asked only there
(the same st_dev). Between two (Lustre or NFS to a local cache), splice(2) through a pipe
would be the same single copy, but it was measured and left out: it moves a pipe's worth
(1 MiB) at a time, and the kernel's readahead behind those steps reads past the end of each
run, into runs other threads had already copied and dropped from the source's page cache
(Source.drop_pages): 1.5% of a file fetched twice from a FUSE source in a test, where a read
of the whole run at once fetches each byte once. Linux 5.19 and later refuse such a copy
(EXDEV); 5.3 to 5.18 would splice it, which is why the devices are compared first. A refusal
(EXDEV, EINVAL, ENOSYS, EOPNOTSUPP) turns the copy off for good for sources on that
filesystem (a source tree may hold mounts of others). `copy` raises `Unsupported` where it
does not copy, and the caller reads into the mapping. Any other error (ENOSPC, EIO) is the
caller's, as a write's or a read's would be.
"""

from __future__ import annotations

import errno
import logging
import os

log = logging.getLogger(__name__)

_REFUSED = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


class Unsupported(Exception):
    """The kernel does not copy between these files here: nothing was copied, read instead."""


class KernelCopy:
    """The filesystems the kernel refused to copy within (one per Source, any thread)."""

    def __init__(self) -> None:
        self.refused: set[int] = set()  # st_dev of each

    def copy(self, src_fd: int, src_dev: int, dst_fd: int, offset: int, length: int) -> int:
        """Copy up to length bytes at offset in src_fd (a file on src_dev, from its open-time
        stat: no call to the source's filesystem here) to the same offset in dst_fd; the bytes
        copied, fewer only where the source ended. Raises Unsupported (nothing copied) or
        OSError."""
        if src_dev in self.refused or src_dev != os.fstat(dst_fd).st_dev:
            raise Unsupported()
        try:
            return _copy_file_range(src_fd, dst_fd, offset, length)
        except OSError as e:
            if e.errno not in _REFUSED:
                raise
            self.refused.add(src_dev)
            log.info("the kernel does not copy within the filesystem %d:%d (%s): filling by reads",
                     os.major(src_dev), os.minor(src_dev), e.strerror)
            raise Unsupported() from None


def _copy_file_range(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    done = 0
    while done < length:
        n = os.copy_file_range(src_fd, dst_fd, length - done, offset + done, offset + done)
        if n == 0:
            break
        done += n
    return done

"""The persistent cache store: one sparse data file and one chunk index per source file.

Layout under the cache dir (documented in docs/design.md):

    fusecache-v1/<source key>/source          the source root this store mirrors
    fusecache-v1/<source key>/lock            flock()ed by the daemon that uses the store
    fusecache-v1/<source key>/objects/<hh>/<key>.data   sparse copy of the file
    fusecache-v1/<source key>/objects/<hh>/<key>.idx    header + one record per chunk

A chunk's index record (checksum of its bytes, PRESENT marker) is written only after its bytes
were written to the data file, by the same thread. A crash (kill -9) therefore leaves either
no record or a record for bytes that are in the file; a power loss that loses data pages but
keeps the record is caught by the checksum, which is checked before a chunk is first served in
each daemon lifetime, unless the entry is sealed. Fills copy the source's bytes into the data
file inside the kernel where they can (kernelcopy.py), else write through one shared mapping
of the data file, only into blocks reserved first (fill_run); the data file never shrinks, so
no page of the mapping lies past its end (a truncation by someone else would be a SIGBUS).

A *seal* is what lets a restart serve a complete file without reading it. Once every chunk of
an entry is verified, its data file and records are made durable (fdatasync), and then a seal
is appended to the index: the data file's inode number, size, mtime and ctime (a write moves
its ctime, which no one can set back; docs/reliability.md lists the few writes that escape
that) and a checksum of the records. A later daemon that finds the seal matching the data
file's fstat and the records trusts the chunks as verified (`verify=sealed`, the default);
anything else, or `verify=always`, checks them chunk by chunk as before. A write of ours into
a sealed entry removes the seal first (the index is truncated back to its records, durably),
so a crash never leaves a seal over bytes that are not those it describes. All methods block:
call them from worker threads.

Every directory of the store must be the daemon user's and writable by nobody else (see
private.py), and no file in it is opened through a symlink: what the store holds is served to
every user as the source's bytes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import stat as stat_mod
import struct
import threading
import time
from array import array
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import xxhash

from . import linux, private
from .source import Identity

log = logging.getLogger(__name__)

LAYOUT = "fusecache-v1"
# A process addresses 128 TiB, and each entry being filled or served from memory maps its whole
# data file, whose size the source's writers choose (a sparse file costs them nothing): eight
# sparse 16 TiB files took it all, and every other mapping of the daemon failed. Past this much
# mapped at once a file is not mapped: its fill reads through, its replies are copied.
MAPPED_MAX = 32 << 40
INDEX_MAGIC = b"FCIDX\x00\x01\n"
_HEADER_PREFIX = struct.Struct("<8sI")  # magic, length of the JSON header that follows
# A chunk's checksum is xxh3-64: as good as crc32 at catching damage, and ten times faster
# (crc32 was a fifth of the daemon's CPU on the cold path and most of it on a warm restart).
CHECKSUM = "xxh3_64"
_RECORD = struct.Struct("<QI4x")  # checksum, marker; 16 bytes, so no record straddles a page
_PRESENT = 0x43484B31  # "CHK1": anything else (zeros from a hole, garbage) means missing
# After the records, only in a sealed index: magic, the data file's inode, size, mtime_ns and
# ctime_ns once durable, and the xxh3-64 of the records it vouches for.
_SEAL = struct.Struct("<8sQQqqQ")
SEAL_MAGIC = b"FCSEAL01"
_PAGE = 4096
# The page cache holds a file in folios of up to 2 MiB (PMD order on x86-64), naturally
# aligned, and POSIX_FADV_DONTNEED drops only the folios wholly inside its range: a 1 MiB
# range drops nothing of a 2 MiB folio (measured: the cache files stayed 86% resident).
DROP_ALIGN = 2 << 20
MAX_PINS_FILE = 16 << 20

# In-memory chunk states.
MISSING = 0
ON_DISK = 1  # recorded present by an earlier run; checksum not yet checked in this one
VERIFIED = 2


class StoreError(Exception):
    """The cache dir cannot be used; the message is the one-line error shown to the user."""


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


class ChunkStates:
    """Which chunk of a version holds which bytes, and what each chunk's state says: the
    arithmetic of a CacheEntry, apart from its files (which move the states)."""

    identity: Identity
    chunk_size: int
    state: bytearray

    @property
    def size(self) -> int:
        return self.identity.size

    @property
    def nchunks(self) -> int:
        return len(self.state)

    def chunk_extent(self, index: int) -> tuple[int, int]:
        """(offset, length) of a chunk; the last one is short."""
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def run_extent(self, chunks: range) -> tuple[int, int]:
        """(offset, length) of a run of contiguous chunks."""
        offset = self.chunk_extent(chunks.start)[0]
        last_offset, last_length = self.chunk_extent(chunks.stop - 1)
        return offset, last_offset + last_length - offset

    def chunks_for(self, offset: int, length: int) -> range:
        """Indices of the chunks that hold bytes [offset, offset+length), clamped to the file."""
        end = min(offset + length, self.size)
        if offset >= end:
            return range(0)
        return range(offset // self.chunk_size, (end - 1) // self.chunk_size + 1)

    def cached_bytes(self) -> int:
        return self.size - self.missing_bytes(range(self.nchunks))

    # The questions the fetcher asks; the chunk state machine (MISSING -> VERIFIED, ON_DISK ->
    # VERIFIED or MISSING, VERIFIED -> ON_DISK on a foreign write) is CacheEntry's.

    def unverified(self, chunks: range) -> list[int]:
        """The chunks of the range that must be fetched or checked before they are served."""
        return [i for i in chunks if self.state[i] != VERIFIED]

    # Counted by bytearray.count, not by a loop in Python: asked after every flight and, while an
    # open waits for its file, every 20 ms, over files of up to millions of chunks.

    def unverified_count(self) -> int:
        return self.nchunks - self.state.count(VERIFIED)

    @property
    def complete(self) -> bool:
        """Every chunk is in the cache file and checked in this daemon's lifetime."""
        return self.state.count(VERIFIED) == self.nchunks

    def missing_bytes(self, chunks: range) -> int:
        """Bytes of the range not in the cache file at all: what fetching it adds to the cache."""
        missing = self.state.count(MISSING, chunks.start, chunks.stop)
        if missing and chunks.stop >= self.nchunks and self.state[-1] == MISSING:  # the last chunk is short
            return (missing - 1) * self.chunk_size + self.chunk_extent(self.nchunks - 1)[1]
        return missing * self.chunk_size

    def missing(self, chunks: range) -> list[int]:
        """The chunks of the range that must be read from the source."""
        return [i for i in chunks if self.state[i] == MISSING]


class _AddressSpace:
    """What the entries' mappings of their data files take of the daemon's address space."""

    lock = threading.Lock()
    mapped = 0


def _map_data(fd: int, size: int) -> mmap.mmap:
    """A shared read-write mapping of a whole data file of size bytes; ENOMEM past MAPPED_MAX
    of such mappings at once (the fill then reads through, replies are copied)."""
    with _AddressSpace.lock:
        if _AddressSpace.mapped + size > MAPPED_MAX:
            raise OSError(errno.ENOMEM, f"cache files of {_AddressSpace.mapped} bytes mapped already")
        _AddressSpace.mapped += size
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        _unmapped(size)
        raise


def _unmap_data(mapping: mmap.mmap, size: int) -> None:
    try:
        mapping.close()
    except BufferError:  # a reply view is still referenced; the GC unmaps it
        pass
    _unmapped(size)


def _unmapped(size: int) -> None:
    with _AddressSpace.lock:
        _AddressSpace.mapped -= size


def _holds(fd: int, view: memoryview, offset: int, checksum: int) -> bool:
    """Whether the data file holds, at offset, the bytes of checksum (read into view). A read
    the cache's disk fails (EIO: a bad sector) is a failed checksum: the chunk is fetched and
    written again, where it used to fail every read of a file the source serves well."""
    try:
        return _pread_all(fd, view, offset) == len(view) and xxhash.xxh3_64_intdigest(view) == checksum
    except OSError as e:
        if e.errno != errno.EIO:
            raise
        return False


def _demote_states(states: bytearray, to: int) -> None:
    """Every chunk state above `to` brought down to it (VERIFIED > ON_DISK > MISSING)."""
    for i, state in enumerate(states):
        if state > to:
            states[i] = to


@contextmanager
def _duplicates(*fds: int) -> Iterator[list[int]]:
    """Duplicates of fds, all closed on leaving (none left open when one cannot be made)."""
    made: list[int] = []
    try:
        for fd in fds:
            made.append(os.dup(fd))
        yield made
    finally:
        for fd in made:
            os.close(fd)


class CacheEntry(ChunkStates):
    """The cached copy of one version (Identity) of one source file."""

    def __init__(self, relpath: str, identity: Identity, chunk_size: int, data_fd: int, index_fd: int,
                 records_offset: int, state: bytearray, sums: array, sealed: bool = False,
                 stamp: Stamp | None = None) -> None:
        self.relpath = relpath
        self.identity = identity
        self.chunk_size = chunk_size
        self.data_fd = data_fd
        self.index_fd = index_fd
        self.records_offset = records_offset
        self.state = state
        self.sums = sums
        self.closed = False
        # Detecting writes into the data file by anyone else: its (size, ctime) as our own
        # last write left it. While one of our writes is in progress the check is skipped.
        self._lock = threading.Lock()
        self._writing = 0
        self._writes = 0  # writes of ours begun: a seal is written only if none began during its syncs
        self._stamp = stamp or (_stamp(data_fd) if data_fd >= 0 else None)  # stamp: taken before a seal was checked
        # bumped when chunks are demoted for re-verification, so that reads which checked
        # their chunks before that cannot serve from them
        self.generation = 0
        self._map: mmap.mmap | None = None
        self.sealed = sealed  # the index ends with a seal (see the module docstring)
        self._reservable = self.cacheable  # until the cache filesystem says it cannot fallocate
        self._copying = threading.Lock()  # held by a fill_run's copy that takes turns

    @property
    def cacheable(self) -> bool:
        return self.data_fd >= 0

    def disk_bytes(self) -> int:
        """The blocks its data file and index take on the cache filesystem (none: a stand-in)."""
        if not self.cacheable:
            return 0
        return allocated(os.fstat(self.data_fd)) + allocated(os.fstat(self.index_fd))

    def verify_recorded(self, chunks: range, scratch: memoryview) -> int:
        """verify_chunk() each chunk of the range an earlier run recorded; how many failed."""
        return sum(1 for i in chunks if self.state[i] == ON_DISK and not self.verify_chunk(i, scratch))

    def store_chunk(self, index: int, data: memoryview) -> None:
        """Write a chunk's bytes, then its index record. Order matters for crash safety."""
        offset, length = self.chunk_extent(index)
        assert len(data) == length, (len(data), length)
        self._begin_write()
        try:
            _pwrite_all(self.data_fd, data, offset)
            self._record(range(index, index + 1), [xxhash.xxh3_64_intdigest(data)])
        finally:
            self._end_write()

    def fill_run(self, run: range, read: Callable[[memoryview], None], scratch: memoryview,
                 copy: Callable[[int, int, int], bool] | None = None, take_turns: bool = False) -> int:
        """Fill a run of contiguous chunks from the source; returns the run's length. `read`
        puts the run's bytes into the view it is given (the run's extent); `copy(data_fd,
        offset, length)`, where given, copies them into the data file at the same offset
        inside the kernel, or returns False where it cannot. Either raises if it cannot vouch
        for the bytes (the source changed): then no chunk of the run is recorded.

        One copy per byte, the cheapest way there is (kernelcopy.py): `copy`, then each chunk
        hashed from the data file's shared mapping (with take_turns, on a cache in memory,
        copies into one file take turns: the kernel writes them one at a time anyway, and a
        waiter on the inode's lock spins where ours sleeps); else the run's space reserved
        (fallocate: a full cache gives ENOSPC here, never a SIGBUS at a write fault) and `read`
        into the mapping, hashed there; else, where the cache cannot reserve, `read` into
        `scratch` and store_chunk. Each chunk's record is written after its bytes."""
        start, length = self.run_extent(run)
        lengths = [self.chunk_extent(i)[1] for i in run]
        if copy is not None:
            with self._copying if take_turns else nullcontext():  # waiting is not writing: the turn first
                self._begin_write()
                try:
                    if copy(self.data_fd, start, length):
                        self._record(run, _hash_mapped(self._mapping(), start, lengths))
                        return length
                finally:
                    self._end_write()
        if self._reservable:
            self._begin_write()
            try:
                if _reserve(self.data_fd, start, length):
                    self._record(run, _fill_mapped(self._mapping(), start, lengths, read))
                    return length
                log.info("cache filesystem cannot reserve space (fallocate); filling %s by writes", self.relpath)
                self._reservable = False
            finally:
                self._end_write()
        return self._fill_buffered(run, read, scratch)

    def _fill_buffered(self, run: range, read: Callable[[memoryview], None], scratch: memoryview) -> int:
        start, length = self.run_extent(run)
        view = scratch[:length]
        read(view)
        for i in run:
            offset, n = self.chunk_extent(i)
            self.store_chunk(i, view[offset - start:offset - start + n])
        return length

    def _record(self, run: range, checksums: list[int]) -> None:
        """Write the records of a run of chunks whose bytes are in the data file (page cache):
        the last step of storing them."""
        records = b"".join(_RECORD.pack(checksum, _PRESENT) for checksum in checksums)
        _pwrite_all(self.index_fd, memoryview(records), self.records_offset + run.start * _RECORD.size)
        for i, checksum in zip(run, checksums):
            self.sums[i] = checksum
            self.state[i] = VERIFIED

    def _begin_write(self) -> None:
        """Before any write of ours into the data file: foreign writes noticed first (our
        write's stamp would hide them), the seal removed, and the stamp check paused."""
        with self._lock:
            self._notice_foreign_writes()
            self._unseal()
            self._writing += 1
            self._writes += 1

    def _end_write(self) -> None:
        with self._lock:
            self._writing -= 1
            self._stamp = _stamp(self.data_fd)

    def _mapping(self) -> mmap.mmap:
        """The shared read-write mapping of the whole data file, made once: fills write into it,
        replies from a cache in memory are views of it. The data file never shrinks (we never
        truncate one), so no page of it is ever past the end of the file."""
        if self._map is not None:  # made once, never replaced: no lock needed to find it
            return self._map
        with self._lock:
            if self._map is None:
                self._map = _map_data(self.data_fd, self.size)
            return self._map

    def verify_chunk(self, index: int, scratch: memoryview) -> bool:
        """Check a chunk recorded by an earlier run against its checksum; forget it if bad. A
        good one stays to be checked again if a foreign write was noticed meanwhile."""
        offset, length = self.chunk_extent(index)
        view = scratch[:length]
        with self._lock:
            self._notice_foreign_writes()
            generation = self.generation
        ok = _holds(self.data_fd, view, offset, self.sums[index])
        if ok:
            with self._lock:
                self._notice_foreign_writes()
                if self.generation == generation:
                    self.state[index] = VERIFIED
        else:
            log.warning("cached chunk %d of %s failed its checksum; fetching it again", index, self.relpath)
            with self._lock:
                self._unseal()
            os.pwrite(self.index_fd, _RECORD.pack(0, 0), self.records_offset + index * _RECORD.size)
            self.state[index] = MISSING
        return ok

    def seal(self) -> bool:
        """Seal a complete entry (the module docstring says what a seal is); whether it is
        sealed now. The syncs run outside the lock; a write meanwhile, ours (counted) or
        anyone's (the stamp, or the generation a read's check moved), leaves it unsealed. A
        failed data sync: see _lost_writes."""
        with ExitStack() as held:
            with self._lock:
                if self.sealed or self.closed or self._writing or not self.cacheable or not self.complete:
                    return self.sealed
                self._notice_foreign_writes()
                writes, generation = self._writes, self.generation
                data_fd, index_fd = held.enter_context(_duplicates(self.data_fd, self.index_fd))  # close() may come
            try:
                os.fdatasync(data_fd)
            except OSError:
                self._lost_writes()
                raise
            records = os.pread(index_fd, self.nchunks * _RECORD.size, self.records_offset)
            os.fdatasync(index_fd)
            with self._lock:
                if (self.sealed or self.closed or self._writing or self._writes != writes or not self.complete
                        or self.generation != generation):
                    return self.sealed
                st = os.fstat(self.data_fd)
                if not same_content(Stamp(st.st_size, st.st_ctime_ns, st.st_mtime_ns, st.st_nlink), self._stamp):
                    return False  # written by someone else meanwhile: left to the checksums
                seal = _SEAL.pack(SEAL_MAGIC, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                  xxhash.xxh3_64_intdigest(records))
                os.pwrite(self.index_fd, seal, self.records_offset + len(records))
                self.sealed = True
                return True

    def _lost_writes(self) -> None:
        """The data file's writeback failed: pages it could not write may be dropped, and read
        back unchecked from the disk. All of it is fetched again (readers of this generation
        retry), and sealed only once synced anew (a sync reports a failure once)."""
        log.warning("writing the cache file of %s back to its disk failed: all of it is fetched again", self.relpath)
        with self._lock:
            self.generation += 1
            _demote_states(self.state, MISSING)
            os.utime(self.data_fd)  # its stamp moves: reader processes, which compare stamps, stop serving it
            self._stamp = _stamp(self.data_fd)

    def _unseal(self) -> None:
        """Called with _lock held, before any write of ours into the entry: the seal goes
        first, durably (a power loss could keep the seal and our write, not its ctime), so it
        never outlives the bytes it describes. Rare: a write into a complete file."""
        if self.sealed:
            os.ftruncate(self.index_fd, self.records_offset + self.nchunks * _RECORD.size)
            os.fdatasync(self.index_fd)
            self.sealed = False

    def read_into(self, buf: memoryview, offset: int, generation: int, nowait: bool = False) -> int | None:
        """Read cached bytes whose chunks were verified at `generation`. None if the data file
        was changed by someone else since our last write (every chunk must then pass its
        checksum again before it is served), or was found changed since that generation.
        With nowait, read only what is in the page cache (RWF_NOWAIT), possibly nothing: the
        caller's thread must never wait for a disk."""
        if not self.unchanged_since(generation):
            return None
        if not nowait:
            return _pread_all(self.data_fd, buf, offset)
        try:
            return os.preadv(self.data_fd, [buf], offset, os.RWF_NOWAIT)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EOPNOTSUPP):
                return 0
            raise

    def drop(self, start: int, end: int) -> None:
        """Let the kernel drop the data file's pages of [start, end) (dirty ones are queued for
        writeback). Any thread; through a duplicate taken under the lock, so close() cannot give
        its number away meanwhile. (fadvise reads length 0 as "to the end": none asked.)"""
        if end <= start:
            return
        with ExitStack() as held:
            with self._lock:
                if self.closed:
                    return
                (fd,) = held.enter_context(_duplicates(self.data_fd))
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)

    def view(self, offset: int, length: int, generation: int) -> memoryview | None:
        """The cached bytes as a view of the data file's mapping (no copy, no thread): only in
        memory (tmpfs), where touching it never waits for a disk. None as for read_into."""
        if not self.unchanged_since(generation):
            return None
        return self.mapped(offset, length)

    def mapped(self, offset: int, length: int) -> memoryview:
        """The range as a view of the data file's mapping, unchecked: for a caller that has
        just asked `unchanged_since` itself (a reader thread, once per reply)."""
        return memoryview(self._mapping())[offset:offset + length]

    def recheck(self) -> None:
        """Notice writes into the data file by anyone else now, before the kernel reads it."""
        with self._lock:
            self._notice_foreign_writes()

    def verified_generation(self) -> int | None:
        """The generation at which every chunk is verified, or None if some chunk is not:
        read together under the lock, so a demotion (a foreign write noticed on another
        thread) cannot fall between the two. A reader that finds `unchanged_since` it true
        may serve any range of the file without asking about its chunks."""
        with self._lock:
            self._notice_foreign_writes()
            return self.generation if self.complete else None

    def unchanged_since(self, generation: int) -> bool:
        """Whether no foreign write was noticed since `generation` (noticing one now if the
        data file's stamp moved). Safe from any thread."""
        with self._lock:
            self._notice_foreign_writes()
            return generation == self.generation

    def _notice_foreign_writes(self) -> None:
        """With _lock held (and nothing while a write of ours is in progress): if the data
        file's stamp moved, someone else wrote it, and every verified chunk is checked again."""
        if self._writing:
            return
        stamp = _stamp(self.data_fd)
        if same_content(stamp, self._stamp):
            self._stamp = stamp
            return
        log.warning("cache file of %s was modified behind fusecache's back; re-verifying it", self.relpath)
        self._stamp = stamp
        self.generation += 1
        _demote_states(self.state, ON_DISK)

    def close(self) -> None:
        with self._lock:  # drop() on a reader thread never meets a closed descriptor
            if self.closed or not self.cacheable:
                return
            self.closed = True
            if self._map is not None:
                _unmap_data(self._map, self.size)
            for fd in (self.data_fd, self.index_fd):  # each, whatever the other's close says (NFS)
                try:
                    os.close(fd)
                except OSError as e:
                    log.warning("closing a cache file of %s: %s", self.relpath, e)


def _is_own_file(fd: int) -> bool:
    """A cache file as the daemon made it: a regular file of its user, with one name. Anything
    else (a file someone planted, or linked elsewhere) is not trusted as cached bytes."""
    st = os.fstat(fd)
    own = stat_mod.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1
    if not own:
        log.warning("ignoring a cache file that fusecache did not make (inode %d, uid %d)", st.st_ino, st.st_uid)
    return own


class Stamp(NamedTuple):
    """What a write into a data file moves: its size and ctime (which no one can set back),
    and its mtime, for once the file has no name. (A tuple: taken before every reply a reader
    thread or process sends, session/queues.py, session/reader_process.py.)"""

    size: int
    ctime_ns: int
    mtime_ns: int
    nlink: int


def _stamp(fd: int) -> Stamp:
    return Stamp(*linux.stamp(fd))


def same_content(now: Stamp, before: Stamp | None) -> bool:
    """Whether nobody wrote the data file between two stamps. Replacing or evicting an entry
    unlinks its data file, which moves the ctime too; the store is the daemon user's alone
    (private.py), so a file that lost its last name lost it to us: then size and mtime tell."""
    if before is None:
        return False
    if now.nlink == 0 and before.nlink > 0:
        return (now.size, now.mtime_ns) == (before.size, before.mtime_ns)
    return (now.size, now.ctime_ns) == (before.size, before.ctime_ns)


def _reserve(fd: int, offset: int, length: int) -> bool:
    """Allocate a range of a data file's blocks; False if its filesystem cannot (the system
    call, never glibc's emulation by writes: linux.fallocate). No room raises, as a write
    would (ENOSPC, EDQUOT)."""
    try:
        linux.fallocate(fd, offset, length)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise
    return True


# The most the kernel maps around a read fault (fault_around_bytes is at most one page table,
# 2 MiB on x86-64 and arm64 with 4 KiB pages; 64 KiB by default).
FAULT_AROUND_MAX = 2 << 20


@contextmanager
def _mapped_range(mapping: mmap.mmap, start: int, length: int, margin: int = 0) -> Iterator[tuple[memoryview, int]]:
    """A view of the mapping's range and its address, unmapped from our page tables again
    afterwards, whatever happens, with `margin` bytes on either side: reading the range faults
    in neighbouring pages too (fault-around), which nothing else would unmap (writes do not
    fault around: no margin). The bytes stay in the page cache (the mapping is shared), but
    pages left mapped would count as the daemon's memory (its RSS, which the OOM killer
    weighs) and would not be dropped by fadvise, so the daemon would seem to hold every file
    it filled. A neighbour another thread is filling or hashing just faults its pages in again.
    Not an mmap and munmap per range: both take the address space's lock for writing, where
    madvise reads it, and with 16 threads filling, half of them waited there (device, issue
    20). Every view is released on the way out (mmap.close raises while one is left); the
    madvise comes first, while the view still holds the mapping there to advise."""
    with memoryview(mapping) as whole, whole[start:start + length] as target:
        base = linux.address_of(whole)
        try:
            yield target, base + start
        finally:
            low, high = max(0, start - margin), min(len(whole), start + length + margin)
            linux.madvise(base + low, high - low, linux.MADV_DONTNEED)


def _checksums(target: memoryview, lengths: list[int]) -> list[int]:
    """The checksums of consecutive chunks of these lengths at the start of target."""
    sums = []
    offset = 0
    for n in lengths:
        with target[offset:offset + n] as chunk:
            sums.append(xxhash.xxh3_64_intdigest(chunk))
        offset += n
    return sums


def _hash_mapped(mapping: mmap.mmap, start: int, lengths: list[int]) -> list[int]:
    """The checksums of consecutive chunks of these lengths from start, hashed through the
    mapping (the page cache itself: no copy). Mapped in one call first (MADV_POPULATE_READ),
    where a page that cannot be read (a reflinked copy whose disk fails) is an error, not the
    SIGBUS a fault while hashing would be; before Linux 5.14 (EINVAL) the faults do it."""
    length = sum(lengths)
    with _mapped_range(mapping, start, length, FAULT_AROUND_MAX) as (target, address):
        try:
            linux.madvise(address, length, linux.MADV_POPULATE_READ)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise OSError(errno.EIO, f"the cache file cannot be read back to be checked: {e.strerror}") from e
        return _checksums(target, lengths)


def _fill_mapped(mapping: mmap.mmap, start: int, lengths: list[int],
                 read: Callable[[memoryview], None]) -> list[int]:
    """Have `read` fill the mapping's range of consecutive chunks of these lengths from start,
    populated writable first; their checksums."""
    with _mapped_range(mapping, start, sum(lengths)) as (target, address):
        _prefault(address, len(target))
        read(target)
        return _checksums(target, lengths)


def _prefault(address: int, length: int) -> None:
    """Map a reserved range writable in one call before the source is read into it. Faulted
    in by the read's copy instead, each 4 KiB page costs a trap into the kernel (13% of the
    fill's CPU on tmpfs, docs/benchmarks.md). EFAULT: the filesystem refused to write a page
    of the range even though its blocks are reserved (Btrfs reserves room for each page's
    write again, and a full one refuses it), which a write would have reported as ENOSPC:
    raised as that, before the source is read, so the fetcher serves the range from the source
    (CacheFull) instead of failing the read. Otherwise (EINVAL: a kernel before 5.14) the
    read's own faults do the work."""
    try:
        linux.madvise(address, length, linux.MADV_POPULATE_WRITE)
    except OSError as e:
        if e.errno == errno.EFAULT:
            raise OSError(errno.ENOSPC, "the cache filesystem refused to write a reserved range") from e
        log.debug("MADV_POPULATE_WRITE: %s", e)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _pread_all(fd: int, buf: memoryview, offset: int) -> int:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def drop_reply_pages(entry: CacheEntry, offset: int, length: int) -> None:
    """Let the kernel drop a data file's pages of a range just copied into a reply: the mount's
    own page cache of the file holds those bytes now, and on a disk cache a second copy here
    would keep the model in memory twice. The range is widened back to whole DROP_ALIGN
    blocks (whole large folios), the one before it included: a folio a concurrent reply
    still held (mapped, or in a pipe) when its own drop came is dropped now, so sequential
    replies drop every folio behind them."""
    entry.drop(max(0, offset - offset % DROP_ALIGN - DROP_ALIGN), offset + length)


def in_place(entry: CacheEntry) -> bool:
    """Whether an open entry's files still have their names: the store only ever unlinks
    them (a new version's files take their place), so a named pair is the one at its path."""
    return (entry.cacheable and not entry.closed
            and all(os.fstat(fd).st_nlink for fd in (entry.data_fd, entry.index_fd)))


def uncached_entry(relpath: str, identity: Identity, chunk_size: int) -> CacheEntry:
    """A stand-in with no files, for when the cache filesystem has no room left."""
    nchunks = -(-identity.size // chunk_size)
    return CacheEntry(relpath, identity, chunk_size, -1, -1, 0, bytearray(nchunks), _no_sums(nchunks))


class CacheStore:
    """The part of a cache dir that belongs to one source tree."""

    def __init__(self, cache_dir: Path, source_root: str, trust_seals: bool = True) -> None:
        """trust_seals: serve sealed entries without checking their chunks (verify=sealed)."""
        self.cache_dir = Path(cache_dir)
        self.source_root = source_root
        self.trust_seals = trust_seals
        self.root = self.cache_dir / LAYOUT / _key(source_root)[:16]
        self.objects = self.root / "objects"
        self._lock_fd: int | None = None
        self._block_size: int | None = None  # of the cache filesystem, asked once
        # relpath -> size of every entry with an index; written by worker threads
        self._sizes: dict[str, int] = {}
        self._catalogue_lock = threading.Lock()

    def prepare(self) -> None:
        """Create the layout, or check that the one there is ours alone, and that we can write
        to it."""
        try:
            private.ensure_tree(self.cache_dir, self.objects)
            for folder in self.objects.iterdir():
                private.ensure_dir(folder)
            private.write_file(self.root / "source", (self.source_root + "\n").encode())
        except private.UntrustedPath as e:
            raise StoreError(str(e)) from None
        except OSError as e:
            raise StoreError(f"cache dir {self.cache_dir} is not writable: {e.strerror}") from None

    def lock(self, wait: float = 0.0) -> None:
        """Take the store for this process. Two daemons filling one store would race on the
        same index records, so the second refuses with the first one's pid; after waiting up
        to `wait` seconds for it to let go (a restart: the old daemon exits)."""
        fd = private.open_file(self.root / "lock", os.O_RDWR | os.O_CREAT)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreError(
                f"cache dir {self.cache_dir} is in use by another fusecache mount of "
                f"{self.source_root} (pid {holder})"
            ) from None
        self._lock_fd = fd
        self.record_owner(os.getpid())

    def release_lock(self) -> None:
        """Let go of this process's descriptor of the lock (a forked child keeps its own)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def lock_fd(self) -> int:
        """A descriptor of a regular file of ours on the cache filesystem (the lock file)."""
        assert self._lock_fd is not None
        return self._lock_fd

    def record_owner(self, pid: int) -> None:
        """Write the pid of the daemon holding the lock (it changes when the daemon detaches)."""
        assert self._lock_fd is not None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{pid}\n".encode(), 0)

    def allocation(self, nbytes: int) -> int:
        """The most nbytes written into the cache can take on its filesystem: whole blocks."""
        if self._block_size is None:
            self._block_size = os.statvfs(self.root).f_bsize or 4096
        return -(-nbytes // self._block_size) * self._block_size

    def free_bytes(self) -> int:
        """Bytes the cache filesystem has free for the daemon's user (blocking)."""
        vfs = os.statvfs(self.root)
        return vfs.f_bavail * vfs.f_frsize

    def paths(self, relpath: str) -> tuple[Path, Path]:
        key = _key(relpath)
        folder = self.objects / key[:2]
        return folder / f"{key}.data", folder / f"{key}.idx"

    def open_entry(self, relpath: str, identity: Identity, chunk_size: int) -> CacheEntry:
        """The cache entry of this version of the file: the one on disk if it matches,
        otherwise a fresh empty one that replaces it."""
        data_path, index_path = self.paths(relpath)
        entry = self._load(relpath, identity, chunk_size, data_path, index_path)
        if entry is None:
            entry = self._create(relpath, identity, chunk_size, data_path, index_path)
        else:
            self._catalogue(relpath, identity.size)
        return entry

    def _load(self, relpath: str, identity: Identity, chunk_size: int,
              data_path: Path, index_path: Path) -> CacheEntry | None:
        try:
            index_fd = os.open(index_path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:  # none, or a symlink planted where it should be
            return None
        try:
            data_fd = os.open(data_path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            os.close(index_fd)
            return None
        entry = None
        try:
            if _is_own_file(index_fd) and _is_own_file(data_fd):
                entry = self._parse_index(relpath, identity, chunk_size, data_fd, index_fd)
        except OSError as e:
            if e.errno != errno.EIO:  # an index its disk cannot read: made afresh, as a damaged one
                raise
        finally:
            if entry is None:
                os.close(index_fd)
                os.close(data_fd)
        if entry is None:
            log.info("cache entry of %s is stale or damaged; starting it afresh", relpath)
        return entry

    def _parse_index(self, relpath: str, identity: Identity, chunk_size: int,
                     data_fd: int, index_fd: int) -> CacheEntry | None:
        header = _expected_header(relpath, identity, chunk_size)
        records_offset = _records_offset(header)
        nchunks = -(-identity.size // chunk_size)
        records_end = records_offset + nchunks * _RECORD.size
        raw = os.pread(index_fd, records_end + _SEAL.size + 1, 0)
        if raw[:records_offset] != _encode_header(header) or len(raw) not in (records_end, records_end + _SEAL.size):
            return None
        stamp = _stamp(data_fd)  # before the seal is checked: a write after it is noticed, never trusted
        data = os.fstat(data_fd)
        if data.st_size != identity.size:
            return None
        records = raw[records_offset:records_end]
        state = bytearray(nchunks)
        sums = _no_sums(nchunks)
        for i, (checksum, marker) in enumerate(_RECORD.iter_unpack(records)):
            if marker == _PRESENT:
                state[i] = ON_DISK
                sums[i] = checksum
        sealed = _seal_holds(raw[records_end:], data, records) and all(state)
        if sealed and self.trust_seals:
            state = bytearray([VERIFIED]) * nchunks
        return CacheEntry(relpath, identity, chunk_size, data_fd, index_fd, records_offset, state, sums, sealed, stamp)

    def _create(self, relpath: str, identity: Identity, chunk_size: int,
                data_path: Path, index_path: Path) -> CacheEntry:
        """Replace whatever is cached for relpath by an empty entry.

        The old files are unlinked, not truncated: a handle still open on the old version of
        the file keeps reading its own bytes. The index is renamed into place last, so a crash
        part-way leaves no index and the entry is simply created again.
        """
        try:  # the folder may be new, or the cache dir removed, or made others' since the mount
            private.ensure_tree(self.cache_dir, data_path.parent)
        except private.UntrustedPath as e:
            raise StoreError(str(e)) from None
        self._catalogue(relpath, None)
        index_path.unlink(missing_ok=True)
        header = _expected_header(relpath, identity, chunk_size)
        records_offset = _records_offset(header)
        nchunks = -(-identity.size // chunk_size)

        tmp_data = data_path.with_suffix(".data.tmp")
        tmp_index = index_path.with_suffix(".idx.tmp")
        tmp_data.unlink(missing_ok=True)  # left by a crash
        tmp_index.unlink(missing_ok=True)
        data_fd = private.open_file(tmp_data, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        index_fd = -1
        try:
            os.ftruncate(data_fd, identity.size)
            os.replace(tmp_data, data_path)
            index_fd = private.open_file(tmp_index, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            os.pwrite(index_fd, _encode_header(header), 0)
            os.ftruncate(index_fd, records_offset + nchunks * _RECORD.size)
            # No fsync: an index lost or emptied by a power cut fails to parse and the entry
            # is recreated; records that outlive their data are caught by the checksum.
            os.replace(tmp_index, index_path)
            self._catalogue(relpath, identity.size)
        except BaseException:
            os.close(data_fd)
            if index_fd >= 0:
                os.close(index_fd)
            for path in (tmp_index, tmp_data, data_path):  # a data file without its index: never served
                path.unlink(missing_ok=True)
            raise
        return CacheEntry(relpath, identity, chunk_size, data_fd, index_fd, records_offset,
                          bytearray(nchunks), _no_sums(nchunks))

    def index_of(self, relpath: str) -> dict | None:
        """Size and cached bytes of relpath as last recorded, without validating it."""
        return summarize_index(self.paths(relpath)[1])

    def load(self) -> list[dict]:
        """Every file the store holds, with its size, cached bytes, allocated bytes (`disk`, data
        and index) and last use, each index read once; and the catalogue (`sizes`) filled from them. Removes entries whose index
        is damaged or of an older format on the way: they can never be served, and would hold
        their disk space forever. Only at start, before any entry is opened (entries being
        created or replaced are briefly without an index)."""
        for stray in self.root.glob("*.tmp"):  # a small file of ours whose write a crash cut short
            _remove(stray)
        held = sorted(self.objects.glob("*/*"))  # one walk of the folders (nothing else writes yet)
        present = set(held)
        for orphan in held:
            if orphan.suffix == ".tmp" or (orphan.suffix == ".data" and orphan.with_suffix(".idx") not in present):
                log.info("removing %s, left without its index by a crash or a full disk", orphan.name)
                _remove(orphan)  # never served, never counted: its space held for good
        summaries = []
        for index_path in (path for path in held if path.suffix == ".idx"):
            try:
                summary = _read_summary(index_path)
            except OSError:
                continue  # unreadable now is not proof of damage
            except Exception as e:  # one file's index must not keep the daemon from starting
                log.warning("skipping cache entry %s: %s", index_path.stem, e)
                continue
            if summary is None:
                log.info("removing unusable cache entry %s", index_path.stem)
                _remove(index_path)
                _remove(index_path.with_suffix(".data"))
            else:
                summary["disk"] = _allocated_at(index_path) + _allocated_at(index_path.with_suffix(".data"))
                summaries.append(summary)
        with self._catalogue_lock:
            self._sizes = {summary["path"]: summary["size"] for summary in summaries}
        return summaries

    def sizes(self) -> dict[str, int]:
        """Size of each file the store holds (the catalogue): kept in memory from `load` on, so
        that listing a store of any size reads no file."""
        with self._catalogue_lock:
            return dict(self._sizes)

    def size_of(self, relpath: str) -> int | None:
        """The size of relpath's cached version, if the store holds one (from the catalogue)."""
        with self._catalogue_lock:
            return self._sizes.get(relpath)

    def _catalogue(self, relpath: str, size: int | None) -> None:
        with self._catalogue_lock:
            if size is None:
                self._sizes.pop(relpath, None)
            else:
                self._sizes[relpath] = size

    def touch(self, relpath: str, when: float) -> None:
        """Record a use of relpath (the index's mtime orders eviction across restarts)."""
        try:
            os.utime(self.paths(relpath)[1], (when, when))
        except FileNotFoundError:
            pass

    def remove(self, relpath: str) -> None:
        """Evict relpath: index first, so a crash half-way leaves no index over missing data."""
        data_path, index_path = self.paths(relpath)
        self._catalogue(relpath, None)
        index_path.unlink(missing_ok=True)
        data_path.unlink(missing_ok=True)

    def load_pins(self) -> set[str]:
        try:
            pins = json.loads(private.read_file(self.root / "pins.json", MAX_PINS_FILE))
        except FileNotFoundError:
            return set()
        except (ValueError, RecursionError, OSError) as e:  # RecursionError: nested past any of ours
            log.warning("ignoring unreadable %s: %s", self.root / "pins.json", e)
            return set()
        return {p for p in pins if isinstance(p, str)} if isinstance(pins, list) else set()

    @staticmethod
    def encode_pins(pins: set[str]) -> bytes:
        """The pins as saved; ValueError where a restart could not read them back whole (more
        than MAX_PINS_FILE: it read the start, found it malformed and dropped every pin)."""
        data = json.dumps(sorted(pins)).encode()
        if len(data) > MAX_PINS_FILE:
            raise ValueError(f"the pins would take {len(data)} bytes, more than the {MAX_PINS_FILE} a restart "
                             "reads: pin the directories above them instead")
        return data

    def save_pins(self, pins: set[str]) -> None:
        """Save the pins (ValueError: see encode_pins), durable before they replace the last
        set: after a power cut, the old set or the new, never an empty file (every pin lost)."""
        private.write_file(self.root / "pins.json", self.encode_pins(pins), durable=True)


def _remove(path: Path) -> None:
    """Unlink path, a file of the store; anything else found there (a directory) is logged and
    left: one entry must not keep the daemon from starting."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("cannot remove %s from the cache: %s", path, e.strerror or e)


def _seal_holds(seal: bytes, data: os.stat_result, records: bytes) -> bool:
    """Whether the seal after an index's records still describes its data file as it is now
    (the same inode, never written since) and these very records."""
    if len(seal) != _SEAL.size:
        return False
    magic, ino, size, mtime_ns, ctime_ns, records_sum = _SEAL.unpack(seal)
    return (magic == SEAL_MAGIC and (ino, size, mtime_ns, ctime_ns) == (data.st_ino, data.st_size,
                                                                       data.st_mtime_ns, data.st_ctime_ns)
            and records_sum == xxhash.xxh3_64_intdigest(records))


def _no_sums(nchunks: int) -> array:
    return array("Q", bytes(8 * nchunks))


def _expected_header(relpath: str, identity: Identity, chunk_size: int) -> dict:
    return {"path": relpath, "size": identity.size, "mtime_ns": identity.mtime_ns,
            "ino": identity.ino, "ctime_ns": identity.ctime_ns, "chunk_size": chunk_size,
            "checksum": CHECKSUM}


def _encode_header(header: dict) -> bytes:
    body = json.dumps(header, sort_keys=True, ensure_ascii=True).encode()
    raw = _HEADER_PREFIX.pack(INDEX_MAGIC, len(body)) + body
    return raw + bytes(-len(raw) % _PAGE)


def _records_offset(header: dict) -> int:
    return len(_encode_header(header))


def summarize_index(index_path: Path) -> dict | None:
    """Header fields plus cached byte count of one index file, for status listings; None if
    it cannot be read now (vanished, being replaced) or is not a usable index."""
    try:
        return _read_summary(index_path)
    except OSError:
        return None


def allocated(st: os.stat_result) -> int:
    """Bytes of the cache filesystem a file takes: its allocated blocks (st_blocks counts
    512-byte units whatever the filesystem's block size), not its length."""
    return st.st_blocks * 512


def _allocated_at(path: Path) -> int:
    try:
        return allocated(os.lstat(path))
    except FileNotFoundError:
        return 0


def _read_summary(index_path: Path) -> dict | None:
    """The summary of an index; None if the file is not a usable index (damaged, or of an
    older format). An OSError means it could not be read: that says nothing about it."""
    fd = os.open(index_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        f = open(fd, "rb")
    except BaseException:  # a directory planted under an index's name (EISDIR): open() keeps the fd
        os.close(fd)
        raise
    with f:
        raw = f.read()
        last_used = os.fstat(fd).st_mtime
    try:
        magic, length = _HEADER_PREFIX.unpack_from(raw)
        header = json.loads(raw[_HEADER_PREFIX.size:_HEADER_PREFIX.size + length])
        path, chunk_size, size = header["path"], header["chunk_size"], header["size"]
        # what the budget counts: the index's own name says which path it is (an index put in
        # another's place could otherwise claim any size, and evict the whole cache)
        if (not isinstance(path, str) or _key(path) != index_path.stem or type(size) is not int or size < 0
                or type(chunk_size) is not int or chunk_size <= 0):
            return None
        nchunks = -(-size // chunk_size)
        records = raw[len(_encode_header(header)):]
        if len(records) == nchunks * _RECORD.size + _SEAL.size:
            records = records[:nchunks * _RECORD.size]
        if (magic != INDEX_MAGIC or header.get("checksum") != CHECKSUM or not isinstance(path, str)
                or len(records) != nchunks * _RECORD.size):
            return None
        cached = sum(min(chunk_size, size - i * chunk_size)
                     for i, (_checksum, marker) in enumerate(_RECORD.iter_unpack(records)) if marker == _PRESENT)
    except (ValueError, KeyError, TypeError, ZeroDivisionError, struct.error):
        return None
    return {"path": path, "size": size, "cached": cached, "last_used": last_used}

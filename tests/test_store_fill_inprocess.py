"""Filling a run of chunks straight into the cache data file (CacheEntry.fill_run), in process.

What it proves: bytes read into the shared mapping and their records round-trip through a
restart, and a seal over them holds; no room at the reservation surfaces as ENOSPC before a
byte is read, with nothing recorded; a cache filesystem that cannot reserve space falls back
to the buffered writes, for that entry from then on; a source that changed during the read
leaves the run's chunks missing and unrecorded, and no view of the mapping behind; a
fill leaves none of its pages mapped into the daemon, even when it fails. The
reservation's failures are injected (os.posix_fallocate raising): what is tested is our
handling of them, not the kernel's.
"""

from __future__ import annotations

import errno
import os

import pytest

from fusecache.source import SourceChanged
from fusecache.store import MISSING, ON_DISK, VERIFIED, CacheEntry, CacheStore

from .test_store_inprocess import CHUNK, SIZE, V1, reopen, served, store  # noqa: F401 - store is a fixture

NO_SCRATCH = memoryview(bytearray(0))  # a fill that needs the buffered path fails on it


def reader_of(data: bytes, entry: CacheEntry, run: range, calls: list[int]):
    """A read function for run that copies data's bytes of it, as the source would."""
    start, length = entry.run_extent(run)

    def read(target: memoryview) -> None:
        assert len(target) == length
        calls.append(start)
        target[:] = data[start:start + length]
    return read


def test_a_mapped_fill_round_trips_through_a_restart_and_can_be_sealed(store):
    data = os.urandom(SIZE)
    entry = store.open_entry("f", V1, CHUNK)
    calls: list[int] = []
    for run in (range(0, 2), range(2, 4)):  # the second run ends with the short chunk
        assert entry.fill_run(run, reader_of(data, entry, run, calls), NO_SCRATCH) == entry.run_extent(run)[1]
    assert calls == [0, 2 * CHUNK] and list(entry.state) == [VERIFIED] * 4
    assert entry.seal()
    entry.close()
    assert entry._map is not None and entry._map.closed  # no view of it was left behind

    again = reopen(store)
    assert again.sealed and served(again) == data
    checked = reopen(store, trust=False)
    assert list(checked.state) == [ON_DISK] * 4 and served(checked) == data  # every checksum holds


def _failing_fallocate(code: int, calls: list[tuple[int, int]]):
    def fallocate(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        raise OSError(code, os.strerror(code))
    return fallocate


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_no_room_at_the_reservation_raises_before_reading_and_records_nothing(store, monkeypatch, code):
    data = os.urandom(SIZE)
    entry = store.open_entry("f", V1, CHUNK)
    reservations: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fallocate", _failing_fallocate(code, reservations))
    reads: list[int] = []
    with pytest.raises(OSError) as failure:
        entry.fill_run(range(0, 4), reader_of(data, entry, range(0, 4), reads), NO_SCRATCH)
    assert failure.value.errno == code  # what the fetcher turns into CacheFull
    assert reservations == [(0, SIZE)] and reads == [] and list(entry.state) == [MISSING] * 4
    monkeypatch.undo()
    # the entry is still usable once there is room: the failed fill left no write in progress
    assert entry.fill_run(range(0, 4), reader_of(data, entry, range(0, 4), reads), NO_SCRATCH) == SIZE
    assert entry.seal()
    entry.close()
    assert served(reopen(store)) == data


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.EINVAL])
def test_a_cache_filesystem_that_cannot_reserve_falls_back_to_writes(store, monkeypatch, code):
    data = os.urandom(SIZE)
    entry = store.open_entry("f", V1, CHUNK)
    reservations: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fallocate", _failing_fallocate(code, reservations))
    scratch = memoryview(bytearray(2 * CHUNK))
    reads: list[int] = []
    for run in (range(0, 2), range(2, 4)):
        entry.fill_run(run, reader_of(data, entry, run, reads), scratch)
    assert reservations == [(0, 2 * CHUNK)]  # asked once; the entry remembers the answer
    assert reads == [0, 2 * CHUNK] and list(entry.state) == [VERIFIED] * 4
    assert entry._map is None  # never mapped: the bytes went through scratch
    entry.close()
    assert served(reopen(store, trust=False)) == data


def test_a_source_changed_during_the_read_leaves_the_run_missing_and_unrecorded(store):
    data = os.urandom(SIZE)
    entry = store.open_entry("f", V1, CHUNK)
    entry.fill_run(range(0, 1), reader_of(data, entry, range(0, 1), []), NO_SCRATCH)

    def changed(target: memoryview) -> None:
        target[:] = bytes(len(target))  # bytes of another version reach the file...
        raise SourceChanged("f")  # ...and the source says so only afterwards
    with pytest.raises(SourceChanged) as failure:
        entry.fill_run(range(1, 4), changed, NO_SCRATCH)
    assert list(entry.state) == [VERIFIED, MISSING, MISSING, MISSING]
    assert not entry.seal()
    kept = failure.value  # the fetcher keeps it on the flight, traceback and all
    entry.close()
    assert entry._map.closed and kept is not None  # the mapping had no view left to hold it
    assert list(reopen(store).state) == [ON_DISK, MISSING, MISSING, MISSING]


def mapped_kib(path: str) -> int:
    """Resident KiB of this process's mappings of the file at path (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = line.rstrip("\n").endswith(" " + path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_a_fill_leaves_none_of_its_pages_mapped_into_the_daemon(store):
    """Pages left in the fill's mapping would count as the daemon's memory (RSS, what the OOM
    killer weighs) and stay out of reach of fadvise: the daemon would seem to hold every file
    it filled. The bytes stay in the page cache: the mapping is shared."""
    data = os.urandom(SIZE)
    entry = store.open_entry("f", V1, CHUNK)
    data_path = str(store.paths("f")[0])
    copy = reader_of(data, entry, range(0, 2), [])
    while_filled: list[int] = []

    def read(target: memoryview) -> None:
        copy(target)
        while_filled.append(mapped_kib(data_path))
    entry.fill_run(range(0, 2), read, NO_SCRATCH)
    assert while_filled[0] >= 2 * CHUNK // 1024 and mapped_kib(data_path) == 0  # mapped while filled, then not

    def changed(target: memoryview) -> None:
        target[:] = data[2 * CHUNK:]
        raise SourceChanged("f")
    with pytest.raises(SourceChanged):
        entry.fill_run(range(2, 4), changed, NO_SCRATCH)
    assert mapped_kib(data_path) == 0  # nor after a failed fill
    buf = bytearray(2 * CHUNK)
    assert entry.read_into(memoryview(buf), 0, entry.generation) == len(buf) and buf == data[:2 * CHUNK]
    entry.close()

"""Sealed cache entries (issue 20): a complete entry is sealed once durable, and a restart
trusts it without reading it only while the seal still describes its data file and records.
Anything else (a byte flipped, a file replaced, records changed, a write of ours after the
seal, verify=always) falls back to checking every chunk, and no wrong byte is served."""

from __future__ import annotations

import os
import shutil

import pytest

from fusecache.source import Identity
from fusecache.store import _SEAL, MISSING, ON_DISK, VERIFIED, CacheEntry, CacheStore

from .inprocess import damage

CHUNK = 64 * 1024
SIZE = 3 * CHUNK + 1000
V1 = Identity(SIZE, mtime_ns=1_000, ino=7, ctime_ns=2_000)


@pytest.fixture
def store(tmp_path):
    store = CacheStore(tmp_path / "cache", "/source/root")
    store.prepare()
    return store


def complete_entry(store: CacheStore, data: bytes, seal: bool = True) -> None:
    entry = store.open_entry("f", V1, CHUNK)
    for i in range(entry.nchunks):
        offset, length = entry.chunk_extent(i)
        entry.store_chunk(i, memoryview(data)[offset:offset + length])
    if seal:
        assert entry.seal() and entry.sealed
    entry.close()


def reopen(store: CacheStore, trust: bool = True) -> CacheEntry:
    return CacheStore(store.cache_dir, store.source_root, trust_seals=trust).open_entry("f", V1, CHUNK)


def served(entry: CacheEntry) -> bytes:
    """What a reader gets once every chunk is verified (checking those that are not)."""
    scratch = memoryview(bytearray(CHUNK))
    for i in range(entry.nchunks):
        if entry.state[i] == ON_DISK:
            entry.verify_chunk(i, scratch)
    assert all(s == VERIFIED for s in entry.state), list(entry.state)
    buf = bytearray(entry.size)
    assert entry.read_into(memoryview(buf), 0, entry.generation) == entry.size
    return bytes(buf)


def test_a_sealed_entry_is_served_after_a_restart_without_reading_it(store):
    data = os.urandom(SIZE)
    complete_entry(store, data)
    again = reopen(store)
    assert again.sealed and again.complete  # no chunk to check
    assert store.index_of("f")["cached"] == SIZE
    assert served(again) == data
    assert list(reopen(store, trust=False).state) == [ON_DISK] * 4  # verify=always


def test_an_incomplete_entry_is_not_sealed(store):
    entry = store.open_entry("f", V1, CHUNK)
    entry.store_chunk(0, memoryview(os.urandom(CHUNK)))
    assert not entry.seal() and not entry.sealed
    entry.close()
    assert list(reopen(store).state) == [ON_DISK, MISSING, MISSING, MISSING]


def test_a_byte_flipped_while_unmounted_is_never_served(store):
    data = os.urandom(SIZE)
    complete_entry(store, data)
    damage(store, "f", CHUNK + 10)  # a write moves the data file's ctime: the seal no longer holds
    again = reopen(store)
    assert not again.sealed and list(again.state) == [ON_DISK] * 4
    scratch = memoryview(bytearray(CHUNK))
    assert [again.verify_chunk(i, scratch) for i in range(4)] == [True, False, True, True]


def test_a_data_file_replaced_under_its_seal_is_checked(store):
    data = os.urandom(SIZE)
    complete_entry(store, data)
    data_path, _ = store.paths("f")
    shutil.copy2(data_path, str(data_path) + ".new")  # same bytes, size and mtime: another inode
    os.replace(str(data_path) + ".new", data_path)
    again = reopen(store)
    assert not again.sealed and list(again.state) == [ON_DISK] * 4
    assert served(again) == data


def test_records_changed_under_a_seal_are_checked(store):
    data = os.urandom(SIZE)
    complete_entry(store, data)
    _, index_path = store.paths("f")
    raw = bytearray(index_path.read_bytes())
    records_end = len(raw) - _SEAL.size
    raw[records_end - 16] ^= 0x01  # the last record's checksum: the seal's sum of the records differs
    index_path.write_bytes(raw)
    again = reopen(store)
    assert not again.sealed and list(again.state) == [ON_DISK] * 4


def test_a_write_of_ours_removes_the_seal_first(store):
    data = os.urandom(SIZE)
    complete_entry(store, data)
    entry = reopen(store)
    assert entry.sealed
    entry.store_chunk(1, memoryview(data)[CHUNK:2 * CHUNK])  # e.g. a chunk fetched again
    assert not entry.sealed
    entry.close()
    again = reopen(store)
    assert not again.sealed and list(again.state) == [ON_DISK] * 4
    assert served(again) == data


def test_an_unsealed_index_of_an_older_daemon_still_loads(store):
    data = os.urandom(SIZE)
    complete_entry(store, data, seal=False)
    again = reopen(store)
    assert not again.sealed and list(again.state) == [ON_DISK] * 4
    assert served(again) == data
    assert store.index_of("f")["cached"] == SIZE
